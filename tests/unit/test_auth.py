"""Scopes on the service API (``payorders.service.auth``): every ``/v1`` route but the
webhooks declares its scopes, OpenAPI shows them, and the dependency answers 401/403 by the
rules. In process (httpx's ASGI transport), no server: the real app is built without its
lifespan, so no request reaches Temporal or PostgreSQL."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts

from payorders.core.settings import Settings
from payorders.core.tokens import Caller, Scope, TokenBook, TokenSpec
from payorders.service import auth
from payorders.service.app import SIGNED_ROUTES, create_app
from payorders.service.errors import ApiError
from payorders.service.metrics import RequestMetrics

CHECKOUT = "tok-checkout-" + "c" * 24
READ = "tok-read-" + "r" * 24
ADMIN = "tok-admin-" + "a" * 24
SECRET = "whsec_" + "s" * 30

# Who may call what (DESIGN.md "Who may do what"); admin may call every one.
ROUTE_SCOPES = {
    ("POST", "/v1/pay-orders"): (Scope.CHECKOUT,),
    ("GET", "/v1/pay-orders/{pay_order_no}"): (Scope.CHECKOUT, Scope.READ),
    ("POST", "/v1/pay-orders/{pay_order_no}/cancel"): (Scope.CHECKOUT,),
    ("POST", "/v1/operator-refunds"): (Scope.REFUND,),
    ("GET", "/v1/operator-refunds/{txn_id}"): (Scope.READ, Scope.REFUND),
    ("GET", "/v1/events"): (Scope.READ,),
    ("POST", "/v1/pay-orders/{pay_order_no}/refunds"): (Scope.REFUND,),
    ("GET", "/v1/pay-orders/{pay_order_no}/refunds"): (Scope.READ, Scope.REFUND),
    ("GET", "/v1/pay-orders/{pay_order_no}/refunds/{refund_no}"): (Scope.READ, Scope.REFUND),
}


def tokens(**named: tuple[str, Scope]) -> list[dict[str, Any]]:
    return [{"name": n, "scopes": [s.value], "token": t} for n, (t, s) in named.items()]


def service_app(**settings: Any) -> FastAPI:
    values: dict[str, Any] = {
        "webhook_secrets": [SECRET],
        "api_tokens": tokens(shop=(CHECKOUT, Scope.CHECKOUT), ops=(ADMIN, Scope.ADMIN)),
    }
    return create_app(Settings(**{**values, **settings}))


def test_every_v1_route_but_the_webhooks_declares_its_scopes() -> None:
    """The rule that makes a forgotten scope a failure: a route added under /v1 without
    ``requires`` fails here (and ``create_app`` refuses to build the app)."""
    found: dict[tuple[str, str], tuple[Scope, ...] | None] = {}
    # As served: FastAPI (0.137+) keeps an included router whole in app.routes.
    for route in iter_route_contexts(service_app().routes):
        if isinstance(route.original_route, APIRoute) and route.path.startswith("/v1/"):
            for method in route.methods:
                found[(method, route.path)] = auth.scopes_of(route)
    open_routes = {k: v for k, v in found.items() if v is None}
    assert set(open_routes) == {("POST", path) for path in SIGNED_ROUTES}
    assert {k: v for k, v in found.items() if v is not None} == ROUTE_SCOPES


def test_an_app_with_a_v1_route_without_scopes_is_refused() -> None:
    app = FastAPI()

    @app.get("/v1/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    @app.get("/v1/guarded", dependencies=[auth.requires(Scope.READ)])
    async def guarded() -> dict[str, str]:
        return {}

    @app.post("/v1/webhooks/gateway")
    async def signed() -> dict[str, str]:
        return {}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {}

    assert auth.unguarded(app.routes, public=["/v1/webhooks/gateway"]) == ["GET /v1/forgotten"]
    with pytest.raises(RuntimeError, match="GET /v1/forgotten"):
        auth.guard(app.routes, public=["/v1/webhooks/gateway"])


def test_an_included_routers_route_without_scopes_is_refused_too() -> None:
    router = APIRouter()

    @router.get("/v1/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(router)
    with pytest.raises(RuntimeError, match="GET /v1/forgotten"):
        auth.guard(app.routes, public=())


def test_an_included_router_says_its_scopes_when_its_routes_are_scoped_routes() -> None:
    """The app serves copies of an included router's routes, made before ``guard`` runs: a
    router says its routes' scopes only as ``ScopedRoute``s, and one that does not is
    refused rather than served without them in its OpenAPI."""
    scoped, plain = APIRouter(route_class=auth.ScopedRoute), APIRouter()

    @scoped.get("/v1/scoped", dependencies=[auth.requires(Scope.READ)])
    async def read_scoped() -> dict[str, str]:
        """Scoped."""
        return {}

    @plain.get("/v1/plain", dependencies=[auth.requires(Scope.READ)])
    async def read_plain() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(scoped)
    auth.guard(app.routes, public=())
    op = app.openapi()["paths"]["/v1/scoped"]["get"]
    assert op["description"] == "Scoped.\n\nScopes: `read` or `admin`."
    assert {"401", "403"} <= set(op["responses"])
    app.include_router(plain)
    with pytest.raises(RuntimeError, match="GET /v1/plain"):
        auth.guard(app.routes, public=())


def test_openapi_names_each_operations_scopes_and_says_them_in_its_description() -> None:
    spec = service_app().openapi()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for (method, path), scopes in ROUTE_SCOPES.items():
        op = spec["paths"][path][method.lower()]
        listed = [*scopes, Scope.ADMIN]
        assert op["security"] == [{"HTTPBearer": [s.value for s in listed]}], path
        quoted = [f"`{s.value}`" for s in listed]
        assert f"Scopes: {', '.join(quoted[:-1])} or {quoted[-1]}." in op["description"]
        assert {"401", "403"} <= set(op["responses"]), path
    for path in (*SIGNED_ROUTES, "/healthz", "/readyz"):
        for op in spec["paths"][path].values():
            assert "security" not in op, path


def test_a_route_needing_admin_alone_says_so() -> None:
    app = FastAPI()

    @app.get("/v1/admin", dependencies=[auth.requires(Scope.ADMIN)])
    async def admin_only() -> dict[str, str]:
        """Admin only."""
        return {}

    auth.guard(app.routes, public=())
    op = app.openapi()["paths"]["/v1/admin"]["get"]
    assert op["security"] == [{"HTTPBearer": ["admin"]}]
    assert op["description"].endswith("Scope: `admin`.")


def _toy() -> FastAPI:
    """One route needing refund, answering with the caller's name, behind the real app's
    metrics middleware (its access log)."""
    app = FastAPI()
    app.state.token_book = TokenBook(
        [
            TokenSpec(name="shop", scopes=frozenset({Scope.CHECKOUT}), token=CHECKOUT),
            TokenSpec(name="reader", scopes=frozenset({Scope.READ}), token=READ),
            TokenSpec(name="ops", scopes=frozenset({Scope.ADMIN}), token=ADMIN),
        ]
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"code": exc.code}, status_code=exc.status)

    @app.get("/v1/refunds")
    async def refunds(caller: Annotated[Caller, auth.requires(Scope.REFUND)]) -> dict[str, str]:
        return {"name": caller.name}

    app.add_middleware(RequestMetrics, routes=app.router.routes, webhook_route="/none")
    return app


async def _get(app: FastAPI, headers: list[tuple[str, str]]) -> httpx.Response:
    # The real app's error shape and its WWW-Authenticate come from its handler.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        return await http.get("/v1/events", headers=headers)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Authorization", "Bearer tok-unknown-" + "u" * 24)],
        [("Authorization", "Bearer ")],
        [("Authorization", "Bearer")],
        [("Authorization", "Basic eHl6Onh5eg==")],
        [("Authorization", f"Bearer {ADMIN} {CHECKOUT}")],
        [("Authorization", f"Bearer {ADMIN}"), ("Authorization", f"Bearer {ADMIN}")],
        [("Authorization", f"bearer{ADMIN}")],
    ],
    ids=["none", "unknown", "empty", "scheme-alone", "basic", "two-in-one", "twice", "no-space"],
)
async def test_no_valid_token_is_one_401_whatever_was_wrong(headers: list[tuple[str, str]]) -> None:
    resp = await _get(service_app(), headers)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert resp.json() == {
        "error": {"code": "unauthorized", "message": "a valid bearer token is required"}
    }


async def test_a_known_token_without_the_scope_is_a_403_naming_the_scope() -> None:
    resp = await _get(service_app(), [("Authorization", f"Bearer {CHECKOUT}")])
    assert resp.status_code == 403
    assert resp.json() == {
        "error": {"code": "forbidden", "message": "this route needs the scope read (or admin)"}
    }
    assert "WWW-Authenticate" not in resp.headers


async def test_the_caller_is_the_tokens_name_and_the_access_log_names_it_never_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="payorders.access")
    app = _toy()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        admin = await http.get("/v1/refunds", headers={"Authorization": f"Bearer {ADMIN}"})
        reader = await http.get("/v1/refunds", headers={"Authorization": f"Bearer {READ}"})
        nobody = await http.get("/v1/refunds")
    assert (admin.status_code, admin.json()) == (200, {"name": "ops"})
    assert reader.status_code == 403 and nobody.status_code == 401
    access = [r.getMessage() for r in caplog.records if r.name == "payorders.access"]
    assert access == ["GET /v1/refunds -> 200 by ops", "GET /v1/refunds -> 403 by reader"]
    for token in (ADMIN, READ):
        assert token not in caplog.text


def test_the_deprecated_single_token_warns_once_at_start_and_never_shows_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    legacy = "tok-legacy-" + "l" * 24
    caplog.set_level(logging.WARNING)
    app = service_app(api_tokens=[], api_token=legacy)
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 1 and "PAYORDERS_API_TOKENS" in warned[0]
    assert legacy not in caplog.text
    assert app.state.token_book.identify(legacy) == Caller("api-token", frozenset({Scope.ADMIN}))
    caplog.clear()
    service_app()
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]

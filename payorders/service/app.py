"""The service API (FastAPI): the app, assembled from one router per resource.

Every ``/v1`` route but the webhooks needs a bearer token holding one of its scopes
(``payorders.service.auth``; ``admin`` may do everything). Each resource is a package of
its router (``endpoints``) and what it takes and answers (``schemas``):

- ``pay_orders``: ``POST /v1/pay-orders`` and ``POST /v1/pay-orders/{no}/cancel``:
  ``checkout``; ``GET /v1/pay-orders/{no}``: ``checkout`` or ``read``.
- ``operator_refunds``: ``POST /v1/operator-refunds``: ``refund``;
  ``GET /v1/operator-refunds/{txn_id}``: ``read`` or ``refund`` (an operator refunds money
  captured for a pay order we never had).
- ``webhooks``: ``POST /v1/webhooks/gateway``, ``/v1/webhooks/stripe``,
  ``/v1/webhooks/alipay`` and ``/v1/webhooks/wechatpay``,
  authenticated by their signature instead. Each answers 2xx only once Temporal has
  accepted the payment, 4xx for what must never be retried, and 503 while Temporal (or the
  gateway, to verify against) cannot be reached.
- ``events``: ``GET /v1/events`` (``read``), the order events' pull feed.
- ``system``: ``/healthz`` (liveness), ``/readyz`` (ready only when Temporal and PostgreSQL
  answer) and ``/metrics`` (Prometheus's), without a token.

Beneath them: ``deps`` (what a route depends on), ``http`` (the error answer, the body
limit) and ``auth``. Another resource is one more such package, its router an
``APIRouter(route_class=auth.ScopedRoute)``, and one more ``include_router`` here:
``guard`` refuses to build the app while one of its ``/v1`` routes declares no scope.

Run with ``uvicorn --factory payorders.service.app:app``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from payorders import logs
from payorders import pay_orders as payorders_api
from payorders.core import secrets
from payorders.core.settings import Settings
from payorders.core.tokens import Caller
from payorders.pay_orders import PayOrders
from payorders.runtime import database_url, open_resources, settings_or_exit
from payorders.service import metrics as api_metrics
from payorders.service import system
from payorders.service.auth import guard
from payorders.service.deps import Deps
from payorders.service.errors import ApiError
from payorders.service.events import endpoints as events
from payorders.service.events import feed
from payorders.service.http import BodyLimit, error_response
from payorders.service.operator_refunds import endpoints as operator_refunds
from payorders.service.pay_orders import endpoints as pay_orders
from payorders.service.refunds import endpoints as refunds
from payorders.service.webhooks import endpoints as webhooks

log = logging.getLogger("payorders.pay_orders")


# --- what the exception handlers say --------------------------------------------------------


def _problem(error: Any) -> str:
    """One validation error as ``field: rule``; our validators' messages name their field."""
    loc = [str(part) for part in error.get("loc", ())]
    field = ".".join(loc[1:] if len(loc) > 1 and loc[0] in _LOC_SOURCES else loc) or "request"
    if error.get("type") == "json_invalid":
        return f"body: not valid JSON ({(error.get('ctx') or {}).get('error', 'decode error')})"
    cause = (error.get("ctx") or {}).get("error")
    rule = str(cause) if error.get("type") == "value_error" and cause else str(error.get("msg"))
    return rule if rule.startswith(field) else f"{field}: {rule}"


_LOC_SOURCES = ("body", "query", "path", "header", "cookie")


def _by(request: Request) -> str:
    """`` by <token name>`` for the log line of a request made with a known token."""
    caller: Caller | None = getattr(request.state, "caller", None)
    return "" if caller is None else f" by {caller.name}"


# --- the app ---------------------------------------------------------------------------------

# The routes that prove themselves by a signature instead of a bearer token.
SIGNED_ROUTES = (
    webhooks.WEBHOOK_ROUTE,
    webhooks.STRIPE_WEBHOOK_ROUTE,
    webhooks.ALIPAY_WEBHOOK_ROUTE,
    webhooks.WECHATPAY_WEBHOOK_ROUTE,
)


def create_app(settings: Settings) -> FastAPI:
    """The service API.

    Raises:
        SecretRefused: no API token, or a weak one (``secrets.token_book``).
        RuntimeError: a ``/v1`` route declares no scope, or an included router's route
            does not say its scopes in its OpenAPI (``auth.guard``).
    """
    token_book = secrets.token_book(settings)
    if settings.api_token is not None:
        log.warning(
            "PAYORDERS_API_TOKEN is deprecated, use PAYORDERS_API_TOKENS: it is taken as one"
            " token named api-token with the scope admin"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_resources(settings, database_url(settings)) as res:
            client = await payorders_api.connect(settings, service=True)
            app.state.deps = Deps(
                settings=settings,
                client=client,
                store=res.store,
                gateway=res.gateway,
                orders=PayOrders(client, res.store, settings),
            )
            app.state.event_feed = feed.EventFeed(res.pool)
            yield

    app = FastAPI(
        title="payorders",
        version="1",
        summary="Pay orders safe against the expiry/payment race",
        lifespan=lifespan,
    )
    app.state.token_book = token_book
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # Added last, so outermost: it also times and counts what BodyLimit refuses.
    app.add_middleware(
        api_metrics.RequestMetrics, routes=app.router.routes, webhook_route=webhooks.WEBHOOK_ROUTE
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        api_metrics.note_error(request.scope, exc.code)
        if exc.status < 500:
            log.info(
                "%s %s -> %d %s%s",
                request.method,
                request.url.path,
                exc.status,
                exc.code,
                _by(request),
            )
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        log.info("%s %s -> 422 invalid_request%s", request.method, request.url.path, _by(request))
        api_metrics.note_error(request.scope, "invalid_request")
        message = "; ".join(_problem(e) for e in exc.errors()) or "the request is not valid"
        return error_response(422, "invalid_request", message, details=errors)

    app.include_router(pay_orders.router)
    app.include_router(webhooks.router)
    app.include_router(operator_refunds.router)
    app.include_router(refunds.router)
    app.include_router(events.router)
    app.include_router(system.router)

    guard(app.routes, public=SIGNED_ROUTES)
    return app


def app() -> FastAPI:
    """Factory for ``uvicorn --factory payorders.service.app:app``."""
    logs.configure(logging.WARNING)  # expected faults in one line, tracebacks for bugs
    # The access log, one line per request with a token: who (its name) did what.
    logging.getLogger("payorders.access").setLevel(logging.INFO)
    return create_app(settings_or_exit("api"))

"""Bearer tokens with scopes on the service API (DESIGN.md, "Who may do what").

Every route under ``/v1`` but the webhooks (which prove themselves by their signature)
declares the scopes it needs with ``requires``, a FastAPI ``Security`` dependency, so its
OpenAPI operation carries them (``security: [{"HTTPBearer": ["checkout", "admin"]}]``).
``guard`` runs once the app has its routes: it refuses to build an app with a ``/v1`` route
that declares none, and writes each route's scopes into its description and answers.

FastAPI (0.137 and later) includes a router lazily: the app's ``routes`` hold the router,
not copies of its routes, and the copies it serves are made from the router's routes the
first time they are needed. So ``guard`` walks the routes the app serves
(``fastapi.routing.iter_route_contexts``), and a router's routes say their scopes as they
are made (``APIRouter(route_class=ScopedRoute)``), before any copy of them exists.

- No token, a malformed ``Authorization`` header (not ``Bearer <token>``, or given twice)
  or a token we do not know: 401 ``unauthorized``, one answer for every case (it never
  says whether a token exists).
- A known token without the scope: 403 ``forbidden``, naming the scopes the route needs.

The caller (the token's name and scopes, never the token) goes on ``request.state.caller``
and to the metrics middleware, whose access log line names it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute

from payorders.core.tokens import Caller, Scope, TokenBook
from payorders.service import metrics as api_metrics
from payorders.service.errors import ApiError

UNAUTHORIZED = "a valid bearer token is required"

_bearer = HTTPBearer(
    auto_error=False,
    description="an API token of PAYORDERS_API_TOKENS; each operation lists the scopes that"
    " may call it (`admin` may call every one)",
)


def _needs(scopes: tuple[Scope, ...]) -> str:
    """``checkout or read (or admin)``: what a 403 says."""
    named = " or ".join(scopes)
    return named if Scope.ADMIN in scopes else f"{named} (or admin)"


def _with_admin(scopes: tuple[Scope, ...]) -> tuple[Scope, ...]:
    """The scopes that may call a route needing ``scopes``: ``admin`` among them."""
    return scopes if Scope.ADMIN in scopes else (*scopes, Scope.ADMIN)


def _listed(scopes: tuple[Scope, ...]) -> str:
    """``Scopes: `checkout`, `read` or `admin`.``: what a route's description says."""
    quoted = [f"`{s}`" for s in _with_admin(scopes)]
    if len(quoted) == 1:
        return f"Scope: {quoted[0]}."
    return f"Scopes: {', '.join(quoted[:-1])} or {quoted[-1]}."


class Requires:
    """The dependency behind ``requires``: who calls, and whether they may."""

    def __init__(self, scopes: tuple[Scope, ...]) -> None:
        self.scopes = scopes
        self.allowed = frozenset(scopes)
        self.forbidden = f"this route needs the scope {_needs(scopes)}"

    async def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Caller:
        book: TokenBook = request.app.state.token_book
        caller = None
        # Two Authorization headers are no answer to "who is this": refused like none.
        if credentials is not None and len(request.headers.getlist("authorization")) == 1:
            caller = book.identify(credentials.credentials)
        if caller is None:
            raise ApiError(401, "unauthorized", UNAUTHORIZED)
        request.state.caller = caller
        api_metrics.note_caller(request.scope, caller.name)
        if not caller.may(self.allowed):
            raise ApiError(403, "forbidden", self.forbidden)
        return caller


def requires(*scopes: Scope) -> Any:
    """A ``Security`` dependency: the request needs a token holding one of ``scopes``
    (``admin`` holds them all). Its value is the ``Caller``; use it as a route's
    ``dependencies=[requires(...)]`` or as a parameter, ``Annotated[Caller, requires(...)]``.
    """
    if not scopes:
        raise ValueError("requires: name at least one scope")
    return Security(Requires(scopes), scopes=[s.value for s in _with_admin(scopes)])


def scopes_of(route: APIRoute | RouteContext) -> tuple[Scope, ...] | None:
    """The scopes a route requires (through ``requires``), or None when it requires none."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if isinstance(dependant.call, Requires):
            return dependant.call.scopes
        pending.extend(dependant.dependencies)
    return None


def api_routes(routes: Iterable[BaseRoute]) -> list[RouteContext]:
    """Every path operation ``routes`` serve, included routers' too: each as FastAPI serves
    it (its ``path``, ``methods``, ``dependant``, ``description`` and ``responses``)."""
    return [r for r in iter_route_contexts(list(routes)) if isinstance(r.original_route, APIRoute)]


def unguarded(routes: Iterable[BaseRoute], *, public: Collection[str]) -> list[str]:
    """``METHOD path`` of every ``/v1`` route that requires no scope and is not ``public``."""
    return [
        f"{','.join(sorted(route.methods or ()))} {route.path}"
        for route in api_routes(routes)
        if route.path is not None
        and route.path.startswith("/v1/")
        and route.path not in public
        and scopes_of(route) is None
    ]


def describe(route: APIRoute) -> None:
    """Say the scopes ``route`` requires in its OpenAPI description and answers (401, 403);
    nothing for a route that requires none. Once is enough: again changes nothing."""
    needed = scopes_of(route)
    if needed is None:
        return
    line = _listed(needed)
    if line not in route.description:
        route.description = f"{route.description}\n\n{line}".strip()
    route.responses.setdefault(401, {"description": f"unauthorized: {UNAUTHORIZED}"})
    route.responses.setdefault(
        403, {"description": f"forbidden: the token does not hold {_needs(needed)}"}
    )


class ScopedRoute(APIRoute):
    """The route class of a router whose routes need scopes: each says them (``describe``)
    as it is made, since the app serves copies of an included router's routes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        describe(self)


def guard(routes: Iterable[BaseRoute], *, public: Collection[str]) -> None:
    """Say each route's scopes in its OpenAPI description and answers (401, 403).

    Raises:
        RuntimeError: a ``/v1`` route, not one of ``public``, requires no scope: every
            route must say who may call it; or an included router's route requires scopes
            its OpenAPI does not say: declare that router with
            ``APIRouter(route_class=ScopedRoute)``.
    """
    routes = list(routes)
    missing = unguarded(routes, public=public)
    if missing:
        raise RuntimeError(
            f"routes without a scope: {', '.join(missing)}; declare one with"
            " dependencies=[auth.requires(Scope...)]"
        )
    for route in routes:
        if isinstance(route, APIRoute):  # the app's own: served as it is
            describe(route)
    unsaid = [
        f"{','.join(sorted(route.methods or ()))} {route.path}"
        for route in api_routes(routes)
        if (needed := scopes_of(route)) is not None
        and (_listed(needed) not in route.description or not {401, 403} <= set(route.responses))
    ]
    if unsaid:
        raise RuntimeError(
            f"routes that do not say their scopes: {', '.join(unsaid)}; include them from an"
            " APIRouter(route_class=auth.ScopedRoute)"
        )

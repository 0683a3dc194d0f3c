"""Bearer tokens with scopes on the service API (DESIGN.md, "Who may do what").

Every route under ``/v1`` but the webhooks (which prove themselves by their signature)
declares the scopes it needs with ``requires``, a FastAPI ``Security`` dependency, so its
OpenAPI operation carries them (``security: [{"HTTPBearer": ["checkout", "admin"]}]``).
``guard`` runs once the app has its routes: it refuses to build an app with a ``/v1`` route
that declares none, and writes each route's scopes into its description and answers.

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
from fastapi.routing import APIRoute
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


def scopes_of(route: APIRoute) -> tuple[Scope, ...] | None:
    """The scopes a route requires (through ``requires``), or None when it requires none."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if isinstance(dependant.call, Requires):
            return dependant.call.scopes
        pending.extend(dependant.dependencies)
    return None


def unguarded(routes: Iterable[BaseRoute], *, public: Collection[str]) -> list[str]:
    """``METHOD path`` of every ``/v1`` route that requires no scope and is not ``public``."""
    return [
        f"{','.join(sorted(route.methods or ()))} {route.path}"
        for route in routes
        if isinstance(route, APIRoute)
        and route.path.startswith("/v1/")
        and route.path not in public
        and scopes_of(route) is None
    ]


def guard(routes: Iterable[BaseRoute], *, public: Collection[str]) -> None:
    """Say each route's scopes in its OpenAPI description and answers (401, 403).

    Raises:
        RuntimeError: a ``/v1`` route, not one of ``public``, requires no scope: every
            route must say who may call it.
    """
    routes = list(routes)
    missing = unguarded(routes, public=public)
    if missing:
        raise RuntimeError(
            f"routes without a scope: {', '.join(missing)}; declare one with"
            " dependencies=[auth.requires(Scope...)]"
        )
    for route in routes:
        needed = scopes_of(route) if isinstance(route, APIRoute) else None
        if not isinstance(route, APIRoute) or needed is None:
            continue
        line = _listed(needed)
        if line not in route.description:
            route.description = f"{route.description}\n\n{line}".strip()
        route.responses.setdefault(401, {"description": f"unauthorized: {UNAUTHORIZED}"})
        route.responses.setdefault(
            403, {"description": f"forbidden: the token does not hold {_needs(needed)}"}
        )

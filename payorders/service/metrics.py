"""Prometheus metrics of the service API, on the default registry (served at ``/metrics``
beside the gateway client's ``payorders_gateway_*``).

- ``payorders_api_requests_total{method,route,status}`` and
  ``payorders_api_request_duration_seconds{method,route}``, recorded by ``RequestMetrics``.
  ``route`` is the route template (``/v1/pay-orders/{pay_order_no}``), never the raw path,
  and ``unmatched`` for paths no route matches; ``method`` is ``other`` for verbs we do not
  serve. Requests to ``/metrics`` itself are not recorded, so scrapes add no noise.
- ``payorders_api_webhook_rejections_total{reason}``: every ``POST /v1/webhooks/gateway``
  answered with an error. ``reason`` is the JSON error ``code`` of the answer, except for
  ``webhook_rejected`` (signature and payload checks), which is split into
  ``WEBHOOK_CHECK_REASONS``; an error without a code is ``internal_error`` (5xx) or
  ``http_<status>``.
- ``payorders_api_webhooks_accepted_total``: every webhook answered 2xx, duplicates included.

The application tells the middleware why it refused a request by ``note_error`` (and
``note_webhook_reason``), and who made it by ``note_caller``, which write into the ASGI
scope that the middleware shares.

The access log: one line per request that presented a known token, at INFO on the logger
``payorders.access``: ``METHOD path -> status by <token name>`` (never the token). Off, it
costs a dict lookup and a level check per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Final

from fastapi.routing import iter_route_contexts
from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payorders.service import webhook

UNMATCHED: Final = "unmatched"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# The finer reasons of the JSON code ``webhook_rejected`` (see ``webhook_check_reason``).
WEBHOOK_CHECK_REASONS: Final = (
    "missing_signature",
    "malformed_signature",
    "stale_timestamp",
    "bad_signature",
    "malformed_body",
    "invalid_event",
)
# The JSON error codes a webhook can be refused with after the checks above.
WEBHOOK_ERROR_CODES: Final = (
    "unsupported_media_type",
    "too_large",
    "invalid_request",
    "unknown_transaction",
    "mismatch",
    "unknown_pay_order",
    "gateway_unavailable",
    "temporal_unavailable",
    "internal_error",
)

REQUESTS = Counter(
    "payorders_api_requests_total",
    "HTTP requests to the service API by method, route template and status",
    ["method", "route", "status"],
)
DURATION = Histogram(
    "payorders_api_request_duration_seconds",
    "Time the service API took to answer, by method and route template",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
WEBHOOK_REJECTIONS = Counter(
    "payorders_api_webhook_rejections_total",
    "Gateway webhooks the adapter refused, by reason",
    ["reason"],
)
WEBHOOKS_ACCEPTED = Counter(
    "payorders_api_webhooks_accepted_total",
    "Gateway webhooks the adapter accepted (2xx), duplicates included",
)
for _reason in (*WEBHOOK_CHECK_REASONS, *WEBHOOK_ERROR_CODES):
    WEBHOOK_REJECTIONS.labels(_reason)

_ERROR_CODE: Final = "payorders.error_code"
_WEBHOOK_REASON: Final = "payorders.webhook_reason"
_CALLER: Final = "payorders.caller"

access_log = logging.getLogger("payorders.access")


def note_error(scope: Scope, code: str) -> None:
    """Record the JSON error ``code`` the request is being answered with."""
    scope[_ERROR_CODE] = code


def note_caller(scope: Scope, name: str) -> None:
    """Record the name of the token the request was made with (for the access log)."""
    scope[_CALLER] = name


def note_webhook_reason(scope: Scope, reason: str) -> None:
    """Record a finer reason than the error code, for the webhook rejection metric."""
    scope[_WEBHOOK_REASON] = reason


def webhook_check_reason(e: webhook.WebhookRejected) -> str:
    """One of ``WEBHOOK_CHECK_REASONS`` for a refusal by ``webhook.verify`` or
    ``webhook.parse_payment_event``."""
    return e.code


def route_of(scope: Scope, routes: Iterable[BaseRoute]) -> str:
    """The template of the route that served (or would serve) the request."""
    route = scope.get("route")
    if route is None:  # answered before routing (e.g. 413 by BodyLimit), or no route
        # Each route as served: an included router's too (FastAPI 0.137+ keeps it whole).
        for candidate in iter_route_contexts(list(routes)):
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                route = candidate
                break
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestMetrics:
    """Pure ASGI middleware: time every HTTP request and count it by method, route template
    and status; count the webhook adapter's answers. Add it last, so it is outermost and sees
    what BodyLimit refuses too."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Iterable[BaseRoute],
        webhook_route: str,
        exclude: Iterable[str] = ("/metrics",),
    ) -> None:
        self.app = app
        self.routes = routes
        self.webhook_route = webhook_route
        self.exclude = frozenset(exclude)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless the app starts a response: an exception escaped it
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        caller = scope.get(_CALLER)
        if caller is not None and access_log.isEnabledFor(logging.INFO):
            access_log.info("%s %s -> %d by %s", scope.get("method"), scope["path"], status, caller)
        route = route_of(scope, self.routes)
        if route in self.exclude:
            return
        method = str(scope.get("method", ""))
        method = method if method in METHODS else "other"
        REQUESTS.labels(method, route, str(status)).inc()
        DURATION.labels(method, route).observe(elapsed)
        if route != self.webhook_route or method != "POST":
            return
        if status < 400:
            WEBHOOKS_ACCEPTED.inc()
            return
        reason = scope.get(_WEBHOOK_REASON) or scope.get(_ERROR_CODE)
        if not reason:
            reason = "internal_error" if status >= 500 else f"http_{status}"
        WEBHOOK_REJECTIONS.labels(str(reason)).inc()

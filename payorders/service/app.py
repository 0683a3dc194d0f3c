"""The service API (FastAPI): checkout, reads, and the gateway webhook adapter.

Every ``/v1`` route but the webhooks needs a bearer token holding one of its scopes
(``payorders.service.auth``; ``admin`` may do everything):

- ``POST /v1/pay-orders`` and ``POST /v1/pay-orders/{no}/cancel``: ``checkout``;
  ``GET /v1/pay-orders/{no}``: ``checkout`` or ``read``.
- ``POST /v1/operator-refunds``: ``refund``; ``GET /v1/operator-refunds/{txn_id}``: ``read``
  or ``refund`` (an operator refunds money captured for a pay order we never had).
- ``POST /v1/webhooks/gateway`` is authenticated by its signature instead. It answers 2xx
  only once Temporal has accepted the payment, 4xx for what must never be retried, and
  503 while Temporal (or the gateway, to verify against) cannot be reached.
- ``GET /v1/events`` (``read``) is the order events' pull feed (``service.events``).
- ``/healthz`` is liveness; ``/readyz`` is ready only when Temporal and PostgreSQL answer.
- ``/metrics`` is Prometheus's (no token; see ``payorders.service.metrics``).

Run with ``uvicorn --factory payorders.service.app:app``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from payorders import logs
from payorders import pay_orders as payorders_api
from payorders.core import domain, secrets
from payorders.core.domain import RefundStatus
from payorders.core.models import OperatorRefund
from payorders.core.settings import Settings
from payorders.core.store import NotRefundable
from payorders.core.tokens import Caller, Scope
from payorders.gateways.port import Capture, Gateway, GatewayError
from payorders.pay_orders import (
    CancelPending,
    CheckoutPending,
    PayOrderConflict,
    PayOrders,
    UnknownPayOrder,
    UnknownTransaction,
)
from payorders.runtime import database_url, open_resources, settings_or_exit
from payorders.service import metrics as api_metrics
from payorders.service import stripe_webhook, webhook
from payorders.service.auth import guard, requires
from payorders.service.deps import Deps, DepsDep, call_temporal, require_json
from payorders.service.errors import ApiError
from payorders.service.events import feed
from payorders.service.http import BodyLimit, error_response

log = logging.getLogger("payorders.pay_orders")

PAY_ORDER_NO = r"^po_[A-Za-z0-9_-]{1,64}$"
WEBHOOK_ROUTE = "/v1/webhooks/gateway"
STRIPE_WEBHOOK_ROUTE = "/v1/webhooks/stripe"


# --- request and response models ---------------------------------------------------------


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


def _currency(value: str) -> str:
    return domain.check_currency(value)


Currency = Annotated[
    str,
    AfterValidator(_currency),
    Field(json_schema_extra={"enum": sorted(domain.CURRENCIES)}, examples=["USD"]),
]


def _iso_time(value: object) -> object:
    # Only ISO 8601 text: pydantic alone would also take 1700000000 (or "1700000000") as
    # Unix seconds, and a bare date as midnight. The zone and range rules are the domain's.
    if value is None or isinstance(value, datetime):
        return value
    try:
        if isinstance(value, str) and ("T" in value or " " in value.strip()):
            return datetime.fromisoformat(value)
    except ValueError:
        pass
    raise ValueError("expires_at must be an ISO 8601 date and time, e.g. 2026-11-27T11:00:00Z")


class CreatePayOrderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_no: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", examples=["order-42"])
    amount: StrictInt = Field(gt=0, le=domain.MAX_AMOUNT, description="minor units, e.g. 1999")
    currency: Currency
    expires_in_s: StrictInt | None = Field(
        default=None,
        gt=0,
        le=int(domain.MAX_EXPIRES_IN.total_seconds()),
        description="payment window in seconds; at most one of this and expires_at"
        " (neither: the service's default, 1 h)",
    )
    expires_at: Annotated[datetime | None, BeforeValidator(_iso_time)] = Field(
        default=None,
        description="the deadline, ISO 8601 with a time zone, in the future and at most"
        " 7 days away; at most one of this and expires_in_s",
        examples=["2026-11-27T11:00:00Z"],
    )


class PayOrderOut(BaseModel):
    pay_order_no: str
    order_no: str
    amount: int
    currency: str
    expires_at: datetime
    created: bool
    checkout: dict[str, str] | None = Field(
        description="what the front end needs to let the customer pay, the same for every"
        " retry: `gateway`, and for Stripe `payment_intent` and `client_secret` (confirm the"
        " PaymentIntent with Stripe.js); for the sandbox `trade_no` and `pay_url`. Null when"
        " the pay order can no longer be paid (`not_payable` says why)",
        examples=[
            {"gateway": "stripe", "payment_intent": "pi_123", "client_secret": "pi_123_secret_456"}
        ],
    )
    not_payable: str | None = None


class PaymentOut(BaseModel):
    txn_id: str
    amount: int
    currency: str
    paid_at: datetime
    settled: bool
    refund_reason: str | None
    refund_key: str | None
    refund_status: str | None
    refund_attempts: int | None


class FundOut(BaseModel):
    holds: bool
    expected_net: int
    net: int
    in_flight: int


class PayOrderDetailsOut(BaseModel):
    pay_order_no: str
    order_no: str
    amount: int
    currency: str
    status: str
    reason: str | None = Field(
        description="why it closed unpaid (PAY_EXPIRED only): EXPIRED (its payment window ran"
        " out) or CANCELLED (checkout cancelled it); null while PAYING and on PAY_SUCCESS"
    )
    cancel_requested_by: str | None = Field(
        default=None,
        description="the name of the API token (never the token) of the first caller that"
        " asked to cancel it while it was PAYING, whatever the outcome; null when nobody did",
    )
    expires_at: datetime
    paid_amount: int
    refunded_amount: int
    lock_version: int
    gateway: str | None = Field(description="the gateway that opened the pay order's trade")
    trade_ref: str | None = Field(
        description="the gateway's id of the trade (Stripe: the PaymentIntent)"
    )
    payments: list[PaymentOut]
    fund_identity: FundOut
    workflow_status: str | None
    workflow: dict[str, Any] | None = Field(
        default=None, description="the open workflow's own view (query status)"
    )


class WebhookAccepted(BaseModel):
    received: bool
    outcome: str
    event_duplicate: bool = Field(
        description="this webhook event (its id) was accepted before: answered with its"
        " first outcome, nothing sent again"
    )
    txn_already_recorded: bool = Field(
        description="the pay order had already recorded a payment with this txn_id when the"
        " notification arrived: its workflow counts it as a duplicate notification and"
        " nothing moves (false while an earlier notification of it is still being handled)"
    )
    duplicate: bool = Field(deprecated=True, description="the same as event_duplicate")


def _signed_body(header: str) -> dict[str, Any]:
    """OpenAPI of a webhook route: its signature header and a raw JSON body, read as bytes
    (the signature covers the exact bytes, so no model parses it first)."""
    return {
        "parameters": [
            {"in": "header", "name": header, "required": True, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    }


def _by(request: Request) -> str:
    """`` by <token name>`` for the log line of a request made with a known token."""
    caller: Caller | None = getattr(request.state, "caller", None)
    return "" if caller is None else f" by {caller.name}"


# --- the app ---------------------------------------------------------------------------------

# The routes that prove themselves by a signature instead of a bearer token.
SIGNED_ROUTES = (WEBHOOK_ROUTE, STRIPE_WEBHOOK_ROUTE)


def create_app(settings: Settings) -> FastAPI:
    """The service API.

    Raises:
        SecretRefused: no API token, or a weak one (``secrets.token_book``).
        RuntimeError: a ``/v1`` route declares no scope (``auth.guard``).
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
        api_metrics.RequestMetrics, routes=app.router.routes, webhook_route=WEBHOOK_ROUTE
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

    @app.post(
        "/v1/pay-orders",
        response_model=PayOrderOut,
        status_code=201,
        # The token first: a caller without one learns nothing else about the request.
        dependencies=[requires(Scope.CHECKOUT), Depends(require_json)],
        responses={
            200: {"model": PayOrderOut, "description": "the existing pay order"},
            409: {"description": "the order has a pay order for another amount"},
            503: {
                "description": "Temporal cannot be reached, or the gateway has not opened the"
                " trade yet: retry the same request"
            },
        },
    )
    async def create_pay_order(body: CreatePayOrderRequest, deps: DepsDep) -> JSONResponse:
        """Checkout: create the pay order of an order, expiring at ``expires_at`` or
        ``expires_in_s`` from now (at most one; neither: the default window). The same
        request again returns the same pay order (200); another amount or currency for the
        order is a 409."""
        expires_in = None if body.expires_in_s is None else timedelta(seconds=body.expires_in_s)
        now = datetime.now(UTC)
        try:
            # Judged here, so that the messages use this API's field names.
            expires_at = domain.pay_order_deadline(
                now=now,
                default=deps.settings.default_expires_in,
                expires_at=body.expires_at,
                expires_in=expires_in,
                window_field="expires_in_s",
            )
            started = await call_temporal(
                lambda: deps.orders.start_pay_order(
                    order_no=body.order_no,
                    amount=body.amount,
                    currency=body.currency,
                    expires_at=expires_at,
                    now=now,
                )
            )
        except domain.InvalidInput as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        except PayOrderConflict as e:
            raise ApiError(409, "conflict", str(e)) from None
        except CheckoutPending as e:
            raise ApiError(503, "checkout_pending", str(e)) from None
        c = started.checkout
        out = PayOrderOut(
            pay_order_no=started.pay_order_no,
            order_no=started.order_no,
            amount=started.amount,
            currency=started.currency,
            expires_at=started.expires_at,
            created=started.created,
            checkout=None if c is None else {"gateway": c.gateway, **c.details},
            not_payable=started.not_payable,
        )
        return JSONResponse(
            out.model_dump(mode="json"), status_code=201 if started.created else 200
        )

    @app.get(
        "/v1/pay-orders/{pay_order_no}",
        response_model=PayOrderDetailsOut,
        dependencies=[requires(Scope.CHECKOUT, Scope.READ)],
    )
    async def get_pay_order(
        pay_order_no: Annotated[str, Path(pattern=PAY_ORDER_NO)], deps: DepsDep
    ) -> PayOrderDetailsOut:
        """The pay order with its payments, refunds and whether the fund identity holds."""
        try:
            d = await deps.orders.get_pay_order(pay_order_no)
        except UnknownPayOrder:
            raise ApiError(404, "not_found", f"no pay order {pay_order_no}") from None
        row = d.row
        return PayOrderDetailsOut(
            **row.model_dump(exclude={"created_at", "updated_at", "status", "close_reason"}),
            status=row.status.value,
            reason=None if row.close_reason is None else row.close_reason.value,
            payments=[
                PaymentOut(
                    txn_id=p["txn_id"],
                    amount=p["amount"],
                    currency=p["currency"].strip(),
                    paid_at=p["paid_at"],
                    settled=p["settled"],
                    refund_reason=p["refund_reason"],
                    refund_key=p["refund_key"],
                    refund_status=p["refund_status"],
                    refund_attempts=p["attempts"],
                )
                for p in d.payments
            ],
            fund_identity=FundOut(**asdict(d.fund)),
            workflow_status=d.workflow_status,
            workflow=None
            if d.view is None
            else d.view.model_dump(mode="json", exclude={"payments"}),
        )

    @app.post(
        WEBHOOK_ROUTE,
        response_model=WebhookAccepted,
        dependencies=[Depends(require_json)],
        openapi_extra=_signed_body(webhook.HEADER),
        responses={401: {"description": "bad signature"}, 503: {"description": "retry later"}},
    )
    async def gateway_webhook(request: Request, deps: DepsDep) -> WebhookAccepted:
        """The gateway adapter: verify, deduplicate, then hand the payment to its workflow."""
        body = await request.body()
        try:
            webhook.verify(
                request.headers.get(webhook.HEADER),
                body,
                secrets=[s.get_secret_value() for s in deps.settings.webhook_secrets],
                now=datetime.now(UTC),
                tolerance_s=deps.settings.webhook_tolerance_s,
            )
            event = webhook.parse_payment_event(body)
        except webhook.WebhookRejected as e:
            log.warning("webhook rejected: %s", e.reason)
            api_metrics.note_webhook_reason(request.scope, api_metrics.webhook_check_reason(e))
            raise ApiError(e.status, "webhook_rejected", e.reason) from None
        return await _accept_payment(deps, event)

    @app.post(
        STRIPE_WEBHOOK_ROUTE,
        response_model=WebhookAccepted,
        openapi_extra=_signed_body(stripe_webhook.HEADER),
        responses={401: {"description": "bad signature"}, 503: {"description": "retry later"}},
    )
    async def stripe_webhook_route(request: Request, deps: DepsDep) -> WebhookAccepted:
        """Stripe's webhook endpoint: verified with the Stripe SDK; ``payment_intent.succeeded``
        is handed to its pay order like any gateway's payment; other types change nothing."""
        if deps.settings.gateway != "stripe":
            raise ApiError(404, "not_found", "this service does not use the Stripe gateway")
        body = await request.body()
        try:
            event = stripe_webhook.read_event(
                body,
                request.headers.get(stripe_webhook.HEADER),
                secrets=[s.get_secret_value() for s in deps.settings.stripe_webhook_secret],
                tolerance_s=deps.settings.webhook_tolerance_s,
            )
        except webhook.WebhookRejected as e:
            log.warning("stripe webhook rejected: %s", e.reason)
            api_metrics.note_webhook_reason(request.scope, api_metrics.webhook_check_reason(e))
            raise ApiError(e.status, "webhook_rejected", e.reason) from None
        if isinstance(event, stripe_webhook.IgnoredEvent):
            log.info("stripe webhook %s: %s ignored", event.event_id, event.type)
            return _accepted("IGNORED", event_duplicate=False, txn_known=False)
        return await _accept_payment(deps, event, STRIPE_FIELDS)

    _operator_refund_routes(app)
    _cancel_route(app)
    feed.add_routes(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus exposition of the default registry (``payorders_api_*``,
        ``payorders_gateway_*``, the process); not itself counted in the request metrics."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", responses={503: {"description": "not ready"}})
    async def readyz(deps: DepsDep) -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            await deps.store.ping()
            checks["postgres"] = "ok"
        except Exception as e:
            checks["postgres"] = type(e).__name__
        try:
            await deps.client.service_client.check_health(timeout=timedelta(seconds=2))
            checks["temporal"] = "ok"
        except Exception as e:
            checks["temporal"] = type(e).__name__
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    guard(app.routes, public=SIGNED_ROUTES)
    return app


SANDBOX_FIELDS = ("data.pay_order_no", "data.amount", "data.currency")
STRIPE_FIELDS = (
    "data.object.metadata.pay_order_no",
    "data.object.amount_received",
    "data.object.currency",
)


async def _accept_payment(
    deps: Deps, event: webhook.PaymentEvent, fields: tuple[str, str, str] = SANDBOX_FIELDS
) -> WebhookAccepted:
    """Deduplicate by event id, check against the gateway, then signal the pay order (or
    start its late refund): the same path for every gateway's notification."""
    seen, txn_known = await deps.store.webhook_seen(
        event.event_id, pay_order_no=event.pay_order_no, txn_id=event.txn_id
    )
    if seen is not None:
        return _accepted(seen, event_duplicate=True, txn_known=txn_known)
    capture = await _verify_with_gateway(deps.gateway, event, fields)
    try:
        outcome = await call_temporal(
            lambda: deps.orders.notify_payment(
                pay_order_no=event.pay_order_no,
                txn_id=event.txn_id,
                amount=event.amount,
                currency=event.currency,
                paid_at=capture.captured_at,
            )
        )
    except UnknownPayOrder:
        log.warning("webhook %s for unknown pay order %s", event.event_id, event.pay_order_no)
        raise ApiError(404, "unknown_pay_order", f"no pay order {event.pay_order_no}") from None
    await deps.store.record_webhook(
        event.event_id,
        pay_order_no=event.pay_order_no,
        txn_id=event.txn_id,
        outcome=outcome.value,
    )
    return _accepted(outcome.value, event_duplicate=False, txn_known=txn_known)


def _accepted(outcome: str, *, event_duplicate: bool, txn_known: bool) -> WebhookAccepted:
    return WebhookAccepted(
        received=True,
        outcome=outcome,
        event_duplicate=event_duplicate,
        txn_already_recorded=txn_known,
        duplicate=event_duplicate,
    )


async def _verify_with_gateway(
    gateway: Gateway, event: webhook.PaymentEvent, fields: tuple[str, str, str]
) -> Capture:
    """Believe a notification only as far as the gateway's own record of the capture.

    A signed notification that disagrees with the gateway is refused (nothing changes);
    one that agrees with the gateway but not with the order is real money: the workflow
    records it and refunds it.
    """
    try:
        capture = await gateway.query_capture(event.txn_id)
    except GatewayError as e:
        log.warning("cannot verify webhook %s with the gateway: %s", event.event_id, e)
        raise ApiError(503, "gateway_unavailable", "cannot verify with the gateway; retry") from e
    if capture is None:
        log.warning("webhook %s: gateway has no transaction %s", event.event_id, event.txn_id)
        raise ApiError(
            422,
            "unknown_transaction",
            f"data.txn_id {event.txn_id}: the gateway has no such transaction",
        )
    differ = [
        name
        for name, ours, theirs in zip(
            fields,
            (event.pay_order_no, event.amount, event.currency),
            (capture.pay_order_no, capture.amount, capture.currency),
            strict=True,
        )
        if ours != theirs
    ]
    if differ:
        log.warning("webhook %s does not match the gateway's capture", event.event_id)
        raise ApiError(
            422,
            "mismatch",
            f"{', '.join(differ)}: the notification must match the gateway's record of"
            f" transaction {event.txn_id}",
        )
    return capture


# --- checkout cancels ------------------------------------------------------------------------


class CancelOut(BaseModel):
    pay_order_no: str
    status: str = Field(
        description="the terminal status, PAY_EXPIRED or PAY_SUCCESS (PAYING only when an"
        " operator terminated its workflow: reconciliation re-drives it to expiry)"
    )
    reason: str | None = Field(
        description="CANCELLED when a cancel closed it unpaid, EXPIRED when its payment window"
        " had run out first; null on PAY_SUCCESS"
    )
    closed: bool = Field(
        description="this call closed the pay order (PAY_EXPIRED/CANCELLED, or PAY_SUCCESS"
        " when the gateway answered the close with an earlier payment); false when it was"
        " closed already: a repeated cancel, a payment, the timer"
    )


async def require_no_body(request: Request) -> None:
    """A cancel carries nothing to say: no body, or an empty JSON object."""
    raw = await request.body()
    if not raw.strip():
        return
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ApiError(422, "invalid_request", "body: not valid JSON") from None
    if doc != {} or not isinstance(doc, dict):
        raise ApiError(422, "invalid_request", "body: a cancel takes no fields; send no body or {}")


def _cancel_route(app: FastAPI) -> None:
    """``POST /v1/pay-orders/{pay_order_no}/cancel`` (``checkout``)."""

    @app.post(
        "/v1/pay-orders/{pay_order_no}/cancel",
        response_model=CancelOut,
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": {"type": "object", "maxProperties": 0}}},
            }
        },
        responses={
            404: {"description": "no such pay order"},
            422: {"description": "a body other than none or {}"},
            503: {
                "description": "Temporal cannot be reached, or the gateway has not closed the"
                " trade yet: the cancel stands; retry the same request"
            },
        },
    )
    async def cancel_pay_order(
        # The token first: a caller without one learns nothing else about the request.
        caller: Annotated[Caller, requires(Scope.CHECKOUT)],
        _no_body: Annotated[None, Depends(require_no_body)],
        pay_order_no: Annotated[str, Path(pattern=PAY_ORDER_NO)],
        deps: DepsDep,
    ) -> CancelOut:
        """Checkout cancels a pay order: its workflow closes it now, by the expiry's path
        (the trade is closed at the gateway first). Answered once the outcome is durable:
        ``PAY_EXPIRED`` with reason ``CANCELLED``, or ``PAY_SUCCESS`` when the gateway says
        the customer had paid already. A repeat, or a cancel of a closed order, answers the
        current status with ``closed`` false and changes nothing. The first caller to ask
        while the order is ``PAYING`` is kept as its ``cancel_requested_by``."""
        try:
            result = await call_temporal(
                lambda: deps.orders.cancel_pay_order(pay_order_no, requested_by=caller.name)
            )
        except UnknownPayOrder:
            raise ApiError(404, "not_found", f"no pay order {pay_order_no}") from None
        except CancelPending as e:
            raise ApiError(503, "cancel_pending", str(e)) from None
        log.info(
            "cancel %s: %s%s (%s) by %s",
            pay_order_no,
            result.status.value,
            f"/{result.close_reason.value}" if result.close_reason else "",
            "closed now" if result.closed else "closed before",
            caller.name,
        )
        return CancelOut(
            pay_order_no=result.pay_order_no,
            status=result.status.value,
            reason=None if result.close_reason is None else result.close_reason.value,
            closed=result.closed,
        )


# --- operator refunds ------------------------------------------------------------------------

TXN_ID = r"^[A-Za-z0-9_-]{1,64}$"

OPERATOR_REFUNDS = Counter(
    "payorders_api_operator_refunds_total",
    "operator refund requests by outcome: opened, existing (asked before: nothing moved),"
    " or why it was refused",
    ["outcome"],
)


class OperatorRefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    txn_id: str = Field(pattern=TXN_ID, description="the gateway's transaction id")


class OperatorRefundOut(BaseModel):
    txn_id: str
    pay_order_no: str = Field(description="the capture's pay order number at the gateway")
    refund_key: str
    amount: int
    currency: str
    captured_at: datetime
    status: str = Field(description="PENDING until the gateway confirms; SUCCEEDED or REJECTED")
    attempts: int
    gateway_refund_id: str | None
    last_error: str | None
    created_at: datetime
    succeeded_at: datetime | None
    created: bool | None = Field(
        default=None, description="on POST: false when this transaction was asked for before"
    )
    requested_by: str | None = Field(
        default=None,
        description="the name of the API token (never the token) that asked for it; null for"
        " refunds asked for before names were recorded",
    )
    workflow_id: str


def _operator_refund_out(refund: OperatorRefund, created: bool | None = None) -> OperatorRefundOut:
    return OperatorRefundOut(
        **refund.model_dump(include=set(OperatorRefundOut.model_fields) - {"status", "currency"}),
        status=refund.status.value,
        currency=refund.currency.strip(),
        created=created,
        workflow_id=payorders_api.operator_refund_workflow_id(refund.txn_id),
    )


def _operator_refund_routes(app: FastAPI) -> None:
    """``POST /v1/operator-refunds`` (``refund``) and ``GET /v1/operator-refunds/{txn_id}``
    (``read`` or ``refund``)."""

    @app.post(
        "/v1/operator-refunds",
        response_model=OperatorRefundOut,
        status_code=202,
        responses={
            200: {"model": OperatorRefundOut, "description": "already confirmed or rejected"},
            404: {"description": "the gateway has no such transaction"},
            409: {"description": "a pay order here settles or refunds it: refused"},
            503: {"description": "the gateway or Temporal cannot be reached; retry"},
        },
    )
    async def create_operator_refund(
        caller: Annotated[Caller, requires(Scope.REFUND)],
        _json: Annotated[None, Depends(require_json)],
        body: OperatorRefundRequest,
        deps: DepsDep,
    ) -> JSONResponse:
        """An operator refunds money the gateway captured for a pay order we never had
        (reconciliation's ``money_without_order``). Amount, currency and pay order come from
        the gateway's capture. 202 while the refund runs, 200 once it is confirmed or
        rejected; the same request again answers with the same refund and refunds nothing
        twice. Refused, with nothing moved, for a transaction a pay order here settled or
        refunds (409), or that the gateway does not know (404)."""
        try:
            started = await call_temporal(
                lambda: deps.orders.refund_orphan_payment(
                    body.txn_id, gateway=deps.gateway, requested_by=caller.name
                )
            )
        except UnknownTransaction as e:
            OPERATOR_REFUNDS.labels("unknown_transaction").inc()
            raise ApiError(404, "unknown_transaction", str(e)) from None
        except NotRefundable as e:
            OPERATOR_REFUNDS.labels(e.refusal.value).inc()
            raise ApiError(409, e.refusal.value, str(e)) from None
        except GatewayError as e:
            log.warning("operator refund of %s: gateway unavailable: %s", body.txn_id, e)
            raise ApiError(
                503, "gateway_unavailable", "cannot ask the gateway for its capture; retry"
            ) from e
        OPERATOR_REFUNDS.labels("opened" if started.created else "existing").inc()
        log.info(
            "operator refund %s: %s (%s) by %s",
            started.refund.refund_key,
            started.refund.status.value,
            "opened" if started.created else "asked before",
            caller.name,
        )
        out = _operator_refund_out(started.refund, started.created)
        pending = started.refund.status is RefundStatus.PENDING
        return JSONResponse(out.model_dump(mode="json"), status_code=202 if pending else 200)

    @app.get(
        "/v1/operator-refunds/{txn_id}",
        response_model=OperatorRefundOut,
        dependencies=[requires(Scope.READ, Scope.REFUND)],
        responses={404: {"description": "no operator refund of that transaction"}},
    )
    async def get_operator_refund(
        txn_id: Annotated[str, Path(pattern=TXN_ID)], deps: DepsDep
    ) -> OperatorRefundOut:
        """An operator refund as it is now: its status, attempts and the gateway's refund id."""
        refund = await deps.store.operator_refunds.get(txn_id)
        if refund is None:
            raise ApiError(404, "not_found", f"no operator refund of {txn_id}")
        return _operator_refund_out(refund)


def app() -> FastAPI:
    """Factory for ``uvicorn --factory payorders.service.app:app``."""
    logs.configure(logging.WARNING)  # expected faults in one line, tracebacks for bugs
    # The access log, one line per request with a token: who (its name) did what.
    logging.getLogger("payorders.access").setLevel(logging.INFO)
    return create_app(settings_or_exit("api"))

"""The sandbox gateway as an HTTP service, reached the way a real payment gateway is.

``uvicorn --factory payorders.sandbox.app:app`` serves it on its own port. The ledger,
the faults and the webhook queue are the ``SandboxGateway``'s rows; this module only
translates HTTP to its calls and back, with vendor-style lower-case statuses. A
background task delivers the queued webhooks, signed, to ``settings.webhook_url``.

Every response carries ``Gateway-Processing-Ms``: the time the gateway spent on the
request, so a caller can tell its own timeout from the gateway's work. The HTTP edge and
the control routes are those every gateway simulator here shares (``sandbox.local``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import aiohttp
from fastapi import APIRouter, FastAPI, Header, Request

from payorders import logs, runtime
from payorders.core import domain, store
from payorders.core.settings import Settings
from payorders.gateways.http_sandbox import aiohttp_session
from payorders.gateways.port import PROCESSING_HEADER as PROCESSING_HEADER
from payorders.gateways.port import GatewayRejected, OpenTrade, RefundRequest
from payorders.sandbox.ledger import SandboxGateway
from payorders.sandbox.local import (
    DELIVERY_INTERVAL_S,
    NOTIFY_CLIENT_TIMEOUT_S,
    JsonObject,
    ProcessingTime,
    Sandbox,
    add_error_handlers,
    capture_json,
    control_router,
    in_background,
    only_fields,
    refund_json,
    unless_client_leaves,
)
from payorders.service.errors import ApiError

log = logging.getLogger(__name__)

WITHHOLD_ANSWER_S = 120.0
"""The "timeout after success" fault over HTTP: the refund is committed and the answer comes
this late (or never, if the caller hangs up first), so the caller's client timeout fires."""


# --- the app ---------------------------------------------------------------------------------


def create_sandbox_app(settings: Settings) -> FastAPI:
    """The sandbox gateway's ASGI app; it connects to PostgreSQL when it starts serving."""
    secrets = [s.get_secret_value() for s in settings.webhook_secrets]
    if not secrets:
        raise ValueError("webhook_secrets must hold at least one signing secret")

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        pool = await store.create_pool(
            runtime.database_url(settings),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
        )
        try:
            gateway = SandboxGateway(
                pool,
                schema=settings.sandbox_schema,
                server_timeout_s=settings.gateway_server_timeout_ms / 1000,
                withhold_answer_s=WITHHOLD_ANSWER_S,
            )
            await gateway.install()
            api.state.sandbox = gateway
            async with (
                # aiohttp, as the worker's gateway adapter: about a tenth of httpx's CPU
                # per request (bench/README.md).
                aiohttp_session(NOTIFY_CLIENT_TIMEOUT_S) as http,
                in_background(
                    _deliver_forever(gateway, http, settings, secrets), name="webhook-delivery"
                ),
            ):
                yield
        finally:
            await pool.close()

    api = FastAPI(title="payorders sandbox gateway", lifespan=lifespan)
    api.add_middleware(ProcessingTime)
    api.include_router(router)
    add_error_handlers(api)
    return api


def app() -> FastAPI:
    """For ``uvicorn --factory payorders.sandbox.app:app``: settings from the environment."""
    logs.configure(logging.WARNING)  # expected faults in one line, tracebacks for bugs
    return create_sandbox_app(runtime.settings_or_exit("gateway"))


async def _deliver_forever(
    gateway: SandboxGateway, http: aiohttp.ClientSession, settings: Settings, secrets: list[str]
) -> None:
    async def send(url: str, headers: dict[str, str], body: bytes) -> int:
        async with http.post(url, headers=headers, data=body) as answer:
            await answer.read()
            return answer.status

    while True:
        try:
            await gateway.deliver_due(
                send,
                url=settings.webhook_url,
                secrets=secrets,
                max_attempts=settings.sandbox_webhook_max_attempts,
                retry_initial_ms=settings.sandbox_webhook_retry_initial_ms,
            )
        except Exception:
            # A database hiccup must not end delivery for good: the rows wait, try again.
            log.exception("webhook delivery round failed")
        await gateway.webhook_queued(DELIVERY_INTERVAL_S)


# --- routes ----------------------------------------------------------------------------------

payments_router = APIRouter()
"""The sandbox's own payments, refunds, trades and statement."""


@payments_router.post("/v1/payments", status_code=201)
async def create_payment(gateway: Sandbox, body: JsonObject) -> dict[str, Any]:
    """A customer pays: capture, and queue the ``payment.succeeded`` webhook."""
    only_fields(
        body,
        required=frozenset({"pay_order_no", "amount", "currency"}),
        optional=frozenset({"txn_id"}),
    )
    pay_order_no = _pay_order_no(body["pay_order_no"], "pay_order_no")
    amount = domain.check_amount(body["amount"])
    currency = domain.check_currency(body["currency"])
    txn_id = body.get("txn_id")
    if txn_id is not None:
        domain.check_identifier(txn_id, "txn_id")
    try:
        capture = await gateway.capture(
            pay_order_no=pay_order_no,
            amount=amount,
            currency=currency,
            txn_id=txn_id,
            notify=True,
        )
    except GatewayRejected as e:
        raise ApiError(409, "txn_conflict", str(e)) from None
    return capture_json(capture)


@payments_router.post("/v1/refunds")
async def create_refund(
    request: Request,
    gateway: Sandbox,
    body: JsonObject,
    idempotency_key: Annotated[str, Header(min_length=1, max_length=255)],
) -> dict[str, Any]:
    """Refund by the original route; the same ``Idempotency-Key`` refunds at most once."""
    only_fields(body, required=frozenset({"pay_order_no", "txn_id", "amount", "currency"}))
    refund_request = RefundRequest(
        idempotency_key=idempotency_key,
        pay_order_no=_pay_order_no(body["pay_order_no"], "pay_order_no"),
        txn_id=domain.check_identifier(body["txn_id"], "txn_id"),
        amount=domain.check_amount(body["amount"]),
        currency=domain.check_currency(body["currency"]),
    )
    try:
        refund = await unless_client_leaves(
            request, gateway.refund_detailed(refund_request, notify=True)
        )
    except GatewayRejected as e:
        raise ApiError(422, "refund_rejected", str(e)) from None
    return refund_json(refund)


@payments_router.get("/v1/captures/{txn_id}/refunds")
async def refunds_of_capture(gateway: Sandbox, txn_id: str) -> dict[str, Any]:
    """Every refund of one capture, whoever made it: ours and the dashboard's."""
    if await gateway.query_capture(txn_id) is None:
        raise ApiError(404, "not_found", f"no capture {txn_id}")
    return {
        "txn_id": txn_id,
        "refunds": [refund_json(r) for r in await gateway.refunds_of(txn_id)],
    }


@payments_router.post("/v1/dashboard/refunds", status_code=201)
async def dashboard_refund(gateway: Sandbox, body: JsonObject) -> dict[str, Any]:
    """What the shop's staff do at a gateway's dashboard: refund a capture, not through
    payorders. The refund gets a key of the gateway's own and its ``refund.succeeded``
    webhook, as every refund does (sandbox only)."""
    only_fields(body, required=frozenset({"txn_id", "amount"}))
    txn_id = domain.check_identifier(body["txn_id"], "txn_id")
    amount = domain.check_amount(body["amount"])
    try:
        refund = await gateway.dashboard_refund(txn_id=txn_id, amount=amount)
    except GatewayRejected as e:
        raise ApiError(422, "refund_rejected", str(e)) from None
    return refund_json(refund)


@payments_router.get("/v1/refunds/{idempotency_key}")
async def get_refund(gateway: Sandbox, idempotency_key: str) -> dict[str, Any]:
    refund = await gateway.query_refund_detailed(idempotency_key)
    if refund is None:
        raise ApiError(404, "not_found", f"no refund under key {idempotency_key}")
    return refund_json(refund)


@payments_router.post("/v1/trades", status_code=201)
async def open_trade(gateway: Sandbox, body: JsonObject) -> dict[str, Any]:
    """Open a pay order's trade (idempotent by pay order): what a front end needs to pay."""
    only_fields(
        body,
        required=frozenset({"pay_order_no", "amount", "currency", "expires_at"}),
    )
    expires_at = body["expires_at"]
    try:
        at = datetime.fromisoformat(expires_at) if isinstance(expires_at, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise domain.InvalidInput("expires_at must be an ISO 8601 time with a time zone")
    no = _pay_order_no(body["pay_order_no"], "pay_order_no")
    checkout = await gateway.open_trade(
        OpenTrade(
            pay_order_no=no,
            amount=domain.check_amount(body["amount"]),
            currency=domain.check_currency(body["currency"]),
            expires_at=at,
            idempotency_key=domain.open_trade_key(no),
        )
    )
    return checkout.model_dump(mode="json")


@payments_router.post("/v1/trades/{pay_order_no}/close")
async def close_trade(request: Request, gateway: Sandbox, pay_order_no: str) -> dict[str, Any]:
    no = _pay_order_no(pay_order_no, "pay_order_no")
    result = await unless_client_leaves(request, gateway.close_trade(no, notify=True))
    if result.capture is not None:
        return {"status": "already_paid", "capture": capture_json(result.capture)}
    return {"status": "closed"}


@payments_router.get("/v1/statement")
async def statement(gateway: Sandbox, start: datetime, end: datetime) -> dict[str, Any]:
    """Captures and refunds made in ``[start, end)``."""
    if start.tzinfo is None or end.tzinfo is None:
        raise domain.InvalidInput("start and end need a time zone")
    if start >= end:
        raise domain.InvalidInput("start must be before end")
    found = await gateway.statement_detailed(start, end)
    return {
        "captures": [capture_json(c) for c in found.captures],
        "refunds": [refund_json(r) for r in found.refunds],
    }


router = APIRouter()
"""Every route of the sandbox gateway."""
router.include_router(control_router)
router.include_router(payments_router)


def _pay_order_no(value: object, what: str) -> str:
    # The same rule as the webhook parser: never queue an event our own adapter refuses.
    if not isinstance(value, str) or not value.startswith("po_"):
        raise domain.InvalidInput(f"{what} must be a pay order number (po_...)")
    domain.check_identifier(value.removeprefix("po_"), what)
    return value

"""The sandbox gateway as an HTTP service, reached the way a real payment gateway is.

``uvicorn --factory payorders.sandbox.app:app`` serves it on its own port. The ledger,
the faults and the webhook queue are the ``SandboxGateway``'s rows; this module only
translates HTTP to its calls and back, with vendor-style lower-case statuses. A
background task delivers the queued webhooks, signed, to ``settings.webhook_url``.

Every response carries ``Gateway-Processing-Ms``: the time the gateway spent on the
request, so a caller can tell its own timeout from the gateway's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar

import httpx
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payorders import logs, runtime
from payorders.core import domain, store
from payorders.core.domain import RefundStatus
from payorders.core.settings import Settings
from payorders.gateways.http_sandbox import POOL_LIMITS
from payorders.gateways.port import (
    PROCESSING_HEADER,
    Capture,
    GatewayRefund,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
)
from payorders.localstack.faults import FaultsPatch
from payorders.sandbox.ledger import SandboxGateway, SandboxRefund
from payorders.service.errors import ApiError

log = logging.getLogger(__name__)

WITHHOLD_ANSWER_S = 120.0
"""The "timeout after success" fault over HTTP: the refund is committed and the answer comes
this late (or never, if the caller hangs up first), so the caller's client timeout fires."""
DELIVERY_INTERVAL_S = 0.1
WEBHOOK_CLIENT_TIMEOUT_S = 5.0
_INT32_MAX = 2**31 - 1

T = TypeVar("T")


class _ClientGone(Exception):
    """The caller hung up before the answer; nobody is left to read one."""


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
                httpx.AsyncClient(timeout=WEBHOOK_CLIENT_TIMEOUT_S, limits=POOL_LIMITS) as http,
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


@asynccontextmanager
async def in_background(work: Coroutine[Any, Any, None], *, name: str) -> AsyncIterator[None]:
    """``work`` runs as a task while the block runs, and is cancelled when it ends (a
    local gateway's delivery loop, for its app's lifespan)."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def add_error_handlers(api: FastAPI) -> None:
    """The sandbox's JSON errors (``{"error": {"code", "message"}}``) on ``api``: also for
    another local gateway that includes ``control_router``."""
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(domain.InvalidInput, _invalid_input)
    api.add_exception_handler(GatewayUnavailable, _unavailable)
    api.add_exception_handler(RequestValidationError, _request_invalid)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(_ClientGone, _client_gone)


def app() -> FastAPI:
    """For ``uvicorn --factory payorders.sandbox.app:app``: settings from the environment."""
    logs.configure(logging.WARNING)  # expected faults in one line, tracebacks for bugs
    return create_sandbox_app(runtime.settings_or_exit("gateway"))


async def _deliver_forever(
    gateway: SandboxGateway, http: httpx.AsyncClient, settings: Settings, secrets: list[str]
) -> None:
    async def send(url: str, headers: dict[str, str], body: bytes) -> int:
        return (await http.post(url, headers=headers, content=body)).status_code

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


class ProcessingTime:
    """Adds ``Gateway-Processing-Ms`` to every response, errors included.

    Plain ASGI rather than ``BaseHTTPMiddleware``, so handlers still see the client's
    disconnect on ``receive``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        response_started = False

        async def send_timed(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                headers = MutableHeaders(scope=message)
                headers[PROCESSING_HEADER] = f"{(time.perf_counter() - started) * 1000:.3f}"
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        except Exception:
            if response_started:
                raise
            log.exception("sandbox gateway: unhandled error")
            error = _error_response(500, "internal", "internal error in the sandbox gateway")
            await error(scope, receive, send_timed)


# --- routes ----------------------------------------------------------------------------------

control_router = APIRouter()
"""What any local gateway on the sandbox's ledger serves as the sandbox does: ``/healthz``,
``/v1/captures/{txn_id}``, ``/v1/ledger/{pay_order_no}`` and the faults (the app's
``state.sandbox`` is the ``SandboxGateway``)."""
payments_router = APIRouter()
"""The sandbox's own payments, refunds, trades and statement."""


async def _gateway(request: Request) -> SandboxGateway:
    # async: FastAPI runs a plain ``def`` dependency in a thread pool, per request.
    gateway = request.app.state.sandbox
    assert isinstance(gateway, SandboxGateway)
    return gateway


Sandbox = Annotated[SandboxGateway, Depends(_gateway)]
JsonObject = Annotated[dict[str, Any], Body()]


@control_router.get("/healthz")
async def healthz(gateway: Sandbox) -> dict[str, str]:
    await gateway.ping()
    return {"status": "ok"}


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
    return _capture_json(capture)


@control_router.get("/v1/captures/{txn_id}")
async def get_capture(gateway: Sandbox, txn_id: str) -> dict[str, Any]:
    capture = await gateway.query_capture(txn_id)
    if capture is None:
        raise ApiError(404, "not_found", f"no capture {txn_id}")
    return _capture_json(capture)


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
        refund = await _unless_client_leaves(
            request, gateway.refund_detailed(refund_request, notify=True)
        )
    except GatewayRejected as e:
        raise ApiError(422, "refund_rejected", str(e)) from None
    return _refund_json(refund)


@payments_router.get("/v1/captures/{txn_id}/refunds")
async def refunds_of_capture(gateway: Sandbox, txn_id: str) -> dict[str, Any]:
    """Every refund of one capture, whoever made it: ours and the dashboard's."""
    if await gateway.query_capture(txn_id) is None:
        raise ApiError(404, "not_found", f"no capture {txn_id}")
    return {
        "txn_id": txn_id,
        "refunds": [_refund_json(r) for r in await gateway.refunds_of(txn_id)],
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
    return _refund_json(refund)


@payments_router.get("/v1/refunds/{idempotency_key}")
async def get_refund(gateway: Sandbox, idempotency_key: str) -> dict[str, Any]:
    refund = await gateway.query_refund_detailed(idempotency_key)
    if refund is None:
        raise ApiError(404, "not_found", f"no refund under key {idempotency_key}")
    return _refund_json(refund)


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
    result = await _unless_client_leaves(request, gateway.close_trade(no, notify=True))
    if result.capture is not None:
        return {"status": "already_paid", "capture": _capture_json(result.capture)}
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
        "captures": [_capture_json(c) for c in found.captures],
        "refunds": [_refund_json(r) for r in found.refunds],
    }


@control_router.get("/v1/ledger/{pay_order_no}")
async def ledger(gateway: Sandbox, pay_order_no: str) -> dict[str, Any]:
    """Everything the gateway holds for one pay order (sandbox only)."""
    held = await gateway.ledger_of(pay_order_no)
    return {
        "pay_order_no": pay_order_no,
        "trade_state": held["trade_state"],
        "captured": held["captured"],
        "refunded": held["refunded"],
        "captures": [_capture_json(c) for c in held["captures"]],
        "refunds": [_refund_json(r) for r in held["refunds"]],
        "refund_calls": [
            {"idempotency_key": key, "outcome": outcome} for key, outcome in held["refund_calls"]
        ],
        "webhooks": [
            {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
            for row in held["webhooks"]
        ],
    }


@control_router.get("/v1/faults")
async def list_faults(gateway: Sandbox) -> list[dict[str, Any]]:
    """The faults still armed."""
    return await gateway.list_faults()


@control_router.put("/v1/faults/{scope}")
async def set_faults(gateway: Sandbox, scope: str, patch: FaultsPatch) -> dict[str, Any]:
    """Arm faults for a pay order, or for every order with scope ``*``."""
    _scope(scope)
    await gateway.set_faults(scope, **patch.model_dump(exclude_unset=True))
    return {"scope": scope, **(await gateway.faults_of(scope)).__dict__}


@control_router.delete("/v1/faults", status_code=204)
async def clear_all_faults(gateway: Sandbox) -> None:
    await gateway.clear_faults()


@control_router.delete("/v1/faults/{scope}", status_code=204)
async def clear_faults(gateway: Sandbox, scope: str) -> None:
    await gateway.clear_faults(_scope(scope))


router = APIRouter()
"""Every route of the sandbox gateway."""
router.include_router(control_router)
router.include_router(payments_router)


# --- translation at the edge -----------------------------------------------------------------


def _vendor_status(status: RefundStatus) -> str:
    """Our refund status in the vendor's words (the client maps them back in one place)."""
    match status:
        case RefundStatus.SUCCEEDED:
            return "succeeded"
        case RefundStatus.PENDING:
            return "pending"
        case RefundStatus.REJECTED:
            return "failed"


def capture_json(capture: Capture) -> dict[str, Any]:
    """A capture as the sandbox's routes answer it (``POST /v1/payments`` among them)."""
    return _capture_json(capture)


def _capture_json(capture: Capture) -> dict[str, Any]:
    return {
        "txn_id": capture.txn_id,
        "pay_order_no": capture.pay_order_no,
        "amount": capture.amount,
        "currency": capture.currency,
        "captured_at": capture.captured_at.isoformat(),
    }


def _refund_json(refund: GatewayRefund) -> dict[str, Any]:
    return {
        "id": refund.gateway_refund_id,
        "idempotency_key": refund.idempotency_key,
        "txn_id": refund.txn_id,
        "amount": refund.amount,
        "currency": refund.currency,
        "status": _vendor_status(refund.status),
        "created_at": refund.created_at.isoformat(),
        "processing_ms": refund.processing_ms if isinstance(refund, SandboxRefund) else None,
    }


def only_fields(
    body: dict[str, Any], *, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> None:
    unknown = sorted(set(body) - required - optional)
    if unknown:
        raise domain.InvalidInput(f"unknown field(s): {', '.join(unknown)}")
    missing = sorted(required - set(body))
    if missing:
        raise domain.InvalidInput(f"missing field(s): {', '.join(missing)}")


def _pay_order_no(value: object, what: str) -> str:
    # The same rule as the webhook parser: never queue an event our own adapter refuses.
    if not isinstance(value, str) or not value.startswith("po_"):
        raise domain.InvalidInput(f"{what} must be a pay order number (po_...)")
    domain.check_identifier(value.removeprefix("po_"), what)
    return value


def _scope(value: str) -> str:
    """``*``, or the name the gateway knows a pay order's trade by (the sandbox's is the pay
    order number; the local Alipay's, its ``out_trade_no``)."""
    return value if value == "*" else domain.check_identifier(value, "scope")


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``_unless_client_leaves`` for another local gateway's routes (with
    ``add_error_handlers``, a caller gone is answered 499)."""
    return await _unless_client_leaves(request, work)


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, abandoning it if the caller hangs up first.

    Nobody is left to read the answer then, and a withheld answer must not keep the server
    from shutting down. Work already committed stays committed.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise _ClientGone()


async def _disconnected(request: Request) -> None:
    # The body has been read by now; the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- errors ----------------------------------------------------------------------------------


def _error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc.status, exc.code, exc.message)


async def _invalid_input(request: Request, exc: Exception) -> Response:
    return _error_response(422, "invalid_request", str(exc))


async def _unavailable(request: Request, exc: Exception) -> Response:
    return _error_response(503, "unavailable", str(exc))


async def _request_invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return _error_response(422, "invalid_request", "; ".join(problems) or "invalid request")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(exc.status_code, code, str(exc.detail))


async def _client_gone(request: Request, exc: Exception) -> Response:
    # 499, as nginx logs it: the client closed the request; this answer goes nowhere.
    return _error_response(499, "client_closed_request", "the caller hung up")

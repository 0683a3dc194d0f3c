"""What every gateway simulator here is built of: the sandbox's own HTTP service, the local
Alipay and the local WeChat Pay.

- The HTTP edge: ``Gateway-Processing-Ms`` on every answer (``ProcessingTime``), the
  sandbox's JSON errors (``add_error_handlers``), ``only_fields``, and
  ``unless_client_leaves`` (a caller that hangs up while its answer is held back leaves
  the work done and gets no answer).
- ``control_router``: what any gateway on the sandbox's ledger serves as the sandbox does
  (``/healthz``, a capture, a pay order's ledger, the faults), so the tools work unchanged.
- The frame of a local vendor gateway (``local_gateway_app``): its PostgreSQL pool and the
  sandbox's ledger in its own schema, its vendor routes, the buyer's side
  (``POST /v1/scans`` and ``POST /v1/payments``, the sandbox's shapes, so ``payorders pay``
  works), the control routes, and the delivery of its notifications on the vendor's own
  retry schedule (``NotificationSchedule``, compressed by a speedup for tests).
- RSA keys and SHA256withRSA (PKCS#1 v1.5, base64) signatures: Alipay's RSA2 and WeChat
  Pay's WECHATPAY2-SHA256-RSA2048 are the same algorithm.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, NoReturn, Protocol, Self, TypeVar

import asyncpg
import httpx
from Cryptodome.Hash import SHA256
from Cryptodome.PublicKey import RSA
from Cryptodome.Signature import pkcs1_15
from fastapi import APIRouter, Body, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payorders.core import domain, store
from payorders.core.domain import RefundStatus
from payorders.core.store import Conn
from payorders.gateways.http_sandbox import POOL_LIMITS
from payorders.gateways.port import PROCESSING_HEADER, Capture, GatewayRefund, GatewayUnavailable
from payorders.localstack.faults import Faults, FaultsPatch
from payorders.sandbox.ledger import (
    NotAcknowledged,
    SandboxGateway,
    SandboxRefund,
    WebhookBodies,
)
from payorders.service.errors import ApiError

log = logging.getLogger(__name__)

T = TypeVar("T")

DELIVERY_INTERVAL_S = 0.1
"""The longest a delivery loop sleeps between rounds (a new notification wakes it)."""
NOTIFY_CLIENT_TIMEOUT_S = 5.0
"""How long a notification waits for the merchant's answer: both vendors give 5 s."""
KEY_BITS = 2048
"""What Alipay's RSA2 and WeChat Pay's WECHATPAY2-SHA256-RSA2048 ask of a key."""


# --- keys and signatures ---------------------------------------------------------------------


def generate_key_pair() -> tuple[str, str]:
    """A new RSA 2048 key pair as PEM: ``(private, public)``, PKCS#8 and SubjectPublicKeyInfo
    (what the vendors' consoles hand out and both SDKs load; the tests)."""
    key = RSA.generate(KEY_BITS)
    private = key.export_key("PEM", pkcs=8).decode()
    return private, key.public_key().export_key("PEM").decode()


def load_key(text: str, *, private: bool) -> RSA.RsaKey:
    """An RSA key from PEM, or from the bare base64 that the vendors' consoles show.

    Raises:
        ValueError: not an RSA key, or a public key where a private one is needed.
    """
    what = "private" if private else "public"
    material: str | bytes = text.strip()
    if isinstance(material, str) and "-----BEGIN" not in material:
        try:
            material = base64.b64decode("".join(material.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"not an RSA {what} key (neither PEM nor base64)") from None
    try:
        key = RSA.import_key(material)
    except (ValueError, IndexError, TypeError):
        raise ValueError(f"not an RSA {what} key") from None
    if private and not key.has_private():
        raise ValueError("a public key where the private key is needed")
    return key if private else key.public_key()


def sign(key: RSA.RsaKey, text: str) -> str:
    """SHA256withRSA, PKCS#1 v1.5, base64 without line breaks."""
    return base64.b64encode(pkcs1_15.new(key).sign(SHA256.new(text.encode()))).decode()


def verify(key: RSA.RsaKey, text: str, signature: str) -> bool:
    try:
        raw = base64.b64decode(signature, validate=True)
        pkcs1_15.new(key).verify(SHA256.new(text.encode()), raw)
    except (binascii.Error, ValueError, TypeError):
        return False
    return True


# --- the HTTP edge ---------------------------------------------------------------------------


class ClientGone(Exception):
    """The caller hung up before the answer; nobody is left to read one."""


@asynccontextmanager
async def in_background(work: Coroutine[Any, Any, None], *, name: str) -> AsyncIterator[None]:
    """``work`` runs as a task while the block runs, and is cancelled when it ends (a
    gateway's delivery loop, for its app's lifespan)."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def only_fields(
    body: dict[str, Any], *, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> None:
    unknown = sorted(set(body) - required - optional)
    if unknown:
        raise domain.InvalidInput(f"unknown field(s): {', '.join(unknown)}")
    missing = sorted(required - set(body))
    if missing:
        raise domain.InvalidInput(f"missing field(s): {', '.join(missing)}")


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, abandoning it if the caller hangs up first (``ClientGone``, which
    ``add_error_handlers`` answers 499).

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
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    # The body has been read by now; the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


def add_error_handlers(api: FastAPI) -> None:
    """The sandbox's JSON errors (``{"error": {"code", "message"}}``) on ``api``."""
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(domain.InvalidInput, _invalid_input)
    api.add_exception_handler(GatewayUnavailable, _unavailable)
    api.add_exception_handler(RequestValidationError, _request_invalid)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(ClientGone, _client_gone)


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


# --- the sandbox's shapes --------------------------------------------------------------------


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
    return {
        "txn_id": capture.txn_id,
        "pay_order_no": capture.pay_order_no,
        "amount": capture.amount,
        "currency": capture.currency,
        "captured_at": capture.captured_at.isoformat(),
    }


def refund_json(refund: GatewayRefund) -> dict[str, Any]:
    """A refund as the sandbox's routes answer it."""
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


# --- the control routes ----------------------------------------------------------------------

control_router = APIRouter()
"""What any gateway on the sandbox's ledger serves as the sandbox does: ``/healthz``,
``/v1/captures/{txn_id}``, ``/v1/ledger/{pay_order_no}`` and the faults (the app's
``state.sandbox`` is the ``SandboxGateway``)."""


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


@control_router.get("/v1/captures/{txn_id}")
async def get_capture(gateway: Sandbox, txn_id: str) -> dict[str, Any]:
    capture = await gateway.query_capture(txn_id)
    if capture is None:
        raise ApiError(404, "not_found", f"no capture {txn_id}")
    return capture_json(capture)


@control_router.get("/v1/ledger/{pay_order_no}")
async def ledger(gateway: Sandbox, pay_order_no: str) -> dict[str, Any]:
    """Everything the gateway holds for one pay order (sandbox only)."""
    held = await gateway.ledger_of(pay_order_no)
    return {
        "pay_order_no": pay_order_no,
        "trade_state": held["trade_state"],
        "captured": held["captured"],
        "refunded": held["refunded"],
        "captures": [capture_json(c) for c in held["captures"]],
        "refunds": [refund_json(r) for r in held["refunds"]],
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


def _scope(value: str) -> str:
    """``*``, or the name the gateway knows a pay order's trade by (the sandbox's is the pay
    order number; a local vendor's, its ``out_trade_no``)."""
    return value if value == "*" else domain.check_identifier(value, "scope")


# --- a local vendor gateway ------------------------------------------------------------------


class PaymentRefused(Exception):
    """The buyer's payment (or scan) is refused: the reason, as a 409 says it."""


class LocalTrade(Protocol):
    """What the frame reads of a local vendor's trade (the vendor's own dataclass)."""

    @property
    def out_trade_no(self) -> str: ...

    @property
    def pay_key(self) -> str | None:
        """The ``txn_id`` of the buyer's payment that paid it (``None``: unpaid, or paid by
        the ``paid_on_close_amount`` fault)."""

    @property
    def paid_at(self) -> datetime | None: ...

    def expired(self, now: datetime) -> bool:
        """Whether ``now`` is past the trade's ``time_expire`` (at the vendor's precision)."""


TradeT = TypeVar("TradeT", bound=LocalTrade)


class LocalTradeBook(Generic[TradeT]):
    """A local vendor's trades (one table in the gateway's schema) beside the sandbox's ledger
    (``self.ledger``), and what every vendor here does alike with them: the buyer's payment
    and scan, a trade found by its transaction id or ``out_trade_no``, the
    ``paid_on_close_amount`` fault's race.

    A vendor's book names its table, its rows' ``SELECT`` and its transaction id's column,
    and brings the rest as hooks: its trade from a row, a trade's total, transaction id and
    closed state, how a trade is marked paid, what a scan shows, the buyer's refusals in its
    own words.
    """

    vendor: ClassVar[str]
    """Its name in the buyer's refusals ("… takes CNY only")."""
    table: ClassVar[str]
    """Its trades' table in the gateway's schema."""
    select: ClassVar[str]
    """``SELECT … FROM {s}.<table> t``: one trade row (``{s}``: the schema)."""
    txn_column: ClassVar[str]
    """The column of the vendor's transaction id (the ledger's ``txn_id``)."""
    lock_id: ClassVar[int]
    """The advisory lock its ``ddl`` is installed under."""
    ddl: ClassVar[str]
    """Its tables (``{s}``: the schema)."""
    currency: ClassVar[str] = "CNY"
    """What it takes; nothing else."""

    no_trade: ClassVar[str]
    """The refusal of a payment or scan of no trade (``{no}``: its ``out_trade_no``)."""
    one_payment: ClassVar[str]
    """The refusal of a second payment (``{no}``)."""
    not_the_total: ClassVar[str]
    """The refusal of another amount (``{amount}``, ``{total}``)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        schema: str,
        server_timeout_s: float,
        withhold_answer_s: float,
        bodies: WebhookBodies,
    ) -> None:
        self._pool = pool
        self._s = schema
        self.ledger = SandboxGateway(
            pool,
            schema=schema,
            server_timeout_s=server_timeout_s,
            withhold_answer_s=withhold_answer_s,
            bodies=bodies,
        )

    async def install(self) -> None:
        await self.ledger.install()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self.lock_id)
            await conn.execute(self.ddl.format(s=self._s))

    async def tick(self) -> None:
        """Work of the vendor's own, before each delivery round (due state changes)."""
        return None

    # --- the hooks ---------------------------------------------------------------------------

    def _trade(self, rec: asyncpg.Record) -> TradeT:
        raise NotImplementedError

    def _total(self, trade: TradeT) -> int:
        """What the trade is to be paid: exactly this."""
        raise NotImplementedError

    def _txn_id(self, trade: TradeT) -> str | None:
        raise NotImplementedError

    def _closed(self, trade: TradeT) -> bool:
        raise NotImplementedError

    def _expired_refusal(self, trade: TradeT) -> str:
        """The refusal of a payment or scan past ``time_expire``."""
        raise NotImplementedError

    async def _mark_paid(self, conn: Conn, trade: TradeT, *, pay_key: str | None) -> str:
        """The locked trade paid (``pay_key`` kept with it): its transaction id."""
        raise NotImplementedError

    async def _shown(self, conn: Conn, trade: TradeT) -> dict[str, Any]:
        """What the buyer's scan of a payable (locked) trade does and answers."""
        raise NotImplementedError

    # --- the buyer's side --------------------------------------------------------------------

    async def scan(self, out_trade_no: str) -> dict[str, Any]:
        """The buyer scans the QR code without paying yet.

        Raises:
            PaymentRefused: no such trade, paid, closed, or past its ``time_expire``.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            trade = await self._payable(conn, out_trade_no)
            return await self._shown(conn, trade)

    async def pay(
        self, *, out_trade_no: str, amount: int, currency: str, pay_key: str | None
    ) -> Capture:
        """The buyer pays: the trade is paid, the ledger holds the capture (``txn_id`` = the
        vendor's transaction id) and the notification is queued. One payment per trade, of
        exactly its total in ``currency``, until ``time_expire`` (a payment at that very
        second is taken). ``pay_key`` (the caller's ``txn_id``) makes a resent payment
        answer the same capture.

        Raises:
            PaymentRefused: why not.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            trade = await self._find(conn, out_trade_no=out_trade_no, lock=True)
            if pay_key is not None and trade is not None and trade.pay_key == pay_key:
                # The same payment resent (its txn_id is ours to match): the same capture.
                if (amount, currency) != (self._total(trade), self.currency):
                    raise PaymentRefused(f"txn {pay_key} exists with other facts")
                txn_id = self._txn_id(trade)
                assert txn_id is not None
                cap = await self.ledger.query_capture(txn_id)
                assert cap is not None
                return cap
            if pay_key is not None and await conn.fetchval(
                f"SELECT 1 FROM {self._s}.{self.table} WHERE pay_key = $1", pay_key
            ):
                raise PaymentRefused(f"txn {pay_key} exists with other facts")
            trade = await self._payable(conn, out_trade_no)
            if currency != self.currency:
                raise PaymentRefused(f"{self.vendor} takes {self.currency} only, not {currency}")
            if amount != self._total(trade):
                raise PaymentRefused(
                    self.not_the_total.format(amount=amount, total=self._total(trade))
                )
            capture = await self._pay_locked(conn, trade, pay_key=pay_key)
        self.ledger.wake_delivery()
        return capture

    async def _payable(self, conn: Conn, out_trade_no: str) -> TradeT:
        trade = await self._find(conn, out_trade_no=out_trade_no, lock=True)
        if trade is None:
            raise PaymentRefused(self.no_trade.format(no=out_trade_no))
        if trade.paid_at is not None:
            raise PaymentRefused(self.one_payment.format(no=out_trade_no))
        if self._closed(trade):
            raise PaymentRefused(f"{out_trade_no} is closed")
        if trade.expired(datetime.now(UTC)):
            raise PaymentRefused(self._expired_refusal(trade))
        return trade

    async def _pay_locked(self, conn: Conn, trade: TradeT, *, pay_key: str | None) -> Capture:
        txn_id = await self._mark_paid(conn, trade, pay_key=pay_key)
        capture, _ = await self.ledger.capture_in(
            conn,
            pay_order_no=trade.out_trade_no,
            amount=self._total(trade),
            currency=self.currency,
            txn_id=txn_id,
            notify=True,
        )
        return capture

    async def _paid_on_close(self, conn: Conn, trade: TradeT, faults: Faults) -> TradeT:
        """The ``paid_on_close_amount`` fault on a close of the locked ``trade``: the buyer
        pays an open trade at the very instant of the close, which then finds it paid (the
        vendor takes only the trade's own total, so the fault's amount and currency only arm
        it). The trade as the close goes on with it."""
        if trade.paid_at is not None or self._closed(trade) or not faults.paid_on_close_amount:
            return trade
        await self._pay_locked(conn, trade, pay_key=None)
        paid = await self._find(conn, out_trade_no=trade.out_trade_no)
        assert paid is not None
        return paid

    # --- reads -------------------------------------------------------------------------------

    async def _named(self, *, txn_id: str | None, out_trade_no: str | None) -> TradeT | None:
        """The trade a request names: by its transaction id when given, else by
        ``out_trade_no``."""
        async with self._pool.acquire() as conn:
            return await self._find(conn, out_trade_no=out_trade_no, txn_id=txn_id)

    async def _find(
        self,
        conn: Conn,
        *,
        out_trade_no: str | None = None,
        txn_id: str | None = None,
        lock: bool = False,
    ) -> TradeT | None:
        """By ``txn_id`` when given, else by ``out_trade_no``; ``lock``: the row locked for
        the caller's transaction."""
        column, value = (
            (self.txn_column, txn_id) if txn_id is not None else ("out_trade_no", out_trade_no)
        )
        if lock:
            await conn.execute(
                f"SELECT 1 FROM {self._s}.{self.table} WHERE {column} = $1 FOR UPDATE", value
            )
        rec = await conn.fetchrow(self.select.format(s=self._s) + f" WHERE t.{column} = $1", value)
        return None if rec is None else self._trade(rec)


@dataclass(frozen=True)
class NotificationSchedule:
    """A vendor's waits between notifications of one event until one is acknowledged,
    divided by ``speedup`` (tests and the local stack compress hours into seconds)."""

    waits_s: tuple[float, ...]
    speedup: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.speedup < float("inf"):
            raise ValueError("notify_speedup must be a number greater than zero")

    @property
    def notifications(self) -> int:
        """How many times one event is notified at most: the first, then one per wait."""
        return len(self.waits_s) + 1

    def retry_after_ms(self, attempt: int) -> float:
        """The wait after failed notification number ``attempt`` (1 for the first)."""
        wait_s = self.waits_s[min(attempt, len(self.waits_s)) - 1]
        return wait_s * 1000 / self.speedup


BookT = TypeVar("BookT", bound=LocalTradeBook[Any])


class LocalServer(Generic[BookT]):
    """What a local vendor's routes share (``of``), and the frame's ``LocalGateway`` over its
    trade book (``trades``): the book's ledger, scan, payment and own rounds, on the vendor's
    notification ``schedule``. A vendor's server adds how its notifications are sent
    (``render``) and acknowledged (``refusal``)."""

    def __init__(self, trades: BookT, schedule: NotificationSchedule) -> None:
        self.trades = trades
        self.schedule = schedule

    @classmethod
    def of(cls, request: Request) -> Self:
        """The server of the app serving ``request``."""
        server = request.app.state.local
        assert isinstance(server, cls)
        return server

    @property
    def ledger(self) -> SandboxGateway:
        return self.trades.ledger

    async def tick(self) -> None:
        await self.trades.tick()

    async def pay(
        self, *, out_trade_no: str, amount: int, currency: str, pay_key: str | None
    ) -> Capture:
        return await self.trades.pay(
            out_trade_no=out_trade_no, amount=amount, currency=currency, pay_key=pay_key
        )

    async def scan(self, out_trade_no: str) -> dict[str, Any]:
        return await self.trades.scan(out_trade_no)


class LocalGateway(Protocol):
    """What the frame needs of a local vendor gateway's service."""

    @property
    def ledger(self) -> SandboxGateway:
        """The sandbox's ledger in the gateway's schema (the control routes read it)."""

    @property
    def schedule(self) -> NotificationSchedule: ...

    def render(self, stored: bytes) -> tuple[str, dict[str, str], bytes]:
        """A stored notification as this attempt sends it: ``(url, headers, body)``."""

    def refusal(self, answer: httpx.Response) -> str | None:
        """``None`` when the merchant's answer acknowledges a notification, else why not."""

    async def tick(self) -> None:
        """Work of the gateway's own, before each delivery round (due state changes)."""

    async def pay(
        self, *, out_trade_no: str, amount: int, currency: str, pay_key: str | None
    ) -> Capture:
        """The buyer pays; ``pay_key`` (the caller's ``txn_id``) makes a resend harmless.

        Raises:
            PaymentRefused: why the vendor would not take it.
        """

    async def scan(self, out_trade_no: str) -> dict[str, Any]:
        """The buyer scans the QR code without paying yet.

        Raises:
            PaymentRefused: why the vendor would not show it.
        """


def local_gateway(request: Request) -> LocalGateway:
    """The local gateway of the app serving ``request``."""
    gateway: LocalGateway = request.app.state.local
    return gateway


def local_gateway_app(
    *,
    title: str,
    database_url: str,
    db_pool_max: int,
    open_book: Callable[[asyncpg.Pool], BookT],
    serve: Callable[[BookT], LocalGateway],
    vendor_router: APIRouter,
    max_trade_no_len: int,
) -> FastAPI:
    """A local vendor gateway's ASGI app; it connects to PostgreSQL when it starts serving.

    ``open_book(pool)`` makes the trade book (the frame installs its schema), ``serve(book)``
    the gateway over it; the app serves ``vendor_router``, the buyer's side (``out_trade_no``
    of at most ``max_trade_no_len`` characters), the control routes, and delivers the
    notifications until it stops.
    """

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        pool = await store.create_pool(database_url, min_size=1, max_size=db_pool_max)
        try:
            book = open_book(pool)
            await book.install()
            gateway = serve(book)
            api.state.sandbox = gateway.ledger  # the control routes' ledger
            api.state.local = gateway
            async with (
                httpx.AsyncClient(timeout=NOTIFY_CLIENT_TIMEOUT_S, limits=POOL_LIMITS) as http,
                in_background(_deliver_forever(gateway, http, title), name=f"{title} delivery"),
            ):
                yield
        finally:
            await pool.close()

    api = FastAPI(title=title, lifespan=lifespan)
    api.add_middleware(ProcessingTime)
    api.include_router(vendor_router)
    api.include_router(buyer_router(max_trade_no_len))
    api.include_router(control_router)
    add_error_handlers(api)
    return api


async def _deliver_forever(gateway: LocalGateway, http: httpx.AsyncClient, title: str) -> None:
    async def send(url: str, headers: dict[str, str], body: bytes) -> int:
        answer = await http.post(url, headers=headers, content=body)
        why = gateway.refusal(answer)
        if why is not None:
            raise NotAcknowledged(answer.status_code, why)
        return answer.status_code

    ledger = gateway.ledger
    while True:
        try:
            await gateway.tick()
        except Exception:
            log.exception("%s: its own round failed", title)
        try:
            await ledger.deliver_due(
                send,
                max_attempts=gateway.schedule.notifications,
                render=gateway.render,
                retry_after_ms=gateway.schedule.retry_after_ms,
            )
        except Exception:
            # A database hiccup must not end delivery for good: the rows wait, try again.
            log.exception("%s: notification round failed", title)
        await ledger.webhook_queued(DELIVERY_INTERVAL_S)


def buyer_router(max_trade_no_len: int) -> APIRouter:
    """``POST /v1/payments`` and ``POST /v1/scans`` over the app's ``LocalGateway``, in the
    sandbox's shapes (409 when the vendor would refuse)."""
    router = APIRouter()

    def trade_no(value: object) -> str:
        if not isinstance(value, str) or not 1 <= len(value) <= max_trade_no_len:
            raise domain.InvalidInput(
                f"pay_order_no must be the trade's out_trade_no (1-{max_trade_no_len} characters)"
            )
        return value

    @router.post("/v1/payments", status_code=201)
    async def create_payment(request: Request, body: JsonObject) -> dict[str, Any]:
        """The buyer scans and pays (the sandbox's route and answer, so ``payorders pay``
        works)."""
        only_fields(
            body,
            required=frozenset({"pay_order_no", "amount", "currency"}),
            optional=frozenset({"txn_id"}),
        )
        no = trade_no(body["pay_order_no"])
        amount = domain.check_amount(body["amount"])
        currency = domain.check_currency(body["currency"])
        txn_id = body.get("txn_id")
        if txn_id is not None:
            domain.check_identifier(txn_id, "txn_id")
        try:
            capture = await local_gateway(request).pay(
                out_trade_no=no, amount=amount, currency=currency, pay_key=txn_id
            )
        except PaymentRefused as e:
            raise ApiError(409, "payment_refused", str(e)) from None
        return capture_json(capture)

    @router.post("/v1/scans")
    async def scan(request: Request, body: JsonObject) -> dict[str, Any]:
        """The buyer scans the QR code without paying yet."""
        only_fields(body, required=frozenset({"pay_order_no"}))
        no = trade_no(body["pay_order_no"])
        try:
            return await local_gateway(request).scan(no)
        except PaymentRefused as e:
            raise ApiError(409, "scan_refused", str(e)) from None

    return router


# --- starting from the environment -----------------------------------------------------------


def refuse_to_start(label: str, why: str) -> NoReturn:
    """One line on stderr and exit 2, as every entry point refuses a bad configuration."""
    print(f"payorders {label}: cannot start: {why}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def required_env(label: str, *names: str) -> dict[str, str]:
    """The variables, each set and not blank (``refuse_to_start`` otherwise)."""
    values = {}
    for name in names:
        values[name] = os.environ.get(name, "").strip()
        if not values[name]:
            refuse_to_start(label, f"{name} is not set")
    return values


def key_env(label: str, values: dict[str, str], name: str, *, private: bool) -> None:
    """``values[name]`` is an RSA key of the right kind (``refuse_to_start`` otherwise)."""
    try:
        load_key(values[name], private=private)
    except ValueError as e:
        refuse_to_start(label, f"{name}: {e}")


def vendor_env(label: str, *names: str, public_key: str, private_key: str) -> dict[str, str]:
    """A local vendor's variables, each set and not blank, ``public_key`` and ``private_key``
    among them RSA keys of those kinds (``refuse_to_start`` otherwise)."""
    values = required_env(label, *names)
    key_env(label, values, public_key, private=False)
    key_env(label, values, private_key, private=True)
    return values


def number_env(label: str, name: str, default: str, *, positive: bool) -> float:
    """A number from the environment: greater than zero with ``positive``, else at least
    zero (``refuse_to_start`` otherwise)."""
    text = os.environ.get(name, default)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    ok = 0 < value < float("inf") if positive else 0 <= value < float("inf")
    if not ok:
        what = "greater than zero" if positive else "zero or more"
        refuse_to_start(label, f"{name}: a number {what}, not {text!r}")
    return value

"""A sandbox payment gateway with its own ledger in its own PostgreSQL schema.

The ledger is the gateway's truth, separate from ours, so tests and reconciliation can
compare the two. Faults are rows too, so another process (the CLI, a test) can set them.
A fault row's ``scope`` is a pay order number, or ``*`` for every order.

Webhooks are rows too (``webhook_delivery``), written in the capture's transaction and sent
by ``deliver_due``, so a notification survives a restart and is retried like a real
gateway's, on a short schedule for local use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Protocol, TypeVar

import asyncpg

from payorders.core import store
from payorders.core.domain import RefundStatus
from payorders.core.models import Checkout
from payorders.core.settings import Settings
from payorders.core.store import Conn
from payorders.gateways.port import (
    Capture,
    CloseResult,
    GatewayAmbiguous,
    GatewayRefund,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
    Statement,
)
from payorders.localstack.faults import Faults
from payorders.runtime import Resources, open_resources
from payorders.service import webhook

_SCHEMA_LOCK_ID = 0x73616E64626F78  # "sandbox"

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.trade (
    pay_order_no text PRIMARY KEY,
    state        text NOT NULL CHECK (state IN ('OPEN', 'PAID', 'CLOSED')),
    txn_id       text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.capture (
    txn_id       text PRIMARY KEY,
    pay_order_no text NOT NULL,
    amount       bigint NOT NULL CHECK (amount > 0),
    currency     text NOT NULL,
    captured_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS capture_pay_order_no ON {s}.capture (pay_order_no);
CREATE TABLE IF NOT EXISTS {s}.refund (
    idempotency_key   text PRIMARY KEY,
    gateway_refund_id text NOT NULL UNIQUE,
    txn_id            text NOT NULL REFERENCES {s}.capture,
    amount            bigint NOT NULL CHECK (amount > 0),
    currency          text NOT NULL,
    status            text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS refund_txn_id ON {s}.refund (txn_id);
CREATE TABLE IF NOT EXISTS {s}.refund_call (
    id              bigserial PRIMARY KEY,
    idempotency_key text NOT NULL,
    outcome         text NOT NULL,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.fault (
    scope                     text PRIMARY KEY,
    fail_next_refunds         integer NOT NULL DEFAULT 0 CHECK (fail_next_refunds >= 0),
    timeout_after_success_next integer NOT NULL DEFAULT 0
                              CHECK (timeout_after_success_next >= 0),
    delay_ms                  integer NOT NULL DEFAULT 0 CHECK (delay_ms >= 0),
    paid_on_close_amount      bigint CHECK (paid_on_close_amount > 0),
    paid_on_close_currency    text
);
-- Added after the first release: upgrade an existing schema in place.
ALTER TABLE {s}.refund ADD COLUMN IF NOT EXISTS processing_ms double precision;
ALTER TABLE {s}.fault
    ADD COLUMN IF NOT EXISTS webhook_delay_ms integer NOT NULL DEFAULT 0
        CHECK (webhook_delay_ms >= 0),
    ADD COLUMN IF NOT EXISTS webhook_duplicate_next integer NOT NULL DEFAULT 0
        CHECK (webhook_duplicate_next >= 0),
    ADD COLUMN IF NOT EXISTS webhook_drop_next integer NOT NULL DEFAULT 0
        CHECK (webhook_drop_next >= 0),
    ADD COLUMN IF NOT EXISTS webhook_reorder_next integer NOT NULL DEFAULT 0
        CHECK (webhook_reorder_next >= 0);
CREATE TABLE IF NOT EXISTS {s}.webhook_delivery (
    event_id        text PRIMARY KEY,
    pay_order_no    text NOT NULL,
    txn_id          text NOT NULL,
    body            bytea NOT NULL,
    copies          integer NOT NULL DEFAULT 1 CHECK (copies >= 1),
    deliveries      integer NOT NULL DEFAULT 0,
    drop_first      boolean NOT NULL DEFAULT false,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_delivery_due ON {s}.webhook_delivery (next_attempt_at)
    WHERE deliveries < copies;
CREATE INDEX IF NOT EXISTS webhook_delivery_pay_order_no
    ON {s}.webhook_delivery (pay_order_no);
"""

T = TypeVar("T")

log = logging.getLogger(__name__)

REORDER_HOLD_S = 1.5
"""How long a reordered webhook is held back, so an event created after it goes first."""
RETRY_CAP_MS = 60_000
DELIVERY_BATCH = 50


FAULT_FIELDS = tuple(f.name for f in fields(Faults))
_COUNTERS = frozenset(
    {
        "fail_next_refunds",
        "timeout_after_success_next",
        "webhook_duplicate_next",
        "webhook_drop_next",
        "webhook_reorder_next",
    }
)


@dataclass(frozen=True)
class SandboxRefund(GatewayRefund):
    """A refund as the sandbox's ledger holds it: also how long the gateway took to make it."""

    processing_ms: float | None = None


SendWebhook = Callable[[str, dict[str, str], bytes], Awaitable[int]]
"""``send(url, headers, body)``: the HTTP status of the answer; raises on a network error,
or ``NotAcknowledged`` when an answer came that does not acknowledge the delivery."""

RenderWebhook = Callable[[bytes], tuple[str, dict[str, str], bytes]]
"""A stored delivery body to what is sent, at the moment of each attempt: ``(url, headers,
body)`` (a gateway whose notifications are signed per attempt renders them here)."""


class NotAcknowledged(Exception):
    """An answer came, and it does not acknowledge the delivery (a gateway that wants a
    literal answer body, say): a failed attempt, retried, recorded with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class WebhookBodies(Protocol):
    """What a new capture's or refund's notification says, stored in the same transaction:
    ``(event_id, body)``, or ``None`` for no notification. The sandbox's are its JSON
    events (``SandboxWebhookBodies``); another local gateway on this ledger brings its own."""

    async def payment(self, conn: Conn, capture: Capture) -> tuple[str, bytes] | None: ...

    async def refund(
        self, conn: Conn, pay_order_no: str, refund: asyncpg.Record
    ) -> tuple[str, bytes] | None: ...


class SandboxWebhookBodies:
    """The sandbox's ``payment.succeeded`` and ``refund.succeeded`` events."""

    async def payment(self, conn: Conn, capture: Capture) -> tuple[str, bytes] | None:
        event = webhook.PaymentEvent(
            event_id=f"evt_{uuid.uuid4().hex}",
            pay_order_no=capture.pay_order_no,
            txn_id=capture.txn_id,
            amount=capture.amount,
            currency=capture.currency,
            paid_at=capture.captured_at,
        )
        return event.event_id, webhook.payment_event_body(event)

    async def refund(
        self, conn: Conn, pay_order_no: str, refund: asyncpg.Record
    ) -> tuple[str, bytes] | None:
        event_id = f"evt_{uuid.uuid4().hex}"
        body = webhook.refund_event_body(
            event_id,
            pay_order_no=pay_order_no,
            txn_id=refund["txn_id"],
            refund_id=refund["gateway_refund_id"],
            amount=refund["amount"],
            currency=refund["currency"],
            refunded_at=refund["created_at"],
        )
        return event_id, body


class SandboxGateway:
    """Implements the ``Gateway`` protocol against its own ledger.

    ``server_timeout_s`` is the gateway's own limit: a request slowed past it is answered
    with an error before any work is done, as a real gateway's front end would.
    ``withhold_answer_s`` is how long the "timeout after success" fault keeps the answer
    back once the refund is committed: ``None`` (in-process) never answers; a server
    bounds it so a request cannot hold it forever. ``bodies`` shapes the notifications
    (the sandbox's JSON events unless given).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        schema: str,
        server_timeout_s: float,
        withhold_answer_s: float | None = None,
        bodies: WebhookBodies | None = None,
    ) -> None:
        if not schema.isidentifier():
            raise ValueError("schema must be an SQL identifier")
        self._pool = pool
        self._s = schema
        self._server_timeout_s = server_timeout_s
        self._withhold_answer_s = withhold_answer_s
        self._bodies: WebhookBodies = bodies or SandboxWebhookBodies()
        self._webhook_queued = asyncio.Event()

    async def install(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_ID)
            await conn.execute(_DDL.format(s=self._s))

    # --- the customer's side -------------------------------------------------------------

    async def capture(
        self,
        *,
        pay_order_no: str,
        amount: int,
        currency: str,
        txn_id: str | None = None,
        notify: bool = False,
    ) -> Capture:
        """A customer pays: the gateway captures the money (even for a closed trade, as a
        payment by another route would). Idempotent per ``txn_id``.

        With ``notify`` a new capture also queues its ``payment.succeeded`` webhook, in the
        same transaction; a replayed capture queues nothing more.
        """
        txn_id = txn_id or f"txn_{uuid.uuid4().hex[:24]}"
        async with self._pool.acquire() as conn, conn.transaction():
            capture, created = await self._capture(conn, pay_order_no, amount, currency, txn_id)
            if notify and created:
                await self._queue_webhook(conn, capture)
        if notify and created:
            self._webhook_queued.set()  # committed: the delivery loop need not wait its turn
        return capture

    async def webhook_queued(self, within_s: float) -> None:
        """Return when this process queues a webhook, or after ``within_s``; the delivery
        loop waits here between rounds (rows queued by another process wait the time)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._webhook_queued.wait()
        self._webhook_queued.clear()

    async def _capture(
        self, conn: Conn, pay_order_no: str, amount: int, currency: str, txn_id: str
    ) -> tuple[Capture, bool]:
        """The capture, and whether this call created it."""
        s = self._s
        rec = await conn.fetchrow(
            f"INSERT INTO {s}.capture (txn_id, pay_order_no, amount, currency)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (txn_id) DO NOTHING RETURNING *",
            txn_id,
            pay_order_no,
            amount,
            currency,
        )
        created = rec is not None
        if rec is None:
            rec = await conn.fetchrow(f"SELECT * FROM {s}.capture WHERE txn_id = $1", txn_id)
            assert rec is not None
            if (rec["pay_order_no"], rec["amount"], rec["currency"]) != (
                pay_order_no,
                amount,
                currency,
            ):
                raise GatewayRejected(f"txn {txn_id} exists with other facts")
        await conn.execute(
            f"INSERT INTO {s}.trade (pay_order_no, state, txn_id) VALUES ($1, 'PAID', $2)"
            " ON CONFLICT (pay_order_no) DO UPDATE SET state = 'PAID', txn_id = $2,"
            " updated_at = now() WHERE {s}.trade.state = 'OPEN'".replace("{s}", s),
            pay_order_no,
            txn_id,
        )
        return _capture(rec), created

    async def _queue_webhook(self, conn: Conn, capture: Capture) -> None:
        """One delivery row for a new capture, shaped by the webhook faults armed now."""
        event = await self._bodies.payment(conn, capture)
        if event is not None:
            await self._queue_delivery(
                conn, event[0], capture.pay_order_no, capture.txn_id, event[1]
            )

    async def _queue_refund_webhook(
        self, conn: Conn, pay_order_no: str, rec: asyncpg.Record
    ) -> None:
        """The ``refund.succeeded`` webhook of a new refund, ours or the dashboard's (a real
        gateway notifies every refund, whoever asked for it)."""
        event = await self._bodies.refund(conn, pay_order_no, rec)
        if event is not None:
            await self._queue_delivery(conn, event[0], pay_order_no, rec["txn_id"], event[1])

    async def _queue_delivery(
        self, conn: Conn, event_id: str, no: str, txn_id: str, body: bytes
    ) -> None:
        faults = await self._faults(no, conn)
        duplicate = await self._consume(no, "webhook_duplicate_next", conn)
        drop = await self._consume(no, "webhook_drop_next", conn)
        reorder = await self._consume(no, "webhook_reorder_next", conn)
        hold_s = faults.webhook_delay_ms / 1000 + (REORDER_HOLD_S if reorder else 0)
        await conn.execute(
            f"INSERT INTO {self._s}.webhook_delivery (event_id, pay_order_no, txn_id, body,"
            " copies, drop_first, next_attempt_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))",
            event_id,
            no,
            txn_id,
            body,
            2 if duplicate else 1,
            drop,
            hold_s,
        )

    # --- webhooks ---------------------------------------------------------------------------

    async def deliver_due(
        self,
        send: SendWebhook,
        *,
        url: str = "",
        secrets: list[str] | None = None,
        max_attempts: int,
        retry_initial_ms: int = 0,
        render: RenderWebhook | None = None,
        retry_after_ms: Callable[[int], float] | None = None,
    ) -> int:
        """Send the webhooks that are due, signed with ``secrets[0]``; how many got a 2xx.

        A failed attempt (non-2xx, network error, ``NotAcknowledged``, or a lost first
        attempt) is retried after ``retry_initial_ms * 2**(attempts before it)``, at most a
        minute, until ``max_attempts``. Rows stay locked while they are sent, so several
        delivery loops never send the same row at once.

        ``render`` replaces the sandbox's signed JSON (``url`` and ``secrets`` are then
        unused) and ``retry_after_ms(attempt)`` the backoff after failed attempt number
        ``attempt`` (1 for the first), for a gateway with notifications of its own.
        """
        if render is None:
            if not secrets:
                raise ValueError("webhook delivery needs a signing secret")
            render = _signed_json(url, secrets[0])
        if retry_after_ms is None:
            retry_after_ms = _doubling(retry_initial_ms)
        delivered = 0
        s = self._s
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT event_id, body, attempts, drop_first FROM {s}.webhook_delivery"
                " WHERE deliveries < copies AND attempts < $1 AND next_attempt_at <= now()"
                " ORDER BY next_attempt_at, created_at, event_id LIMIT $2"
                " FOR UPDATE SKIP LOCKED",
                max_attempts,
                DELIVERY_BATCH,
            )

            async def send_one(row: asyncpg.Record) -> tuple[int | None, str | None]:
                if row["drop_first"] and row["attempts"] == 0:
                    return None, "lost (injected fault): never sent"
                try:
                    to, headers, body = render(bytes(row["body"]))
                    return await send(to, headers, body), None
                except NotAcknowledged as e:
                    return e.status, str(e)[:500]
                except Exception as e:
                    # Any failure to get an answer is a failed attempt, retried later.
                    return None, f"{type(e).__name__}: {e}"[:500]

            # The batch's rows go out at once, as a gateway's delivery workers send them
            # (one by one, a slow answer would hold every payment behind it); the rows
            # stay locked until their outcomes are written below.
            outcomes = await asyncio.gather(*(send_one(row) for row in rows))
            for row, (status, error) in zip(rows, outcomes, strict=True):
                if status is not None and 200 <= status < 300 and error is None:
                    delivered += 1
                    await conn.execute(
                        f"UPDATE {s}.webhook_delivery SET attempts = attempts + 1,"
                        " deliveries = deliveries + 1, last_status = $2, last_error = NULL,"
                        " delivered_at = COALESCE(delivered_at, clock_timestamp()),"
                        " next_attempt_at = clock_timestamp() WHERE event_id = $1",
                        row["event_id"],
                        status,
                    )
                    continue
                retry_ms = retry_after_ms(row["attempts"] + 1)
                await conn.execute(
                    f"UPDATE {s}.webhook_delivery SET attempts = attempts + 1,"
                    " last_status = $2, last_error = $3,"
                    " next_attempt_at = clock_timestamp() + make_interval(secs => $4)"
                    " WHERE event_id = $1",
                    row["event_id"],
                    status,
                    error or f"HTTP {status}",
                    retry_ms / 1000,
                )
                attempt = row["attempts"] + 1
                if attempt >= max_attempts:
                    log.error(
                        "webhook %s given up after %d attempts (%s)",
                        row["event_id"],
                        attempt,
                        error or f"HTTP {status}",
                    )
                else:
                    log.warning(
                        "webhook %s attempt %d failed (%s); next in %d ms",
                        row["event_id"],
                        attempt,
                        error or f"HTTP {status}",
                        retry_ms,
                    )
        return delivered

    # --- for another local gateway built on this ledger -------------------------------------

    async def capture_in(
        self,
        conn: Conn,
        *,
        pay_order_no: str,
        amount: int,
        currency: str,
        txn_id: str,
        notify: bool,
    ) -> tuple[Capture, bool]:
        """``capture`` inside the caller's transaction: the capture, and whether this call
        created it. Call ``wake_delivery`` once that transaction is committed."""
        capture, created = await self._capture(conn, pay_order_no, amount, currency, txn_id)
        if notify and created:
            await self._queue_webhook(conn, capture)
        return capture, created

    def wake_delivery(self) -> None:
        """A notification was queued: the delivery loop need not wait its turn."""
        self._webhook_queued.set()

    async def apply_delay(self, pay_order_no: str) -> Faults:
        """The ``delay_ms`` fault of a call, as every gateway call here takes it; the faults
        armed for the order (or ``*``).

        Raises:
            GatewayUnavailable: the delay reaches the server's own timeout (nothing done).
        """
        return await self._apply_delay(pay_order_no)

    async def faults_for(self, pay_order_no: str, conn: Conn | None = None) -> Faults:
        """The faults armed for an order: its own, else those of ``*``."""
        return await self._faults(pay_order_no, conn)

    # --- the Gateway protocol -------------------------------------------------------------

    name = "sandbox"

    async def open_trade(self, trade: OpenTrade, *, first_attempt: bool = True) -> Checkout:
        """Open the trade (once per pay order: the pay order number is the sandbox's trade
        number, so a repeated call finds the same trade). A trade already paid or closed
        stays as it is."""
        await self._apply_delay(trade.pay_order_no)
        async with self._pool.acquire() as conn:
            await conn.execute(
                f"INSERT INTO {self._s}.trade (pay_order_no, state) VALUES ($1, 'OPEN')"
                " ON CONFLICT (pay_order_no) DO NOTHING",
                trade.pay_order_no,
            )
        return sandbox_checkout(trade.pay_order_no)

    async def close_trade(
        self, pay_order_no: str, trade_ref: str | None = None, *, notify: bool = False
    ) -> CloseResult:
        """Close the trade, or learn it was paid. With ``notify``, a payment made at the very
        instant of closing (the ``paid_on_close`` fault) also queues its webhook, as a real
        gateway would send one for it."""
        faults = await self._apply_delay(pay_order_no)
        s = self._s
        async with self._pool.acquire() as conn, conn.transaction():
            trade = await conn.fetchrow(
                f"SELECT * FROM {s}.trade WHERE pay_order_no = $1 FOR UPDATE", pay_order_no
            )
            if (trade is None or trade["state"] == "OPEN") and faults.paid_on_close_amount:
                # The customer pays at the very instant we close: the gateway wins the race.
                paid, _ = await self._capture(
                    conn,
                    pay_order_no,
                    faults.paid_on_close_amount,
                    faults.paid_on_close_currency or "",
                    f"txn_close_{uuid.uuid4().hex[:18]}",
                )
                if notify:
                    await self._queue_webhook(conn, paid)
                    self._webhook_queued.set()  # read only after this commit: harmless early
                trade = await conn.fetchrow(
                    f"SELECT * FROM {s}.trade WHERE pay_order_no = $1", pay_order_no
                )
            if trade is not None and trade["state"] == "PAID":
                cap = await conn.fetchrow(
                    f"SELECT * FROM {s}.capture WHERE txn_id = $1", trade["txn_id"]
                )
                assert cap is not None
                return CloseResult(closed=False, capture=_capture(cap))
            await conn.execute(
                f"INSERT INTO {s}.trade (pay_order_no, state) VALUES ($1, 'CLOSED')"
                f" ON CONFLICT (pay_order_no) DO UPDATE SET state = 'CLOSED', updated_at = now()",
                pay_order_no,
            )
            return CloseResult(closed=True)

    async def refund(self, request: RefundRequest) -> GatewayRefund:
        return _refund(await self._refund_row(request))

    async def refund_detailed(
        self, request: RefundRequest, *, notify: bool = False
    ) -> SandboxRefund:
        """``refund``, with the sandbox's own detail (how long making the refund took).

        With ``notify`` a new refund also queues its ``refund.succeeded`` webhook, in the
        same transaction (a replayed one queues nothing more).
        """
        return _sandbox_refund(await self._refund_row(request, notify=notify))

    async def dashboard_refund(self, *, txn_id: str, amount: int) -> SandboxRefund:
        """A refund made at the gateway's dashboard by the shop's staff, not through us: a
        key of the gateway's own, the same checks as any refund, and its webhook.

        Raises:
            GatewayRejected: no such capture, or more than is left of it.
        """
        cap = await self.query_capture(txn_id)
        if cap is None:
            raise GatewayRejected(f"no capture {txn_id}")
        request = RefundRequest(
            idempotency_key=f"dashboard-{uuid.uuid4().hex[:24]}",
            pay_order_no=cap.pay_order_no,
            txn_id=txn_id,
            amount=amount,
            currency=cap.currency,
        )
        return await self.refund_detailed(request, notify=True)

    async def _refund_row(self, request: RefundRequest, *, notify: bool = False) -> asyncpg.Record:
        started = time.perf_counter()
        await self.refund_faults_before(request)
        async with self._pool.acquire() as conn, conn.transaction():
            rec, created = await self.refund_in(conn, request, notify=notify, started=started)
        if not created:
            return rec
        if notify:
            self._webhook_queued.set()
        await self.refund_faults_after(request)
        return rec

    # --- refunds, for another local gateway built on this ledger ----------------------------

    async def refund_faults_before(self, request: RefundRequest) -> None:
        """The faults a refund call meets before anything is done: ``delay_ms``, then
        ``fail_next_refunds``.

        Raises:
            GatewayUnavailable: either fault (nothing was done).
        """
        await self._apply_delay(request.pay_order_no)
        if await self._consume(request.pay_order_no, "fail_next_refunds"):
            await self._log_call(request.idempotency_key, "FAILED_INJECTED")
            raise GatewayUnavailable("sandbox gateway: refund failed (injected fault)")

    async def refund_faults_after(self, request: RefundRequest) -> None:
        """The ``timeout_after_success_next`` fault of a refund just made (committed): its
        answer is held back past the caller's timeout."""
        if await self._consume(request.pay_order_no, "timeout_after_success_next"):
            # The money has moved; the answer never reaches the caller before its timeout.
            await self._log_call(request.idempotency_key, "ANSWER_WITHHELD")
            if self._withhold_answer_s is None:
                await asyncio.Event().wait()
            else:
                await asyncio.sleep(self._withhold_answer_s)

    async def refund_in(
        self,
        conn: Conn,
        request: RefundRequest,
        *,
        notify: bool,
        started: float | None = None,
    ) -> tuple[asyncpg.Record, bool]:
        """The refund made inside the caller's transaction, or the one made before under
        its key: the row, and whether this call made it (no faults: see
        ``refund_faults_before`` and ``_after``). With ``notify`` a new refund queues its
        notification too; call ``wake_delivery`` once the transaction is committed.

        Raises:
            GatewayRejected: the key was used with other facts, no such capture, or more
                than is left of it.
        """
        started = time.perf_counter() if started is None else started
        s = self._s
        # Serialise calls with the same key so one key can only ever move money once.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", request.idempotency_key
        )
        existing = await conn.fetchrow(
            f"SELECT * FROM {s}.refund WHERE idempotency_key = $1", request.idempotency_key
        )
        if existing is not None:
            if (existing["txn_id"], existing["amount"]) != (request.txn_id, request.amount):
                await self._log_call(request.idempotency_key, "REJECTED_KEY_REUSE", conn)
                raise GatewayRejected("idempotency key reused with other parameters")
            await self._log_call(request.idempotency_key, "REPLAYED", conn)
            return existing, False
        cap = await conn.fetchrow(
            f"SELECT * FROM {s}.capture WHERE txn_id = $1 FOR UPDATE", request.txn_id
        )
        if cap is None or cap["pay_order_no"] != request.pay_order_no:
            await self._log_call(request.idempotency_key, "REJECTED_NO_CAPTURE", conn)
            raise GatewayRejected(f"no capture {request.txn_id} for {request.pay_order_no}")
        refunded = await conn.fetchval(
            f"SELECT COALESCE(sum(amount), 0) FROM {s}.refund WHERE txn_id = $1",
            request.txn_id,
        )
        if refunded + request.amount > cap["amount"] or request.currency != cap["currency"]:
            await self._log_call(request.idempotency_key, "REJECTED_EXCEEDS", conn)
            raise GatewayRejected("refund exceeds what was captured")
        rec = await conn.fetchrow(
            f"INSERT INTO {s}.refund (idempotency_key, gateway_refund_id, txn_id, amount,"
            " currency, status, processing_ms) VALUES ($1, $2, $3, $4, $5, 'SUCCEEDED', $6)"
            " RETURNING *",
            request.idempotency_key,
            f"rf_{uuid.uuid4().hex[:24]}",
            request.txn_id,
            request.amount,
            request.currency,
            (time.perf_counter() - started) * 1000,
        )
        assert rec is not None
        await self._log_call(request.idempotency_key, "SUCCEEDED", conn)
        if notify:
            await self._queue_refund_webhook(conn, request.pay_order_no, rec)
        return rec, True

    async def log_refund_call(self, key: str, outcome: str, conn: Conn | None = None) -> None:
        """One refund call's outcome, as the ledger's ``refund_calls`` show them."""
        await self._log_call(key, outcome, conn)

    async def queue_notification_in(
        self, conn: Conn, event_id: str, *, pay_order_no: str, txn_id: str, body: bytes
    ) -> None:
        """A notification of the gateway's own (not a capture's or refund's), queued inside
        the caller's transaction and shaped by the webhook faults armed now; call
        ``wake_delivery`` once the transaction is committed."""
        await self._queue_delivery(conn, event_id, pay_order_no, txn_id, body)

    async def query_refund(self, idempotency_key: str, txn_id: str) -> GatewayRefund | None:
        rec = await self._refund_by_key(idempotency_key)
        return None if rec is None or rec["txn_id"] != txn_id else _refund(rec)

    async def query_refund_detailed(self, idempotency_key: str) -> SandboxRefund | None:
        rec = await self._refund_by_key(idempotency_key)
        return None if rec is None else _sandbox_refund(rec)

    async def _refund_by_key(self, idempotency_key: str) -> asyncpg.Record | None:
        async with self._pool.acquire() as conn:
            rec: asyncpg.Record | None = await conn.fetchrow(
                f"SELECT * FROM {self._s}.refund WHERE idempotency_key = $1", idempotency_key
            )
        return rec

    async def query_capture(self, txn_id: str) -> Capture | None:
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(f"SELECT * FROM {self._s}.capture WHERE txn_id = $1", txn_id)
        return None if rec is None else _capture(rec)

    async def refunds_of(self, txn_id: str) -> list[GatewayRefund]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT * FROM {self._s}.refund WHERE txn_id = $1"
                " ORDER BY created_at, idempotency_key",
                txn_id,
            )
        return [_refund(r) for r in rows]

    async def statement(self, start: datetime, end: datetime) -> Statement:
        caps, refs = await self._statement_rows(start, end)
        return Statement(captures=[_capture(c) for c in caps], refunds=[_refund(r) for r in refs])

    async def statement_detailed(self, start: datetime, end: datetime) -> Statement:
        """``statement`` whose refunds are ``SandboxRefund``s."""
        caps, refs = await self._statement_rows(start, end)
        return Statement(
            captures=[_capture(c) for c in caps], refunds=[_sandbox_refund(r) for r in refs]
        )

    async def _statement_rows(
        self, start: datetime, end: datetime
    ) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        s = self._s
        async with self._pool.acquire() as conn:
            caps = await conn.fetch(
                f"SELECT * FROM {s}.capture WHERE captured_at >= $1 AND captured_at < $2"
                " ORDER BY captured_at, txn_id",
                start,
                end,
            )
            refs = await conn.fetch(
                f"SELECT * FROM {s}.refund WHERE created_at >= $1 AND created_at < $2"
                " ORDER BY created_at, idempotency_key",
                start,
                end,
            )
        return caps, refs

    # --- ledger reads and faults (sandbox only) ---------------------------------------------

    async def ledger_of(self, pay_order_no: str) -> dict[str, Any]:
        """What the gateway holds for one pay order: captures, refunds (``SandboxRefund``),
        refund calls and webhook deliveries."""
        s = self._s
        async with self._pool.acquire() as conn:
            caps = await conn.fetch(
                f"SELECT * FROM {s}.capture WHERE pay_order_no = $1 ORDER BY captured_at",
                pay_order_no,
            )
            refs = await conn.fetch(
                f"SELECT r.* FROM {s}.refund r JOIN {s}.capture c USING (txn_id)"
                " WHERE c.pay_order_no = $1 ORDER BY r.created_at",
                pay_order_no,
            )
            calls = await conn.fetch(
                f"SELECT idempotency_key, outcome FROM {s}.refund_call"
                " WHERE idempotency_key LIKE 'refund-' || $1 || '-%' ORDER BY id",
                pay_order_no,
            )
            trade = await conn.fetchrow(
                f"SELECT state FROM {s}.trade WHERE pay_order_no = $1", pay_order_no
            )
            hooks = await conn.fetch(
                f"SELECT event_id, txn_id, copies, deliveries, attempts, next_attempt_at,"
                f" delivered_at, last_status, last_error, created_at FROM {s}.webhook_delivery"
                " WHERE pay_order_no = $1 ORDER BY created_at, event_id",
                pay_order_no,
            )
        return {
            "trade_state": None if trade is None else trade["state"],
            "captures": [_capture(c) for c in caps],
            "refunds": [_sandbox_refund(r) for r in refs],
            "refund_calls": [(c["idempotency_key"], c["outcome"]) for c in calls],
            "captured": sum(c["amount"] for c in caps),
            "refunded": sum(r["amount"] for r in refs),
            "webhooks": [dict(h) for h in hooks],
        }

    async def set_faults(self, scope: str = "*", **faults: Any) -> None:
        """Arm faults for ``scope``; fields not given keep their current values."""
        unknown = set(faults) - set(FAULT_FIELDS)
        if unknown:
            raise ValueError(f"unknown faults: {', '.join(sorted(unknown))}")
        if not faults:
            return
        names = list(faults)
        # Column names come from FAULT_FIELDS only (checked above), never from the caller.
        await self._execute(
            f"INSERT INTO {self._s}.fault (scope, {', '.join(names)})"
            f" VALUES ($1, {', '.join(f'${i}' for i in range(2, len(names) + 2))})"
            f" ON CONFLICT (scope) DO UPDATE SET"
            f" {', '.join(f'{n} = EXCLUDED.{n}' for n in names)}",
            scope,
            *faults.values(),
        )

    async def list_faults(self) -> list[dict[str, Any]]:
        """The faults still armed (spent counters are left out)."""
        armed = " OR ".join(
            f"{f.name} IS NOT NULL" if f.default is None else f"{f.name} > 0"
            for f in fields(Faults)
        )
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT scope, {', '.join(FAULT_FIELDS)} FROM {self._s}.fault"
                f" WHERE {armed} ORDER BY scope"
            )
        return [dict(r) for r in rows]

    async def faults_of(self, scope: str) -> Faults:
        """The faults of exactly this scope (no fallback to ``*``)."""
        return await self._faults_row(scope) or Faults()

    async def ping(self) -> None:
        """Raises if the ledger cannot be reached."""
        async with self._pool.acquire() as conn:
            await conn.fetchval(f"SELECT count(*) FROM {self._s}.fault WHERE false")

    async def clear_faults(self, scope: str | None = None) -> None:
        async with self._pool.acquire() as conn:
            if scope is None:
                await conn.execute(f"DELETE FROM {self._s}.fault")
            else:
                await conn.execute(f"DELETE FROM {self._s}.fault WHERE scope = $1", scope)

    async def _faults_row(self, scope: str, conn: Conn | None = None) -> Faults | None:
        sql = f"SELECT {', '.join(FAULT_FIELDS)} FROM {self._s}.fault WHERE scope = $1"
        if conn is not None:
            rec = await conn.fetchrow(sql, scope)
        else:
            async with self._pool.acquire() as c:
                rec = await c.fetchrow(sql, scope)
        return None if rec is None else Faults(**dict(rec))

    async def _faults(self, pay_order_no: str, conn: Conn | None = None) -> Faults:
        return (
            await self._faults_row(pay_order_no, conn)
            or await self._faults_row("*", conn)
            or Faults()
        )

    async def _apply_delay(self, pay_order_no: str) -> Faults:
        faults = await self._faults(pay_order_no)
        if faults.delay_ms:
            delay = faults.delay_ms / 1000
            await asyncio.sleep(min(delay, self._server_timeout_s))
            if delay >= self._server_timeout_s:
                raise GatewayUnavailable("sandbox gateway: server timeout, nothing was done")
        return faults

    async def _consume(self, pay_order_no: str, counter: str, conn: Conn | None = None) -> bool:
        """Take one unit of a counting fault, the order's own before the global one."""
        assert counter in _COUNTERS
        sql = (
            f"UPDATE {self._s}.fault SET {counter} = {counter} - 1"
            f" WHERE scope = $1 AND {counter} > 0 RETURNING scope"
        )
        if conn is None:
            async with self._pool.acquire() as c:
                return await self._consume(pay_order_no, counter, c)
        for scope in (pay_order_no, "*"):
            if await conn.fetchval(sql, scope) is not None:
                return True
        return False

    async def _execute(self, sql: str, *args: Any) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(sql, *args)

    async def _log_call(self, key: str, outcome: str, conn: Conn | None = None) -> None:
        sql = f"INSERT INTO {self._s}.refund_call (idempotency_key, outcome) VALUES ($1, $2)"
        if conn is not None:
            await conn.execute(sql, key, outcome)
            return
        async with self._pool.acquire() as c:
            await c.execute(sql, key, outcome)


class TimeoutClient:
    """The caller's side of any in-process gateway: a client timeout on every call.

    A timeout is reported as ``GatewayAmbiguous``: the gateway may have done the work.
    """

    def __init__(self, inner: SandboxGateway, *, client_timeout_s: float) -> None:
        self._inner = inner
        self._timeout = client_timeout_s

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await asyncio.wait_for(fn(), self._timeout)
        except TimeoutError:
            observed = (loop.time() - started) * 1000
            raise GatewayAmbiguous(
                f"{what}: no answer within {self._timeout:.1f}s; outcome unknown",
                observed_ms=observed,
            ) from None

    name = "sandbox"

    async def open_trade(self, trade: OpenTrade, *, first_attempt: bool = True) -> Checkout:
        return await self._call("open_trade", lambda: self._inner.open_trade(trade))

    async def close_trade(self, pay_order_no: str, trade_ref: str | None = None) -> CloseResult:
        return await self._call("close_trade", lambda: self._inner.close_trade(pay_order_no))

    async def refund(self, request: RefundRequest) -> GatewayRefund:
        return await self._call("refund", lambda: self._inner.refund(request))

    async def query_refund(self, idempotency_key: str, txn_id: str) -> GatewayRefund | None:
        return await self._call(
            "query_refund", lambda: self._inner.query_refund(idempotency_key, txn_id)
        )

    async def query_capture(self, txn_id: str) -> Capture | None:
        return await self._call("query_capture", lambda: self._inner.query_capture(txn_id))

    async def refunds_of(self, txn_id: str) -> list[GatewayRefund]:
        return await self._call("refunds_of", lambda: self._inner.refunds_of(txn_id))

    async def statement(self, start: datetime, end: datetime) -> Statement:
        return await self._call("statement", lambda: self._inner.statement(start, end))


def _signed_json(url: str, secret: str) -> RenderWebhook:
    def render(body: bytes) -> tuple[str, dict[str, str], bytes]:
        headers = {
            webhook.HEADER: webhook.sign_header([secret], int(time.time()), body),
            "Content-Type": "application/json",
        }
        return url, headers, body

    return render


def _doubling(initial_ms: int) -> Callable[[int], float]:
    def after(attempt: int) -> float:
        return float(min(initial_ms * 2 ** min(attempt - 1, 30), RETRY_CAP_MS))

    return after


def sandbox_checkout(pay_order_no: str) -> Checkout:
    """What a front end needs to pay a sandbox trade: its number, and where to pay it."""
    return Checkout(
        gateway="sandbox",
        trade_ref=pay_order_no,
        details={"trade_no": pay_order_no, "pay_url": "/v1/payments"},
    )


def _capture(rec: asyncpg.Record) -> Capture:
    return Capture(
        txn_id=rec["txn_id"],
        pay_order_no=rec["pay_order_no"],
        amount=rec["amount"],
        currency=rec["currency"],
        captured_at=rec["captured_at"],
    )


def _sandbox_refund(rec: asyncpg.Record) -> SandboxRefund:
    return SandboxRefund(**_refund(rec).__dict__, processing_ms=rec["processing_ms"])


def _refund(rec: asyncpg.Record) -> GatewayRefund:
    return GatewayRefund(
        idempotency_key=rec["idempotency_key"],
        gateway_refund_id=rec["gateway_refund_id"],
        txn_id=rec["txn_id"],
        amount=rec["amount"],
        currency=rec["currency"],
        status=RefundStatus(rec["status"]),
        created_at=rec["created_at"],
    )


@dataclass
class InProcessResources(Resources):
    sandbox: SandboxGateway
    """The sandbox's ledger itself: tests and benchmarks read and arm it directly."""


@asynccontextmanager
async def in_process(settings: Settings, url: str) -> AsyncIterator[InProcessResources]:
    """Our resources wired to a sandbox gateway inside this process (tests, benchmarks):
    the product calls it through a client timeout, as it would call one over the wire."""
    pool = await store.create_pool(url, min_size=1, max_size=settings.db_pool_max)
    try:
        sandbox = SandboxGateway(
            pool,
            schema=settings.sandbox_schema,
            server_timeout_s=settings.gateway_server_timeout_ms / 1000,
        )
        await sandbox.install()
        gateway = TimeoutClient(sandbox, client_timeout_s=settings.gateway_client_timeout_ms / 1000)
        async with open_resources(settings, url, gateway=gateway) as res:
            yield InProcessResources(
                **{f.name: getattr(res, f.name) for f in fields(Resources)}, sandbox=sandbox
            )
    finally:
        await pool.close()

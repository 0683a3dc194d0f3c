"""A sandbox payment gateway with its own ledger in its own PostgreSQL schema.

The ledger is the gateway's truth, separate from ours, so tests and reconciliation can
compare the two. Faults are rows too, so another process (the CLI, a test) can set them.
A fault row's ``scope`` is a pay order number, or ``*`` for every order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from payorders.domain import RefundStatus
from payorders.gateway import (
    Capture,
    CloseResult,
    GatewayAmbiguous,
    GatewayRefund,
    GatewayRejected,
    GatewayUnavailable,
    RefundRequest,
    Statement,
)
from payorders.store import Conn

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

"""

T = TypeVar("T")


@dataclass(frozen=True)
class Faults:
    fail_next_refunds: int = 0
    timeout_after_success_next: int = 0
    delay_ms: int = 0
    paid_on_close_amount: int | None = None
    paid_on_close_currency: str | None = None


class SandboxGateway:
    """Implements the ``Gateway`` protocol against its own ledger.

    ``server_timeout_s`` is the gateway's own limit: a request slowed past it is answered
    with an error before any work is done, as a real gateway's front end would.
    """

    def __init__(self, pool: asyncpg.Pool, *, schema: str, server_timeout_s: float) -> None:
        if not schema.isidentifier():
            raise ValueError("schema must be an SQL identifier")
        self._pool = pool
        self._s = schema
        self._server_timeout_s = server_timeout_s

    async def install(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_ID)
            await conn.execute(_DDL.format(s=self._s))

    # --- the customer's side -------------------------------------------------------------

    async def capture(
        self, *, pay_order_no: str, amount: int, currency: str, txn_id: str | None = None
    ) -> Capture:
        """A customer pays: the gateway captures the money (even for a closed trade, as a
        payment by another route would). Idempotent per ``txn_id``."""
        txn_id = txn_id or f"txn_{uuid.uuid4().hex[:24]}"
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._capture(conn, pay_order_no, amount, currency, txn_id)

    async def _capture(
        self, conn: Conn, pay_order_no: str, amount: int, currency: str, txn_id: str
    ) -> Capture:
        s = self._s
        rec = await conn.fetchrow(
            f"INSERT INTO {s}.capture (txn_id, pay_order_no, amount, currency)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (txn_id) DO NOTHING RETURNING *",
            txn_id,
            pay_order_no,
            amount,
            currency,
        )
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
        return _capture(rec)

    # --- the Gateway protocol -------------------------------------------------------------

    async def close_trade(self, pay_order_no: str) -> CloseResult:
        faults = await self._apply_delay(pay_order_no)
        s = self._s
        async with self._pool.acquire() as conn, conn.transaction():
            trade = await conn.fetchrow(
                f"SELECT * FROM {s}.trade WHERE pay_order_no = $1 FOR UPDATE", pay_order_no
            )
            if (trade is None or trade["state"] == "OPEN") and faults.paid_on_close_amount:
                # The customer pays at the very instant we close: the gateway wins the race.
                await self._capture(
                    conn,
                    pay_order_no,
                    faults.paid_on_close_amount,
                    faults.paid_on_close_currency or "",
                    f"txn_close_{uuid.uuid4().hex[:18]}",
                )
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
        await self._apply_delay(request.pay_order_no)
        if await self._consume(request.pay_order_no, "fail_next_refunds"):
            await self._log_call(request.idempotency_key, "FAILED_INJECTED")
            raise GatewayUnavailable("sandbox gateway: refund failed (injected fault)")
        s = self._s
        async with self._pool.acquire() as conn, conn.transaction():
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
                return _refund(existing)
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
                " currency, status) VALUES ($1, $2, $3, $4, $5, 'SUCCEEDED') RETURNING *",
                request.idempotency_key,
                f"rf_{uuid.uuid4().hex[:24]}",
                request.txn_id,
                request.amount,
                request.currency,
            )
            await self._log_call(request.idempotency_key, "SUCCEEDED", conn)
        assert rec is not None
        if await self._consume(request.pay_order_no, "timeout_after_success_next"):
            # The money has moved; the answer never reaches the caller before its timeout.
            await self._log_call(request.idempotency_key, "ANSWER_WITHHELD")
            await asyncio.Event().wait()
        return _refund(rec)

    async def query_refund(self, idempotency_key: str) -> GatewayRefund | None:
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(
                f"SELECT * FROM {self._s}.refund WHERE idempotency_key = $1", idempotency_key
            )
        return None if rec is None else _refund(rec)

    async def statement(self, start: datetime, end: datetime) -> Statement:
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
        return Statement(captures=[_capture(c) for c in caps], refunds=[_refund(r) for r in refs])

    # --- ledger reads and faults (sandbox only) ---------------------------------------------

    async def ledger_of(self, pay_order_no: str) -> dict[str, Any]:
        """What the gateway holds for one pay order: captures, refunds and refund calls."""
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
        return {
            "trade_state": None if trade is None else trade["state"],
            "captures": [_capture(c) for c in caps],
            "refunds": [_refund(r) for r in refs],
            "refund_calls": [(c["idempotency_key"], c["outcome"]) for c in calls],
            "captured": sum(c["amount"] for c in caps),
            "refunded": sum(r["amount"] for r in refs),
        }

    async def set_faults(self, scope: str = "*", **faults: Any) -> None:
        current = await self._faults_row(scope) or Faults()
        merged = Faults(**{**current.__dict__, **faults})
        async with self._pool.acquire() as conn:
            await conn.execute(
                f"INSERT INTO {self._s}.fault (scope, fail_next_refunds,"
                " timeout_after_success_next, delay_ms, paid_on_close_amount,"
                " paid_on_close_currency) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (scope) DO UPDATE SET fail_next_refunds = $2,"
                " timeout_after_success_next = $3, delay_ms = $4, paid_on_close_amount = $5,"
                " paid_on_close_currency = $6",
                scope,
                merged.fail_next_refunds,
                merged.timeout_after_success_next,
                merged.delay_ms,
                merged.paid_on_close_amount,
                merged.paid_on_close_currency,
            )

    async def list_faults(self) -> list[dict[str, Any]]:
        """The faults still armed (spent counters are left out)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT * FROM {self._s}.fault WHERE fail_next_refunds > 0"
                " OR timeout_after_success_next > 0 OR delay_ms > 0"
                " OR paid_on_close_amount IS NOT NULL ORDER BY scope"
            )
        return [dict(r) for r in rows]

    async def clear_faults(self, scope: str | None = None) -> None:
        async with self._pool.acquire() as conn:
            if scope is None:
                await conn.execute(f"DELETE FROM {self._s}.fault")
            else:
                await conn.execute(f"DELETE FROM {self._s}.fault WHERE scope = $1", scope)

    async def _faults_row(self, scope: str) -> Faults | None:
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(f"SELECT * FROM {self._s}.fault WHERE scope = $1", scope)
        if rec is None:
            return None
        values = dict(rec)
        values.pop("scope")
        return Faults(**values)

    async def _faults(self, pay_order_no: str) -> Faults:
        return await self._faults_row(pay_order_no) or await self._faults_row("*") or Faults()

    async def _apply_delay(self, pay_order_no: str) -> Faults:
        faults = await self._faults(pay_order_no)
        if faults.delay_ms:
            delay = faults.delay_ms / 1000
            await asyncio.sleep(min(delay, self._server_timeout_s))
            if delay >= self._server_timeout_s:
                raise GatewayUnavailable("sandbox gateway: server timeout, nothing was done")
        return faults

    async def _consume(self, pay_order_no: str, counter: str) -> bool:
        """Take one unit of a counting fault, the order's own before the global one."""
        async with self._pool.acquire() as conn:
            for scope in (pay_order_no, "*"):
                taken = await conn.fetchval(
                    f"UPDATE {self._s}.fault SET {counter} = {counter} - 1"
                    f" WHERE scope = $1 AND {counter} > 0 RETURNING scope",
                    scope,
                )
                if taken is not None:
                    return True
        return False

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

    async def close_trade(self, pay_order_no: str) -> CloseResult:
        return await self._call("close_trade", lambda: self._inner.close_trade(pay_order_no))

    async def refund(self, request: RefundRequest) -> GatewayRefund:
        return await self._call("refund", lambda: self._inner.refund(request))

    async def query_refund(self, idempotency_key: str) -> GatewayRefund | None:
        return await self._call("query_refund", lambda: self._inner.query_refund(idempotency_key))

    async def statement(self, start: datetime, end: datetime) -> Statement:
        return await self._call("statement", lambda: self._inner.statement(start, end))


def _capture(rec: asyncpg.Record) -> Capture:
    return Capture(
        txn_id=rec["txn_id"],
        pay_order_no=rec["pay_order_no"],
        amount=rec["amount"],
        currency=rec["currency"],
        captured_at=rec["captured_at"],
    )


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

"""Merchant refunds: money a shop gives back after ``PAY_SUCCESS``, and their SQL.

The one writer per pay order is the pay order's row lock: a refund is opened in one
transaction that locks the ``pay_order`` row (``FOR UPDATE``), reads what is refunded or in
flight and inserts the refund only if it fits; the insert trigger of migration 0009 takes
the same lock and checks the same rule, whatever writes. So two refunds for the last money,
from any processes, are decided one after the other, and a refund months after the pay
order's workflow has completed needs no workflow of the pay order's. Each refund then runs
in a small workflow of its own (``merchant-refund-{refund_no}``), so a pay order refunded
many times adds nothing to any one history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg

from payorders.core import domain
from payorders.core.domain import PayOrderStatus, RefundSource
from payorders.core.models import MerchantRefund

SQL_LOCK_PAY_ORDER = "SELECT * FROM pay_order WHERE pay_order_no = $1 FOR UPDATE"
SQL_GET = "SELECT * FROM merchant_refund WHERE refund_no = $1"
SQL_OF_PAY_ORDER = """
SELECT * FROM merchant_refund WHERE pay_order_no = $1 ORDER BY created_at, refund_no"""
SQL_SETTLING_PAYMENT = """
SELECT txn_id, paid_at FROM payment WHERE pay_order_no = $1 AND settled"""
SQL_SUMS = """
SELECT COALESCE(sum(amount) FILTER (WHERE status = 'REFUND_SUCCESS'), 0)::bigint AS refunded,
       COALESCE(sum(amount) FILTER (WHERE status = 'REFUNDING'), 0)::bigint AS in_flight
  FROM merchant_refund WHERE pay_order_no = $1"""
SQL_INSERT = """
INSERT INTO merchant_refund
       (refund_no, pay_order_no, txn_id, amount, currency, reason, requested_by, source,
        idempotency_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING *"""
SQL_NOTE_ATTEMPT = """
UPDATE merchant_refund SET attempts = GREATEST(attempts, $2), last_error = $3
 WHERE refund_no = $1 AND status = 'REFUNDING'"""
SQL_SUCCEED = """
UPDATE merchant_refund
   SET status = 'REFUND_SUCCESS', gateway_refund_id = $2, finished_at = now(), last_error = NULL
 WHERE refund_no = $1 AND status = 'REFUNDING'
RETURNING *"""
SQL_FAIL = """
UPDATE merchant_refund
   SET status = 'REFUND_FAILED', failure_reason = $2, finished_at = now()
 WHERE refund_no = $1 AND status = 'REFUNDING'
RETURNING *"""
SQL_PAYMENT = "SELECT * FROM payment WHERE txn_id = $1"
# Is this gateway refund one of ours, of any kind? Ours carry our key; the id is checked too.
SQL_KNOWN = """
SELECT EXISTS (SELECT 1 FROM merchant_refund
                WHERE idempotency_key = $1 OR gateway_refund_id = $2)
    OR EXISTS (SELECT 1 FROM refund WHERE refund_key = $1 OR gateway_refund_id = $2)
    OR EXISTS (SELECT 1 FROM operator_refund WHERE refund_key = $1 OR gateway_refund_id = $2)"""
SQL_INSERT_GATEWAY_MADE = """
INSERT INTO merchant_refund
       (refund_no, pay_order_no, txn_id, amount, currency, reason, source, idempotency_key,
        status, gateway_refund_id, created_at, finished_at)
VALUES ($1, $2, $3, $4, $5, 'made at the gateway', 'gateway', $6, 'REFUND_SUCCESS', $7, $8,
        now())
ON CONFLICT DO NOTHING
RETURNING *"""
SQL_INSERT_EVENT = """
INSERT INTO outbox (event_type, pay_order_no, dedupe_key, payload)
VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (dedupe_key) DO NOTHING"""


GATEWAY_REFUND_PREFIX = "gateway-"
"""The ``refund_no`` of a refund made at the gateway: this prefix and the gateway's refund id."""


def gateway_refund_no(gateway_refund_id: str) -> str:
    """The ``refund_no`` we give a refund made at the gateway's dashboard (48 characters at
    most, of the shape every ``refund_no`` has)."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in gateway_refund_id)
    return (GATEWAY_REFUND_PREFIX + safe)[:48]


@dataclass(frozen=True)
class SeenAtGateway:
    """A refund the gateway holds for a transaction of ours, in our words."""

    key: str
    """Its idempotency key at the gateway (ours: ``mrefund-...``, ``refund-...``), or the
    gateway's refund id where it has no key of ours (a dashboard refund)."""
    gateway_refund_id: str
    txn_id: str
    amount: int
    currency: str
    created_at: datetime


class Refusal(StrEnum):
    """Why a merchant refund was refused; nothing was written."""

    NOT_FOUND = "not_found"
    NOT_PAID = "not_refundable"
    WINDOW_CLOSED = "refund_window_closed"
    EXCEEDS = "exceeds_refundable"
    CONFLICT = "conflict"


class RefundRefused(Exception):
    """A merchant refund that cannot be opened, and why (its message names the rule)."""

    def __init__(self, refusal: Refusal, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.extra = extra


@dataclass(frozen=True)
class Opened:
    refund: MerchantRefund
    created: bool
    """False: this ``refund_no`` was asked for before, with the same body; nothing moved."""
    totals: domain.MerchantRefunds


def _refund(rec: asyncpg.Record) -> MerchantRefund:
    values = dict(rec)
    values["currency"] = values["currency"].strip()
    return MerchantRefund.model_validate(values)


async def _totals(conn: Any, pay_order_no: str, amount: int) -> domain.MerchantRefunds:
    sums = await conn.fetchrow(SQL_SUMS, pay_order_no)
    return domain.MerchantRefunds(
        amount=amount, refunded=sums["refunded"], in_flight=sums["in_flight"]
    )


class MerchantRefunds:
    """The ``merchant_refund`` rows and their events."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def open(
        self,
        *,
        pay_order_no: str,
        refund_no: str,
        amount: int,
        reason: str | None,
        requested_by: str | None,
        now: datetime,
        window: timedelta = domain.DEFAULT_REFUND_WINDOW,
        source: RefundSource = RefundSource.API,
    ) -> Opened:
        """Open a refund of ``amount`` of a paid pay order, or answer the one ``refund_no``
        already is.

        Raises:
            RefundRefused: no such pay order; not ``PAY_SUCCESS``; past the refund window;
                more than is still refundable; ``refund_no`` taken by another refund.
                Nothing was written.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            order = await conn.fetchrow(SQL_LOCK_PAY_ORDER, pay_order_no)
            existing = await conn.fetchrow(SQL_GET, refund_no)
            if existing is not None:
                if (existing["pay_order_no"], existing["amount"]) != (pay_order_no, amount):
                    raise RefundRefused(
                        Refusal.CONFLICT,
                        f"refund_no {refund_no} is a refund of {existing['amount']} for"
                        f" {existing['pay_order_no']}: use a new refund_no for another refund",
                    )
                assert order is not None
                totals = await _totals(conn, pay_order_no, order["amount"])
                return Opened(refund=_refund(existing), created=False, totals=totals)
            if order is None:
                raise RefundRefused(Refusal.NOT_FOUND, f"no pay order {pay_order_no}")
            status = PayOrderStatus(order["status"])
            if status is not PayOrderStatus.PAY_SUCCESS:
                raise RefundRefused(
                    Refusal.NOT_PAID,
                    f"pay order {pay_order_no} is {status.value}: only a PAY_SUCCESS order is"
                    " refunded (money of an expired one goes back by itself)",
                    status=status.value,
                )
            payment = await conn.fetchrow(SQL_SETTLING_PAYMENT, pay_order_no)
            assert payment is not None  # PAY_SUCCESS has its settling payment (0001)
            if domain.refund_window_closed(paid_at=payment["paid_at"], now=now, window=window):
                raise RefundRefused(
                    Refusal.WINDOW_CLOSED,
                    f"pay order {pay_order_no} was paid {payment['paid_at'].date()}: refunds"
                    f" are taken for {window.days} days after payment",
                )
            totals = await _totals(conn, pay_order_no, order["amount"])
            if amount > totals.refundable:
                raise RefundRefused(
                    Refusal.EXCEEDS,
                    f"amount: at most {totals.refundable} of pay order {pay_order_no} is still"
                    f" refundable ({totals.refunded} refunded, {totals.in_flight} in flight)",
                    refundable=totals.refundable,
                )
            try:
                rec = await conn.fetchrow(
                    SQL_INSERT,
                    refund_no,
                    pay_order_no,
                    payment["txn_id"],
                    amount,
                    order["currency"].strip(),
                    reason,
                    requested_by,
                    source.value,
                    domain.merchant_refund_key(refund_no),
                )
            except asyncpg.UniqueViolationError:
                # The same refund_no opened at once for another pay order (whose lock this
                # transaction does not hold).
                raise RefundRefused(
                    Refusal.CONFLICT, f"refund_no {refund_no} is taken by another refund"
                ) from None
            assert rec is not None
            totals = domain.MerchantRefunds(
                amount=totals.amount,
                refunded=totals.refunded,
                in_flight=totals.in_flight + amount,
            )
            return Opened(refund=_refund(rec), created=True, totals=totals)

    async def get(self, refund_no: str) -> MerchantRefund | None:
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(SQL_GET, refund_no)
        return None if rec is None else _refund(rec)

    async def of_pay_order(self, pay_order_no: str) -> list[MerchantRefund]:
        async with self._pool.acquire() as conn:
            return [_refund(r) for r in await conn.fetch(SQL_OF_PAY_ORDER, pay_order_no)]

    async def totals(self, pay_order_no: str, amount: int) -> domain.MerchantRefunds:
        async with self._pool.acquire() as conn:
            return await _totals(conn, pay_order_no, amount)

    async def note_attempt(self, refund_no: str, attempt: int, error: str | None) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(SQL_NOTE_ATTEMPT, refund_no, attempt, error)

    async def succeed(self, refund_no: str, gateway_refund_id: str) -> bool:
        """REFUNDING -> REFUND_SUCCESS with its ``refund.succeeded`` event, in one
        transaction; False when it had finished before (nothing written again)."""
        return await self._finish(refund_no, SQL_SUCCEED, gateway_refund_id, "refund.succeeded")

    async def fail(self, refund_no: str, reason: str) -> bool:
        """REFUNDING -> REFUND_FAILED (the gateway's documented, final refusal) with its
        ``refund.failed`` event; False when it had finished before."""
        return await self._finish(refund_no, SQL_FAIL, reason, "refund.failed")

    async def record_gateway_made(self, seen: SeenAtGateway) -> MerchantRefund | None:
        """Record a refund the gateway made outside payorders (at its dashboard) as a
        merchant refund with ``source: gateway``, already ``REFUND_SUCCESS``, with its
        ``refund.succeeded`` event, in one transaction under the pay order's lock.

        Returns None, writing nothing, when the refund is one of ours (a merchant refund, a
        compensation or an operator's refund: by key or by the gateway's id) or was recorded
        before: a refund we sent is never recorded twice when its notification comes too.

        Raises:
            RefundRefused: the transaction is not the settling payment of a ``PAY_SUCCESS``
                order (a refund of a late or duplicate payment is the saga's to explain), or
                the refund would take the order past its amount. Nothing was written.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            payment = await conn.fetchrow(SQL_PAYMENT, seen.txn_id)
            if payment is None:
                raise RefundRefused(Refusal.NOT_FOUND, f"no payment {seen.txn_id} here")
            order = await conn.fetchrow(SQL_LOCK_PAY_ORDER, payment["pay_order_no"])
            assert order is not None  # the payment's foreign key
            if await conn.fetchval(SQL_KNOWN, seen.key, seen.gateway_refund_id):
                return None
            status = PayOrderStatus(order["status"])
            if status is not PayOrderStatus.PAY_SUCCESS or not payment["settled"]:
                raise RefundRefused(
                    Refusal.NOT_PAID,
                    f"gateway refund {seen.gateway_refund_id} of {seen.txn_id}: not the payment"
                    f" that settled a paid order ({order['pay_order_no']} is {status.value})",
                    status=status.value,
                )
            totals = await _totals(conn, order["pay_order_no"], order["amount"])
            if totals.refunded + seen.amount > order["amount"]:
                raise RefundRefused(
                    Refusal.EXCEEDS,
                    f"gateway refund {seen.gateway_refund_id} of {seen.amount} would take"
                    f" {order['pay_order_no']} past its amount ({totals.refunded} refunded)",
                    refundable=totals.refundable,
                )
            rec = await conn.fetchrow(
                SQL_INSERT_GATEWAY_MADE,
                gateway_refund_no(seen.gateway_refund_id),
                order["pay_order_no"],
                seen.txn_id,
                seen.amount,
                seen.currency,
                seen.key,
                seen.gateway_refund_id,
                seen.created_at,
            )
            if rec is None:
                return None  # recorded meanwhile (the key, id or refund_no is taken)
            await _event(conn, rec, "refund.succeeded", order["amount"])
            return _refund(rec)

    async def _finish(self, refund_no: str, sql: str, value: str, event_type: str) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            rec = await conn.fetchrow(sql, refund_no, value)
            if rec is None:
                if await conn.fetchrow(SQL_GET, refund_no) is None:
                    raise LookupError(f"no merchant refund {refund_no}")
                return False
            order = await conn.fetchrow(SQL_LOCK_PAY_ORDER, rec["pay_order_no"])
            assert order is not None  # the refund's foreign key
            await _event(conn, rec, event_type, order["amount"])
            return True


async def _event(conn: Any, rec: asyncpg.Record, event_type: str, order_amount: int) -> None:
    """The refund's order event, in the caller's transaction (which holds the order's lock)."""
    totals = await _totals(conn, rec["pay_order_no"], order_amount)
    payload = {
        "pay_order_no": rec["pay_order_no"],
        "refund_no": rec["refund_no"],
        "refund_key": rec["idempotency_key"],
        "txn_id": rec["txn_id"],
        "amount": rec["amount"],
        "currency": rec["currency"].strip(),
        "source": rec["source"],
        "failure_reason": rec["failure_reason"],
        "refundable": totals.refundable,
    }
    await conn.execute(
        SQL_INSERT_EVENT,
        event_type,
        rec["pay_order_no"],
        f"{event_type}:{rec['idempotency_key']}",
        json.dumps(payload),
    )

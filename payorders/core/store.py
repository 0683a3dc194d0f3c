"""All SQL of our own tables, as named statements, behind one small class.

Every status write is a guarded update that reports whether it changed a row; every
multi-statement write runs in one transaction.
"""

from __future__ import annotations

import json
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from payorders.core import domain
from payorders.core.domain import CloseReason, PayOrderStatus, RefundReason, RefundStatus
from payorders.core.merchant_refunds import MerchantRefunds
from payorders.core.models import (
    CreatePayOrder,
    OperatorRefund,
    PayOrderRow,
    RecordedPayment,
    RecordPayment,
    TransitionResult,
)

if TYPE_CHECKING:  # a type only: the core never calls a gateway
    from payorders.gateways.port import Capture

# A connection taken from the pool (the stubs make the proxy generic; the runtime does not).
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

MIGRATION_LOCK_ID = 0x7061796F72646572  # "payorder": one advisory lock for all migrators

SQL_RECORD_TRADE = """
WITH upd AS (
    UPDATE pay_order SET gateway = $2, trade_ref = $3, updated_at = now()
     WHERE pay_order_no = $1 AND trade_ref IS NULL
    RETURNING trade_ref
)
SELECT trade_ref FROM upd
UNION ALL
SELECT trade_ref FROM pay_order WHERE pay_order_no = $1 AND trade_ref IS NOT NULL
LIMIT 1"""
SQL_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""

SQL_APPLIED_MIGRATIONS = "SELECT version FROM schema_migrations"
SQL_RECORD_MIGRATION = "INSERT INTO schema_migrations (version) VALUES ($1)"

SQL_INSERT_PAY_ORDER = """
INSERT INTO pay_order (pay_order_no, order_no, amount, currency, expires_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
RETURNING *"""
SQL_GET_PAY_ORDER = "SELECT * FROM pay_order WHERE pay_order_no = $1"
SQL_LOCK_PAY_ORDER = "SELECT * FROM pay_order WHERE pay_order_no = $1 FOR UPDATE"

# The original design's conditional update on status and lock_version: only one of "paid"
# and "expired" can win. Each transition is one statement, so one round trip: a statement
# is a transaction of its own and its parts see one snapshot. It settles with a payment not
# recorded yet (and records it), or expires, and queues the event. When the guard does not
# match, no row comes back and nothing was written: the caller reads why.
SQL_SETTLE_NEW_PAYMENT = """
WITH settled AS (
    UPDATE pay_order
       SET status = 'PAY_SUCCESS', paid_amount = paid_amount + $3, lock_version = lock_version + 1
     WHERE pay_order_no = $1 AND status = 'PAYING' AND lock_version = $2
       AND NOT EXISTS (SELECT 1 FROM payment WHERE txn_id = $4)
    RETURNING *
), new_payment AS (
    INSERT INTO payment (txn_id, pay_order_no, amount, currency, paid_at, settled)
    SELECT $4, pay_order_no, $3, $5::text, $6, true FROM settled
), new_event AS (
    INSERT INTO outbox (event_type, pay_order_no, dedupe_key, payload)
    SELECT 'pay_order.succeeded', pay_order_no, $7,
           jsonb_build_object('pay_order_no', pay_order_no, 'order_no', order_no,
                              'txn_id', $4::text, 'amount', $3::bigint, 'currency', $5::text)
      FROM settled
    ON CONFLICT (dedupe_key) DO NOTHING
)
SELECT * FROM settled"""
# $4 is why it closed unpaid (EXPIRED or CANCELLED): on the row and in the event.
SQL_EXPIRE_WITH_EVENT = """
WITH expired AS (
    UPDATE pay_order
       SET status = 'PAY_EXPIRED', close_reason = $4, lock_version = lock_version + 1
     WHERE pay_order_no = $1 AND status = 'PAYING' AND lock_version = $2
    RETURNING *
), new_event AS (
    INSERT INTO outbox (event_type, pay_order_no, dedupe_key, payload)
    SELECT 'pay_order.expired', pay_order_no, $3,
           jsonb_build_object('pay_order_no', pay_order_no, 'order_no', order_no,
                              'reason', close_reason)
      FROM expired
    ON CONFLICT (dedupe_key) DO NOTHING
)
SELECT * FROM expired"""
# Who asked to cancel (migration 0008): written by the API before it asks the workflow, while
# the order is PAYING, and only by the first caller; it moves no status and no lock_version.
SQL_NOTE_CANCEL_REQUESTED = """
UPDATE pay_order SET cancel_requested_by = $2
 WHERE pay_order_no = $1 AND status = 'PAYING' AND cancel_requested_by IS NULL"""
SQL_ADD_PAID = """
UPDATE pay_order SET paid_amount = paid_amount + $2 WHERE pay_order_no = $1 RETURNING *"""
SQL_ADD_REFUNDED = """
UPDATE pay_order SET refunded_amount = refunded_amount + $2 WHERE pay_order_no = $1"""

SQL_GET_PAYMENT = """
SELECT p.*, r.refund_key FROM payment p LEFT JOIN refund r USING (txn_id) WHERE p.txn_id = $1"""
SQL_INSERT_PAYMENT = """
INSERT INTO payment (txn_id, pay_order_no, amount, currency, paid_at, settled, refund_reason)
VALUES ($1, $2, $3, $4, $5, $6, $7)"""
SQL_INSERT_REFUND = """
INSERT INTO refund (refund_key, pay_order_no, txn_id, amount, currency, reason)
VALUES ($1, $2, $3, $4, $5, $6)"""
SQL_NOTE_REFUND_ATTEMPT = """
UPDATE refund SET attempts = GREATEST(attempts, $2), last_error = $3
 WHERE refund_key = $1 AND status = 'PENDING'"""
SQL_CONFIRM_REFUND = """
UPDATE refund
   SET status = 'SUCCEEDED', gateway_refund_id = $2, succeeded_at = now(), last_error = NULL
 WHERE refund_key = $1 AND status = 'PENDING'
RETURNING pay_order_no, txn_id, amount, currency"""
SQL_REJECT_REFUND = """
UPDATE refund SET status = 'REJECTED', last_error = $2
 WHERE refund_key = $1 AND status = 'PENDING'"""
SQL_GET_REFUND_STATUS = "SELECT status FROM refund WHERE refund_key = $1"
# For the worker's gauges: reads only the partial index refund_pending (PENDING rows).
SQL_PENDING_REFUNDS = """
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_s
  FROM refund WHERE status = 'PENDING'"""
SQL_PAYMENTS_OF = """
SELECT p.*, r.refund_key, r.status AS refund_status, r.attempts, r.gateway_refund_id
  FROM payment p LEFT JOIN refund r USING (txn_id)
 WHERE p.pay_order_no = $1 ORDER BY p.recorded_at, p.txn_id"""
SQL_OUTBOX_OF = """
SELECT event_type, dedupe_key, payload FROM outbox WHERE pay_order_no = $1 ORDER BY id"""

SQL_WEBHOOK_SEEN = """
SELECT (SELECT outcome FROM webhook_event WHERE event_id = $1) AS outcome,
       EXISTS (SELECT 1 FROM payment WHERE txn_id = $3 AND pay_order_no = $2) AS txn_known"""
SQL_RECORD_WEBHOOK = """
INSERT INTO webhook_event (event_id, pay_order_no, txn_id, outcome) VALUES ($1, $2, $3, $4)
ON CONFLICT (event_id) DO NOTHING"""

SQL_INSERT_OUTBOX = """
INSERT INTO outbox (event_type, pay_order_no, dedupe_key, payload)
VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (dedupe_key) DO NOTHING"""

# Operator refunds (migration 0004): a payment no pay order holds, refunded on request.
SQL_GET_OPERATOR_REFUND = "SELECT * FROM operator_refund WHERE txn_id = $1"
# Held to the end of the opening transaction (milliseconds): a payment recorded at the same
# time is either visible to the check after it or refused by its trigger once we commit.
SQL_LOCK_PAYMENTS = "LOCK TABLE payment IN SHARE MODE"
SQL_PAYMENT_AND_REFUND = """
SELECT p.pay_order_no, p.settled, r.refund_key, r.status AS refund_status
  FROM payment p LEFT JOIN refund r USING (txn_id) WHERE p.txn_id = $1"""
SQL_INSERT_OPERATOR_REFUND = """
INSERT INTO operator_refund
       (refund_key, txn_id, pay_order_no, amount, currency, captured_at, requested_by)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT DO NOTHING
RETURNING *"""
SQL_OPERATOR_REFUND_STATUS = "SELECT status FROM operator_refund WHERE refund_key = $1"
SQL_NOTE_OPERATOR_REFUND_ATTEMPT = """
UPDATE operator_refund SET attempts = GREATEST(attempts, $2), last_error = $3
 WHERE refund_key = $1 AND status = 'PENDING'"""
SQL_CONFIRM_OPERATOR_REFUND = """
UPDATE operator_refund
   SET status = 'SUCCEEDED', gateway_refund_id = $2, succeeded_at = now(), last_error = NULL
 WHERE refund_key = $1 AND status = 'PENDING'
RETURNING refund_key"""
SQL_REJECT_OPERATOR_REFUND = """
UPDATE operator_refund SET status = 'REJECTED', last_error = $2
 WHERE refund_key = $1 AND status = 'PENDING'"""


class PayOrderNotFound(LookupError):
    pass


class TxnConflict(ValueError):
    """A transaction id already recorded with other facts: never overwrite a payment."""


class Refusal(StrEnum):
    """Why an operator may not refund a transaction."""

    SETTLED = "settled"
    """It settled one of our pay orders."""
    REFUNDING = "already_refunding"
    """One of our pay orders recorded it and refunds it (or already did)."""
    ORDER_KNOWN = "order_known"
    """Its pay order is ours: reconciliation feeds it there (a lost notification)."""


class NotRefundable(ValueError):
    """An operator refund refused; nothing was written."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class PooledConnection(asyncpg.Connection):
    """A pool connection given back without asyncpg's reset statement (advisory unlock,
    ``CLOSE ALL``, ``UNLISTEN *``, ``RESET ALL``): one round trip less per use. Nothing in
    payorders leaves session state on a pooled connection: advisory locks are
    transaction-scoped, nothing LISTENs or SETs on one, cursors live in transactions.
    asyncpg still rolls back a transaction left open before the connection goes back."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, connection_class=PooledConnection
    )
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply the versioned migrations not applied yet; safe when workers start together.

    The advisory lock is transaction-scoped, so a crashed migrator never leaves it held.
    """
    files = sorted(
        (f.name, f.read_text())
        for f in resources.files("payorders.core.migrations").iterdir()
        if f.name.endswith(".sql")
    )
    applied_now: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(SQL_MIGRATIONS_TABLE)
        applied = {r["version"] for r in await conn.fetch(SQL_APPLIED_MIGRATIONS)}
        for name, sql in files:
            version = name.removesuffix(".sql")
            if version in applied:
                continue
            await conn.execute(sql)
            await conn.execute(SQL_RECORD_MIGRATION, version)
            applied_now.append(version)
    return applied_now


def _row(record: asyncpg.Record) -> PayOrderRow:
    return PayOrderRow.model_validate(dict(record))


def _dedupe_key(event_type: str, dedupe: str) -> str:
    """The outbox row's unique key: one event of a type per pay order or refund."""
    return f"{event_type}:{dedupe}"


async def _outbox(
    conn: Conn, event_type: str, pay_order_no: str, dedupe: str, payload: Any
) -> None:
    await conn.execute(
        SQL_INSERT_OUTBOX,
        event_type,
        pay_order_no,
        _dedupe_key(event_type, dedupe),
        json.dumps(payload),
    )


class PayOrderStore:
    """Our side of the ledger: pay orders, payments, refunds and the outbox."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.operator_refunds = OperatorRefunds(pool)
        self.merchant_refunds = MerchantRefunds(pool)

    async def create_pay_order(self, cmd: CreatePayOrder) -> PayOrderRow:
        """Insert the row, or return the one already there (checkout retried)."""
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(
                SQL_INSERT_PAY_ORDER,
                cmd.pay_order_no,
                cmd.order_no,
                cmd.amount,
                cmd.currency,
                cmd.expires_at,
            )
            if rec is None:
                rec = await conn.fetchrow(SQL_GET_PAY_ORDER, cmd.pay_order_no)
            if rec is None:
                # order_no taken by another pay order number: cannot be ours to create.
                raise TxnConflict(f"order {cmd.order_no} already has another pay order")
            return _row(rec)

    async def get_pay_order(self, pay_order_no: str) -> PayOrderRow | None:
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(SQL_GET_PAY_ORDER, pay_order_no)
        return None if rec is None else _row(rec)

    async def record_payment(self, cmd: RecordPayment) -> RecordedPayment:
        """Record a payment once: settle the order with it, or keep it for a refund.

        Idempotent: the same ``txn_id`` again returns what was recorded the first time.
        """
        recorded, _ = await self.record_payment_new(cmd)
        return recorded

    async def record_payment_new(self, cmd: RecordPayment) -> tuple[RecordedPayment, bool]:
        """``record_payment``, and whether this call recorded it (False: it was already)."""
        p = cmd.payment
        try:
            async with self._pool.acquire() as conn:
                if cmd.settles:
                    settled = await conn.fetchrow(
                        SQL_SETTLE_NEW_PAYMENT,
                        cmd.pay_order_no,
                        cmd.expected_lock_version,
                        p.amount,
                        p.txn_id,
                        p.currency,
                        p.paid_at,
                        _dedupe_key("pay_order.succeeded", cmd.pay_order_no),
                    )
                    if settled is not None:
                        return _settled(p.txn_id, settled), True
                # The payment is known already, the order moved on, or the payment is to
                # be refunded: decide in one transaction, on the locked row.
                async with conn.transaction():
                    return await self._record_locked(conn, cmd)
        except asyncpg.UniqueViolationError:
            # A concurrent writer recorded the same transaction first: answer with its record.
            async with self._pool.acquire() as conn:
                existing = await conn.fetchrow(SQL_GET_PAYMENT, p.txn_id)
                assert existing is not None
                return await self._recorded(conn, existing, cmd), False

    async def _record_locked(self, conn: Conn, cmd: RecordPayment) -> tuple[RecordedPayment, bool]:
        p = cmd.payment
        existing = await conn.fetchrow(SQL_GET_PAYMENT, p.txn_id)
        if existing is not None:
            return await self._recorded(conn, existing, cmd), False
        order = await conn.fetchrow(SQL_LOCK_PAY_ORDER, cmd.pay_order_no)
        if order is None:
            raise PayOrderNotFound(cmd.pay_order_no)
        if cmd.settles and order["status"] == PayOrderStatus.PAYING:
            # The settling statement wrote nothing, yet the order still waits for payment.
            raise TxnConflict(f"pay order {cmd.pay_order_no} is PAYING at another lock version")
        # Otherwise the order moved on (or the caller chose to refund): refund.
        reason = cmd.refund_reason or _reason_from_row(order, p.amount, p.currency)
        updated = await conn.fetchrow(SQL_ADD_PAID, cmd.pay_order_no, p.amount)
        assert updated is not None
        key = domain.refund_key(cmd.pay_order_no, p.txn_id)
        await conn.execute(
            SQL_INSERT_PAYMENT,
            p.txn_id,
            cmd.pay_order_no,
            p.amount,
            p.currency,
            p.paid_at,
            False,
            reason.value,
        )
        await conn.execute(
            SQL_INSERT_REFUND,
            key,
            cmd.pay_order_no,
            p.txn_id,
            p.amount,
            p.currency,
            reason.value,
        )
        return RecordedPayment(
            txn_id=p.txn_id,
            pay_order_no=cmd.pay_order_no,
            settled=False,
            refund_reason=reason,
            refund_key=key,
            order_status=PayOrderStatus(updated["status"]),
            lock_version=updated["lock_version"],
        ), True

    async def _recorded(
        self, conn: Conn, existing: asyncpg.Record, cmd: RecordPayment
    ) -> RecordedPayment:
        p = cmd.payment
        if (
            existing["pay_order_no"] != cmd.pay_order_no
            or existing["amount"] != p.amount
            or existing["currency"] != p.currency
        ):
            raise TxnConflict(
                f"transaction {p.txn_id} is already recorded for"
                f" {existing['pay_order_no']} with other facts"
            )
        order = await conn.fetchrow(SQL_GET_PAY_ORDER, existing["pay_order_no"])
        assert order is not None
        reason = existing["refund_reason"]
        return RecordedPayment(
            txn_id=p.txn_id,
            pay_order_no=existing["pay_order_no"],
            settled=existing["settled"],
            refund_reason=None if reason is None else RefundReason(reason),
            refund_key=existing["refund_key"],
            order_status=PayOrderStatus(order["status"]),
            lock_version=order["lock_version"],
        )

    async def note_cancel_requested(self, pay_order_no: str, requested_by: str) -> bool:
        """Keep ``requested_by`` as who asked to cancel, if the order is ``PAYING`` and nobody
        asked before; whether this call wrote it."""
        async with self._pool.acquire() as conn:
            done = await conn.execute(SQL_NOTE_CANCEL_REQUESTED, pay_order_no, requested_by)
        return done == "UPDATE 1"

    async def record_trade(self, pay_order_no: str, gateway: str, trade_ref: str) -> str:
        """Remember the trade the gateway opened for the pay order; returns the one kept.

        Not a state change (no ``lock_version``): the first trade recorded stays, and a
        repeat with the same trade changes nothing.
        """
        async with self._pool.acquire() as conn:
            kept: str | None = await conn.fetchval(
                SQL_RECORD_TRADE, pay_order_no, gateway, trade_ref
            )
        if kept is None:
            raise PayOrderNotFound(pay_order_no)
        return kept

    async def expire(
        self,
        pay_order_no: str,
        expected_lock_version: int,
        reason: CloseReason = CloseReason.EXPIRED,
    ) -> TransitionResult:
        """PAYING -> PAY_EXPIRED under the guard, with its outbox event in the same transaction.

        ``reason``: why it closed unpaid, kept on the row and announced in the event. When
        the guard does not match, nothing is written: a repeat keeps the first reason.
        """
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(
                SQL_EXPIRE_WITH_EVENT,
                pay_order_no,
                expected_lock_version,
                _dedupe_key("pay_order.expired", pay_order_no),
                reason.value,
            )
            if rec is not None:
                return TransitionResult(changed=True, row=_row(rec))
            current = await conn.fetchrow(SQL_GET_PAY_ORDER, pay_order_no)
            if current is None:
                raise PayOrderNotFound(pay_order_no)
            return TransitionResult(changed=False, row=_row(current))

    async def note_refund_attempt(self, refund_key: str, attempt: int, error: str | None) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(SQL_NOTE_REFUND_ATTEMPT, refund_key, attempt, error)

    async def confirm_refund(self, refund_key: str, gateway_refund_id: str) -> bool:
        """Mark the refund succeeded and raise ``refunded_amount``, once, in one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            rec = await conn.fetchrow(SQL_CONFIRM_REFUND, refund_key, gateway_refund_id)
            if rec is None:
                status = await conn.fetchval(SQL_GET_REFUND_STATUS, refund_key)
                if status is None:
                    raise LookupError(f"no refund {refund_key}")
                return False
            await conn.execute(SQL_ADD_REFUNDED, rec["pay_order_no"], rec["amount"])
            await _outbox(
                conn,
                "refund.succeeded",
                rec["pay_order_no"],
                refund_key,
                {
                    "pay_order_no": rec["pay_order_no"],
                    "refund_key": refund_key,
                    "txn_id": rec["txn_id"],
                    "amount": rec["amount"],
                    "currency": rec["currency"],
                    "gateway_refund_id": gateway_refund_id,
                },
            )
            return True

    async def reject_refund(self, refund_key: str, error: str) -> bool:
        """Mark a pending refund REJECTED; False when it was not pending (any more)."""
        async with self._pool.acquire() as conn:
            done = await conn.execute(SQL_REJECT_REFUND, refund_key, error)
        return done == "UPDATE 1"

    async def refund_status(self, refund_key: str) -> RefundStatus | None:
        async with self._pool.acquire() as conn:
            status = await conn.fetchval(SQL_GET_REFUND_STATUS, refund_key)
        return None if status is None else RefundStatus(status)

    async def pending_refunds(self) -> tuple[int, float]:
        """How many refunds are PENDING, and the age in seconds of the oldest (0: none)."""
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(SQL_PENDING_REFUNDS)
        assert rec is not None
        return int(rec["pending"]), float(rec["oldest_s"])

    async def webhook_seen(
        self, event_id: str, *, pay_order_no: str, txn_id: str
    ) -> tuple[str | None, bool]:
        """What we did with this gateway event (None: never accepted), and whether its
        pay order already holds the payment ``txn_id``: one round trip per webhook."""
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(SQL_WEBHOOK_SEEN, event_id, pay_order_no, txn_id)
        assert rec is not None
        return rec["outcome"], bool(rec["txn_known"])

    async def record_webhook(
        self, event_id: str, *, pay_order_no: str, txn_id: str, outcome: str
    ) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(SQL_RECORD_WEBHOOK, event_id, pay_order_no, txn_id, outcome)

    async def ping(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def snapshot(self, pay_order_no: str) -> tuple[PayOrderRow | None, list[dict[str, Any]]]:
        """The row and its payments and refunds as of one instant (a read-only snapshot),
        so the fund identity is never judged on a row and payments read at two moments."""
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rec = await conn.fetchrow(SQL_GET_PAY_ORDER, pay_order_no)
            payments = [dict(r) for r in await conn.fetch(SQL_PAYMENTS_OF, pay_order_no)]
        return (None if rec is None else _row(rec)), payments

    async def payments_of(self, pay_order_no: str) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(SQL_PAYMENTS_OF, pay_order_no)]

    async def outbox_of(self, pay_order_no: str) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(SQL_OUTBOX_OF, pay_order_no)]


def _settled(txn_id: str, row: asyncpg.Record) -> RecordedPayment:
    return RecordedPayment(
        txn_id=txn_id,
        pay_order_no=row["pay_order_no"],
        settled=True,
        refund_reason=None,
        refund_key=None,
        order_status=PayOrderStatus.PAY_SUCCESS,
        lock_version=row["lock_version"],
    )


def _reason_from_row(order: asyncpg.Record, amount: int, currency: str) -> RefundReason:
    decision = domain.decide_payment(
        status=PayOrderStatus(order["status"]),
        order_amount=order["amount"],
        order_currency=order["currency"].strip(),
        amount=amount,
        currency=currency,
    )
    # A payment nobody may settle with (its order's workflow has closed) is late.
    return decision if isinstance(decision, RefundReason) else RefundReason.LATE


class OperatorRefunds:
    """Refunds an operator asked for, of payments no pay order holds (``operator_refund``).

    The refund activity sees the same four calls as on ``PayOrderStore`` (status, attempt,
    confirm, reject); none of them touches a pay order or the outbox, since there is no
    pay order (and so no order service) to tell.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get(self, txn_id: str) -> OperatorRefund | None:
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(SQL_GET_OPERATOR_REFUND, txn_id)
        return None if rec is None else OperatorRefund.model_validate(dict(rec))

    async def open(
        self, capture: Capture, *, requested_by: str | None = None
    ) -> tuple[OperatorRefund, bool]:
        """The operator refund of the gateway's ``capture``, and whether this call opened it;
        ``requested_by`` (the API token's name) is kept on the row it opens.

        Idempotent by ``txn_id``: the same transaction again returns its refund as it is now
        (its requester is the one who opened it).

        Raises:
            NotRefundable: one of our pay orders holds the transaction, or its pay order is
                ours; nothing was written.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rec = await conn.fetchrow(SQL_GET_OPERATOR_REFUND, capture.txn_id)
            if rec is None:
                await conn.execute(SQL_LOCK_PAYMENTS)
                await _refuse_ours(conn, capture)
                rec = await conn.fetchrow(
                    SQL_INSERT_OPERATOR_REFUND,
                    domain.refund_key(capture.pay_order_no, capture.txn_id),
                    capture.txn_id,
                    capture.pay_order_no,
                    capture.amount,
                    capture.currency,
                    capture.captured_at,
                    requested_by,
                )
                if rec is not None:
                    return OperatorRefund.model_validate(dict(rec)), True
                # Opened by a concurrent request for the same transaction: answer with it.
                rec = await conn.fetchrow(SQL_GET_OPERATOR_REFUND, capture.txn_id)
            assert rec is not None
            return OperatorRefund.model_validate(dict(rec)), False

    async def refund_status(self, refund_key: str) -> RefundStatus | None:
        async with self._pool.acquire() as conn:
            status = await conn.fetchval(SQL_OPERATOR_REFUND_STATUS, refund_key)
        return None if status is None else RefundStatus(status)

    async def note_refund_attempt(self, refund_key: str, attempt: int, error: str | None) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(SQL_NOTE_OPERATOR_REFUND_ATTEMPT, refund_key, attempt, error)

    async def confirm_refund(self, refund_key: str, gateway_refund_id: str) -> bool:
        """PENDING -> SUCCEEDED, once; False when it was not pending (any more)."""
        async with self._pool.acquire() as conn:
            done = await conn.fetchval(SQL_CONFIRM_OPERATOR_REFUND, refund_key, gateway_refund_id)
            if done is None and await conn.fetchval(SQL_OPERATOR_REFUND_STATUS, refund_key) is None:
                raise LookupError(f"no operator refund {refund_key}")
        return done is not None

    async def reject_refund(self, refund_key: str, error: str) -> bool:
        """PENDING -> REJECTED; False when it was not pending (any more)."""
        async with self._pool.acquire() as conn:
            done = await conn.execute(SQL_REJECT_OPERATOR_REFUND, refund_key, error)
        return done == "UPDATE 1"


async def _refuse_ours(conn: Conn, capture: Capture) -> None:
    """Raise ``NotRefundable`` when a pay order of ours holds the capture, or will."""
    payment = await conn.fetchrow(SQL_PAYMENT_AND_REFUND, capture.txn_id)
    if payment is not None and payment["settled"]:
        raise NotRefundable(
            Refusal.SETTLED,
            f"transaction {capture.txn_id} settled pay order {payment['pay_order_no']}:"
            " it is not refunded here",
        )
    if payment is not None:
        state = (
            f"refund {payment['refund_key']} is {payment['refund_status']}"
            if payment["refund_key"]
            else "reconciliation restores its refund"
        )
        raise NotRefundable(
            Refusal.REFUNDING,
            f"transaction {capture.txn_id} is refunded by pay order {payment['pay_order_no']}"
            f" ({state})",
        )
    if await conn.fetchrow(SQL_GET_PAY_ORDER, capture.pay_order_no) is not None:
        raise NotRefundable(
            Refusal.ORDER_KNOWN,
            f"pay order {capture.pay_order_no} is ours: reconciliation hands transaction"
            f" {capture.txn_id} to it, and its workflow settles or refunds it",
        )

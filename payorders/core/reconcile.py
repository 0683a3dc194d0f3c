"""Reconciliation: the SQL and the rules behind each check and repair.

Checks are set-based SQL over keyset pages (``pay_order_no > $cursor``), each page read in
one repeatable-read snapshot, returning only the orders that need a look. Repairs are
idempotent writes (``ON CONFLICT DO NOTHING``, guarded updates) and every one, like every
exception for a person, leaves a ``reconciliation_finding`` row; so does a discrepancy a
person has resolved (``RESOLVED``: money captured for a pay order we never had, refunded
by an operator).

This module holds the reconciliation SQL apart from ``store.py`` to keep each module
about one thing; it follows the same habits (named statements, asyncpg, transactions).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from payorders.core import domain
from payorders.core.domain import PayOrderStatus


class Kind(StrEnum):
    PAID_AMOUNT_MISMATCH = "paid_amount_mismatch"
    REFUNDED_AMOUNT_MISMATCH = "refunded_amount_mismatch"
    REFUND_MISSING = "refund_missing"
    REFUND_PENDING_TOO_LONG = "refund_pending_too_long"
    REFUND_CONFIRMED_AT_GATEWAY = "refund_confirmed_at_gateway"
    REFUND_RESTORED = "refund_restored"
    REFUND_ABSENT_AT_GATEWAY = "refund_absent_at_gateway"
    LOST_NOTIFICATION = "lost_notification"
    MONEY_WITHOUT_ORDER = "money_without_order"
    PAYMENT_ABSENT_AT_GATEWAY = "payment_absent_at_gateway"
    AMOUNT_DIFFERS = "amount_differs"
    STUCK_PAYING = "stuck_paying"
    IDENTITY_BROKEN = "identity_broken"
    EVENT_UNDELIVERED = "event_undelivered"
    GATEWAY_REFUND_RECORDED = "gateway_refund_recorded"
    MERCHANT_REFUND_DIFFERS = "merchant_refund_differs"


REPAIRED = "REPAIRED"
EXCEPTION = "EXCEPTION"
# A discrepancy a person has already dealt with (money captured for a pay order we never
# had, refunded by an operator): reported for the books, counted neither as repaired by
# the run nor as an exception.
RESOLVED = "RESOLVED"

SQL_START_RUN = """
INSERT INTO reconciliation_run (run_id, period_start, period_end) VALUES ($1, $2, $3)
ON CONFLICT (run_id) DO NOTHING"""
SQL_ADD_COUNTS = """
UPDATE reconciliation_run SET checked = checked + $2, consistent = consistent + $3,
       in_flight_count = in_flight_count + $4, money_in_flight = money_in_flight + $5
 WHERE run_id = $1"""
# Operator refunds still pending are money in flight too; no page holds them (they have no
# pay order), so they are added here, once: a retried finish finds finished_at set.
SQL_FINISH_RUN = """
WITH operator AS (
    SELECT count(*) AS n, coalesce(sum(amount), 0) AS money
      FROM operator_refund WHERE status = 'PENDING'
)
UPDATE reconciliation_run r SET finished_at = now(),
       repaired = (SELECT count(*) FROM reconciliation_finding f
                    WHERE f.run_id = r.run_id AND f.action = 'REPAIRED'),
       exceptions = (SELECT count(*) FROM reconciliation_finding f
                      WHERE f.run_id = r.run_id AND f.action = 'EXCEPTION'),
       in_flight_count = r.in_flight_count
                         + CASE WHEN r.finished_at IS NULL THEN operator.n ELSE 0 END,
       money_in_flight = r.money_in_flight
                         + CASE WHEN r.finished_at IS NULL THEN operator.money ELSE 0 END
  FROM operator
 WHERE r.run_id = $1
RETURNING r.*"""
SQL_FINDING = """
INSERT INTO reconciliation_finding
    (run_id, kind, action, pay_order_no, txn_id, refund_key, amount, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"""
SQL_FINDINGS_OF = "SELECT * FROM reconciliation_finding WHERE run_id = $1 ORDER BY id"
SQL_RUNS = "SELECT * FROM reconciliation_run ORDER BY started_at DESC LIMIT $1"

# One keyset page: how many orders it holds, where it ends, and the totals of money in flight.
SQL_PAGE_SPAN = """
WITH page AS (
    SELECT pay_order_no, status, amount, paid_amount, refunded_amount FROM pay_order
     WHERE pay_order_no > $1 ORDER BY pay_order_no LIMIT $2
)
SELECT count(*) AS checked, max(pay_order_no) AS last,
       count(*) FILTER (WHERE paid_amount - refunded_amount
                        <> CASE WHEN status = 'PAY_SUCCESS' THEN amount ELSE 0 END) AS in_flight,
       coalesce(sum(paid_amount - refunded_amount
                    - CASE WHEN status = 'PAY_SUCCESS' THEN amount ELSE 0 END), 0) AS money
  FROM page"""

# The orders of the page that need a look: any identity off, any sum that disagrees with
# the rows it sums, any payment owed back without a refund row, or stuck in PAYING.
SQL_PAGE_SUSPECTS = """
WITH page AS (
    SELECT * FROM pay_order WHERE pay_order_no > $1 ORDER BY pay_order_no LIMIT $2
), bound AS (
    SELECT max(pay_order_no) AS last FROM page
), pays AS (
    -- The explicit range lets the planner read only this page's payments and refunds
    -- (a join to the page alone made it scan both tables on every page).
    SELECT p.pay_order_no, sum(p.amount) AS paid,
           array_agg(p.txn_id) FILTER (WHERE NOT p.settled AND r.txn_id IS NULL) AS owed
      FROM payment p LEFT JOIN refund r ON r.txn_id = p.txn_id
     WHERE p.pay_order_no > $1 AND p.pay_order_no <= (SELECT last FROM bound)
     GROUP BY p.pay_order_no
), refs AS (
    SELECT r.pay_order_no,
           coalesce(sum(r.amount) FILTER (WHERE r.status = 'SUCCEEDED'), 0) AS refunded,
           array_agg(r.refund_key ORDER BY r.refund_key) FILTER (
               WHERE r.status = 'PENDING' AND r.created_at < now() - make_interval(secs => $3)
           ) AS old_pending,
           array_agg(r.txn_id ORDER BY r.refund_key) FILTER (
               WHERE r.status = 'PENDING' AND r.created_at < now() - make_interval(secs => $3)
           ) AS old_pending_txns
      FROM refund r
     WHERE r.pay_order_no > $1 AND r.pay_order_no <= (SELECT last FROM bound)
     GROUP BY r.pay_order_no
)
SELECT page.pay_order_no, page.status, page.amount, page.currency, page.paid_amount,
       page.refunded_amount, page.expires_at, page.lock_version,
       coalesce(pays.paid, 0) AS payments_sum, coalesce(refs.refunded, 0) AS refunds_sum,
       coalesce(pays.owed, '{}') AS owed, coalesce(refs.old_pending, '{}') AS old_pending,
       coalesce(refs.old_pending_txns, '{}') AS old_pending_txns
  FROM page LEFT JOIN pays USING (pay_order_no) LEFT JOIN refs USING (pay_order_no)
 WHERE page.paid_amount <> coalesce(pays.paid, 0)
    OR page.refunded_amount <> coalesce(refs.refunded, 0)
    OR pays.owed IS NOT NULL
    OR refs.old_pending IS NOT NULL
    OR (page.status = 'PAYING' AND page.expires_at < now() - make_interval(secs => $4))"""

SQL_PAYMENTS_BY_TXN = """
SELECT p.*, r.refund_key, r.status AS refund_status FROM payment p
  LEFT JOIN refund r USING (txn_id) WHERE p.txn_id = ANY($1)"""
SQL_ORDERS_EXIST = "SELECT pay_order_no FROM pay_order WHERE pay_order_no = ANY($1)"
SQL_PAYMENTS_IN_PERIOD = """
SELECT txn_id, pay_order_no, amount, currency FROM payment
 WHERE paid_at >= $1 AND paid_at < $2 AND txn_id > $3 ORDER BY txn_id LIMIT $4"""
SQL_REFUNDS_BY_KEY = "SELECT * FROM refund WHERE refund_key = ANY($1)"
SQL_SUCCEEDED_REFUNDS_IN_PERIOD = """
SELECT refund_key, pay_order_no, txn_id, amount FROM refund
 WHERE status = 'SUCCEEDED' AND succeeded_at >= $1 AND succeeded_at < $2
UNION ALL
SELECT refund_key, pay_order_no, txn_id, amount FROM operator_refund
 WHERE status = 'SUCCEEDED' AND succeeded_at >= $1 AND succeeded_at < $2
UNION ALL
SELECT idempotency_key, pay_order_no, txn_id, amount FROM merchant_refund
 WHERE status = 'REFUND_SUCCESS' AND finished_at >= $1 AND finished_at < $2"""
# Merchant refunds (migrations 0009, 0010), by the gateway's key or its refund id.
SQL_MERCHANT_REFUNDS_BY_KEY = """
SELECT * FROM merchant_refund WHERE idempotency_key = ANY($1) OR gateway_refund_id = ANY($2)"""
# The page's merchant refunds still REFUNDING after the limit: their workflow may be gone.
SQL_OLD_MERCHANT_REFUNDS = """
SELECT * FROM merchant_refund
 WHERE pay_order_no > $1 AND pay_order_no <= $2 AND status = 'REFUNDING'
   AND created_at < now() - make_interval(secs => $3)
 ORDER BY pay_order_no, created_at"""
# The page's orders whose merchant refunds break the identity: refunded beyond the amount,
# or refunds of an order that is not PAY_SUCCESS (0009's trigger forbids both: a row
# changed outside the application).
SQL_MERCHANT_IDENTITY = """
SELECT m.pay_order_no, po.status, po.amount,
       coalesce(sum(m.amount) FILTER (WHERE m.status = 'REFUND_SUCCESS'), 0) AS refunded
  FROM merchant_refund m JOIN pay_order po USING (pay_order_no)
 WHERE m.pay_order_no > $1 AND m.pay_order_no <= $2
 GROUP BY m.pay_order_no, po.status, po.amount
HAVING coalesce(sum(m.amount) FILTER (WHERE m.status = 'REFUND_SUCCESS'), 0) > po.amount
    OR po.status <> 'PAY_SUCCESS'"""
SQL_OPERATOR_REFUNDS_BY_TXN = "SELECT * FROM operator_refund WHERE txn_id = ANY($1)"
SQL_OPERATOR_REFUNDS_BY_KEY = "SELECT * FROM operator_refund WHERE refund_key = ANY($1)"

SQL_UNCOVERED = """
SELECT po.refunded_amount - coalesce(
         (SELECT sum(r.amount) FROM refund r
           WHERE r.pay_order_no = po.pay_order_no AND r.status = 'SUCCEEDED'), 0)
  FROM pay_order po WHERE po.pay_order_no = $1"""

SQL_RESTORE_REFUND = """
INSERT INTO refund (refund_key, pay_order_no, txn_id, amount, currency, reason, status,
                    gateway_refund_id, succeeded_at)
SELECT $1, p.pay_order_no, p.txn_id, p.amount, p.currency, p.refund_reason, $2, $3,
       CASE WHEN $2 = 'SUCCEEDED' THEN now() END
  FROM payment p WHERE p.txn_id = $4 AND NOT p.settled
ON CONFLICT DO NOTHING
RETURNING refund_key"""


# Order events (migration 0006) the relay has not had acknowledged within the limit: one
# exception per pay order, naming its oldest overdue event; recorded once per run, and only
# while the run is open (a retried finish adds nothing), oldest first, at most $3 of them.
SQL_UNDELIVERED_EVENTS = """
WITH overdue AS (
    SELECT DISTINCT ON (o.pay_order_no)
           o.pay_order_no, o.id, o.event_type, o.sequence, o.created_at, o.attempts,
           o.last_error, count(*) OVER (PARTITION BY o.pay_order_no) AS waiting
      FROM outbox o
     WHERE o.delivered_at IS NULL AND o.created_at < now() - make_interval(secs => $2)
     ORDER BY o.pay_order_no, o.sequence
), found AS (
    SELECT * FROM overdue
     WHERE EXISTS (SELECT 1 FROM reconciliation_run r WHERE r.run_id = $1 AND r.finished_at IS NULL)
       AND NOT EXISTS (SELECT 1 FROM reconciliation_finding f
                        WHERE f.run_id = $1 AND f.kind = 'event_undelivered'
                          AND f.pay_order_no = overdue.pay_order_no)
     ORDER BY created_at
     LIMIT $3
)
INSERT INTO reconciliation_finding (run_id, kind, action, pay_order_no, detail)
SELECT $1, 'event_undelivered', 'EXCEPTION', pay_order_no,
       format('order event evt_%s (%s, sequence %s) not acknowledged by the order service'
              ' for %s, after %s attempts%s; %s overdue event(s) of this pay order',
              lpad(id::text, 16, '0'), event_type, sequence,
              date_trunc('second', now() - created_at), attempts,
              coalesce(' (last: ' || last_error || ')', ''), waiting)
  FROM found
RETURNING pay_order_no, detail"""
MAX_EVENT_FINDINGS = 1000


@dataclass(frozen=True)
class Finding:
    kind: Kind
    action: str
    detail: str
    pay_order_no: str | None = None
    txn_id: str | None = None
    refund_key: str | None = None
    amount: int | None = None


@dataclass(frozen=True)
class PageResult:
    checked: int
    last: str | None
    in_flight: int
    money_in_flight: int
    suspects: list[dict[str, Any]]


SQL_TRADES_PAYABLE_IN = """
SELECT pay_order_no FROM pay_order
 WHERE gateway = $1 AND trade_ref IS NOT NULL
   AND created_at < $3::timestamptz AND expires_at >= $2::timestamptz - make_interval(secs => $4)
 ORDER BY pay_order_no"""
SQL_REFUNDS_IN_FLIGHT_OF = """
SELECT refund_key AS key, pay_order_no, txn_id FROM refund
 WHERE status = 'PENDING' AND pay_order_no = ANY($1)
UNION ALL
SELECT idempotency_key, pay_order_no, txn_id FROM merchant_refund
 WHERE status = 'REFUNDING' AND pay_order_no = ANY($1)"""


class ReconcileStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def start_run(self, run_id: str, start: datetime, end: datetime) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(SQL_START_RUN, run_id, start, end)

    async def page(
        self, after: str, limit: int, *, pending_after_s: float, stuck_after_s: float
    ) -> PageResult:
        """One keyset page, its counts and its suspects, read in one snapshot."""
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            span = await conn.fetchrow(SQL_PAGE_SPAN, after, limit)
            rows = await conn.fetch(SQL_PAGE_SUSPECTS, after, limit, pending_after_s, stuck_after_s)
        assert span is not None
        return PageResult(
            checked=span["checked"],
            last=span["last"],
            in_flight=span["in_flight"],
            money_in_flight=span["money"],
            suspects=[dict(r) for r in rows],
        )

    async def add_counts(
        self, run_id: str, *, checked: int, consistent: int, in_flight: int, money: int
    ) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(SQL_ADD_COUNTS, run_id, checked, consistent, in_flight, money)

    async def record(self, run_id: str, findings: list[Finding]) -> None:
        if not findings:
            return
        async with self._pool.acquire() as conn:
            await conn.executemany(
                SQL_FINDING,
                [
                    (
                        run_id,
                        f.kind.value,
                        f.action,
                        f.pay_order_no,
                        f.txn_id,
                        f.refund_key,
                        f.amount,
                        f.detail,
                    )
                    for f in findings
                ],
            )

    async def record_undelivered_events(self, run_id: str, alert_after_s: float) -> list[Finding]:
        """Record an exception for each pay order with an order event unacknowledged for
        longer than ``alert_after_s`` (once per run); returns the findings recorded now."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                SQL_UNDELIVERED_EVENTS, run_id, alert_after_s, MAX_EVENT_FINDINGS
            )
        return [
            Finding(Kind.EVENT_UNDELIVERED, EXCEPTION, r["detail"], pay_order_no=r["pay_order_no"])
            for r in rows
        ]

    async def finish(self, run_id: str) -> dict[str, Any]:
        async with self._pool.acquire() as conn:
            rec = await conn.fetchrow(SQL_FINISH_RUN, run_id)
        assert rec is not None
        return dict(rec)

    async def findings(self, run_id: str) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(SQL_FINDINGS_OF, run_id)]

    async def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(SQL_RUNS, limit)]

    async def payments_by_txn(self, txn_ids: list[str]) -> dict[str, dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_PAYMENTS_BY_TXN, txn_ids)
        return {r["txn_id"]: dict(r) for r in rows}

    async def orders_exist(self, pay_order_nos: list[str]) -> set[str]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_ORDERS_EXIST, pay_order_nos)
        return {r["pay_order_no"] for r in rows}

    async def trades_payable_in(
        self, gateway: str, start: datetime, end: datetime, *, grace_s: float
    ) -> list[str]:
        """Pay orders whose trade at ``gateway`` could be paid within ``[start, end)``:
        opened before ``end``, expiring (``grace_s`` past) at or after ``start``."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_TRADES_PAYABLE_IN, gateway, start, end, grace_s)
        return [r["pay_order_no"] for r in rows]

    async def refunds_in_flight_of(self, pay_order_nos: list[str]) -> list[tuple[str, str, str]]:
        """``(key, pay_order_no, txn_id)`` of these pay orders' refunds not yet confirmed:
        compensations ``PENDING``, merchant refunds ``REFUNDING``."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_REFUNDS_IN_FLIGHT_OF, pay_order_nos)
        return [(r["key"], r["pay_order_no"], r["txn_id"]) for r in rows]

    async def payments_in_period(
        self, start: datetime, end: datetime, after: str, limit: int
    ) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_PAYMENTS_IN_PERIOD, start, end, after, limit)
        return [dict(r) for r in rows]

    async def refunds_by_key(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_REFUNDS_BY_KEY, keys)
        return {r["refund_key"]: dict(r) for r in rows}

    async def succeeded_refunds_in_period(
        self, start: datetime, end: datetime
    ) -> list[dict[str, Any]]:
        """Refunds, of pay orders and of operators, that succeeded in ``[start, end)``."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_SUCCEEDED_REFUNDS_IN_PERIOD, start, end)
        return [dict(r) for r in rows]

    async def merchant_refunds_by_key(
        self, keys: list[str], gateway_ids: list[str]
    ) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [
                dict(r) for r in await conn.fetch(SQL_MERCHANT_REFUNDS_BY_KEY, keys, gateway_ids)
            ]

    async def old_merchant_refunds(
        self, after: str, last: str, pending_after_s: float
    ) -> list[dict[str, Any]]:
        """Merchant refunds of the page ``(after, last]`` REFUNDING for longer than the limit."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_OLD_MERCHANT_REFUNDS, after, last, pending_after_s)
        return [dict(r) for r in rows]

    async def merchant_identity_broken(self, after: str, last: str) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(SQL_MERCHANT_IDENTITY, after, last)]

    async def operator_refunds_by_txn(self, txn_ids: list[str]) -> dict[str, dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_OPERATOR_REFUNDS_BY_TXN, txn_ids)
        return {r["txn_id"]: dict(r) for r in rows}

    async def operator_refunds_by_key(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_OPERATOR_REFUNDS_BY_KEY, keys)
        return {r["refund_key"]: dict(r) for r in rows}

    async def uncovered(self, pay_order_no: str) -> int:
        """How much of ``refunded_amount`` no succeeded refund row explains."""
        async with self._pool.acquire() as conn:
            value = await conn.fetchval(SQL_UNCOVERED, pay_order_no)
        return int(value or 0)

    async def restore_refund(
        self, refund_key: str, txn_id: str, *, gateway_refund_id: str | None, covered: bool
    ) -> bool:
        """Put back a refund row for a payment owed back (idempotent).

        ``covered``: the order's ``refunded_amount`` already counts this refund (its row was
        deleted after it succeeded), so it comes back SUCCEEDED without counting it twice;
        otherwise it comes back PENDING, to be confirmed or retried.
        """
        status = "SUCCEEDED" if covered and gateway_refund_id else "PENDING"
        async with self._pool.acquire() as conn:
            key = await conn.fetchval(
                SQL_RESTORE_REFUND, refund_key, status, gateway_refund_id, txn_id
            )
        return key is not None


def judge(order: dict[str, Any]) -> list[Finding]:
    """What a suspect order's own rows say, before anything is asked of the gateway."""
    no = order["pay_order_no"]
    findings: list[Finding] = []
    if order["paid_amount"] != order["payments_sum"]:
        findings.append(
            Finding(
                Kind.PAID_AMOUNT_MISMATCH,
                EXCEPTION,
                f"paid_amount {order['paid_amount']} but its payments sum to"
                f" {order['payments_sum']}: the row was changed outside the application",
                pay_order_no=no,
                amount=order["paid_amount"] - order["payments_sum"],
            )
        )
    fund = domain.fund_check(
        status=PayOrderStatus(order["status"]),
        amount=order["amount"],
        paid_amount=order["payments_sum"],
        refunded_amount=order["refunds_sum"],
    )
    if fund.in_flight < 0:
        findings.append(
            Finding(
                Kind.IDENTITY_BROKEN,
                EXCEPTION,
                f"more refunded than paid beyond the order: in flight {fund.in_flight}",
                pay_order_no=no,
                amount=fund.in_flight,
            )
        )
    return findings

"""``payorders torture``: many pay orders with payments timed around their expiry, plus
duplicates, double payments, wrong amounts, late payments and gateway faults, and merchant
refunds of paid orders (in parts, sent twice, several racing for what is left, one racing a
late payment and its compensation, one through gateway faults); then it waits for
settlement, reconciles, and verifies from the database and the gateway's own records (the
sandbox's ledger tables, or Stripe's PaymentIntents and refunds; never the workflows' own
answers) that no money was lost or moved twice.

Bounded in count and time, loopback only; it stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx

from payorders.core import store
from payorders.core.models import ReconcileReport
from payorders.core.settings import Settings
from payorders.localstack.stack import DevStack, GatewayKind
from payorders.localstack.stackinfo import check_processes
from payorders.runtime import database_url
from payorders.service import relay
from payorders.tools.http_clients import (
    GatewayAudit,
    GatewayMoney,
    ServiceClient,
    ServiceError,
    Unreachable,
    currency_of,
    gateway_client,
)
from payorders.tools.table import render

AMOUNT = 1000
LOST_AFTER_S = 6.0
"""A capture still unrecorded this long after it was first seen lost its webhook."""
T = TypeVar("T")
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
"""What a query meets while PostgreSQL restarts."""

# (name, weight): what happens to an order. Payments are timed around expires_at.
SCENARIOS = [
    ("pay around expiry", 30),
    ("pay exactly at expiry", 10),
    ("pay early", 10),
    ("no payment", 10),
    ("duplicate notification", 8),
    ("double payment", 8),
    ("wrong amount, then right", 8),
    ("late payment", 8),
    ("refund fails twice", 4),
    ("refund times out after success", 2),
    ("webhook lost once", 2),
    ("merchant refunds in parts", 6),
    ("merchant refund sent twice", 4),
    ("merchant refunds racing for what is left", 4),
    ("merchant refund racing a late payment", 4),
    ("merchant refund through gateway faults", 3),
]
MERCHANT_SCENARIOS = frozenset(name for name, _ in SCENARIOS if name.startswith("merchant "))
RACING_REFUNDS = 3
"""Refunds with different keys sent at once for 40% of the amount each: two fit."""
LATE_SCENARIOS = frozenset({"late payment", "refund fails twice", "refund times out after success"})
"""Paid after the order's expiry, so the money goes back (through the faults they arm)."""
LATE_MARGIN_S = 0.15
"""How long before the end of the expiry's second a late payment is sent at the latest."""


@dataclass
class Figures:
    orders: int = 0
    payments: int = 0
    scenarios: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)
    chaos: list[tuple[str, float]] = field(default_factory=list)
    drive_s: float = 0.0
    settle_s: float = 0.0
    reconcile: ReconcileReport | None = None
    settle_reconciles: int = 0
    """Reconciliations run while settling, for captures whose webhook was lost for good."""
    totals: dict[str, int] = field(default_factory=dict)
    gateway_label: str = "gateway"
    probes: int = 0
    """Probe orders, one after each chaos fault (see ``Torture.probe``)."""
    bursts: int = 0
    """Bursts of payments chaos made to strike while webhooks and events are in flight."""
    order_events: dict[str, int] = field(default_factory=dict)
    """With the order events checked: outbox rows, delivered, received, received again."""
    refused_payments: Counter[str] = field(default_factory=Counter)
    """Payments the gateway refused, by its code (the local Alipay refuses a second payment,
    another amount, or one after ``time_expire``); nothing was captured."""
    merchant: Counter[str] = field(default_factory=Counter)
    """Merchant refund requests by their answer: created (201), the same again (200: a
    duplicate, or a resend after a lost answer), refused (409/422: a key reused for another
    amount, more than is left), and orders that never succeeded (none asked)."""


class Torture:
    def __init__(
        self,
        settings: Settings,
        *,
        pool: asyncpg.Pool,
        orders: int,
        expires_in_s: int,
        seed: int,
        out: Callable[[str], None],
        order_service_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.order_service_url = order_service_url
        """The order service the relay delivers to, whose ``GET /events`` is checked."""
        self.last_payment_at = 0.0
        """When (monotonic) the gateway last took a payment: its webhook follows."""
        self.n = orders
        self.expires_in_s = expires_in_s
        self.rng = random.Random(seed)
        self.out = out
        self.run_id = f"t{datetime.now(UTC):%H%M%S}{seed % 1000:03d}"
        self.service = ServiceClient(settings)
        self.gateway = gateway_client(settings, self.service, pool=pool)
        self.figures = Figures(orders=orders, gateway_label=self.gateway.label)
        self.currency = currency_of(settings)
        self.pay_orders: list[str] = []
        self._txn_seq = 0

    async def close(self) -> None:
        await self.service.aclose()
        await self.gateway.aclose()

    # --- the storm ----------------------------------------------------------------------------

    def _pick(self) -> str:
        names = [name for name, _ in SCENARIOS]
        weights = [weight for _, weight in SCENARIOS]
        return self.rng.choices(names, weights)[0]

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry what a real client would: unreachable services and 5xx, for up to 2 min.
        Every call retried here is idempotent (order number, transaction id, fault row)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return await call()
            except (Unreachable, ServiceError) as e:
                if isinstance(e, ServiceError) and e.status < 500:
                    raise
                if time.monotonic() > deadline:
                    raise
                self.figures.retries[what] += 1
                await asyncio.sleep(0.5)

    async def _pay(self, no: str, amount: int = AMOUNT, *, at: datetime | None = None) -> None:
        """Pay (at the instant ``at``, if given), resending what a real client would."""
        self._txn_seq += 1
        txn = f"txn-{no.removeprefix('po_')}-{self._txn_seq}"
        sent = 0

        async def pay() -> dict[str, Any]:
            nonlocal sent
            sent += 1
            return await self.gateway.pay(
                pay_order_no=no,
                amount=amount,
                currency=self.currency,
                txn_id=txn,
                first_attempt=sent == 1,
                at=at,
            )

        try:
            await self._retry("pay", pay)
        except ServiceError as e:
            if e.status != 409:
                raise
            # The gateway refused the payment: Alipay takes one payment of a trade's
            # total_amount, before its time_expire. Nothing was captured.
            self.figures.refused_payments[e.code] += 1
            return
        self.figures.payments += 1
        self.last_payment_at = time.monotonic()

    async def _create(self, no: str) -> None:
        """Create a pay order paid at once (a window to spare), to verify with the rest."""
        await self._retry(
            "create",
            lambda: self.service.create(
                order_no=no.removeprefix("po_"),
                amount=AMOUNT,
                currency=self.currency,
                expires_in_s=300,
            ),
        )
        self.pay_orders.append(no)

    async def burst(self, n: int) -> None:
        """``n`` more pay orders, created and then paid all at once: when this returns,
        their webhooks are on their way to the API and, once recorded, their order events
        to the relay (chaos strikes then). They join the orders verified at the end."""
        nos = [f"po_{self.run_id}-burst-{self.figures.bursts}-{i}" for i in range(n)]
        self.figures.bursts += 1
        for no in nos:
            await self._create(no)
        await asyncio.gather(*(self._pay(no) for no in nos))

    async def probe(self, within_s: float = 120) -> None:
        """One pay order end to end: created over the API, paid at the gateway, recorded
        PAY_SUCCESS by the workflow, and (with the order events checked) its
        ``pay_order.succeeded`` event acknowledged by the order service. It joins the
        orders verified at the end.

        Raises:
            RuntimeError: not done within ``within_s``.
        """
        self.figures.probes += 1
        no = f"po_{self.run_id}-probe-{self.figures.probes}"
        await self._create(no)
        await self._pay(no)
        events = self.order_service_url is not None
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with contextlib.suppress(*DB_ERRORS):
                async with self.pool.acquire() as conn:
                    done = await conn.fetchval(
                        "SELECT p.status = 'PAY_SUCCESS' AND (NOT $2 OR EXISTS ("
                        "  SELECT 1 FROM outbox o WHERE o.pay_order_no = p.pay_order_no"
                        "   AND o.event_type = 'pay_order.succeeded'"
                        "   AND o.delivered_at IS NOT NULL))"
                        " FROM pay_order p WHERE p.pay_order_no = $1",
                        no,
                        events,
                    )
                if done:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the probe order {no} did not complete within {within_s:.0f}s")

    async def _one(self, i: int, limit: asyncio.Semaphore) -> None:
        scenario = self._pick()
        self.figures.scenarios[scenario] += 1
        no = f"po_{self.run_id}-{i}"
        async with limit:
            if scenario == "refund fails twice":
                await self._retry("fault", lambda: self.gateway.set_faults(no, fail_next_refunds=2))
                self.figures.faults["refund failures"] += 2
            elif scenario == "refund times out after success":
                await self._retry(
                    "fault", lambda: self.gateway.set_faults(no, timeout_after_success_next=1)
                )
                self.figures.faults["timeouts after success"] += 1
            elif scenario == "webhook lost once":
                await self._retry("fault", lambda: self.gateway.set_faults(no, webhook_drop_next=1))
                self.figures.faults["webhooks lost"] += 1
            elif scenario == "merchant refund through gateway faults":
                await self._retry(
                    "fault",
                    lambda: self.gateway.set_faults(
                        no, fail_next_refunds=2, timeout_after_success_next=1
                    ),
                )
                self.figures.faults["merchant refund failures"] += 2
                self.figures.faults["merchant refund timeouts after success"] += 1
            elif scenario == "duplicate notification":
                await self._retry(
                    "fault", lambda: self.gateway.set_faults(no, webhook_duplicate_next=1)
                )
                self.figures.faults["webhooks duplicated"] += 1
            late = scenario in LATE_SCENARIOS and not self.gateway.takes_payments_after_expiry

            def deadline() -> datetime | None:
                """Where the gateway refuses payments after the trade's expiry, a late
                payment lands inside the last second it still takes (Alipay's time_expire
                is to the second): the order expires at a tenth past a second, and is paid
                once it has expired, within that second. Chosen at each attempt: a resend
                after a lost answer gets the pay order as first created (checkout is
                idempotent by order number)."""
                if not late:
                    return None
                at = datetime.now(UTC) + timedelta(seconds=self.expires_in_s)
                return at.replace(microsecond=100_000)

            # A lost answer is retried with the same order number: checkout is idempotent.
            doc = await self._retry(
                "create",
                lambda: self.service.create(
                    order_no=no.removeprefix("po_"),
                    amount=AMOUNT,
                    currency=self.currency,
                    expires_in_s=None if late else self.expires_in_s,
                    expires_at=deadline(),
                ),
            )
        self.pay_orders.append(no)
        expires_at = datetime.fromisoformat(doc["expires_at"])
        jitter = timedelta(milliseconds=self.rng.uniform(-200, 200))
        match scenario:
            case "pay around expiry":
                await self._pay(no, at=expires_at + jitter)
            case "pay exactly at expiry":
                await self._pay(no, at=expires_at)
            case "pay early" | "duplicate notification" | "webhook lost once":
                await self._pay(no)
            case "double payment":
                await self._pay(no)
                await self._pay(no)
            case "wrong amount, then right":
                await self._pay(no, AMOUNT - 1)
                await self._pay(no)
            case _ if scenario in LATE_SCENARIOS:
                if self.gateway.takes_payments_after_expiry:
                    await self._pay(no, at=expires_at + timedelta(seconds=1))
                else:
                    await self._pay(no, at=await self._expired_within_its_second(no, expires_at))
            case "no payment":
                pass
            case _ if scenario in MERCHANT_SCENARIOS:
                await self._pay(no)
                await self._merchant_refunds(no, scenario)

    async def _expired_within_its_second(self, no: str, expires_at: datetime) -> datetime:
        """When to pay ``no`` late at a gateway that takes payments only until the end of
        its expiry's second (Alipay): as soon as the order is ``PAY_EXPIRED`` (the workflow
        closed the trade, so the money is late), or at the last moment of that second."""
        last = expires_at.replace(microsecond=0) + timedelta(seconds=1 - LATE_MARGIN_S)
        await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()))
        while datetime.now(UTC) < last:
            with contextlib.suppress(*DB_ERRORS):
                async with self.pool.acquire() as conn:
                    status = await conn.fetchval(
                        "SELECT status FROM pay_order WHERE pay_order_no = $1", no
                    )
                if status == "PAY_EXPIRED":
                    break
            await asyncio.sleep(0.03)
        return min(datetime.now(UTC), last)

    async def _paid(self, no: str, within_s: float = 180) -> bool:
        """Whether ``no`` is PAY_SUCCESS, waiting for it while it is PAYING (from the
        database: PostgreSQL may be restarting under chaos)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with contextlib.suppress(*DB_ERRORS):
                async with self.pool.acquire() as conn:
                    status = await conn.fetchval(
                        "SELECT status FROM pay_order WHERE pay_order_no = $1", no
                    )
                if status not in (None, "PAYING"):
                    return bool(status == "PAY_SUCCESS")
            await asyncio.sleep(0.2)
        return False

    async def _refund(self, no: str, refund_no: str, amount: int) -> None:
        """One merchant refund request, resent while the service is unreachable or answers
        5xx (safe: idempotent by ``refund_no``); its answer counted."""
        try:
            doc = await self._retry(
                "merchant refund",
                lambda: self.service.merchant_refund(
                    no, refund_no=refund_no, amount=amount, reason="torture"
                ),
            )
        except ServiceError as e:
            self.figures.merchant[f"refused ({e.status} {e.code})"] += 1
            return
        self.figures.merchant["created (201)" if doc["created"] else "the same again (200)"] += 1

    async def _merchant_refunds(self, no: str, scenario: str) -> None:
        """The shop refunds the paid order ``no`` as ``scenario`` says."""
        if not await self._paid(no):
            self.figures.merchant["none asked: the order did not succeed"] += 1
            return
        key = f"{no.removeprefix('po_')}-r"
        match scenario:
            case "merchant refunds in parts":
                first = self.rng.randint(1, AMOUNT // 2)
                await self._refund(no, f"{key}1", first)
                await self._refund(no, f"{key}2", self.rng.randint(1, AMOUNT - first))
            case "merchant refund sent twice":
                amount = self.rng.randint(1, AMOUNT)
                await asyncio.gather(*(self._refund(no, f"{key}1", amount) for _ in range(3)))
                await self._refund(no, f"{key}1", amount)  # a retry after the answer
                if amount < AMOUNT:  # the same key for another amount: 409
                    await self._refund(no, f"{key}1", amount + 1)
            case "merchant refunds racing for what is left":
                share = AMOUNT * 2 // 5
                await asyncio.gather(
                    *(self._refund(no, f"{key}{i}", share) for i in range(RACING_REFUNDS))
                )
            case "merchant refund racing a late payment":
                await asyncio.gather(self._pay(no), self._refund(no, f"{key}1", AMOUNT))
            case _:  # through gateway faults
                await self._refund(no, f"{key}1", AMOUNT * 3 // 5)

    async def storm(self) -> None:
        t0 = time.monotonic()
        limit = asyncio.Semaphore(32)
        # Orders arrive over a few seconds, so expiries spread out too.
        spread = max(1.0, self.n / 200)
        tasks = []
        for i in range(self.n):
            await asyncio.sleep(spread / self.n)
            tasks.append(asyncio.create_task(self._one(i, limit)))
            if i % max(1, self.n // 10) == 0:
                self.out(f"  created {i}/{self.n} orders")
        await asyncio.gather(*tasks)
        self.figures.drive_s = time.monotonic() - t0

    # --- settle and verify --------------------------------------------------------------------

    async def settle(self, pool: asyncpg.Pool, within_s: float) -> None:
        t0 = time.monotonic()
        # When each capture not yet recorded was first seen so, and the last repair.
        unrecorded_since: dict[str, float] = {}
        last_repair = t0
        while True:
            async with pool.acquire() as conn:
                open_orders = await conn.fetchval(
                    "SELECT count(*) FROM pay_order WHERE pay_order_no = ANY($1)"
                    " AND status = 'PAYING'",
                    self.pay_orders,
                )
                missing = len(self.pay_orders) - await conn.fetchval(
                    "SELECT count(*) FROM pay_order WHERE pay_order_no = ANY($1)", self.pay_orders
                )
                pending_refunds = await conn.fetchval(
                    "SELECT (SELECT count(*) FROM refund WHERE pay_order_no = ANY($1)"
                    "         AND status = 'PENDING')"
                    "     + (SELECT count(*) FROM merchant_refund WHERE pay_order_no = ANY($1)"
                    "         AND status = 'REFUNDING')",
                    self.pay_orders,
                )
                undelivered = (
                    await conn.fetchval(
                        "SELECT count(*) FROM outbox WHERE pay_order_no = ANY($1)"
                        " AND delivered_at IS NULL",
                        self.pay_orders,
                    )
                    if self.order_service_url is not None
                    else 0
                )
            unrecorded = await self._unrecorded_captures(pool)
            now = time.monotonic()
            unrecorded_since = {txn: unrecorded_since.get(txn, now) for txn in unrecorded}
            busy = open_orders + missing + pending_refunds + len(unrecorded) + undelivered
            elapsed = now - t0
            events = f", {undelivered} order events undelivered" if undelivered else ""
            self.out(
                f"  settling [{elapsed:5.1f}s]: {open_orders} paying, {pending_refunds} refunds"
                f" pending, {len(unrecorded)} captures not yet recorded{events}"
            )
            if busy == 0 or elapsed > within_s:
                break
            # A gateway that never sends a webhook again leaves a lost one to reconciliation
            # (its Schedule runs every few minutes): run one now for captures that stayed
            # unrecorded through a few polls.
            stale = [txn for txn, since in unrecorded_since.items() if now - since >= LOST_AFTER_S]
            if stale and not self.gateway.redelivers_webhooks and now - last_repair >= LOST_AFTER_S:
                self.out(f"  settling: {len(stale)} webhook(s) lost for good; reconciling now")
                await self.reconcile(f"settle-{self.figures.settle_reconciles}")
                self.figures.settle_reconciles += 1
                last_repair = time.monotonic()
            await asyncio.sleep(2)
        self.figures.settle_s = time.monotonic() - t0

    async def _unrecorded_captures(self, pool: asyncpg.Pool) -> set[str]:
        """Transactions the gateway captured for our orders that no payment row records."""
        captured = await self._retry(
            "read the gateway", lambda: self.gateway.captured_txns(self.pay_orders)
        )
        async with pool.acquire() as conn:
            recorded = await conn.fetch(
                "SELECT txn_id FROM payment WHERE txn_id = ANY($1)", list(captured)
            )
        return captured - {r["txn_id"] for r in recorded}

    async def reconcile(self, name: str) -> ReconcileReport:
        from payorders.pay_orders import connect

        client = await connect(self.settings)
        report: ReconcileReport = await client.execute_workflow(
            "ReconcileWorkflow",
            self.settings.reconcile_input(),
            id=f"payorders-reconcile-{self.run_id}-{name}",
            task_queue=self.settings.task_queue,
            result_type=ReconcileReport,
        )
        return report

    async def verify(self, pool: asyncpg.Pool) -> None:
        orders = self.pay_orders
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows = [dict(r) for r in await conn.fetch(SQL_VERDICT_ROWS, orders)]
            succeeded_keys = {
                r["idempotency_key"]
                for r in await conn.fetch(
                    "SELECT refund_key AS idempotency_key FROM refund"
                    " WHERE pay_order_no = ANY($1) AND status = 'SUCCEEDED'"
                    " UNION ALL SELECT idempotency_key FROM merchant_refund"
                    " WHERE pay_order_no = ANY($1) AND status = 'REFUND_SUCCESS'",
                    orders,
                )
            }
        # The gateway's side from its own records: nothing moves any more once settled.
        audit = await self._retry("read the gateway", lambda: self.gateway.audit(orders))
        if len(rows) != len(orders):
            self.figures.violations.append(
                f"{len(orders) - len(rows)} pay orders were never written"
            )
        violations, totals = judge(rows, audit, succeeded_keys)
        self.figures.violations += violations
        self.figures.totals = dict(totals)
        if self.order_service_url is not None:
            await self.verify_order_events(pool)

    async def verify_order_events(self, pool: asyncpg.Pool) -> None:
        """The relay's promises, from the outbox and what the order service received: every
        event delivered (acknowledged) and received, at least once, and each pay order's
        events taken in order (sequence 1, 2, 3... with no gap); duplicates are allowed."""
        assert self.order_service_url is not None
        v = self.figures.violations
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT pay_order_no, sequence, delivered_at IS NOT NULL AS delivered"
                " FROM outbox WHERE pay_order_no = ANY($1)",
                self.pay_orders,
            )
        url = f"{self.order_service_url}/events"

        async def received() -> dict[str, Any]:
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.get(url)
                response.raise_for_status()
                doc: dict[str, Any] = response.json()
                return doc

        doc = await self._retry("read the order service", received)
        mine = set(self.pay_orders)
        taken: dict[str, list[int]] = {}
        for event in doc["events"]:
            if event["pay_order_no"] in mine:
                taken.setdefault(event["pay_order_no"], []).append(event["sequence"])
        expected: dict[str, int] = Counter(r["pay_order_no"] for r in rows)
        undelivered = sum(1 for r in rows if not r["delivered"])
        if undelivered:
            v.append(f"{undelivered} order events never acknowledged by the order service")
        for no, n in expected.items():
            if taken.get(no, []) != list(range(1, n + 1)):
                v.append(f"{no}: the order service took sequences {taken.get(no)}, not 1..{n}")
        strays = sorted(set(taken) - set(expected))
        if strays:
            v.append(f"{len(strays)} pay orders have events the outbox does not hold")
        # The private stack's order service hears only this run; a duplicate's warning names
        # the event's id, not its pay order.
        warnings: list[str] = doc["warnings"]
        for w in warnings:
            if "delivered again" not in w:
                v.append(f"order service: {w}")
        self.figures.order_events = {
            "outbox": len(rows),
            "delivered": len(rows) - undelivered,
            "received": sum(len(s) for s in taken.values()),
            "received again": sum(1 for w in warnings if "delivered again" in w),
        }

    def table(self) -> str:
        f = self.figures
        t = f.totals
        rows: list[list[Any]] = [
            ["orders", f.orders],
            ["PAY_SUCCESS / PAY_EXPIRED", f"{t.get('PAY_SUCCESS', 0)} / {t.get('PAY_EXPIRED', 0)}"],
            ["payments at the gateway", f.payments],
            *[
                [f"payments the gateway refused: {k}", n]
                for k, n in sorted(f.refused_payments.items())
            ],
            [
                "captured / refunded (minor units)",
                f"{t.get('captured', 0)} / {t.get('gateway_refunded', 0)}",
            ],
            *self._merchant_rows(),
            *[[f"fault: {k}", n] for k, n in sorted(f.faults.items())],
            *[[f"chaos: {name}, recovered in (s)", f"{secs:.1f}"] for name, secs in f.chaos],
            *([["probe orders (one after each fault)", f.probes]] if f.probes else []),
            *([["burst orders (chaos paid them to strike)", f.bursts * BURST]] if f.bursts else []),
            *self._order_event_rows(),
            *[[f"client retries: {k}", n] for k, n in sorted(f.retries.items())],
            ["time to drive the storm (s)", f"{f.drive_s:.1f}"],
            ["time to settle (s)", f"{f.settle_s:.1f}"],
        ]
        if f.settle_reconciles:
            rows.append(["reconciliations while settling (webhooks lost)", f.settle_reconciles])
        if f.reconcile is not None:
            r = f.reconcile
            rows.append(
                [
                    "reconciliation: checked / repaired / exceptions",
                    f"{r.checked} / {r.repaired} / {r.exceptions}",
                ]
            )
        rows.append(["violations", len(f.violations)])
        return render(["figure", "value"], rows)

    def _merchant_rows(self) -> list[list[Any]]:
        f, t = self.figures, self.figures.totals
        if not f.merchant:
            return []
        return [
            *[[f"merchant refund requests: {k}", n] for k, n in sorted(f.merchant.items())],
            [
                "merchant refunds REFUND_SUCCESS / REFUND_FAILED",
                f"{t.get('merchant REFUND_SUCCESS', 0)} / {t.get('merchant REFUND_FAILED', 0)}",
            ],
            [
                "merchant refunded: at the gateway / recorded (minor units)",
                f"{t.get('gateway_merchant_refunded', 0)} / {t.get('merchant_refunded', 0)}",
            ],
        ]

    def _order_event_rows(self) -> list[list[Any]]:
        e = self.figures.order_events
        if not e:
            return []
        return [
            [
                "order events: outbox / acknowledged / taken by the order service",
                f"{e['outbox']} / {e['delivered']} / {e['received']}",
            ],
            ["order events delivered again (at least once)", e["received again"]],
        ]


SQL_VERDICT_ROWS = """
SELECT po.pay_order_no, po.status, po.amount, po.paid_amount, po.refunded_amount,
       coalesce((SELECT sum(amount) FROM payment p
                  WHERE p.pay_order_no = po.pay_order_no), 0) AS payments,
       coalesce((SELECT sum(amount) FROM refund r WHERE r.status = 'SUCCEEDED'
                  AND r.pay_order_no = po.pay_order_no), 0) AS refunds,
       (SELECT count(*) FROM refund r WHERE r.pay_order_no = po.pay_order_no
         AND r.status = 'SUCCEEDED') AS refunds_succeeded,
       coalesce((SELECT sum(amount) FROM merchant_refund m WHERE m.status = 'REFUND_SUCCESS'
                  AND m.pay_order_no = po.pay_order_no), 0) AS merchant_refunded,
       (SELECT count(*) FROM merchant_refund m WHERE m.pay_order_no = po.pay_order_no
         AND m.status = 'REFUND_SUCCESS') AS merchant_succeeded,
       (SELECT count(*) FROM merchant_refund m WHERE m.pay_order_no = po.pay_order_no
         AND m.status = 'REFUND_FAILED') AS merchant_failed,
       (SELECT count(*) FROM merchant_refund m WHERE m.pay_order_no = po.pay_order_no
         AND m.status = 'REFUNDING') AS merchant_refunding,
       (SELECT count(*) FROM outbox o WHERE o.pay_order_no = po.pay_order_no
         AND o.event_type IN ('pay_order.succeeded', 'pay_order.expired')) AS terminal_events,
       (SELECT count(*) FROM outbox o WHERE o.pay_order_no = po.pay_order_no
         AND o.event_type = 'refund.succeeded') AS refund_events,
       (SELECT count(*) FROM outbox o WHERE o.pay_order_no = po.pay_order_no
         AND o.event_type = 'refund.failed') AS refund_failed_events
  FROM pay_order po WHERE po.pay_order_no = ANY($1)"""


def judge(
    rows: Sequence[Mapping[str, Any]], audit: GatewayAudit, succeeded_keys: Collection[str]
) -> tuple[list[str], Counter[str]]:
    """The verdict: what our rows (``SQL_VERDICT_ROWS``, after settlement) and the gateway's
    own records disagree on, and the totals the table shows.

    Per pay order: the saga's fund identity (payments - compensations = amount on
    PAY_SUCCESS, 0 on PAY_EXPIRED) in our rows and at the gateway; what the gateway refunded
    under merchant refund keys equal to our REFUND_SUCCESS merchant refunds, never past the
    amount, none of an unpaid order, none still in flight; one terminal event, one refund
    event per refund. Across them: no refund key executed twice at the gateway (one refund
    per ``refund_no``), no transaction refunded past its amount, every gateway refund one we
    recorded as succeeded."""
    v: list[str] = []
    totals: Counter[str] = Counter()
    for r in rows:
        no = r["pay_order_no"]
        paid = r["status"] == "PAY_SUCCESS"
        expected = r["amount"] if paid else 0
        held = audit.money.get(no, GatewayMoney())
        compensated = held.refunded - held.merchant_refunded
        totals[r["status"]] += 1
        totals["payments"] += r["payments"]
        totals["refunds"] += r["refunds"]
        totals["captured"] += held.captured
        totals["gateway_refunded"] += held.refunded
        totals["gateway_merchant_refunded"] += held.merchant_refunded
        totals["merchant_refunded"] += r["merchant_refunded"]
        totals["merchant REFUND_SUCCESS"] += r["merchant_succeeded"]
        totals["merchant REFUND_FAILED"] += r["merchant_failed"]
        if r["status"] == "PAYING":
            v.append(f"{no}: still PAYING after settlement")
        if r["paid_amount"] != r["payments"] or r["refunded_amount"] != r["refunds"]:
            v.append(f"{no}: sums disagree with rows")
        if r["payments"] - r["refunds"] != expected:
            v.append(f"{no}: fund identity broken ({r['payments']} - {r['refunds']})")
        if held.captured != r["payments"]:
            v.append(f"{no}: gateway captured {held.captured}, we recorded {r['payments']}")
        if compensated != r["refunds"]:
            v.append(f"{no}: gateway compensated {compensated}, we {r['refunds']}")
        if held.captured - compensated != expected:
            v.append(f"{no}: the gateway keeps {held.captured - compensated}, expected {expected}")
        if held.merchant_refunded != r["merchant_refunded"]:
            v.append(
                f"{no}: gateway refunded {held.merchant_refunded} for merchant refunds,"
                f" we recorded {r['merchant_refunded']}"
            )
        if held.merchant_refunded > expected:
            v.append(f"{no}: merchant refunds of {held.merchant_refunded} past {expected}")
        if r["merchant_refunding"]:
            v.append(f"{no}: {r['merchant_refunding']} merchant refund(s) still REFUNDING")
        if r["terminal_events"] != 1:
            v.append(f"{no}: {r['terminal_events']} terminal outbox events")
        if r["refund_events"] != r["refunds_succeeded"] + r["merchant_succeeded"]:
            v.append(
                f"{no}: {r['refund_events']} refund events for"
                f" {r['refunds_succeeded'] + r['merchant_succeeded']} refunds"
            )
        if r["refund_failed_events"] != r["merchant_failed"]:
            v.append(f"{no}: {r['refund_failed_events']} refund.failed events")
    if totals["captured"] != totals["payments"] or (
        totals["captured"] - (totals["gateway_refunded"] - totals["gateway_merchant_refunded"])
        != AMOUNT * totals["PAY_SUCCESS"]
    ):
        v.append("gateway totals: captured != settled + compensated")
    if audit.keys_executed_twice:
        v.append(f"{audit.keys_executed_twice} refund keys executed twice at the gateway")
    for txn in audit.over_refunded:
        v.append(f"{txn}: refunded beyond its amount at the gateway")
    unrecorded = [k for k in audit.refund_keys if k not in succeeded_keys]
    if unrecorded:
        v.append(f"{len(unrecorded)} gateway refunds not recorded as succeeded here")
    return v, totals


async def run_torture(
    settings: Settings,
    *,
    orders: int = 2000,
    expires_in_s: int = 8,
    seed: int = 1,
    settle_within_s: float = 300,
    out: Callable[[str], None] = print,
    chaos: Callable[[Torture, float], Coroutine[Any, Any, None]] | None = None,
    order_service_url: str | None = None,
) -> int:
    """Returns 0 when every check holds, 1 otherwise (after printing the figures).

    ``order_service_url``: the order service the relay delivers to; given, the relay's
    promises are checked too (``Torture.verify_order_events``).
    """
    pool = await store.create_pool(database_url(settings), min_size=1, max_size=4)
    try:
        t = Torture(
            settings,
            pool=pool,
            orders=orders,
            expires_in_s=expires_in_s,
            seed=seed,
            out=out,
            order_service_url=order_service_url,
        )
    except BaseException:
        await pool.close()
        raise
    try:
        out(
            f"torture {t.run_id}: {orders} orders, expiring {expires_in_s}s after creation,"
            f" at the {t.gateway.label}"
        )
        # Chaos spans the storm and the first part of settling.
        chaos_task = (
            asyncio.create_task(chaos(t, orders / 60 + expires_in_s + 10))
            if chaos is not None
            else None
        )
        await t.storm()
        if chaos_task is not None:
            await chaos_task
        await t.settle(pool, settle_within_s)
        t.figures.reconcile = await t.reconcile("final")
        await t.verify(pool)
    finally:
        await t.close()
        await pool.close()
    out("")
    out(t.table())
    for line in t.figures.violations[:50]:
        out(f"VIOLATION {line}")
    for scenario, n in sorted(t.figures.scenarios.items()):
        out(f"  scenario {scenario}: {n}")
    return 1 if t.figures.violations else 0


# --- chaos -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosPlan:
    """How many of each fault ``payorders torture --chaos`` injects."""

    worker_kills: int = 3
    """SIGKILL a worker, the stack's workers in turn (the others carry on)."""
    temporal_restarts: int = 1
    postgres_restarts: int = 1
    gateway_pauses: int = 1
    gateway_pause_s: float = 5.0
    api_kills: int = 1
    """SIGKILL an API process (in turn) just after a payment, as its webhook arrives."""
    relay_kills: int = 1
    """SIGKILL the worker whose relay holds a claim: mid-delivery of an order event."""


IN_FLIGHT_WAIT_S = 10.0
"""How long a relay kill waits for a delivery in flight before it strikes anyway, saying
so."""
BURST = 6
"""Payments chaos makes at once when the storm has none in flight at a kill's moment."""


async def _ready(api_url: str, within: float = 120) -> None:
    """Wait until the service says Temporal and PostgreSQL answer again."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=3) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(f"{api_url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the stack did not recover")


async def _claiming_worker(
    stack: DevStack, pool: asyncpg.Pool, within_s: float = IN_FLIGHT_WAIT_S
) -> str | None:
    """The worker whose relay holds a claim right now (its session is idle in the claim's
    transaction while it POSTs), found by its sessions' ``application_name``; None if no
    relay is delivering within ``within_s``."""
    names = {f"payorders-{name}: payorders-relay": name for name in stack.group("worker")}
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(*DB_ERRORS):
            async with pool.acquire() as conn:
                holders = await conn.fetch(
                    "SELECT application_name FROM pg_stat_activity"
                    " WHERE state = 'idle in transaction' AND position($1 in query) > 0",
                    # The relay's claim is the last statement of a session holding one.
                    relay.SQL_CLAIM_HEAD,
                )
            for row in holders:
                if row["application_name"] in names:
                    return names[row["application_name"]]
        await asyncio.sleep(0.001)  # a claim lasts a POST to a local service: milliseconds
    return None


async def _after_a_payment(torture: Torture, within_s: float = 2.0) -> None:
    """Return just after the gateway took a payment, whose webhook is then on its way to
    the API: one of the storm's, or, with none within ``within_s``, a burst of our own."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if time.monotonic() - torture.last_payment_at < 0.05:
            return
        await asyncio.sleep(0.005)
    await torture.burst(BURST)


class _Chaos:
    """One fault at a time: inject it, then time the recovery.

    A fault's recovery runs from the moment it is injected until (1) the API answers
    ``/readyz`` (Temporal and PostgreSQL answer it), (2) a killed process's replacement
    serves (``DevStack.wait_serving``: uvicorn accepts on the API socket, the worker polls
    its task queue), and (3) a probe pay order completes end to end (``Torture.probe``:
    created over the API, paid at the gateway, PAY_SUCCESS recorded, its order event
    acknowledged by the order service).
    """

    def __init__(self, stack: DevStack, plan: ChaosPlan, torture: Torture) -> None:
        self.stack = stack
        self.plan = plan
        self.torture = torture
        self.kills: Counter[str] = Counter()

    def _next(self, group: str) -> str:
        names = self.stack.group(group)
        name = names[self.kills[group] % len(names)]
        self.kills[group] += 1
        return name

    async def inject(self, kind: str) -> tuple[str, str | None]:
        """Inject one fault; its line in the table and the child that must serve again."""
        stack = self.stack
        if kind == "worker":
            name = self._next("worker")
            others = len(stack.group("worker")) - 1
            stack.kill(name)
            if not others:
                return "kill the worker (SIGKILL)", name
            return f"kill {name} (SIGKILL; {others} other worker(s) carry on)", name
        if kind == "api":
            name = self._next("api")
            await _after_a_payment(self.torture)
            stack.kill(name)
            return f"kill {name} (SIGKILL) as webhooks arrive", name
        if kind == "relay":
            holder = await _claiming_worker(stack, self.torture.pool, 2.0)
            if holder is None:  # the storm is over: make events to deliver
                await self.torture.burst(BURST)
                holder = await _claiming_worker(stack, self.torture.pool)
            name = holder or self._next("worker")
            stack.kill(name)
            moment = "mid-delivery" if holder else "(no delivery in flight)"
            return f"kill {name}'s order-events relay (SIGKILL) {moment}", name
        if kind == "temporal":
            await stack.restart_temporal()
            return "restart the Temporal dev server", None
        if kind == "postgres":
            await stack.restart_postgres()
            return "restart PostgreSQL", None
        label = self.torture.figures.gateway_label
        await stack.pause("gateway", self.plan.gateway_pause_s)
        return f"stop the {label} for {self.plan.gateway_pause_s:.0f}s", None

    async def recover(self, serving: str | None) -> None:
        await _ready(self.stack.api_url)
        if serving is not None:
            await self.stack.wait_serving(serving)
        await self.torture.probe()


async def _chaos(
    stack: DevStack, plan: ChaosPlan, torture: Torture, span_s: float, seed: int
) -> None:
    """Inject the plan's faults at random moments over ``span_s``, one at a time, and time
    each recovery (see ``_Chaos``)."""
    rng = random.Random(seed)
    faults = (
        ["worker"] * plan.worker_kills
        + ["api"] * plan.api_kills
        + ["relay"] * plan.relay_kills
        + ["temporal"] * plan.temporal_restarts
        + ["postgres"] * plan.postgres_restarts
        + ["gateway"] * plan.gateway_pauses
    )
    moments = sorted(rng.uniform(0.1, 0.9) * span_s for _ in faults)
    rng.shuffle(faults)
    chaos = _Chaos(stack, plan, torture)
    t0 = time.monotonic()
    for at, kind in zip(moments, faults, strict=True):
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        started = time.monotonic()
        line, serving = await chaos.inject(kind)
        # The wait for the moment of a kill is not part of its recovery.
        struck = started if kind not in ("api", "relay") else time.monotonic()
        await chaos.recover(serving)
        torture.figures.chaos.append((line, time.monotonic() - struck))


async def run_chaos_torture(
    plan: ChaosPlan,
    *,
    gateway: GatewayKind = "sandbox",
    workers: int = 1,
    api_processes: int = 1,
    orders: int,
    expires_in_s: int,
    seed: int,
    settle_within_s: float,
    out: Callable[[str], None] = print,
) -> int:
    """The torture on a private local stack of its own, so faults can hit every part, and
    the relay's promises checked at its order service.

    It takes no settings: the private stack's are its own, whatever the environment holds
    (it may hold the addresses of the running ``payorders dev``). ``gateway``: the one the
    private stack runs; ``workers`` and ``api_processes``: how many of each it runs.
    """
    async with private_stack(
        out, gateway=gateway, workers=workers, api_processes=api_processes
    ) as (stack, local):
        out(
            f"private stack: {workers} worker(s) (each with a relay),"
            f" {api_processes} API process(es)"
        )
        return await run_torture(
            local,
            orders=orders,
            expires_in_s=expires_in_s,
            seed=seed,
            settle_within_s=settle_within_s,
            out=out,
            chaos=lambda torture, span: _chaos(stack, plan, torture, span, seed),
            order_service_url=stack.orders_url,  # a private stack always runs it
        )


@asynccontextmanager
async def private_stack(
    out: Callable[[str], None],
    *,
    gateway: GatewayKind = "sandbox",
    workers: int = 1,
    api_processes: int = 1,
) -> AsyncIterator[tuple[DevStack, Settings]]:
    """A started private stack in a temporary folder (removed at the end), running
    ``gateway`` with ``workers`` workers and ``api_processes`` API processes, and the
    settings of its clients."""
    # Checked before the folder exists: a refused count leaves nothing behind.
    check_processes("workers", workers)
    check_processes("api_processes", api_processes)
    tmp = Path(tempfile.mkdtemp(prefix="payorders-torture-"))
    stack = DevStack.private(
        tmp / "data", gateway=gateway, workers=workers, api_processes=api_processes
    )
    stop = asyncio.Event()
    try:
        await stack.start(lambda m: out(f"  stack: {m}"))
        supervisor = asyncio.create_task(stack.supervise(stop, lambda m: out(f"  stack: {m}")))
        try:
            yield stack, stack.client_settings()
        finally:
            stop.set()
            await supervisor
    finally:
        await asyncio.to_thread(stack.stop)
        shutil.rmtree(tmp, ignore_errors=True)

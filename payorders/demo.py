"""``payorders demo``: the scenarios users worry about, each on its own pay orders, against
the running stack; ends with a table per scenario and a non-zero exit if any order breaks
the fund identity."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from payorders import domain
from payorders.api import PayOrders, StartedPayOrder
from payorders.customer import customer_pays
from payorders.domain import PayOrderStatus
from payorders.runtime import Resources
from payorders.table import render

SHORT = timedelta(seconds=4)
SETTLE_WITHIN_S = 120.0


@dataclass
class Outcome:
    pay_order_no: str
    status: str
    paid: int
    refunded: int
    refunds_at_gateway: int
    identity_holds: bool


@dataclass
class Ctx:
    api: PayOrders
    res: Resources
    run_id: str

    def order_no(self, scenario: str, i: int = 0) -> str:
        return f"demo-{self.run_id}-{scenario}-{i}"

    async def start(
        self, scenario: str, i: int = 0, *, expires_in: timedelta = SHORT
    ) -> StartedPayOrder:
        return await self.api.start_pay_order(
            order_no=self.order_no(scenario, i), amount=1999, currency="USD", expires_in=expires_in
        )

    async def create(self, scenario: str, i: int = 0, *, expires_in: timedelta = SHORT) -> str:
        return (await self.start(scenario, i, expires_in=expires_in)).pay_order_no

    async def pay(self, pay_order_no: str, amount: int = 1999, txn_id: str | None = None) -> str:
        """The customer pays at the sandbox gateway, which notifies the adapter."""
        cap, _ = await customer_pays(
            self.api,
            self.res.sandbox,
            pay_order_no=pay_order_no,
            amount=amount,
            currency="USD",
            txn_id=txn_id,
        )
        return cap.txn_id

    async def wait_status(self, pay_order_no: str, status: PayOrderStatus) -> None:
        while True:
            row = await self.res.store.get_pay_order(pay_order_no)
            if row is not None and row.status is status:
                return
            await asyncio.sleep(0.1)


async def _sleep_until(when: datetime) -> None:
    await asyncio.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()))


async def paid_in_time(c: Ctx) -> list[str]:
    no = await c.create("paid", expires_in=timedelta(minutes=10))
    await c.pay(no)
    return [no]


async def expired(c: Ctx) -> list[str]:
    return [await c.create("expired")]


async def fifty_at_the_expiry_instant(c: Ctx) -> list[str]:
    started = await asyncio.gather(*(c.start("race", i) for i in range(50)))

    async def pay_at_expiry(order: StartedPayOrder) -> None:
        await _sleep_until(order.expires_at)
        await c.pay(order.pay_order_no)

    await asyncio.gather(*(pay_at_expiry(s) for s in started))
    return [s.pay_order_no for s in started]


async def _late_payment(c: Ctx, scenario: str, **faults: Any) -> list[str]:
    """An order expires, then its payment lands; ``faults`` arm the gateway for its refund."""
    no = domain.pay_order_no_for(c.order_no(scenario))
    if faults:
        await c.res.sandbox.set_faults(no, **faults)
    await c.create(scenario)
    await c.wait_status(no, PayOrderStatus.PAY_EXPIRED)
    await c.pay(no)
    return [no]


async def late_payment(c: Ctx) -> list[str]:
    return await _late_payment(c, "late")


async def refund_fails_five_times(c: Ctx) -> list[str]:
    return await _late_payment(c, "flaky", fail_next_refunds=5)


async def refund_times_out_after_success(c: Ctx) -> list[str]:
    return await _late_payment(c, "ambiguous", timeout_after_success_next=1)


async def duplicate_notification(c: Ctx) -> list[str]:
    no = await c.create("dupnotify", expires_in=timedelta(minutes=10))
    txn = await c.pay(no)
    await c.pay(no, txn_id=txn)
    return [no]


async def double_payment(c: Ctx) -> list[str]:
    no = await c.create("double", expires_in=timedelta(minutes=10))
    await c.pay(no)
    await c.pay(no)
    return [no]


async def already_paid_on_close(c: Ctx) -> list[str]:
    no = domain.pay_order_no_for(c.order_no("closepaid"))
    await c.res.sandbox.set_faults(no, paid_on_close_amount=1999, paid_on_close_currency="USD")
    await c.create("closepaid")
    return [no]


SCENARIOS: list[tuple[str, str, Callable[[Ctx], Awaitable[list[str]]]]] = [
    ("paid in time", "PAY_SUCCESS, nothing refunded", paid_in_time),
    ("expired", "PAY_EXPIRED, trade closed", expired),
    ("50 payments at the expiry instant", "each one terminal state", fifty_at_the_expiry_instant),
    ("late payment", "PAY_EXPIRED, refunded once", late_payment),
    ("refund fails 5 times, then succeeds", "1 refund at the gateway", refund_fails_five_times),
    (
        "refund times out after the gateway did it",
        "1 refund at the gateway",
        refund_times_out_after_success,
    ),
    ("duplicate notification", "ignored: paid once", duplicate_notification),
    ("double payment", "second payment refunded", double_payment),
    ("expiry, gateway says already paid", "PAY_SUCCESS, no refund", already_paid_on_close),
]


async def _outcome(c: Ctx, no: str) -> tuple[Outcome, bool]:
    """The order as our rows and the gateway's ledger see it, and whether it has settled."""
    row = await c.res.store.get_pay_order(no)
    assert row is not None
    payments = await c.res.store.payments_of(no)
    ledger = await c.res.sandbox.ledger_of(no)
    fund = domain.fund_check(
        status=row.status,
        amount=row.amount,
        paid_amount=row.paid_amount,
        refunded_amount=row.refunded_amount,
    )
    settled = (
        domain.is_terminal(row.status)
        and all(p["settled"] or p["refund_status"] == "SUCCEEDED" for p in payments)
        and ledger["captured"] == row.paid_amount
    )
    return (
        Outcome(
            pay_order_no=no,
            status=row.status.value,
            paid=row.paid_amount,
            refunded=row.refunded_amount,
            refunds_at_gateway=len(ledger["refunds"]),
            identity_holds=fund.holds and ledger["refunded"] == row.refunded_amount,
        ),
        settled,
    )


async def run_demo(api: PayOrders, res: Resources, *, out: Callable[[str], None] = print) -> int:
    c = Ctx(api=api, res=res, run_id=datetime.now(UTC).strftime("%H%M%S"))
    t0 = time.monotonic()
    out(f"demo {c.run_id}: driving {len(SCENARIOS)} scenarios against the running stack")

    async def drive(name: str, fn: Callable[[Ctx], Awaitable[list[str]]]) -> list[str]:
        orders = await fn(c)
        out(f"  [{time.monotonic() - t0:5.1f}s] {name}: {len(orders)} order(s) driven")
        return orders

    driven = await asyncio.gather(*(drive(name, fn) for name, _, fn in SCENARIOS))
    every = [no for orders in driven for no in orders]
    outcomes: dict[str, Outcome] = {}
    deadline = time.monotonic() + SETTLE_WITHIN_S
    last_report = 0.0
    while True:
        results = await asyncio.gather(*(_outcome(c, no) for no in every))
        outcomes = {o.pay_order_no: o for o, _ in results}
        done = sum(1 for _, settled in results if settled)
        now = time.monotonic()
        if done == len(every) or now > deadline:
            break
        if now - last_report >= 1.0:
            out(f"  [{now - t0:5.1f}s] settling: {done}/{len(every)} orders settled")
            last_report = now
        await asyncio.sleep(0.25)
    out(f"  [{time.monotonic() - t0:5.1f}s] settled: {done}/{len(every)} orders\n")
    for no in every:  # disarm what the scenarios armed at the gateway
        await res.sandbox.clear_faults(no)
    broken = 0
    for (name, expect, _), orders in zip(SCENARIOS, driven, strict=True):
        rows = [outcomes[no] for no in orders]
        broken += sum(1 for o in rows if not o.identity_holds)
        out(f"== {name}  (expected: {expect})")
        out(_scenario_table(rows, api))
        out("")
    if done != len(every):
        out(f"demo: {len(every) - done} order(s) did not settle within {SETTLE_WITHIN_S:.0f}s")
        return 1
    if broken:
        out(f"demo: FAILED: {broken} order(s) break the fund identity")
        return 1
    out(f"demo: all {len(every)} orders settled; the fund identity holds for every one")
    return 0


def _scenario_table(rows: list[Outcome], api: PayOrders) -> str:
    headers = ["pay order", "status", "paid", "refunded", "gateway refunds", "identity", "UI"]
    if len(rows) > 3:
        by_status: dict[str, int] = {}
        for o in rows:
            by_status[o.status] = by_status.get(o.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
        holds = sum(o.identity_holds for o in rows)
        return render(
            ["orders", "final status", "paid", "refunded", "gateway refunds", "identity"],
            [
                [
                    len(rows),
                    summary,
                    sum(o.paid for o in rows),
                    sum(o.refunded for o in rows),
                    sum(o.refunds_at_gateway for o in rows),
                    f"holds {holds}/{len(rows)}",
                ]
            ],
        )
    body: list[list[Any]] = [
        [
            o.pay_order_no,
            o.status,
            o.paid,
            o.refunded,
            o.refunds_at_gateway,
            "holds" if o.identity_holds else "BROKEN",
            api.ui_link(o.pay_order_no),
        ]
        for o in rows
    ]
    return render(headers, body)

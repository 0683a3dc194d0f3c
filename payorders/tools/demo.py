"""``payorders demo``: the scenarios users worry about, each on its own pay orders, against
the running stack; ends with a table per scenario, the example order service's lines for
those orders, and a non-zero exit if any order breaks the fund identity or an event of
theirs does not reach the order service."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from payorders.core import domain
from payorders.core.domain import PayOrderStatus
from payorders.core.settings import Settings
from payorders.localstack import stackinfo
from payorders.tools.http_clients import (
    GatewayClient,
    ServiceClient,
    ServiceError,
    currency_of,
    gateway_client,
)
from payorders.tools.table import render

SHORT = timedelta(seconds=4)
LATE_IN_THE_SECOND = timedelta(milliseconds=500)
SETTLE_WITHIN_S = 120.0
EVENTS_WITHIN_S = 60.0
"""How long the demo waits for the order service to hear of its settled orders."""
TERMINAL_EVENTS = frozenset({"pay_order.succeeded", "pay_order.expired"})


@dataclass
class Outcome:
    pay_order_no: str
    status: str
    paid: int
    refunded: int
    refunds_at_gateway: int
    identity_holds: bool


@dataclass
class Started:
    pay_order_no: str
    expires_at: datetime


@dataclass
class Ctx:
    """The demo's hands: checkout through the service API, customers at the configured
    gateway (whose webhooks reach the adapter), and reads through both."""

    service: ServiceClient
    gateway: GatewayClient
    settings: Settings
    run_id: str

    def order_no(self, scenario: str, i: int = 0) -> str:
        return f"demo-{self.run_id}-{scenario}-{i}"

    async def start(self, scenario: str, i: int = 0, *, expires_in: timedelta = SHORT) -> Started:
        doc = await self.service.create(
            order_no=self.order_no(scenario, i),
            amount=1999,
            currency=currency_of(self.settings),
            expires_in_s=int(expires_in.total_seconds()),
        )
        return Started(doc["pay_order_no"], datetime.fromisoformat(doc["expires_at"]))

    async def create(self, scenario: str, i: int = 0, *, expires_in: timedelta = SHORT) -> str:
        return (await self.start(scenario, i, expires_in=expires_in)).pay_order_no

    async def pay(self, pay_order_no: str, *, at: datetime | None = None) -> str:
        """The customer pays at the gateway (at the instant ``at``), which then sends its
        webhook."""
        capture = await self.gateway.pay(
            pay_order_no=pay_order_no, amount=1999, currency=currency_of(self.settings), at=at
        )
        return str(capture["txn_id"])

    async def wait_status(self, pay_order_no: str, status: PayOrderStatus) -> None:
        while (await self.service.get(pay_order_no))["status"] != status.value:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def paid_in_time(c: Ctx) -> list[str]:
    no = await c.create("paid", expires_in=timedelta(minutes=10))
    await c.pay(no)
    return [no]


async def expired(c: Ctx) -> list[str]:
    return [await c.create("expired")]


async def fifty_at_the_expiry_instant(c: Ctx) -> list[str]:
    started = await asyncio.gather(*(c.start("race", i) for i in range(50)))

    async def pay_at_expiry(order: Started) -> None:
        try:
            await c.pay(order.pay_order_no, at=order.expires_at)
        except ServiceError as e:
            # Alipay refuses a payment once the trade's time_expire has passed: one that
            # reached it after the second of our expiry was refused, nothing captured.
            if e.status != 409 or c.gateway.takes_payments_after_expiry:
                raise

    await asyncio.gather(*(pay_at_expiry(s) for s in started))
    return [s.pay_order_no for s in started]


async def _late_payment(c: Ctx, scenario: str, **faults: Any) -> list[str]:
    """An order expires, then its payment lands; ``faults`` arm the gateway for its refund.

    A gateway that refuses payments after the trade's expiry (Alipay's ``time_expire``, to
    the second) still takes one inside that last second: the order expires at a tenth past
    a second and is paid 0.5 s later, after our expiry. Whether that money is late depends
    on whether the workflow's close reached Alipay first (else the close finds the trade
    paid, and it is a success): so there the refunds the faults are about are the shop's
    own, of a paid order, in full."""
    no = domain.pay_order_no_for(c.order_no(scenario))
    if faults:
        await c.gateway.set_faults(no, **faults)
    if c.gateway.takes_payments_after_expiry:
        await c.create(scenario)
        await c.wait_status(no, PayOrderStatus.PAY_EXPIRED)
        await c.pay(no)
        return [no]
    if faults:
        await c.create(scenario, expires_in=timedelta(minutes=10))
        await c.pay(no)
        await c.wait_status(no, PayOrderStatus.PAY_SUCCESS)
        await c.service.merchant_refund(no, refund_no=f"{scenario}-return", amount=1999)
        return [no]
    expires_at = (datetime.now(UTC) + SHORT).replace(microsecond=100_000)
    await c.service.create(
        order_no=c.order_no(scenario),
        amount=1999,
        currency=currency_of(c.settings),
        expires_at=expires_at,
    )
    try:
        await c.pay(no, at=expires_at + LATE_IN_THE_SECOND)
    except ServiceError as e:
        # It reached Alipay after that second (a loaded machine): refused, nothing moved.
        if e.status != 409:
            raise
    return [no]


async def late_payment(c: Ctx) -> list[str]:
    return await _late_payment(c, "late")


async def refund_fails_five_times(c: Ctx) -> list[str]:
    return await _late_payment(c, "flaky", fail_next_refunds=5)


async def refund_times_out_after_success(c: Ctx) -> list[str]:
    return await _late_payment(c, "ambiguous", timeout_after_success_next=1)


async def duplicate_notification(c: Ctx) -> list[str]:
    no = domain.pay_order_no_for(c.order_no("dupnotify"))
    await c.gateway.set_faults(no, webhook_duplicate_next=1)  # the gateway sends it twice
    await c.create("dupnotify", expires_in=timedelta(minutes=10))
    await c.pay(no)
    return [no]


async def double_payment(c: Ctx) -> list[str]:
    no = await c.create("double", expires_in=timedelta(minutes=10))
    await c.pay(no)
    if c.gateway.takes_payments_after_expiry:
        await c.pay(no)
        return [no]
    # Alipay takes one payment per trade: the second is refused at the gateway.
    try:
        await c.pay(no)
    except ServiceError as e:
        if e.status != 409:
            raise
    else:
        raise RuntimeError(f"{c.gateway.label} took a second payment of {no}'s one trade")
    return [no]


async def already_paid_on_close(c: Ctx) -> list[str]:
    no = domain.pay_order_no_for(c.order_no("closepaid"))
    await c.gateway.set_faults(
        no, paid_on_close_amount=1999, paid_on_close_currency=currency_of(c.settings)
    )
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


ONE_PAYMENT_PER_TRADE = {
    "double payment": "the gateway refuses the second payment: paid once, nothing refunded",
    "late payment": "paid after our expiry, inside time_expire's second: PAY_EXPIRED and"
    " refunded once (PAY_SUCCESS if it beat our close; refused if it missed that second)",
    "refund fails 5 times, then succeeds": "the shop's full refund: 1 refund at the gateway",
    "refund times out after the gateway did it": "the shop's full refund: 1 refund at the gateway",
}
"""What to expect where the gateway takes one payment per trade, until the trade's expiry."""


async def _outcomes(c: Ctx, nos: list[str]) -> list[tuple[Outcome, bool]]:
    """Each order as our service and the gateway's own records see it, and whether it
    settled. The gateway's records of all of them are read at once."""
    orders = await asyncio.gather(*(c.service.get(no) for no in nos))
    ledgers = await c.gateway.ledgers(nos)
    return [_outcome(no, order, ledgers[no]) for no, order in zip(nos, orders, strict=True)]


def _outcome(no: str, order: dict[str, Any], ledger: dict[str, Any]) -> tuple[Outcome, bool]:
    by_shop = order.get("refunded_by_merchant", 0)
    settled = (
        order["status"] != PayOrderStatus.PAYING.value
        and all(p["settled"] or p["refund_status"] == "SUCCEEDED" for p in order["payments"])
        and ledger["captured"] == order["paid_amount"]
        and not order.get("merchant_refund_in_flight", 0)
    )
    return (
        Outcome(
            pay_order_no=no,
            status=order["status"],
            paid=order["paid_amount"],
            refunded=order["refunded_amount"] + by_shop,
            refunds_at_gateway=len(ledger["refunds"]),
            identity_holds=order["fund_identity"]["holds"]
            and ledger["refunded"] == order["refunded_amount"] + by_shop,
        ),
        settled,
    )


async def run_demo(settings: Settings, *, out: Callable[[str], None] = print) -> int:
    service = ServiceClient(settings)
    try:
        gateway = gateway_client(settings, service)
    except BaseException:
        await service.aclose()
        raise
    try:
        return await _run(
            Ctx(service, gateway, settings, datetime.now(UTC).strftime("%H%M%S")), out
        )
    finally:
        await service.aclose()
        await gateway.aclose()


async def _run(c: Ctx, out: Callable[[str], None]) -> int:
    t0 = time.monotonic()
    out(
        f"demo {c.run_id}: driving {len(SCENARIOS)} scenarios against the running stack"
        f" ({c.gateway.label})"
    )

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
        results = await _outcomes(c, every)
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
        await c.gateway.clear_faults(no)
    broken = 0
    for (name, expect, _), orders in zip(SCENARIOS, driven, strict=True):
        if not c.gateway.takes_payments_after_expiry:
            expect = ONE_PAYMENT_PER_TRADE.get(name, expect)
        rows = [outcomes[no] for no in orders]
        broken += sum(1 for o in rows if not o.identity_holds)
        out(f"== {name}  (expected: {expect})")
        out(_scenario_table(rows, c.settings))
        out("")
    if done != len(every):
        out(f"demo: {len(every) - done} order(s) did not settle within {SETTLE_WITHIN_S:.0f}s")
        return 1
    if broken:
        out(f"demo: FAILED: {broken} order(s) break the fund identity")
        return 1
    if not await _order_service_side(c, driven, out):
        return 1
    out(f"demo: all {len(every)} orders settled; the fund identity holds for every one")
    return 0


def _scenario_table(rows: list[Outcome], settings: Settings) -> str:
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
            settings.ui_link(domain.workflow_id_for(o.pay_order_no)),
        ]
        for o in rows
    ]
    return render(headers, body)


# --- the order service's side --------------------------------------------------------------


def _order_service_url(settings: Settings) -> str | None:
    """The example order service's ``/events`` of the stack the demo drives, if that
    stack runs one (not with ``--order-events-url``)."""
    info = stackinfo.read(settings.data_dir)
    if info is None or info.api_url != settings.api_url or info.order_service_url is None:
        return None
    return f"{info.order_service_url}/events"


async def _expected_events(c: Ctx, nos: list[str]) -> Counter[tuple[str, str]]:
    """Per settled order: its terminal event, and one ``refund.succeeded`` per refund."""
    want: Counter[tuple[str, str]] = Counter()
    for no, order in zip(nos, await asyncio.gather(*(c.service.get(n) for n in nos)), strict=True):
        want[(no, "terminal")] = 1
        want[(no, "refund.succeeded")] = sum(
            p["refund_status"] == "SUCCEEDED" for p in order["payments"]
        )
    return want


def _heard(events: list[dict[str, Any]], nos: set[str]) -> Counter[tuple[str, str]]:
    got: Counter[tuple[str, str]] = Counter()
    for e in events:
        if e["pay_order_no"] in nos:
            kind = "terminal" if e["type"] in TERMINAL_EVENTS else e["type"]
            got[(e["pay_order_no"], kind)] += 1
    return got


async def _order_service_side(c: Ctx, driven: list[list[str]], out: Callable[[str], None]) -> bool:
    """Wait (bounded) until the order service has received every terminal event and refund
    of the demo's orders, then print its lines for them. False if some never arrived."""
    url = _order_service_url(c.settings)
    if url is None:
        out(
            "(the order service's side needs the example order service, which this stack does"
            " not run: its events go to your --order-events-url; not shown)\n"
        )
        return True
    every = [no for orders in driven for no in orders]
    want = await _expected_events(c, every)
    received: dict[str, Any] = {"lines": [], "events": []}
    missing = sum(want.values())
    deadline = time.monotonic() + EVENTS_WITHIN_S
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            # Restarting, or not up yet: ask again until the deadline.
            with contextlib.suppress(httpx.HTTPError):
                received = (await http.get(url)).raise_for_status().json()
            got = _heard(received["events"], set(every))
            missing = sum((want - got).values())
            if missing == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
    out(f"== the order service's side (what the example shop did; GET {url})")
    for (name, _, _), orders in zip(SCENARIOS, driven, strict=True):
        out(_scenario_lines(name, set(orders), received))
    out("")
    if missing:
        out(f"demo: {missing} event(s) did not reach the order service in {EVENTS_WITHIN_S:.0f}s")
        return False
    return True


def _scenario_lines(name: str, nos: set[str], received: dict[str, Any]) -> str:
    """The order service's lines for a scenario's orders; for many orders, counts by event
    type and one line of each."""
    mine = [
        (e["type"], line)
        for e, line in zip(received["events"], received["lines"], strict=True)
        if e["pay_order_no"] in nos
    ]
    if len(nos) <= 3:
        return "\n".join([f"-- {name}", *(f"  {line}" for _, line in mine)])
    by_type = Counter(kind for kind, _ in mine)
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(by_type.items()))
    examples = {kind: line for kind, line in reversed(mine)}  # the first line of each type
    return "\n".join(
        [
            f"-- {name}: {len(mine)} events ({counts}), for example:",
            *(f"  {examples[kind]}" for kind in sorted(examples)),
        ]
    )

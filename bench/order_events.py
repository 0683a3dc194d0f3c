"""Order events: commit -> delivery latency at idle, and the relay under the happy path's peak.

The private stack's worker runs the relay (``PAYORDERS_ORDER_EVENTS_URL``), as a deployment
does; the receiver is a small ASGI app in the benchmark process (uvicorn on 127.0.0.1) that
verifies each signature and answers 200. A delivery's latency runs from the insert of its
``pay_order.succeeded`` row (``clock_timestamp()`` in the statement that commits it, from
the harness's trigger) to the moment the receiver has read the request: an upper bound on
commit -> delivery. Idle: one pay order at a time, paid, then its event awaited. Peak:
the throughput benchmark's happy path (64 lanes) while the backlog (events not yet
acknowledged) is sampled every 100 ms. Drain: a backlog built while the receiver answers
503, then the rate at which the relay empties it once the receiver answers 200.

    python -m bench.order_events [--probes 200] [--peak-orders 1000] [--drain-events 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn

from bench._harness import Bench, bench_stack, chart, ms, pct, save, say, table
from bench.throughput import happy_round
from payorders.core.models import CreatePayOrder, PaymentNotification, RecordPayment
from payorders.core.store import PayOrderStore
from payorders.localstack.ports import free_port
from payorders.service import webhook
from payorders.service.relay import SIGNATURE_HEADER

SECRET = "whsec_bench_order_events"


@dataclass
class Receiver:
    """The order service's endpoint: when each pay order's events arrived, verified."""

    arrived: dict[str, float] = field(default_factory=dict)
    """First arrival (epoch seconds) of each pay order's ``pay_order.succeeded``."""
    count: int = 0
    bad: int = 0
    status: int = 200
    """What to answer (the drain phase answers 503 while its backlog builds)."""
    _waiters: dict[str, asyncio.Future[float]] = field(default_factory=dict)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        t = time.time()
        if self.status != 200:
            await send({"type": "http.response.start", "status": self.status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            webhook.verify(
                headers.get(SIGNATURE_HEADER.lower()),
                body,
                secrets=[SECRET],
                now=datetime.now(UTC),
            )
        except webhook.WebhookRejected:
            self.bad += 1
        event = json.loads(body)
        self.count += 1
        if event["type"] == "pay_order.succeeded":
            no = event["pay_order_no"]
            self.arrived.setdefault(no, t)
            fut = self._waiters.pop(no, None)
            if fut is not None and not fut.done():
                fut.set_result(t)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def wait(self, no: str, timeout: float = 30) -> float:
        if no in self.arrived:
            return self.arrived[no]
        fut = asyncio.get_running_loop().create_future()
        self._waiters[no] = fut
        return await asyncio.wait_for(fut, timeout)


@contextlib.asynccontextmanager
async def serve(receiver: Receiver, port: int) -> AsyncIterator[None]:
    server = uvicorn.Server(
        uvicorn.Config(receiver, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        await task


async def backlog(b: Bench) -> int:
    return int(await b.db.fetchval("SELECT count(*) FROM outbox WHERE delivered_at IS NULL"))


async def probes(b: Bench, receiver: Receiver, n: int, tag: str) -> list[float]:
    out = []
    for i in range(n):
        no = await b.start(b.order_no(i, tag), expires_in=timedelta(hours=1))
        await asyncio.sleep(0.05)  # the create's workflow task completes first
        await b.pay(no)
        committed = await b.commits.wait(no)
        out.append(await receiver.wait(no) - committed)
    return out


async def drain(b: Bench, receiver: Receiver, n: int) -> tuple[int, float]:
    """A backlog of ``n`` events built while the endpoint answers 503 (written straight
    with the product's settling statement, no workflow), then how fast the relay empties
    it once the endpoint answers 200: (backlog at the release, events/s)."""
    store = PayOrderStore(b.db)
    receiver.status = 503
    for i in range(n):
        no = b.order_no(i, "drain")
        await store.create_pay_order(
            CreatePayOrder(
                pay_order_no=f"po_{no}",
                order_no=no,
                amount=1000,
                currency="USD",
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
        await store.record_payment(
            RecordPayment(
                pay_order_no=f"po_{no}",
                payment=PaymentNotification(
                    txn_id=f"txn-{no}", amount=1000, currency="USD", paid_at=datetime.now(UTC)
                ),
                refund_reason=None,
                expected_lock_version=0,
            )
        )
    await asyncio.sleep(2)  # the relay has tried, failed and backed off
    waiting = await backlog(b)
    receiver.status = 200
    t0 = time.time()
    nos = [f"po_{b.order_no(i, 'drain')}" for i in range(n)]
    await b.wait_until(lambda: all(no in receiver.arrived for no in nos), 300, "the drain")
    return waiting, n / (max(receiver.arrived[no] for no in nos) - t0)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    receiver = Receiver()
    port = free_port()
    # The stack's own addresses win over tuning: the receiver is given as the shop's own
    # (``payorders dev --order-events-url``), so no example order service runs.
    async with (
        serve(receiver, port),
        bench_stack(
            "order_events",
            order_events_url=f"http://127.0.0.1:{port}/order-events",
            order_events_secret=SECRET,
        ) as b,
    ):
        say("warm-up")
        await probes(b, receiver, 20, "warm")
        say(f"idle: {args.probes} probes, one at a time")
        idle = await probes(b, receiver, args.probes, "idle")
        say(f"peak: {args.peak_orders} happy-path orders, 64 in flight, backlog sampled")
        samples: list[tuple[float, int]] = []
        sampling = True

        async def sample() -> None:
            t0 = time.monotonic()
            while sampling:
                samples.append((time.monotonic() - t0, await backlog(b)))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        t0 = time.time()
        rate = await happy_round(b, args.peak_orders, 64, "peak")
        peak_nos = [b.order_no(i, "peak") for i in range(args.peak_orders)]
        pay_order_nos = [f"po_{no}" for no in peak_nos]
        await b.wait_until(
            lambda: all(no in receiver.arrived for no in pay_order_nos), 120, "every delivery"
        )
        sampling = False
        await sampler
        committed = [b.commits.succeeded[no] for no in pay_order_nos]
        arrived = [receiver.arrived[no] for no in pay_order_nos]
        loaded = [a - c for a, c in zip(arrived, committed, strict=True)]
        delivered_per_s = len(arrived) / (max(arrived) - t0)
        committed_per_s = len(committed) / (max(committed) - t0)
        left = await backlog(b)
        say(f"drain: a backlog of {args.drain_events} events behind a 503, then released")
        drain_backlog, drain_per_s = await drain(b, receiver, args.drain_events)
        violations = await b.fund_violations()
    peak_backlog = max(n for _, n in samples)
    rows = [
        ["idle, one at a time", len(idle), ms(pct(idle, 50)), ms(pct(idle, 99)), ms(max(idle))],
        [
            f"happy path at its peak ({rate:.0f}/s)",
            len(loaded),
            ms(pct(loaded, 50)),
            ms(pct(loaded, 99)),
            ms(max(loaded)),
        ],
    ]
    text = table(
        "Order events: PAY_SUCCESS committed -> delivered to the order service"
        " (target idle: p50 <= 50 ms, p99 <= 200 ms)",
        ["", "events", "p50 ms", "p99 ms", "max ms"],
        rows,
    )
    text += table(
        "The relay under the happy path's peak",
        ["figure", "value"],
        [
            ["happy path (orders/s, first start -> last PAY_SUCCESS)", rate],
            ["events committed /s", committed_per_s],
            ["events delivered /s (first start -> last delivery)", delivered_per_s],
            ["backlog peak (events not yet acknowledged)", peak_backlog],
            ["backlog after the round", left],
            [f"drain: backlog built behind a 503 ({args.drain_events} events)", drain_backlog],
            ["drain: delivered /s once the endpoint answers", drain_per_s],
            ["deliveries received / bad signatures", f"{receiver.count} / {receiver.bad}"],
            ["fund identity violations", len(violations)],
        ],
    )
    figures = {
        "idle_s": idle,
        "loaded_s": loaded,
        "p50_idle_ms": ms(pct(idle, 50)),
        "p99_idle_ms": ms(pct(idle, 99)),
        "p50_loaded_ms": ms(pct(loaded, 50)),
        "p99_loaded_ms": ms(pct(loaded, 99)),
        "happy_per_s": rate,
        "committed_per_s": committed_per_s,
        "delivered_per_s": delivered_per_s,
        "backlog_samples": samples,
        "backlog_peak": peak_backlog,
        "drain_backlog": drain_backlog,
        "drain_per_s": drain_per_s,
        "bad_signatures": receiver.bad,
        "violations": violations,
    }
    save("order_events", figures, text)

    def draw(plt: Any) -> None:
        _fig, (left_ax, right_ax) = plt.subplots(1, 2, figsize=(9.6, 3.6))
        for xs, label in [(idle, "idle"), (loaded, f"at {rate:.0f}/s")]:
            s = sorted(ms(x) for x in xs)
            left_ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
        left_ax.axvline(50, color="#999", ls=":", lw=1)
        left_ax.axvline(200, color="#999", ls=":", lw=1)
        left_ax.set_xscale("log")
        left_ax.set_xlabel("committed -> delivered (ms, log)")
        left_ax.set_ylabel("fraction of events")
        left_ax.legend(loc="lower right", fontsize=8)
        right_ax.plot([t for t, _ in samples], [n for _, n in samples])
        right_ax.set_xlabel("s into the peak round")
        right_ax.set_ylabel("events not yet acknowledged")
        right_ax.set_title("backlog under the peak")

    chart("order_events", draw)
    if violations or receiver.bad:
        raise SystemExit("fund identity broken or a bad signature")
    return figures


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", type=int, default=200)
    p.add_argument("--peak-orders", type=int, default=1000)
    p.add_argument("--drain-events", type=int, default=2000)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

"""Latency: payment notification -> PAY_SUCCESS committed, one at a time and under load.

Each probe order is started and left until its row exists and its payment-window timer is
armed; then the gateway adapter's call (``PayOrders.notify_payment``: the signal) is timed
from the moment it is made to the commit of PAY_SUCCESS with its outbox event (the time
PostgreSQL wrote it). "accepted" is when the signal call returned: Temporal has the payment.
Under load, background happy-path orders run open-loop at half the peak rate measured just
before, on the same server.

    python -m bench.latency [--probes 200] [--peak-orders 600]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import timedelta
from typing import Any

from bench._harness import Bench, bench_stack, chart, ms, pct, save, say, table
from bench.throughput import happy_round


async def probe(b: Bench, tag: str, i: int) -> tuple[float, float]:
    no = await b.start(b.order_no(i, tag), expires_in=timedelta(hours=1))
    deadline = time.monotonic() + 30
    while await b.db.fetchval("SELECT 1 FROM pay_order WHERE pay_order_no = $1", no) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{no} was not created")
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # the create's workflow task completes and the timer is armed
    t0 = time.time()
    await b.pay(no)
    accepted = time.time()
    committed = await b.commits.wait(no)
    return committed - t0, committed - accepted


async def probes(b: Bench, n: int, tag: str) -> tuple[list[float], list[float]]:
    total, after = [], []
    for i in range(n):
        t, a = await probe(b, tag, i)
        total.append(t)
        after.append(a)
    return total, after


def row(name: str, xs: list[float]) -> list[Any]:
    return [name, len(xs), ms(pct(xs, 50)), ms(pct(xs, 99)), ms(max(xs))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with bench_stack("latency") as b:
        say("warm-up")
        await probes(b, 20, "warm")
        say(f"one at a time: {args.probes} probes")
        idle, idle_after = await probes(b, args.probes, "idle")
        say(f"peak: {args.peak_orders} orders, 64 in flight")
        peak = await happy_round(b, args.peak_orders, 64, "peak")
        rate = peak / 2
        say(f"peak {peak:.1f}/s; under load: background at {rate:.1f}/s")
        stop = asyncio.Event()

        async def background() -> int:
            n = 0

            async def one(i: int) -> None:
                no = await b.start(b.order_no(i, "bg"), expires_in=timedelta(hours=1))
                await b.pay(no)

            t0 = time.monotonic()
            tasks: list[asyncio.Task[None]] = []
            while not stop.is_set():
                delay = t0 + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n)))
                n += 1
            await asyncio.gather(*tasks)
            return n

        bg = asyncio.create_task(background())
        await asyncio.sleep(3)
        loaded, loaded_after = await probes(b, args.probes, "load")
        stop.set()
        bg_n = await bg
        violations = await b.fund_violations()
    rows = [
        row("one at a time: sent -> committed", idle),
        row("one at a time: accepted -> committed", idle_after),
        row(f"at {rate:.0f}/s background: sent -> committed", loaded),
        row(f"at {rate:.0f}/s background: accepted -> committed", loaded_after),
    ]
    text = table(
        "Latency: payment notification -> PAY_SUCCESS committed"
        " (target one at a time: p50 <= 20 ms, p99 <= 100 ms)",
        ["", "probes", "p50 ms", "p99 ms", "max ms"],
        rows,
    )
    text += (
        f"\npeak measured before the loaded run: {peak:.1f} orders/s; background orders"
        f" during it: {bg_n}; fund identity violations: {len(violations)}\n"
    )
    figures = {
        "idle_s": idle,
        "idle_after_s": idle_after,
        "loaded_s": loaded,
        "loaded_after_s": loaded_after,
        "peak_per_s": peak,
        "background_per_s": rate,
        "background_orders": bg_n,
        "violations": violations,
        "p50_idle_ms": ms(pct(idle, 50)),
        "p99_idle_ms": ms(pct(idle, 99)),
        "p50_loaded_ms": ms(pct(loaded, 50)),
        "p99_loaded_ms": ms(pct(loaded, 99)),
    }
    save("latency", figures, text)

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for xs, label in [(idle, "one at a time"), (loaded, f"under {rate:.0f}/s load")]:
            s = sorted(ms(x) for x in xs)
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
        ax.axvline(20, color="#999", ls=":", lw=1)
        ax.axvline(100, color="#999", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("payment signal sent -> PAY_SUCCESS committed (ms, log)")
        ax.set_ylabel("fraction of payments")
        ax.set_title("Latency to a committed PAY_SUCCESS")
        ax.legend(loc="lower right", fontsize=8)

    chart("latency", draw)
    if violations:
        raise SystemExit(f"fund identity broken for {len(violations)} pay orders")
    return figures


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", type=int, default=200)
    p.add_argument("--peak-orders", type=int, default=600)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

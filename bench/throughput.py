"""Throughput: the full happy path against the engine's ceiling, same run, same server.

Happy path: checkout starts the pay order (``PayOrders.start_pay_order``), the gateway
adapter sends "payment succeeded" (``PayOrders.notify_payment``), and the order counts when
PAY_SUCCESS and its ``pay_order.succeeded`` outbox event are committed in PostgreSQL.
Ceiling: a workflow that does nothing (``BenchTrivialWorkflow``), started and awaited to
completion. Rounds alternate trivial / happy so drift between batches hits both alike.

    python -m bench.throughput [--orders 1000] [--rounds 3] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import timedelta
from typing import Any

from bench._harness import (
    Bench,
    bench_stack,
    chart,
    median,
    paid_round,
    save,
    say,
    table,
)


async def trivial_round(b: Bench, n: int, concurrency: int, tag: str) -> float:
    return await b.ceiling(n, concurrency, tag)


async def happy_round(b: Bench, n: int, concurrency: int, tag: str) -> float:
    async def pay_order(i: int) -> str:
        no = await b.start(b.order_no(i, tag), expires_in=timedelta(hours=1))
        await b.pay(no)
        return no

    return await paid_round(b, n, concurrency, pay_order)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with bench_stack("throughput", trivial_worker=True) as b:
        say("warm-up")
        await trivial_round(b, 100, args.concurrency, "warm-t")
        await happy_round(b, 100, args.concurrency, "warm-h")
        rounds: list[dict[str, float]] = []
        for r in range(args.rounds):
            cpu0 = b.cpu_s()
            t0 = time.time()
            trivial = await trivial_round(b, args.orders, args.concurrency, f"t{r}")
            cpu1 = b.cpu_s()
            t1 = time.time()
            happy = await happy_round(b, args.orders, args.concurrency, f"h{r}")
            cpu2 = b.cpu_s()
            t2 = time.time()
            rounds.append(
                {
                    "trivial_per_s": trivial,
                    "happy_per_s": happy,
                    "ratio": happy / trivial,
                    "server_cores_trivial": (cpu1["temporal server"] - cpu0["temporal server"])
                    / (t1 - t0),
                    "server_cores_happy": (cpu2["temporal server"] - cpu1["temporal server"])
                    / (t2 - t1),
                    "worker_cores_happy": (cpu2["worker"] - cpu1["worker"]) / (t2 - t1),
                    "bench_cores_trivial": (
                        cpu1["benchmark (starter)"] - cpu0["benchmark (starter)"]
                    )
                    / (t1 - t0),
                    "bench_cores_happy": (cpu2["benchmark (starter)"] - cpu1["benchmark (starter)"])
                    / (t2 - t1),
                    "postgres_cores_happy": (cpu2["postgresql"] - cpu1["postgresql"]) / (t2 - t1),
                }
            )
            say(
                f"round {r + 1}: trivial {trivial:.1f}/s, happy path {happy:.1f}/s,"
                f" ratio {happy / trivial:.2f}"
            )
        violations = await b.fund_violations()
    trivial_m = median(r["trivial_per_s"] for r in rounds)
    happy_m = median(r["happy_per_s"] for r in rounds)
    rows = [
        [
            f"round {i + 1}",
            r["trivial_per_s"],
            r["happy_per_s"],
            f"{r['ratio']:.2f}",
            f"{r['server_cores_trivial']:.2f} / {r['server_cores_happy']:.2f}",
            f"{r['worker_cores_happy']:.2f}",
            f"{r['bench_cores_trivial']:.2f} / {r['bench_cores_happy']:.2f}",
            f"{r['postgres_cores_happy']:.2f}",
        ]
        for i, r in enumerate(rounds)
    ]
    rows.append(["median", trivial_m, happy_m, f"{happy_m / trivial_m:.2f}", "", "", "", ""])
    text = table(
        f"Throughput: {args.orders:,} orders a round, {args.concurrency} in flight"
        " (target: happy path >= 0.8 x ceiling)",
        [
            "",
            "trivial workflow /s",
            "happy path /s",
            "ratio",
            "server cores (t / h)",
            "worker cores (h)",
            "starter cores (t / h)",
            "postgres cores (h)",
        ],
        rows,
    )
    text += f"\nfund identity violations: {len(violations)}\n"
    figures = {
        "rounds": rounds,
        "trivial_median": trivial_m,
        "happy_median": happy_m,
        "ratio_median": happy_m / trivial_m,
        "orders": args.orders,
        "concurrency": args.concurrency,
        "violations": violations,
    }
    save("throughput", figures, text)

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(6.4, 3.6))
        xs = range(len(rounds))
        ax.bar(
            [x - 0.2 for x in xs],
            [r["trivial_per_s"] for r in rounds],
            0.4,
            label="trivial workflow (ceiling)",
            color="#9aa5b1",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [r["happy_per_s"] for r in rounds],
            0.4,
            label="pay order: start, pay, PAY_SUCCESS committed",
            color="#2f6fdf",
        )
        for x, r in zip(xs, rounds, strict=True):
            ax.text(x + 0.2, r["happy_per_s"], f"{r['ratio']:.2f}x", ha="center", va="bottom")
        ax.set_xticks(list(xs), [f"round {x + 1}" for x in xs])
        ax.set_ylabel("completed per second")
        ax.set_title(f"Throughput, {args.orders:,} per round, same server")
        ax.legend(loc="lower right", fontsize=8)

    chart("throughput", draw)
    if violations:
        raise SystemExit(f"fund identity broken for {len(violations)} pay orders")
    return figures


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

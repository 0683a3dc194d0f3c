"""What the Temporal server does for a pay order against its same-shape skeleton: the calls it
serves and makes, counted, and its CPU per order with both offered at the same rate.

``bench.http_path`` finds the server spending more CPU on a direct pay order than on a
skeleton, each run as fast as it goes. This asks whether that is more work or the same work
at another rate, on one private stack whose dev server serves its own metrics:

1. **Calls per order**: ``n`` trivial workflows, ``n`` skeletons, ``n`` direct pay orders,
   each closed loop as in ``bench.http_path``; per order, the deltas of the server's
   ``service_requests`` (frontend, history, matching: every RPC by operation) and
   ``persistence_requests`` (every SQLite call by operation).
2. **The same offered rate**: skeletons and direct pay orders started open loop at
   ``--rate`` per second (below both peaks), in two rounds of alternating order; CPU per
   order of every process group.
3. **A shape with one step less**: the skeleton beside a skeleton whose row creation and
   trade opening are one local activity (``merged``), and the ceiling, closed loop in
   alternating rounds: what that change of the pay order's shape could buy at most.

    python -m bench.server_work [--orders 300] [--rate 30] [--paced-orders 600]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from statistics import mean
from typing import Any

from bench._harness import Bench, bench_stack, paced, save, say, table
from bench.throughput import happy_round

PATHS = ("ceiling", "skeleton", "direct")
LABELS = {
    "ceiling": "trivial workflow",
    "skeleton": "same-shape skeleton",
    "direct": "direct pay order",
}


async def counted(b: Bench, n: int, run: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    """The server's calls per order over ``run`` (and a short settle after it)."""
    before = await b.server_calls()
    await run()
    await asyncio.sleep(2)  # the round's last transfer and visibility tasks
    after = await b.server_calls()
    return {k: (v - before.get(k, 0.0)) / n for k, v in after.items() if v > before.get(k, 0.0)}


async def at_rate(
    b: Bench, n: int, rate: float, one: Callable[[int], Awaitable[Any]]
) -> dict[str, Any]:
    cpu0, t0 = b.cpu_s(), time.time()
    await paced(n, rate, one)
    cpu1, t1 = b.cpu_s(), time.time()
    return {
        "achieved_per_s": n / (t1 - t0),
        "cpu_ms_per_order": {g: (cpu1[g] - cpu0[g]) * 1000 / n for g in cpu1},
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    n = args.orders
    async with bench_stack("server_work", trivial_worker=True, temporal_metrics=True) as b:
        say("warm-up")
        await b.ceiling(100, 64, "warm-t")
        await b.skeleton(100, 64, "warm-s")
        await happy_round(b, 100, 64, "warm-d")
        await asyncio.sleep(2)
        calls = {
            "ceiling": await counted(b, n, lambda: b.ceiling(n, 64, "t")),
            "skeleton": await counted(b, n, lambda: b.skeleton(n, 64, "s")),
            "direct": await counted(b, n, lambda: happy_round(b, n, 64, "d")),
        }
        say("calls counted; now both at the same offered rate")
        runs: dict[str, list[dict[str, Any]]] = {"skeleton": [], "direct": []}
        for r in range(2):
            one = {
                "skeleton": lambda i, r=r: b.skeleton(1, 1, f"ps{r}-{i}"),
                "direct": lambda i, r=r: happy_round(b, 1, 1, f"pd{r}-{i}"),
            }
            for path in ("skeleton", "direct") if r == 0 else ("direct", "skeleton"):
                result = await at_rate(b, args.paced_orders, args.rate, one[path])
                runs[path].append(result)
                say(
                    f"round {r + 1}, {LABELS[path]} at {result['achieved_per_s']:.1f}/s: server"
                    f" {result['cpu_ms_per_order']['temporal server']:.1f} ms of CPU per order"
                )
        say("the skeleton beside the merged skeleton and the ceiling")
        shapes: list[dict[str, float]] = []
        for r in range(2):
            order = ("ceiling", "skeleton", "merged")
            rates: dict[str, float] = {}
            for path in order if r == 0 else tuple(reversed(order)):
                if path == "ceiling":
                    rates[path] = await b.ceiling(n, 64, f"mt{r}")
                else:
                    rates[path] = await b.skeleton(n, 64, f"m{path}{r}", merged=path == "merged")
            shapes.append(rates)
            say(", ".join(f"{p} {v:.1f}/s" for p, v in rates.items()))
    figures = {
        "orders": n,
        "rate": args.rate,
        "calls_per_order": calls,
        "paced": runs,
        "merged_shape": shapes,
    }
    save("server_work", figures, _text(args, calls, runs, shapes))
    return figures


def _text(
    args: argparse.Namespace,
    calls: dict[str, dict[str, float]],
    runs: dict[str, list[dict[str, Any]]],
    shapes: list[dict[str, float]],
) -> str:
    keys = sorted({k for per in calls.values() for k, v in per.items() if v >= 0.05})
    rows = [[k, *(calls[p].get(k, 0.0) for p in PATHS)] for k in keys]
    out = table(
        f"The server's calls per order ({args.orders} orders each, closed loop)",
        ["calls (kind, service, operation)", *(LABELS[p] for p in PATHS)],
        rows,
    )
    groups = sorted(
        {g for rs in runs.values() for r in rs for g, v in r["cpu_ms_per_order"].items() if v}
    )
    paced_rows = [
        [
            g,
            *(r["cpu_ms_per_order"].get(g, 0.0) for r in runs["skeleton"]),
            *(r["cpu_ms_per_order"].get(g, 0.0) for r in runs["direct"]),
            mean(r["cpu_ms_per_order"].get(g, 0.0) for r in runs["direct"])
            - mean(r["cpu_ms_per_order"].get(g, 0.0) for r in runs["skeleton"]),
        ]
        for g in groups
    ]
    rates = " / ".join(
        f"{r['achieved_per_s']:.1f}" for p in ("skeleton", "direct") for r in runs[p]
    )
    out += "\n" + table(
        f"CPU per order at the same offered rate, {args.rate:g}/s ({args.paced_orders} orders"
        f" a round; achieved {rates}/s), ms",
        [
            "process group",
            "skeleton, round 1",
            "skeleton, round 2",
            "direct, round 1",
            "direct, round 2",
            "direct - skeleton (mean)",
        ],
        paced_rows,
    )
    out += "\n" + table(
        f"The shape with create and open as one local activity ({args.orders} orders a round)",
        [
            "round",
            "ceiling /s",
            "skeleton /s",
            "merged skeleton /s",
            "skeleton / ceiling",
            "merged / ceiling",
        ],
        [
            [
                str(i + 1),
                r["ceiling"],
                r["skeleton"],
                r["merged"],
                r["skeleton"] / r["ceiling"],
                r["merged"] / r["ceiling"],
            ]
            for i, r in enumerate(shapes)
        ],
    )
    return out


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=300, help="orders per path for the counts")
    p.add_argument("--rate", type=float, default=30.0, help="offered rate of the paced rounds")
    p.add_argument("--paced-orders", type=int, default=600, help="orders per paced round")
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

"""Open orders: 10,000 and then 100,000 pay orders waiting on their payment-window timers.

Starts are flow-controlled: at most 500 started pay orders may wait for their row (the
first workflow task: create the row, arm the timer), so the rate is what the stack
sustains, not what the server accepts into a backlog. (Open-loop, 100,000 starts were
accepted at 76/s while rows were created at about 34/s: the backlog of 50,000 workflow
tasks spilled into the dev server's SQLite and slowed it further.)

Each size runs on a fresh stack (file-backed dev server). All but the last 1,000 orders get
a window longer than the run; the last 1,000 get a short one, so they expire while every
other order is still open, and each must reach PAY_EXPIRED at its time, with its trade
closed at the gateway. Memory is sampled while the orders wait (after starting, once the
worker's cache has settled); the start rate is rows created per second.

    python -m bench.open_orders [--sizes 10000 100000] [--concurrency 128]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench._harness import bench_stack, bounded, chart, ms, pct, save, say, table

SAMPLE = 1000
BACKLOG = 500


async def one_size(n: int, concurrency: int) -> dict[str, Any]:
    async with bench_stack(f"open-{n}") as b:
        rss0 = b.rss_mib()
        samples: list[tuple[float, dict[str, float]]] = []
        t0 = time.time()
        errors: list[str] = []

        async def sampler() -> None:
            while True:
                samples.append((time.time() - t0, b.rss_mib()))
                await asyncio.sleep(2)

        sampling = asyncio.create_task(sampler())
        long_window = timedelta(hours=6)
        short = [b.order_no(i, "short") for i in range(SAMPLE)]
        nos: list[str] = []

        created = b.commits.created

        async def start(i: int) -> None:
            while len(nos) - len(created) > BACKLOG:
                await asyncio.sleep(0.01)
            try:
                nos.append(await b.start(b.order_no(i, "open"), expires_in=long_window))
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

        last_report = time.time()

        async def progress() -> None:
            nonlocal last_report
            while True:
                await asyncio.sleep(30)
                say(f"  {len(nos):,} / {n - SAMPLE:,} started, {len(created):,} created")

        reporter = asyncio.create_task(progress())
        await bounded(n - SAMPLE, concurrency, start)
        # The sample: short windows, all ending 20 s after the last one starts.
        base = datetime.now(UTC)
        expires_at = base + timedelta(seconds=20 + SAMPLE / 20)
        sample_nos: list[str] = []

        async def start_short(i: int) -> None:
            while len(nos) + len(sample_nos) - len(created) > BACKLOG:
                await asyncio.sleep(0.01)
            sample_nos.append(await b.start(short[i], expires_in=expires_at - base, now=base))

        await bounded(SAMPLE, concurrency, start_short)
        await b.wait_until(
            lambda: len(created) >= len(nos) + len(sample_nos), 600, "every pay order's row"
        )
        started_s = max(created.values()) - t0
        reporter.cancel()
        start_rate = n / started_s
        say(f"{n:,} open orders started in {started_s:.0f} s ({start_rate:.1f}/s)")
        # Let the worker's cache and the server settle, then measure the open state.
        await asyncio.sleep(15)
        open_rss = b.rss_mib()
        open_count = await b.db.fetchval("SELECT count(*) FROM pay_order WHERE status='PAYING'")
        done = b.commits.expired
        await b.wait_until(
            lambda: all(no in done for no in sample_nos),
            (expires_at - datetime.now(UTC)).total_seconds() + 900,
            "the sample's PAY_EXPIRED commits",
        )
        late = [done[no] - expires_at.timestamp() for no in sample_nos]
        early = [no for no in sample_nos if done[no] < expires_at.timestamp()]
        closed = await b.db.fetchval(
            f"SELECT count(*) FROM {b.settings.sandbox_schema}.trade"
            " WHERE state = 'CLOSED' AND pay_order_no = ANY($1::text[])",
            sample_nos,
        )
        still_open = await b.db.fetchval("SELECT count(*) FROM pay_order WHERE status='PAYING'")
        wrongly_closed = await b.db.fetchval(
            "SELECT count(*) FROM pay_order WHERE status <> 'PAYING'"
            " AND pay_order_no = ANY($1::text[])",
            nos,
        )
        end_rss = b.rss_mib()
        sampling.cancel()
        violations = await b.fund_violations()
        db_size = (b.stack.data_dir / "temporal.db").stat().st_size / 2**20
    peak = {k: max(s[1].get(k, 0.0) for s in samples) for k in open_rss}
    return {
        "orders": n,
        "start_s": started_s,
        "start_per_s": start_rate,
        "errors": errors,
        "rss_idle_mib": rss0,
        "rss_open_mib": open_rss,
        "rss_peak_mib": peak,
        "rss_end_mib": end_rss,
        "open_count": open_count,
        "sample": SAMPLE,
        "sample_expired": sum(1 for no in sample_nos if no in done),
        "sample_trades_closed": closed,
        "sample_early": early,
        "sample_lateness_p50_ms": ms(pct(late, 50)),
        "sample_lateness_p99_ms": ms(pct(late, 99)),
        "still_open_after": still_open,
        "long_window_closed": wrongly_closed,
        "violations": violations,
        "temporal_db_mib": db_size,
        "rss_samples": [(t, r) for t, r in samples],
    }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for n in args.sizes:
        results.append(await one_size(n, args.concurrency))
        r = results[-1]
        say(
            f"{n:,}: worker {r['rss_open_mib']['worker']:.0f} MiB,"
            f" server {r['rss_open_mib']['temporal server']:.0f} MiB, errors {len(r['errors'])}"
        )
    rows = []
    for r in results:
        o = r["rss_open_mib"]
        rows.append(
            [
                f"{r['orders']:,}",
                r["start_per_s"],
                len(r["errors"]),
                r["open_count"],
                f"{o['worker']:.0f} / {r['rss_peak_mib']['worker']:.0f}",
                f"{o['temporal server']:.0f} / {r['rss_peak_mib']['temporal server']:.0f}",
                f"{o['postgresql']:.0f}",
                f"{r['temporal_db_mib']:.0f}",
                f"{r['sample_expired']}/{r['sample']} ({r['sample_trades_closed']} closed)",
                r["sample_lateness_p99_ms"],
                r["long_window_closed"],
            ]
        )
    text = table(
        "Open orders waiting on their timers (target: 10,000 with the worker < 200 MiB;"
        " 100,000 on the file-backed server without errors)",
        [
            "open orders",
            "created /s",
            "start errors",
            "PAYING rows",
            "worker MiB (open / peak)",
            "server MiB (open / peak)",
            "postgres USS MiB",
            "temporal.db MiB",
            "sample expired",
            "sample lateness p99 ms",
            "long windows closed early",
        ],
        rows,
    )
    save("open_orders", {"results": results}, text)

    def draw(plt: Any) -> None:
        _fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 3.6), squeeze=False)
        for ax, r in zip(axes[0], results, strict=True):
            ts = [t for t, _ in r["rss_samples"]]
            for k, c in [
                ("worker", "#2f6fdf"),
                ("temporal server", "#d9822b"),
                ("postgresql", "#5a9e6f"),
            ]:
                ax.plot(ts, [s.get(k, 0.0) for _, s in r["rss_samples"]], label=k, color=c)
            ax.axvline(r["start_s"], color="#999", ls=":", lw=1)
            ax.set_title(f"{r['orders']:,} open pay orders")
            ax.set_xlabel("seconds (dotted: all started)")
            ax.set_ylabel("MiB")
            ax.legend(fontsize=8)

    chart("open_orders", draw)
    bad = [
        r
        for r in results
        if r["errors"]
        or r["sample_early"]
        or r["violations"]
        or r["sample_expired"] != r["sample"]
        or r["long_window_closed"]
    ]
    if bad:
        raise SystemExit("open orders: wrong outcome (see the table)")
    return results


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--concurrency", type=int, default=128)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

"""Expiry burst: 1,000 pay orders whose payment windows all end in the same second.

Each expiry is the full path: the timer fires, the trade is closed at the sandbox gateway
(an HTTP call, a regular activity), and PAY_EXPIRED is committed with its outbox event.
Lateness is commit time minus ``expires_at``; the drain rate is orders over the time from
``expires_at`` to the last commit, against the trivial-workflow ceiling measured in the
same run on the same server.

    python -m bench.expiry_burst [--orders 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench._harness import bench_stack, bounded, chart, ms, pct, save, say, table


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with bench_stack("expiry_burst", trivial_worker=True) as b:
        await b.ceiling(100, 64, "warm")
        ceiling = await b.ceiling(args.orders, 64, "ceiling")
        say(f"ceiling: {ceiling:.1f} trivial workflows/s")
        # Every window ends at the same whole second, after all the orders have started.
        base = datetime.now(UTC).replace(microsecond=0)
        expires_at = base + timedelta(seconds=15 + args.orders / 15)
        t0 = time.time()
        nos: list[str] = []

        async def start(i: int) -> None:
            nos.append(
                await b.start(b.order_no(i, "burst"), expires_in=expires_at - base, now=base)
            )

        await bounded(args.orders, 64, start)
        start_rate = args.orders / (time.time() - t0)
        say(f"{args.orders} orders started at {start_rate:.1f}/s; all expire at {expires_at}")
        if datetime.now(UTC) >= expires_at:
            raise SystemExit("starting took longer than the window: raise the margin")
        done = b.commits.expired
        await b.wait_until(
            lambda: all(no in done for no in nos),
            (expires_at - datetime.now(UTC)).total_seconds() + 600,
            "every PAY_EXPIRED commit",
        )
        t_exp = expires_at.timestamp()
        late = [done[no] - t_exp for no in nos]
        early = [no for no in nos if done[no] < t_exp]
        drain_s = max(done[no] for no in nos) - t_exp
        drain = args.orders / drain_s
        closed = await b.db.fetchval(
            f"SELECT count(*) FROM {b.settings.sandbox_schema}.trade"
            " WHERE state = 'CLOSED' AND pay_order_no = ANY($1::text[])",
            nos,
        )
        statuses = await b.db.fetch(
            "SELECT status, count(*) AS n FROM pay_order WHERE pay_order_no = ANY($1::text[])"
            " GROUP BY status",
            nos,
        )
        violations = await b.fund_violations()
        rss = b.rss_mib()
    by_status = {r["status"]: r["n"] for r in statuses}
    rows = [
        ["orders expiring in the same second", args.orders],
        ["start rate (orders/s)", start_rate],
        ["lateness p50 (ms)", ms(pct(late, 50))],
        ["lateness p99 (ms)", ms(pct(late, 99))],
        ["lateness max (ms)", ms(max(late))],
        ["drain: expires_at -> last PAY_EXPIRED (s)", drain_s],
        ["drain rate (orders/s)", drain],
        ["trivial-workflow ceiling, same run (/s)", ceiling],
        ["drain / ceiling (target >= 0.5)", f"{drain / ceiling:.2f}"],
        [
            "PAY_EXPIRED / trades closed at the gateway",
            f"{by_status.get('PAY_EXPIRED', 0)} / {closed}",
        ],
        ["expired before expires_at", len(early)],
        ["fund identity violations", len(violations)],
        ["worker / server RSS after (MiB)", f"{rss['worker']:.0f} / {rss['temporal server']:.0f}"],
    ]
    text = table(
        f"Expiry burst: {args.orders:,} windows ending in the same second",
        ["figure", "value"],
        rows,
    )
    figures = {
        "orders": args.orders,
        "start_per_s": start_rate,
        "ceiling_per_s": ceiling,
        "lateness_p50_ms": ms(pct(late, 50)),
        "lateness_p99_ms": ms(pct(late, 99)),
        "lateness_max_ms": ms(max(late)),
        "drain_s": drain_s,
        "drain_per_s": drain,
        "drain_over_ceiling": drain / ceiling,
        "statuses": by_status,
        "trades_closed": closed,
        "early": early,
        "violations": violations,
        "rss_mib": rss,
        "lateness_s": sorted(late),
    }
    save("expiry_burst", figures, text)

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(6.4, 3.6))
        s = sorted(late)
        ax.plot(s, range(1, len(s) + 1))
        ax.set_xlabel("seconds after expires_at")
        ax.set_ylabel("PAY_EXPIRED committed")
        ax.set_title(
            f"Expiry burst: {args.orders:,} orders, drain {drain:.0f}/s"
            f" ({drain / ceiling:.2f} x ceiling)"
        )

    chart("expiry_burst", draw)
    if early or violations or by_status.get("PAY_EXPIRED", 0) != args.orders:
        raise SystemExit("expiry burst: wrong outcome (see the table)")
    return figures


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=1000)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

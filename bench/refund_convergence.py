"""Refund convergence: 1,000 late payments while the gateway fails half the refund calls.

1,000 pay orders expire; then each is paid at the gateway and the payment reported, so
every one needs a refund. Before the payments land, each order gets a number of failing
refund calls drawn so that every call fails with probability 1/2 (geometric, seeded), and
a further 5% of orders get "time out after success": the gateway refunds, and the answer is
held back past our client's timeout, so the caller cannot know the refund happened.

Measured: time from the first late payment to the last confirmed refund, the calls made,
and at the gateway, refunds per idempotency key and per payment (each must be 1) and the
money refunded (must equal the late payments, to the unit).

    python -m bench.refund_convergence [--orders 1000] [--fail 0.5] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from datetime import timedelta
from typing import Any

from bench._harness import bench_stack, bounded, chart, save, say, table

AMOUNT = 1234


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    async with bench_stack("refund_convergence") as b:
        s = b.settings.sandbox_schema
        nos: list[str] = []

        async def start(i: int) -> None:
            nos.append(
                await b.start(b.order_no(i, "late"), expires_in=timedelta(seconds=5), amount=AMOUNT)
            )

        await bounded(args.orders, 64, start)
        await b.wait_until(
            lambda: all(no in b.commits.expired for no in nos), 600, "every order to expire"
        )
        say(f"{len(nos)} orders expired; arming refund faults")
        failures = {}
        for no in nos:
            k = 0
            while rng.random() < args.fail:
                k += 1
            failures[no] = k
        ambiguous = set(rng.sample(nos, k=max(1, len(nos) // 20)))
        sandbox = b.sandbox
        for no in nos:
            faults: dict[str, int] = {}
            if failures[no]:
                faults["fail_next_refunds"] = failures[no]
            if no in ambiguous:
                faults["timeout_after_success_next"] = 1
            if faults:
                await sandbox.set_faults(no, **faults)
        t0 = time.time()
        await bounded(len(nos), 64, lambda i: b.capture_and_pay(nos[i], AMOUNT))
        paid_s = time.time() - t0
        say(f"{len(nos)} late payments reported in {paid_s:.1f} s; waiting for the refunds")

        async def confirmed() -> int:
            return int(
                await b.db.fetchval(
                    "SELECT count(*) FROM refund WHERE status = 'SUCCEEDED'"
                    " AND pay_order_no = ANY($1::text[])",
                    nos,
                )
            )

        while (n := await confirmed()) < len(nos):
            if time.time() - t0 > args.timeout:
                raise SystemExit(f"only {n} of {len(nos)} refunds confirmed in {args.timeout} s")
            await asyncio.sleep(0.2)
        converged_s = time.time() - t0
        progress = await b.db.fetch(
            "SELECT extract(epoch FROM succeeded_at)::float8 AS t FROM refund"
            " WHERE pay_order_no = ANY($1::text[]) ORDER BY succeeded_at",
            nos,
        )
        per_key = await b.db.fetchrow(
            f"SELECT count(*) AS refunds, count(DISTINCT idempotency_key) AS keys,"
            f" count(DISTINCT txn_id) AS txns, coalesce(sum(amount), 0) AS money"
            f" FROM {s}.refund r WHERE r.txn_id IN"
            f" (SELECT txn_id FROM {s}.capture WHERE pay_order_no = ANY($1::text[]))",
            nos,
        )
        calls = await b.db.fetch(
            f"SELECT outcome, count(*) AS n FROM {s}.refund_call WHERE idempotency_key IN"
            f" (SELECT refund_key FROM refund WHERE pay_order_no = ANY($1::text[]))"
            f" GROUP BY outcome ORDER BY outcome",
            nos,
        )
        max_per_txn = await b.db.fetchval(
            f"SELECT coalesce(max(c), 0) FROM (SELECT count(*) AS c FROM {s}.refund"
            f" GROUP BY txn_id) x"
        )
        attempts = await b.db.fetch(
            "SELECT attempts FROM refund WHERE pay_order_no = ANY($1::text[])", nos
        )
        violations = await b.fund_violations()
        ledger = await b.db.fetchrow(
            "SELECT sum(paid_amount) AS paid, sum(refunded_amount) AS refunded FROM pay_order"
            " WHERE pay_order_no = ANY($1::text[])",
            nos,
        )
    call_counts = {r["outcome"]: r["n"] for r in calls}
    total_calls = sum(call_counts.values())
    failed = sum(v for k, v in call_counts.items() if k != "SUCCEEDED" and k != "REPLAYED")
    late_money = AMOUNT * len(nos)
    rows = [
        ["late payments (each needs a refund)", len(nos)],
        [
            "orders with failing calls armed / with a withheld answer",
            f"{sum(1 for v in failures.values() if v)} / {len(ambiguous)}",
        ],
        [
            "refund calls at the gateway, by outcome",
            ", ".join(f"{k} {v}" for k, v in call_counts.items()),
        ],
        ["share of calls that failed or timed out", f"{failed / total_calls:.2f}"],
        ["first late payment -> every refund confirmed (s)", converged_s],
        ["attempts per refund (max)", max(r["attempts"] for r in attempts)],
        [
            "gateway refunds / idempotency keys / payments refunded",
            f"{per_key['refunds']} / {per_key['keys']} / {per_key['txns']}",
        ],
        [
            "refunds per key / per payment (max, must be 1)",
            f"{per_key['refunds'] // max(1, per_key['keys'])} / {max_per_txn}",
        ],
        ["money refunded at the gateway / late money", f"{per_key['money']} / {late_money}"],
        ["our ledger: paid / refunded", f"{ledger['paid']} / {ledger['refunded']}"],
        ["fund identity violations", len(violations)],
    ]
    text = table(
        f"Refund convergence: {len(nos):,} late payments, gateway failing"
        f" {args.fail:.0%} of refund calls",
        ["figure", "value"],
        rows,
    )
    figures = {
        "orders": len(nos),
        "converged_s": converged_s,
        "calls": call_counts,
        "failed_share": failed / total_calls,
        "gateway": dict(per_key),
        "max_refunds_per_txn": max_per_txn,
        "violations": violations,
        "ledger": dict(ledger),
        "late_money": late_money,
        "confirmed_times": [r["t"] - t0 for r in progress],
    }
    save("refund_convergence", figures, text)

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ts = figures["confirmed_times"]
        ax.plot(ts, range(1, len(ts) + 1))
        ax.set_xlabel("seconds after the first late payment was reported")
        ax.set_ylabel("refunds confirmed")
        ax.set_title(f"{len(nos):,} late payments, {args.fail:.0%} of refund calls failing")

    chart("refund_convergence", draw)
    ok = (
        per_key["refunds"] == per_key["keys"] == per_key["txns"] == len(nos)
        and max_per_txn == 1
        and per_key["money"] == late_money
        and not violations
        and ledger["refunded"] == late_money
    )
    if not ok:
        raise SystemExit("refund convergence: money moved wrongly (see the table)")
    return figures


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=1000)
    p.add_argument("--fail", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=900)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

"""History size: events per pay order on each path (a cost proxy: every event is engine
work, and a hosted Temporal bills by actions).

Each path runs on a private stack with a 2-second settlement window, so the workflows
complete; their histories are fetched and counted. The "version 1" column counts the
histories saved before the short database writes became local activities
(tests/histories/before-local-db-writes/, recorded the same way by the integration tests).

    python -m bench.history_size
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from datetime import timedelta
from typing import Any

from temporalio.api.enums.v1 import EventType

from bench._harness import ROOT, Bench, bench_stack, chart, save, say, table
from payorders import pay_orders as payorders_api
from payorders.core import domain

V1 = ROOT / "tests" / "histories" / "before-local-db-writes"
TARGET = 20  # events on the happy path


def kinds(event_types: list[str]) -> dict[str, int]:
    c = Counter(event_types)
    return {
        "events": len(event_types),
        "workflow tasks": c["WORKFLOW_TASK_COMPLETED"],
        "activities": c["ACTIVITY_TASK_SCHEDULED"],
        "local activities": c["MARKER_RECORDED"],
        "timers": c["TIMER_STARTED"],
        "signals": c["WORKFLOW_EXECUTION_SIGNALED"],
    }


def v1_counts(name: str) -> dict[str, int] | None:
    path = V1 / f"{name}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return kinds([e["eventType"].removeprefix("EVENT_TYPE_") for e in doc["events"]])


async def run_path(b: Bench, api: payorders_api.PayOrders, name: str) -> list[str]:
    no = b.order_no(0, name.replace("_", "-"))
    sandbox = b.sandbox
    faults: dict[str, Any] = {
        "already_paid_on_close": {"paid_on_close_amount": 1000, "paid_on_close_currency": "USD"},
        "late_payment_refund_retried": {"fail_next_refunds": 2},
        "late_payment_refund_ambiguous": {"timeout_after_success_next": 1},
    }.get(name, {})
    pay_order_no = domain.pay_order_no_for(no)
    if faults:
        await sandbox.set_faults(pay_order_no, **faults)
    pays_in_time = name in ("paid", "double_payment", "wrong_amount_then_paid")
    window = timedelta(seconds=60 if pays_in_time else 3)
    started = await api.start_pay_order(order_no=no, amount=1000, currency="USD", expires_in=window)
    wf_id = domain.workflow_id_for(started.pay_order_no)
    handle = b.client.get_workflow_handle(wf_id)
    await asyncio.sleep(0.3)  # the first workflow task: created, timer armed
    if name in ("paid", "double_payment"):
        await b.capture_and_pay(started.pay_order_no)
    if name == "double_payment":
        await b.capture_and_pay(started.pay_order_no)
    if name == "wrong_amount_then_paid":
        await b.capture_and_pay(started.pay_order_no, 999)
        await b.capture_and_pay(started.pay_order_no)
    if name.startswith("late_payment") or name == "late_refund":
        await b.commits.wait(started.pay_order_no, 60)
    if name.startswith("late_payment"):
        await b.capture_and_pay(started.pay_order_no)
    await handle.result()
    if name == "late_refund":
        txn = await b.capture_and_pay(started.pay_order_no)
        handle = b.client.get_workflow_handle(domain.late_refund_workflow_id(txn))
        await handle.result()
    history = await handle.fetch_history()
    return [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events]


PATHS = [
    ("paid", "paid before expiry (the happy path)"),
    ("expired", "expired unpaid"),
    ("already_paid_on_close", "paid at the gateway as it closed"),
    ("late_payment_refund_retried", "late payment, refund failing twice"),
    ("late_payment_refund_ambiguous", "late payment, refund answer lost"),
    ("double_payment", "paid twice (one refunded)"),
    ("wrong_amount_then_paid", "wrong amount refunded, then paid"),
    ("late_refund", "payment after the workflow closed (LateRefundWorkflow)"),
]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    async with bench_stack("history_size") as b:
        api = payorders_api.PayOrders(
            b.client,
            b.api._store,
            b.settings.model_copy(update={"settlement_window_s": 2}),
        )
        for name, _ in PATHS:
            say(f"path: {name}")
            events = await run_path(b, api, name)
            results[name] = {"now": kinds(events), "v1": v1_counts(name), "events": events}
    rows = []
    for name, label in PATHS:
        now, v1 = results[name]["now"], results[name]["v1"]
        rows.append(
            [
                label,
                v1["events"] if v1 else "-",
                now["events"],
                now["workflow tasks"],
                now["activities"],
                now["local activities"],
                now["timers"],
            ]
        )
    text = table(
        f"History events per pay order (target: happy path <= {TARGET})",
        [
            "path",
            "events, version 1",
            "events now",
            "workflow tasks",
            "activities",
            "local activities",
            "timers",
        ],
        rows,
    )
    save("history_size", {"paths": results, "target": TARGET}, text)

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(7.5, 3.8))
        labels = [n for n, _ in PATHS]
        xs = range(len(labels))
        v1 = [(results[n]["v1"] or {}).get("events", 0) for n in labels]
        now = [results[n]["now"]["events"] for n in labels]
        ax.bar([x - 0.2 for x in xs], v1, 0.4, label="version 1", color="#9aa5b1")
        ax.bar([x + 0.2 for x in xs], now, 0.4, label="now", color="#2f6fdf")
        ax.axhline(TARGET, color="#999", ls=":", lw=1)
        ax.set_xticks(list(xs), [n.replace("_", "\n") for n in labels], fontsize=7)
        ax.set_ylabel("history events")
        ax.set_title("History events per pay order, by path")
        ax.legend(fontsize=8)

    chart("history_size", draw)
    if results["paid"]["now"]["events"] > TARGET:
        raise SystemExit(f"happy path has {results['paid']['now']['events']} events")
    return results


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

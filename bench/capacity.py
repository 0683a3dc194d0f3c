"""Capacity on paper: what one pay order costs, measured, and what 100 and 2,000 a second need.

One run on a private stack measures a pay order's whole life through the HTTP edge
(checkout, the customer paying at the sandbox gateway, its webhook, PAY_SUCCESS, the order
event delivered, the settlement window's end: shortened here to a few seconds so that the
workflow completes inside the run and its last events are counted):

- CPU per order of each process group, with each group's idle CPU taken out;
- Temporal history: events and bytes per pay order, from the completed histories;
- PostgreSQL: rows inserted, updated and deleted, transactions and WAL bytes per order,
  and the growth of the product's tables (``public``; the sandbox's own schema is not ours);
- gateway calls per order made by us (the API's ``payorders_gateway_calls_total``; the
  worker's one ``open_trade`` per order is counted from the sandbox's trades).

It then prints the capacity table for the rates in ``--rates`` with a 1 h payment window
and a 25 h settlement window. Every assumption is a named constant below and is repeated
under the table in ``bench/README.md``.

    python -m bench.capacity [--orders 300] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import time
from typing import Any

import httpx
from temporalio.api.enums.v1 import EventType

from bench._harness import Bench, bench_stack, bounded, cpu_delta, save, say, table
from bench.http_path import Edge, edge_of, idle_cores
from payorders.core import domain

SETTLEMENT_IN_RUN_S = 5
"""The settlement window inside the run: long enough that no order completes before its
event is delivered, short enough that every workflow completes before the figures are read."""

WINDOW_H = 1.0
"""Payment window: an order is open at most this long before it is paid or expires."""
SETTLEMENT_H = 25.0
"""Settlement window after the terminal state (the product's default, 25 h)."""
PEAK_HOURS = 1.0
"""A sales peak lasts this long; open workflows of a peak are counted for its hours only."""
UTILISATION = 0.6
"""Plan each replica at this share of its cores: headroom for bursts, retries, a lost node."""
WORKER_CORES = 1.0
"""One worker or API process uses at most one core (Python, one event loop)."""
SHARDS = 4096
"""History shards: fixed when the cluster is created (Temporal's production checklist),
a power of two; 4096 leaves room far past 2,000/s at negligible cost per shard."""
FRONTEND_RPS_PER_HOST = 1500.0
"""Frontend requests per second one frontend host serves: an assumption to replace with
the cluster's own load test (the frontend is stateless and scales out)."""
SERVER_SHARE = {"history": 0.6, "matching": 0.25, "frontend": 0.15}
"""How the dev server's single-process CPU would split across the services (assumed)."""


async def _pg_counters(b: Bench) -> dict[str, float]:
    row = await b.db.fetchrow(
        """SELECT (SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables
                    WHERE schemaname = 'public') AS ins,
                  (SELECT coalesce(sum(n_tup_upd), 0) FROM pg_stat_user_tables
                    WHERE schemaname = 'public') AS upd,
                  (SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables
                    WHERE schemaname = 'public') AS del,
                  (SELECT xact_commit FROM pg_stat_database
                    WHERE datname = current_database()) AS xacts,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') AS wal,
                  (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)
                     FROM pg_stat_user_tables WHERE schemaname = 'public') AS bytes"""
    )
    assert row is not None
    return {k: float(v) for k, v in dict(row).items()}


async def _gateway_calls(http: httpx.AsyncClient, api_url: str) -> float:
    text = (await http.get(f"{api_url}/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("payorders_gateway_calls_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _histories(b: Bench, nos: list[str]) -> tuple[float, float, float]:
    """Mean events, bytes (serialized protobuf) and workflow tasks of the completed
    histories of ``nos``."""
    events = size = tasks = 0
    for no in nos:
        history = await b.client.get_workflow_handle(domain.workflow_id_for(no)).fetch_history()
        events += len(history.events)
        size += sum(e.ByteSize() for e in history.events)
        tasks += sum(
            e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED for e in history.events
        )
    return events / len(nos), size / len(nos), tasks / len(nos)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    n, conc = args.orders, args.concurrency
    tuning = {"PAYORDERS_SETTLEMENT_WINDOW_S": str(SETTLEMENT_IN_RUN_S)}
    async with (
        bench_stack("capacity", worker_env=tuning) as b,
        edge_of(b, conc) as edge,
    ):
        say("warm-up")
        await _life(b, edge, 50, conc, "warm")
        idle = await idle_cores(b, 10)
        await asyncio.sleep(3)  # the backends' table statistics reach the collector
        pg0, calls0 = await _pg_counters(b), await _gateway_calls(edge.http, b.stack.api_url)
        trades0 = await _trades(b)
        cpu0, t0 = b.cpu_by_pid(), time.time()
        say(f"{n} pay orders through their whole life")
        nos = await _life(b, edge, n, conc, "m")
        cpu1, t1 = b.cpu_by_pid(), time.time()
        await asyncio.sleep(3)
        pg1, calls1 = await _pg_counters(b), await _gateway_calls(edge.http, b.stack.api_url)
        trades1 = await _trades(b)
        events, size, tasks = await _histories(b, nos[: args.history_sample])
        violations = await b.fund_violations()
    cpu = cpu_delta(cpu0, cpu1)
    span = t1 - t0
    per_order_ms = {g: max(0.0, (s - idle.get(g, 0.0) * span) * 1000 / n) for g, s in cpu.items()}
    return {
        "orders": n,
        "concurrency": conc,
        "span_s": span,
        "cpu_ms_per_order": per_order_ms,
        "idle_cores": idle,
        "history_events": events,
        "history_bytes": size,
        "workflow_tasks": tasks,
        "pg_rows_inserted": (pg1["ins"] - pg0["ins"]) / n,
        "pg_rows_updated": (pg1["upd"] - pg0["upd"]) / n,
        "pg_rows_deleted": (pg1["del"] - pg0["del"]) / n,
        "pg_transactions": (pg1["xacts"] - pg0["xacts"]) / n,
        "pg_wal_bytes": (pg1["wal"] - pg0["wal"]) / n,
        "pg_table_bytes": (pg1["bytes"] - pg0["bytes"]) / n,
        "gateway_calls_api": (calls1 - calls0) / n,
        "gateway_calls_worker": (trades1 - trades0) / n,
        "violations": violations,
    }


async def _trades(b: Bench) -> float:
    return float(await b.db.fetchval(f"SELECT count(*) FROM {b.settings.sandbox_schema}.trade"))


async def _life(b: Bench, edge: Edge, n: int, conc: int, tag: str) -> list[str]:
    """``n`` pay orders paid through HTTP, each until its workflow has completed."""
    nos: list[str] = []

    async def job(i: int) -> None:
        no = await edge.checkout(b.order_no(i, tag))
        await edge.pay(no)
        nos.append(no)

    await bounded(n, conc, job)

    async def completed(i: int) -> None:
        await b.client.get_workflow_handle(domain.workflow_id_for(nos[i])).result()

    await bounded(n, conc, completed)
    undelivered = "SELECT count(*) FROM outbox WHERE delivered_at IS NULL AND pay_order_no LIKE $1"
    deadline = time.monotonic() + 60
    while await b.db.fetchval(undelivered, f"po_{b.run_id}-{tag}-%"):
        if time.monotonic() > deadline:
            raise TimeoutError("order events not delivered")
        await asyncio.sleep(0.2)
    return nos


def plan(m: dict[str, Any], rate: float, *, peak: bool) -> dict[str, float]:
    """What ``rate`` pay orders a second need, from the measured costs ``m``."""
    cpu = m["cpu_ms_per_order"]
    life_h = WINDOW_H + SETTLEMENT_H
    # Little's law: open = arrival rate x time open. A peak's orders stay open their whole
    # life, but only PEAK_HOURS of them arrive at the peak rate.
    open_workflows = rate * 3600 * (min(PEAK_HOURS, life_h) if peak else life_h)
    server_cores = rate * cpu.get("temporal server", 0.0) / 1000
    client_rpcs = 3.0  # update-with-start, describe (its memo), the payment signal
    task_rpcs = 2.0 * m["workflow_tasks"]  # each workflow task: a poll and its completion
    frontend_rps = rate * (client_rpcs + task_rpcs)
    per_day = rate * 3600 * (PEAK_HOURS if peak else 24)
    return {
        "open_workflows": open_workflows,
        "history_events_per_s": rate * m["history_events"],
        "history_mib_per_day": per_day * m["history_bytes"] / 2**20,
        "events_per_shard_per_s": rate * m["history_events"] / SHARDS,
        "server_cores": server_cores,
        "history_cores": server_cores * SERVER_SHARE["history"],
        "matching_cores": server_cores * SERVER_SHARE["matching"],
        "frontend_rps": frontend_rps,
        "frontend_hosts": max(2, math.ceil(frontend_rps / FRONTEND_RPS_PER_HOST)),
        "worker_replicas": max(
            2, math.ceil(rate * cpu.get("worker", 0.0) / 1000 / (WORKER_CORES * UTILISATION))
        ),
        "api_processes": max(
            2, math.ceil(rate * cpu.get("api", 0.0) / 1000 / (WORKER_CORES * UTILISATION))
        ),
        "pg_rows_per_s": rate
        * (m["pg_rows_inserted"] + m["pg_rows_updated"] + m["pg_rows_deleted"]),
        "pg_commits_per_s": rate * m["pg_transactions"],
        "pg_wal_mib_per_s": rate * m["pg_wal_bytes"] / 2**20,
        "pg_growth_gib_per_day": per_day * m["pg_table_bytes"] / 2**30,
        "gateway_calls_per_s": rate * (m["gateway_calls_api"] + m["gateway_calls_worker"]),
    }


def _text(m: dict[str, Any], plans: list[tuple[str, dict[str, float]]]) -> str:
    cpu = m["cpu_ms_per_order"]
    measured = table(
        f"Measured per pay order: {m['orders']:,} through their whole life over HTTP"
        f" ({m['concurrency']} in flight, settlement shortened to {SETTLEMENT_IN_RUN_S} s)",
        ["cost", "per pay order"],
        [
            [
                "Temporal server CPU (dev server: all services, SQLite), ms",
                cpu.get("temporal server", 0.0),
            ],
            ["worker CPU, ms", cpu.get("worker", 0.0)],
            ["API CPU, ms", cpu.get("api", 0.0)],
            ["PostgreSQL CPU, ms", cpu.get("postgresql", 0.0)],
            [
                "sandbox gateway CPU (a real gateway runs elsewhere), ms",
                cpu.get("sandbox gateway", 0.0),
            ],
            ["history events (completed workflow)", m["history_events"]],
            ["history bytes (serialized events)", m["history_bytes"]],
            ["workflow tasks", m["workflow_tasks"]],
            [
                "PostgreSQL rows inserted / updated / deleted",
                " / ".join(
                    f"{m[k]:.1f}"
                    for k in ("pg_rows_inserted", "pg_rows_updated", "pg_rows_deleted")
                ),
            ],
            [
                "PostgreSQL transactions committed (all clients, sandbox included)",
                m["pg_transactions"],
            ],
            ["WAL bytes (whole server, sandbox included)", m["pg_wal_bytes"]],
            [
                "growth of the product's tables and indexes, bytes (before vacuum)",
                m["pg_table_bytes"],
            ],
            [
                "gateway calls by us (API verification + worker open_trade)",
                m["gateway_calls_api"] + m["gateway_calls_worker"],
            ],
        ],
    )
    names = [name for name, _ in plans]

    def row(label: str, key: str, fmt: str = "{:,.0f}") -> list[str]:
        return [label, *(fmt.format(p[key]) for _, p in plans)]

    capacity = table(
        "Capacity on paper (1 h payment window, 25 h settlement)",
        ["need", *names],
        [
            row("open workflows (Little's law)", "open_workflows"),
            row("history events written /s", "history_events_per_s"),
            row("history MiB written per day (a peak: its hours)", "history_mib_per_day"),
            row(
                f"history events /s per shard ({SHARDS} shards)",
                "events_per_shard_per_s",
                "{:,.1f}",
            ),
            row("Temporal server cores (scaled from the dev server)", "server_cores", "{:,.1f}"),
            row("  of which history (assumed share)", "history_cores", "{:,.1f}"),
            row("  of which matching (assumed share)", "matching_cores", "{:,.1f}"),
            row("frontend requests /s", "frontend_rps"),
            row(
                f"frontend hosts (at {FRONTEND_RPS_PER_HOST:,.0f} rps each, at least 2)",
                "frontend_hosts",
            ),
            row(
                f"worker replicas (1 core each at {UTILISATION:.0%}, at least 2)", "worker_replicas"
            ),
            row(f"API processes (1 core each at {UTILISATION:.0%}, at least 2)", "api_processes"),
            row("PostgreSQL rows written /s", "pg_rows_per_s"),
            row("PostgreSQL commits /s", "pg_commits_per_s"),
            row("WAL MiB /s", "pg_wal_mib_per_s", "{:,.2f}"),
            row("table growth GiB per day (a peak: its hours)", "pg_growth_gib_per_day", "{:,.1f}"),
            row("gateway calls /s by us", "gateway_calls_per_s"),
        ],
    )
    return measured + capacity + f"\nfund identity violations: {len(m['violations'])}\n"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    m = await measure(args)
    plans = [
        (
            f"{rate:,.0f}/s" + (f" ({PEAK_HOURS:g} h peak)" if rate >= args.peak_from else ""),
            plan(m, rate, peak=rate >= args.peak_from),
        )
        for rate in args.rates
    ]
    figures = {**m, "plans": dict(plans)}
    save("capacity", figures, _text(m, plans))
    if m["violations"]:
        raise SystemExit(f"fund identity broken for {len(m['violations'])} pay orders")
    return figures


def _rates(text: str) -> list[float]:
    return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--history-sample", type=int, default=50)
    p.add_argument("--rates", type=_rates, default=[100.0, 2000.0])
    p.add_argument("--peak-from", type=float, default=1000.0, help="rates from here on are a peak")
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

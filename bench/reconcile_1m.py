"""Benchmark: one reconciliation run over N pay orders (default 1,000,000) on a stack of its own.

    /tmp/venv/bin/python bench/reconcile_1m.py [--orders 1000000] [--page-sizes 20000,50000]

It starts an embedded PostgreSQL in a temporary directory (removed at the end), migrates it
(``in_process``: our resources on an in-process sandbox gateway), seeds N pay orders with
set-based SQL in their final states (70% PAY_SUCCESS with one settled payment, 25%
PAY_EXPIRED unpaid, 5% PAY_EXPIRED with a late payment refunded), seeds the sandbox
gateway's ledger to match the last two days, injects a handful of discrepancies, then
starts a Temporal dev server and an in-process worker and runs ``ReconcileWorkflow`` once
per page size, timing it end to end. It checks that exactly the injected discrepancies were
found (exit status 1 otherwise) and prints a markdown table.

Times are spread over the last 30 days; about 2% of N payments (20,000 for 1M) fall in the
last two days, the period the gateway statement is compared over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from payorders.core import search_attributes as sa
from payorders.core.models import ReconcileReport
from payorders.core.settings import Settings
from payorders.localstack import postgres as embedded
from payorders.localstack.binaries import find_binary
from payorders.sandbox.ledger import in_process
from worker import build_worker
from workflows.reconcile import ReconcileWorkflow

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "sandbox_gateway"
DEV_SERVER_ARGS = ["--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000"]

# --- seeding --------------------------------------------------------------------------------

# One row per pay order, computed once from i; every table below is filled from it.
# kind: S = PAY_SUCCESS paid, E = PAY_EXPIRED unpaid, L = PAY_EXPIRED with a late payment
# refunded. u is a multiplicative hash of i in [0, 1): it places the order in time, so the
# recent orders are spread over the whole key space. Recent orders are created in
# [t0 - 47h, t0 - 3h], the others in [t0 - 30d, t0 - 2d - 3h]: every payment and refund of an
# old order ends before the statement period, every one of a recent order inside it.
SQL_SEED_TABLE = """
CREATE TEMP TABLE seed (
    i            int         NOT NULL,
    pay_order_no text        NOT NULL,
    order_no     text        NOT NULL,
    txn_id       text        NOT NULL,
    amount       bigint      NOT NULL,
    currency     text        NOT NULL,
    kind         "char"      NOT NULL,
    recent       boolean     NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    paid_at      timestamptz,
    succeeded_at timestamptz
)"""
SQL_SEED_ROWS = """
INSERT INTO seed
SELECT i, 'po_' || o, o, 'txn_bench_' || lpad(i::text, 8, '0'), amount, currency, kind, recent,
       created, created + interval '1 hour',
       CASE kind WHEN 'S' THEN created + (1 + i % 50) * interval '1 minute'
                 WHEN 'L' THEN created + interval '1 hour' + (1 + i % 30) * interval '1 minute'
       END,
       CASE kind WHEN 'L' THEN created + interval '1 hour' + (1 + i % 30) * interval '1 minute'
                               + (5 + i % 20) * interval '1 second'
       END
  FROM (SELECT i, 'bench-' || lpad(i::text, 8, '0') AS o,
               100 + (i::bigint * 7919) % 99901 AS amount,
               CASE WHEN i % 7 = 0 THEN 'EUR' ELSE 'USD' END AS currency,
               (CASE WHEN i % 20 < 14 THEN 'S' WHEN i % 20 < 19 THEN 'E' ELSE 'L' END)::"char"
                   AS kind,
               u < $2 AS recent,
               CASE WHEN u < $2
                    THEN $3::timestamptz - interval '47 hours' + (u / $2) * interval '44 hours'
                    ELSE $3::timestamptz - interval '30 days'
                         + ((u - $2) / (1 - $2)) * interval '27 days 21 hours'
               END AS created
          FROM (SELECT i, ((i::bigint * 2654435761) % 4294967296)::float8 / 4294967296 AS u
                  FROM generate_series(1, $1::int) AS i) g) s"""
SQL_SEED_PAY_ORDERS = """
INSERT INTO pay_order (pay_order_no, order_no, amount, currency, status, paid_amount,
                       refunded_amount, lock_version, expires_at, created_at, updated_at)
SELECT pay_order_no, order_no, amount, currency,
       CASE kind WHEN 'S' THEN 'PAY_SUCCESS' ELSE 'PAY_EXPIRED' END,
       CASE kind WHEN 'E' THEN 0 ELSE amount END,
       CASE kind WHEN 'L' THEN amount ELSE 0 END,
       CASE kind WHEN 'L' THEN 2 ELSE 1 END,
       expires_at, created_at, coalesce(succeeded_at, paid_at, expires_at)
  FROM seed ORDER BY i"""
SQL_SEED_PAYMENTS = """
INSERT INTO payment (txn_id, pay_order_no, amount, currency, paid_at, settled, refund_reason,
                     recorded_at)
SELECT txn_id, pay_order_no, amount, currency, paid_at, kind = 'S',
       CASE kind WHEN 'L' THEN 'LATE' END, paid_at + interval '200 milliseconds'
  FROM seed WHERE kind <> 'E' ORDER BY i"""
SQL_SEED_REFUNDS = """
INSERT INTO refund (refund_key, pay_order_no, txn_id, amount, currency, status, reason, attempts,
                    gateway_refund_id, created_at, updated_at, succeeded_at)
SELECT 'refund-' || pay_order_no || '-' || txn_id, pay_order_no, txn_id, amount, currency,
       'SUCCEEDED', 'LATE', 1, 'rf_bench_' || lpad(i::text, 8, '0'),
       paid_at + interval '1 second', succeeded_at, succeeded_at
  FROM seed WHERE kind = 'L' ORDER BY i"""
SQL_SEED_GATEWAY_CAPTURES = f"""
INSERT INTO {SCHEMA}.capture (txn_id, pay_order_no, amount, currency, captured_at)
SELECT txn_id, pay_order_no, amount, currency, paid_at
  FROM seed WHERE recent AND kind <> 'E' ORDER BY i"""
SQL_SEED_GATEWAY_REFUNDS = f"""
INSERT INTO {SCHEMA}.refund (idempotency_key, gateway_refund_id, txn_id, amount, currency, status,
                             created_at, processing_ms)
SELECT 'refund-' || pay_order_no || '-' || txn_id, 'rf_bench_' || lpad(i::text, 8, '0'), txn_id,
       amount, currency, 'SUCCEEDED', succeeded_at - interval '1 second', 25
  FROM seed WHERE recent AND kind = 'L' ORDER BY i"""

SQL_COUNTS = f"""
SELECT (SELECT count(*) FROM pay_order) AS pay_orders,
       (SELECT count(*) FROM payment) AS payments,
       (SELECT count(*) FROM refund) AS refunds,
       (SELECT count(*) FROM {SCHEMA}.capture) AS gateway_captures,
       (SELECT count(*) FROM {SCHEMA}.refund) AS gateway_refunds,
       pg_size_pretty(pg_database_size(current_database())) AS db_size"""

# --- discrepancies --------------------------------------------------------------------------

PAID_DELTA = 7

SQL_PICK_PAID_ORDERS = """
SELECT pay_order_no FROM pay_order
 WHERE status = 'PAY_SUCCESS' AND NOT pay_order_no = ANY($1)
 ORDER BY md5(pay_order_no) LIMIT $2"""
# Settled payments whose capture is well inside the statement period.
SQL_PICK_CAPTURES = f"""
SELECT c.txn_id, c.pay_order_no FROM {SCHEMA}.capture c JOIN payment p USING (txn_id)
 WHERE p.settled
   AND c.captured_at BETWEEN now() - interval '40 hours' AND now() - interval '4 hours'
   AND NOT c.pay_order_no = ANY($1)
 ORDER BY md5(c.txn_id) LIMIT $2"""
# Refund rows whose gateway refund is well inside the statement period.
SQL_PICK_REFUNDS = f"""
SELECT r.refund_key, r.pay_order_no FROM refund r
  JOIN {SCHEMA}.refund g ON g.idempotency_key = r.refund_key
 WHERE g.created_at BETWEEN now() - interval '40 hours' AND now() - interval '4 hours'
   AND NOT r.pay_order_no = ANY($1)
 ORDER BY md5(r.refund_key) LIMIT $2"""


@dataclass
class Injected:
    """What was broken on purpose: the findings a run must report, no more, no fewer."""

    touched: set[str] = field(default_factory=set)
    persistent: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """Exceptions for a person: every run reports them again."""
    log: list[str] = field(default_factory=list)
    runs: int = 0

    def expect(self, kind: str, action: str, pay_order_nos: list[str]) -> None:
        for no in pay_order_nos:
            self.persistent[(kind, action, no)] += 1
        self.touched.update(pay_order_nos)


async def pick(conn: asyncpg.Connection, sql: str, inj: Injected, n: int) -> list[asyncpg.Record]:
    """n rows not touched yet; too few means too small a data set to inject into."""
    rows = await conn.fetch(sql, list(inj.touched), n)
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} of {n} rows to inject into: raise --orders")
    return rows


async def inject_persistent(conn: asyncpg.Connection, inj: Injected) -> None:
    # 10 orders whose paid_amount was changed by SQL: paid_amount_mismatch, EXCEPTION.
    rows = await pick(conn, SQL_PICK_PAID_ORDERS, inj, 10)
    nos = [r["pay_order_no"] for r in rows]
    await conn.execute(
        "UPDATE pay_order SET paid_amount = paid_amount + $2 WHERE pay_order_no = ANY($1)",
        nos,
        PAID_DELTA,
    )
    inj.expect("paid_amount_mismatch", "EXCEPTION", nos)
    inj.log.append(f"paid_amount + {PAID_DELTA} on {len(nos)} PAY_SUCCESS orders")

    # 3 captures at the gateway for pay orders we never had: money_without_order, EXCEPTION.
    ghosts = [f"po_bench-ghost-{k}" for k in range(3)]
    for k, no in enumerate(ghosts):
        await conn.execute(
            f"INSERT INTO {SCHEMA}.capture (txn_id, pay_order_no, amount, currency, captured_at)"
            " VALUES ($1, $2, 999, 'USD', now() - interval '1 day')",
            f"txn_bench_ghost_{k}",
            no,
        )
    inj.expect("money_without_order", "EXCEPTION", ghosts)
    inj.log.append(f"{len(ghosts)} gateway captures for unknown pay orders")

    # 6 settled payments of the period: 3 captures deleted at the gateway
    # (payment_absent_at_gateway), 3 captured with another amount (amount_differs).
    rows = await pick(conn, SQL_PICK_CAPTURES, inj, 6)
    absent, differs = rows[:3], rows[3:]
    await conn.execute(
        f"DELETE FROM {SCHEMA}.capture WHERE txn_id = ANY($1)", [r["txn_id"] for r in absent]
    )
    await conn.execute(
        f"UPDATE {SCHEMA}.capture SET amount = amount + 1 WHERE txn_id = ANY($1)",
        [r["txn_id"] for r in differs],
    )
    inj.expect("payment_absent_at_gateway", "EXCEPTION", [r["pay_order_no"] for r in absent])
    inj.expect("amount_differs", "EXCEPTION", [r["pay_order_no"] for r in differs])
    inj.log.append(f"{len(absent)} gateway captures deleted, {len(differs)} amounts changed")


async def inject_for_run(conn: asyncpg.Connection, inj: Injected) -> Counter[tuple[str, str, str]]:
    """5 refund rows deleted after they succeeded: refund_restored, REPAIRED (once)."""
    inj.runs += 1
    rows = await pick(conn, SQL_PICK_REFUNDS, inj, 5)
    await conn.execute(
        "DELETE FROM refund WHERE refund_key = ANY($1)", [r["refund_key"] for r in rows]
    )
    nos = [r["pay_order_no"] for r in rows]
    inj.touched.update(nos)
    inj.log.append(
        f"before run {inj.runs}: {len(nos)} succeeded refund rows deleted"
        " (gateway refund in the period)"
    )
    return inj.persistent + Counter(("refund_restored", "REPAIRED", no) for no in nos)


# --- memory sampling ------------------------------------------------------------------------


class Sampler:
    """Samples memory in a thread: PostgreSQL's processes, the Temporal server, and us."""

    def __init__(self, pg_pid: int, interval_s: float = 0.25) -> None:
        self._pg = psutil.Process(pg_pid)
        me = psutil.Process()
        self._me = me
        self._temporal = [p for p in me.children(recursive=True) if "temporal" in p.name()]
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples = 0
        self.pg_backend_rss_max = 0
        self.pg_rss_sum_max = 0
        self.pg_uss_sum_max = 0
        self.pg_procs_max = 0
        self.temporal_rss_max = 0
        self.self_rss_max = 0

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval):
                return

    def sample(self) -> None:
        rss_sum = uss_sum = backend_max = n = 0
        for p in [self._pg, *self._pg.children()]:
            try:
                mem = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            n += 1
            rss_sum += mem.rss
            uss_sum += mem.uss
            backend_max = max(backend_max, mem.rss)
        self.pg_backend_rss_max = max(self.pg_backend_rss_max, backend_max)
        self.pg_rss_sum_max = max(self.pg_rss_sum_max, rss_sum)
        self.pg_uss_sum_max = max(self.pg_uss_sum_max, uss_sum)
        self.pg_procs_max = max(self.pg_procs_max, n)
        for p in self._temporal:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.temporal_rss_max = max(self.temporal_rss_max, p.memory_info().rss)
        self.self_rss_max = max(self.self_rss_max, self._me.memory_info().rss)
        self.samples += 1


# --- one run --------------------------------------------------------------------------------


@dataclass
class RunFigures:
    page_size: int
    run_s: float
    report: ReconcileReport
    findings: Counter[tuple[str, str]]
    ok: bool
    problems: list[str]
    runs_in_chain: int
    history_events: int
    max_run_events: int
    activities: dict[str, tuple[int, float, float]]
    """Activity type: count, total seconds, longest seconds (scheduled to completed)."""
    retries: int
    mem: Sampler


async def history_of(client: Client, workflow_id: str, first_run_id: str) -> dict[str, Any]:
    """Follow the continue-as-new chain: runs, events, and activity timings from history."""
    run_id: str | None = first_run_id
    runs = events = max_events = retries = 0
    acts: dict[str, list[float]] = {}
    while run_id:
        hist = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        runs += 1
        events += len(hist.events)
        max_events = max(max_events, len(hist.events))
        scheduled: dict[int, tuple[str, datetime]] = {}
        run_id = None
        for e in hist.events:
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                name = e.activity_task_scheduled_event_attributes.activity_type.name
                scheduled[e.event_id] = (name, e.event_time.ToDatetime())
            elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                retries += e.activity_task_started_event_attributes.attempt - 1
            elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                name, at = scheduled[e.activity_task_completed_event_attributes.scheduled_event_id]
                acts.setdefault(name, []).append((e.event_time.ToDatetime() - at).total_seconds())
            elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                attrs = e.workflow_execution_continued_as_new_event_attributes
                run_id = attrs.new_execution_run_id
    return {
        "runs": runs,
        "events": events,
        "max_events": max_events,
        "retries": retries,
        "activities": {k: (len(v), sum(v), max(v)) for k, v in sorted(acts.items())},
    }


async def run_once(
    client: Client,
    pool: asyncpg.Pool,
    settings: Settings,
    page_size: int,
    expected: Counter[tuple[str, str, str]],
    orders: int,
    pg_pid: int,
    timeout_s: float,
) -> RunFigures:
    inp = settings.reconcile_input().model_copy(update={"page_size": page_size})
    wf_id = f"bench-reconcile-{page_size}-{uuid.uuid4().hex[:8]}"
    with Sampler(pg_pid) as mem:
        started = time.perf_counter()
        handle = await client.start_workflow(
            ReconcileWorkflow.run, inp, id=wf_id, task_queue=settings.task_queue
        )
        try:
            report = await asyncio.wait_for(handle.result(), timeout_s)
        except TimeoutError:
            await handle.terminate("benchmark timeout")
            raise SystemExit(
                f"reconciliation with page size {page_size} did not finish in {timeout_s:.0f} s"
            ) from None
        run_s = time.perf_counter() - started
    assert handle.first_execution_run_id is not None
    hist = await history_of(client, wf_id, handle.first_execution_run_id)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT kind, action, pay_order_no FROM reconciliation_finding WHERE run_id = $1",
            report.run_id,
        )
    found = Counter((r["kind"], r["action"], r["pay_order_no"]) for r in rows)
    problems = [f"missing: {k}" for k in sorted(expected - found)]
    problems += [f"unexpected: {k}" for k in sorted(found - expected)]
    if report.checked != orders:
        problems.append(f"checked {report.checked}, expected {orders}")
    repaired = sum(n for (_, action, _), n in expected.items() if action == "REPAIRED")
    if (report.repaired, report.exceptions) != (repaired, sum(expected.values()) - repaired):
        problems.append(f"counters: repaired {report.repaired}, exceptions {report.exceptions}")
    return RunFigures(
        page_size=page_size,
        run_s=run_s,
        report=report,
        findings=Counter((k, a) for (k, a, _), n in found.items() for _ in range(n)),
        ok=not problems,
        problems=problems,
        runs_in_chain=hist["runs"],
        history_events=hist["events"],
        max_run_events=hist["max_events"],
        activities=hist["activities"],
        retries=hist["retries"],
        mem=mem,
    )


# --- the benchmark --------------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


async def seed(url: str, orders: int, recent_payments: int, timeout_s: float) -> dict[str, Any]:
    share = recent_payments / (0.75 * orders)
    if not 0 < share < 1:
        raise SystemExit("--recent-payments must be below 75% of --orders")
    t0 = datetime.now(UTC)
    timings: dict[str, float] = {}
    conn = await asyncpg.connect(url)
    try:
        # The server's own settings, before this session changes its own.
        pg = {
            k: await conn.fetchval(f"SHOW {k}")
            for k in ("server_version", "shared_buffers", "work_mem", "max_wal_size")
        }
        # Session settings for the bulk load only (this connection is closed afterwards).
        await conn.execute("SET work_mem = '256MB'; SET maintenance_work_mem = '512MB'")
        await conn.execute(SQL_SEED_TABLE)
        steps = [
            ("seed rows (temp)", SQL_SEED_ROWS, (orders, share, t0)),
            ("pay_order", SQL_SEED_PAY_ORDERS, ()),
            ("payment", SQL_SEED_PAYMENTS, ()),
            ("refund", SQL_SEED_REFUNDS, ()),
            ("gateway capture", SQL_SEED_GATEWAY_CAPTURES, ()),
            ("gateway refund", SQL_SEED_GATEWAY_REFUNDS, ()),
        ]
        started = time.perf_counter()
        async with conn.transaction():
            for name, sql, args in steps:
                t = time.perf_counter()
                status = await conn.execute(sql, *args, timeout=timeout_s)
                timings[name] = time.perf_counter() - t
                print(f"  {name:<18} {status:<16} {timings[name]:6.1f} s", flush=True)
        timings["insert"] = time.perf_counter() - started
        await conn.execute("DROP TABLE seed")
        t = time.perf_counter()
        await conn.execute("VACUUM (ANALYZE)", timeout=timeout_s)
        timings["vacuum analyze"] = time.perf_counter() - t
        print(f"  {'vacuum analyze':<18} {'':<16} {timings['vacuum analyze']:6.1f} s", flush=True)
        counts = dict(await conn.fetchrow(SQL_COUNTS) or {})
    finally:
        await conn.close()
    return {"timings": timings, "counts": counts, "pg": pg, "recent_share": share}


async def bench(args: argparse.Namespace, admin_url: str, pg_pid: int) -> int:
    url = await embedded.ensure_database(admin_url, "payorders_bench")
    settings = Settings(
        task_queue=f"bench-reconcile-{uuid.uuid4().hex[:8]}",
        sandbox_schema=SCHEMA,
        database_url=url,
    )
    async with in_process(settings, url) as res:
        print(f"seeding {args.orders:,} pay orders ...", flush=True)
        started = time.perf_counter()
        seeded = await seed(url, args.orders, args.recent_payments, args.timeout)
        seed_s = time.perf_counter() - started
        print(f"seeded in {seed_s:.1f} s: {seeded['counts']}", flush=True)

        inj = Injected()
        async with res.pool.acquire() as conn:
            await inject_persistent(conn, inj)

        print("starting the Temporal dev server ...", flush=True)
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=find_binary("temporal"),
            data_converter=pydantic_data_converter,
            search_attributes=list(sa.ALL),
            dev_server_extra_args=DEV_SERVER_ARGS,
            dev_server_startup_timeout=timedelta(seconds=60),
        )
        results: list[RunFigures] = []
        skipped: list[str] = []
        async with env, build_worker(env.client, res, task_queue=settings.task_queue):
            for page_size in args.page_sizes:
                if results and results[-1].run_s > args.quick_s:
                    skipped.append(
                        f"page size {page_size:,} skipped: the previous run took"
                        f" {results[-1].run_s:.0f} s (> --quick-s {args.quick_s:.0f})"
                    )
                    continue
                async with res.pool.acquire() as conn:
                    expected = await inject_for_run(conn, inj)
                print(f"reconciling with page size {page_size:,} ...", flush=True)
                fig = await run_once(
                    env.client,
                    res.pool,
                    settings,
                    page_size,
                    expected,
                    args.orders,
                    pg_pid,
                    args.timeout,
                )
                results.append(fig)
                print(
                    f"  {fig.run_s:.1f} s, {args.orders / fig.run_s:,.0f} orders/s,"
                    f" {sum(fig.findings.values())} findings, ok={fig.ok}",
                    flush=True,
                )
                for p in fig.problems:
                    print(f"  PROBLEM {p}", flush=True)
        if args.explain:
            await explain(res.pool, args.page_sizes[0], args.orders)

    print()
    print("Injected: " + "; ".join(inj.log))
    for s in skipped:
        print(s)
    print()
    print(table(args, seeded, seed_s, results))
    ok = bool(results) and all(r.ok for r in results)
    print(
        "\n" + ("all injected discrepancies found, nothing else" if ok else "FAILED: see PROBLEM")
    )
    return 0 if ok else 1


def table(
    args: argparse.Namespace, seeded: dict[str, Any], seed_s: float, results: list[RunFigures]
) -> str:
    c, t, pg = seeded["counts"], seeded["timings"], seeded["pg"]
    lines = [
        "| figure | " + " | ".join(f"page size {r.page_size:,}" for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]

    def row(name: str, values: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    def same(name: str, value: str) -> None:
        row(name, [value] * len(results))

    same("pay orders", f"{c['pay_orders']:,}")
    same("payments / refunds", f"{c['payments']:,} / {c['refunds']:,}")
    same("gateway captures / refunds", f"{c['gateway_captures']:,} / {c['gateway_refunds']:,}")
    same("database size", c["db_size"])
    same(
        "seed time (insert + vacuum analyze)",
        f"{seed_s:.1f} s ({t['insert']:.1f} + {t['vacuum analyze']:.1f})",
    )
    row("reconciliation run (end to end)", [f"{r.run_s:.1f} s" for r in results])
    row("orders/s", [f"{args.orders / r.run_s:,.0f}" for r in results])
    for name in sorted({k for r in results for k in r.activities}):
        values = []
        for r in results:
            n, total, longest = r.activities.get(name, (0, 0.0, 0.0))
            values.append(f"{n} x avg {total / max(n, 1):.2f} s, max {longest:.2f} s")
        row(f"activity {name}", values)
    row("activity retries", [str(r.retries) for r in results])
    row("workflow runs in the continue-as-new chain", [str(r.runs_in_chain) for r in results])
    row(
        "history events (total / largest run)",
        [f"{r.history_events:,} / {r.max_run_events:,}" for r in results],
    )
    for kind, action in sorted({k for r in results for k in r.findings}):
        row(f"finding {kind} {action}", [str(r.findings.get((kind, action), 0)) for r in results])
    for name in ("checked", "consistent", "in_flight_count", "money_in_flight"):
        row(f"run {name}", [f"{getattr(r.report, name):,}" for r in results])
    row(
        "run repaired / exceptions",
        [f"{r.report.repaired} / {r.report.exceptions}" for r in results],
    )
    row("all injected found, nothing else", ["yes" if r.ok else "NO" for r in results])
    same(
        "peak RSS, benchmark process (ru_maxrss)",
        mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    )
    row("peak RSS, benchmark process (sampled in run)", [mib(r.mem.self_rss_max) for r in results])
    row("peak RSS, largest PostgreSQL process", [mib(r.mem.pg_backend_rss_max) for r in results])
    row(
        "peak sum of PostgreSQL USS (private) / RSS",
        [f"{mib(r.mem.pg_uss_sum_max)} / {mib(r.mem.pg_rss_sum_max)}" for r in results],
    )
    row("peak RSS, Temporal dev server", [mib(r.mem.temporal_rss_max) for r in results])
    same(
        "PostgreSQL",
        f"{pg['server_version']}, shared_buffers {pg['shared_buffers']}, work_mem {pg['work_mem']}",
    )
    same("CPUs", str(psutil.cpu_count()))
    return "\n".join(lines)


async def explain(pool: asyncpg.Pool, page_size: int, orders: int) -> None:
    """EXPLAIN ANALYZE of the reconciliation SQL on a page in the middle and one window."""
    from payorders.core import reconcile as r

    async with pool.acquire() as conn:
        after = await conn.fetchval(
            "SELECT pay_order_no FROM pay_order ORDER BY pay_order_no OFFSET $1 LIMIT 1",
            orders // 2,
        )
        end = datetime.now(UTC)
        start = end - timedelta(hours=6)
        statements = [
            ("SQL_PAGE_SPAN", r.SQL_PAGE_SPAN, (after, page_size)),
            ("SQL_PAGE_SUSPECTS", r.SQL_PAGE_SUSPECTS, (after, page_size, 600.0, 600.0)),
            ("SQL_PAYMENTS_IN_PERIOD", r.SQL_PAYMENTS_IN_PERIOD, (start, end, "", 5000)),
            ("SQL_SUCCEEDED_REFUNDS_IN_PERIOD", r.SQL_SUCCEEDED_REFUNDS_IN_PERIOD, (start, end)),
        ]
        for name, sql, params in statements:
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)
            print(f"\n-- {name}")
            print("\n".join(p[0] for p in plan))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument(
        "--recent-payments",
        type=int,
        default=None,
        help="payments in the last two days (default: 2%% of --orders)",
    )
    parser.add_argument(
        "--page-sizes",
        default="20000,50000",
        help="comma-separated; one reconciliation run each (default: 20000,50000)",
    )
    parser.add_argument(
        "--quick-s",
        type=float,
        default=180,
        help="run the next page size only if the previous run took at most this (default 180)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="limit for the seeding and for each run"
    )
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE plans")
    args = parser.parse_args()
    args.page_sizes = [int(p) for p in args.page_sizes.split(",") if p.strip()]
    if args.orders < 10_000:
        parser.error("--orders must be at least 10000 (discrepancies need recent rows to pick)")
    if args.recent_payments is None:
        args.recent_payments = round(args.orders * 0.02)

    tmp = Path(tempfile.mkdtemp(prefix="payorders-bench-")).resolve()
    if tmp.is_relative_to(REPO_ROOT):
        shutil.rmtree(tmp)
        parser.error(f"the temporary directory {tmp} is under the repository: set TMPDIR")
    server = None
    try:
        server, admin_url = embedded.start_postgres(tmp)
        print(f"PostgreSQL in {tmp}", flush=True)
        return asyncio.run(bench(args, admin_url, server.get_pid()))
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

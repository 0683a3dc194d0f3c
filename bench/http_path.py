"""The happy path through the HTTP edge, beside the direct path and the ceiling, in one run.

Rounds alternate, on one private stack (every other round in reverse order, so that a
server that drifts through a run favours no path): the trivial-workflow ceiling
(``BenchTrivialWorkflow``), the same-shape skeleton (``bench/_skeleton.py``: a pay order's
Temporal shape on the happy path with empty activities, driven as the direct path drives
pay orders), the direct happy path (``PayOrders.start_pay_order`` and ``notify_payment``
from the benchmark process, as ``bench.throughput``), and the happy path as users drive it:

1. checkout ``POST /v1/pay-orders`` to the stack's API, with its bearer token;
2. the customer pays at the sandbox gateway, ``POST {gateway}/v1/payments``: the sandbox
   captures, queues its ``payment.succeeded`` webhook and answers; its delivery loop then
   sends the signed webhook to the API's ``/v1/webhooks/gateway`` by itself, and the API
   verifies it (signature, the capture at the gateway) and signals the workflow;
3. the order counts when PAY_SUCCESS and its outbox event are committed (the harness's
   ``pg_notify`` clock). Rate = orders / (first checkout -> last commit).

The load generator is the benchmark process: 64 lanes share one ``httpx.AsyncClient`` whose
keep-alive pool holds as many connections as there are lanes.

CPU per order: each process group's user + system seconds over the round (the harness's
groups: every stack child named ``<group>`` or ``<group>-N`` with its whole process tree),
divided by the orders of the round.

The sandbox gateway stands in for a gateway that runs elsewhere, so the HTTP ratio is given
twice. As measured: ``ratio = (n / wall) / ceiling``. With the sandbox's CPU taken out:

    ratio_ex = (n / (wall - sandbox_cpu_s / cores)) / ceiling,   cores = os.cpu_count()

that is ``rate * cores / (cores - sandbox_cores)``: the sandbox's CPU, spread over the
machine's cores, is time the rest of the stack would have had. It assumes the run is
CPU-bound (the machine saturated, as the table's "machine busy" column shows) and that the
rest of the stack would turn the freed CPU into orders at the rate it turns its own; on a
machine with idle cores it overstates the gain.

Before the rounds, one skeleton's history is set beside one pay order's, event type by
event type (the "same shape" check), with their payload bytes.

Latency at half the measured HTTP peak (orders paced open-loop): checkout (``POST
/v1/pay-orders`` sent -> answered with its checkout); from the answer of
``POST /v1/payments`` (captured, webhook queued) to the PAY_SUCCESS commit, per order; the
same split at the sandbox's ``webhook_delivery.delivered_at`` (PostgreSQL's clock, when the
sandbox had the API's 2xx), and the API's own handling of the webhook from its Prometheus
histogram ``payorders_api_request_duration_seconds`` (quantiles interpolated within its
buckets; one API process's registry).

    python -m bench.http_path [--orders 500] [--rounds 3] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from temporalio.api.enums.v1 import EventType

from bench._harness import (
    Bench,
    bench_stack,
    chart,
    cpu_delta,
    median,
    ms,
    paced,
    paid_round,
    pct,
    save,
    say,
    table,
)
from bench.throughput import happy_round
from payorders.core import domain

PATHS = ("ceiling", "skeleton", "direct", "http")
LABELS = {
    "ceiling": "trivial workflow (ceiling)",
    "skeleton": "same-shape skeleton",
    "direct": "direct",
    "http": "HTTP",
}
GROUPS = (
    "temporal server",
    "worker",
    "api",
    "sandbox gateway",
    "postgresql",
    "benchmark (starter)",
    "trivial worker",
    "order service",
)
GROUP_LABELS = {
    "benchmark (starter)": "load generator (benchmark)",
    "trivial worker": "trivial / skeleton worker",
}
REFERENCE_WORKER = "trivial worker"
"""The group of the references' worker process (the ceiling's and the skeleton's)."""
WEBHOOK_ROUTE = "/v1/webhooks/gateway"
DURATION_BUCKETS = "payorders_api_request_duration_seconds_bucket"
AMOUNT = 1000
RETRY_STATUS = 503  # checkout_pending / temporal_unavailable: the same request again


@dataclass
class Edge:
    """The users' side of the edge: checkout at the API, the customer at the gateway."""

    http: httpx.AsyncClient
    api_url: str
    gateway_url: str
    token: str
    retries: int = 0
    """Requests answered 503 (checkout pending, Temporal unavailable) and sent again."""
    resent: int = 0
    """Requests whose connection failed, sent again."""
    paid_answered: dict[str, float] = field(default_factory=dict)
    checkout_s: dict[str, float] = field(default_factory=dict)
    """Per pay order: ``POST /v1/pay-orders`` sent -> answered with its checkout (seconds)."""

    async def _post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        # Both calls are idempotent (a pay order by its order_no, a capture by its txn_id),
        # so a dropped connection or a 503 is answered by the same request again.
        for attempt in range(20):
            try:
                resp = await self.http.post(url, json=body, headers=headers)
            except (httpx.NetworkError, httpx.RemoteProtocolError):
                self.resent += 1
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if resp.status_code != RETRY_STATUS:
                resp.raise_for_status()
                return resp.json()
            self.retries += 1
            await asyncio.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"{url} kept failing")

    async def checkout(self, order_no: str) -> str:
        t0 = time.perf_counter()
        doc = await self._post(
            f"{self.api_url}/v1/pay-orders",
            {"order_no": order_no, "amount": AMOUNT, "currency": "USD", "expires_in_s": 3600},
            {"Authorization": f"Bearer {self.token}"},
        )
        no = str(doc["pay_order_no"])
        if doc.get("checkout") is None:
            raise RuntimeError(f"checkout of {no} answered without its checkout: {doc}")
        self.checkout_s[no] = time.perf_counter() - t0
        return no

    async def pay(self, pay_order_no: str) -> None:
        """The customer pays; the sandbox sends its webhook afterwards, by itself."""
        await self._post(
            f"{self.gateway_url}/v1/payments",
            {
                "pay_order_no": pay_order_no,
                "amount": AMOUNT,
                "currency": "USD",
                # The caller's key: a resent payment captures once.
                "txn_id": f"txn-{pay_order_no}",
            },
            {},
        )
        self.paid_answered[pay_order_no] = time.time()


@asynccontextmanager
async def edge_of(b: Bench, concurrency: int) -> AsyncIterator[Edge]:
    """The users' side of ``b``'s stack over one keep-alive client sized for ``concurrency``."""
    # Idle connections are dropped before the servers' own 5 s keep-alive ends, so a request
    # never goes out on a connection the server is closing (as the product's clients do).
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        yield Edge(
            http=http,
            api_url=b.stack.api_url,
            gateway_url=b.stack.gateway_url,
            token=b.stack.secrets["PAYORDERS_API_TOKEN"],
        )


async def http_round(b: Bench, edge: Edge, n: int, concurrency: int, tag: str) -> float:
    async def pay_order(i: int) -> str:
        no = await edge.checkout(b.order_no(i, tag))
        await edge.pay(no)
        return no

    return await paid_round(b, n, concurrency, pay_order)


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


async def measured(
    b: Bench, n: int, run: Callable[[], Coroutine[Any, Any, float]]
) -> dict[str, Any]:
    """One round of one path: its rate, wall time, and CPU per order for each group."""
    cpu0, busy0, t0 = b.cpu_by_pid(), _machine_busy_s(), time.time()
    rate = await run()
    cpu1, busy1, t1 = b.cpu_by_pid(), _machine_busy_s(), time.time()
    cpu = cpu_delta(cpu0, cpu1)
    wall = n / rate
    return {
        "per_s": rate,
        "wall_s": wall,
        "round_s": t1 - t0,
        "cpu_s": cpu,
        "cpu_ms_per_order": {g: ms(s) / n for g, s in cpu.items()},
        "machine_busy_cores": (busy1 - busy0) / (t1 - t0),
        "ours_cores": sum(cpu.values()) / (t1 - t0),
        "processes": {g: len(p) for g, p in cpu1.items()},
    }


async def idle_cores(b: Bench, seconds: float) -> dict[str, float]:
    """Cores each group uses with nothing to do: its fixed cost (pollers, the server's
    internal queues), which a round spreads over its orders in proportion to its length."""
    cpu0 = b.cpu_by_pid()
    await asyncio.sleep(seconds)
    return {g: s / seconds for g, s in cpu_delta(cpu0, b.cpu_by_pid()).items()}


def ratio_without_sandbox(n: int, wall_s: float, sandbox_cpu_s: float, ceiling: float) -> float:
    """``(n / (wall - sandbox_cpu_s / cores)) / ceiling`` (see the module's docstring)."""
    cores = os.cpu_count() or 1
    return (n / (wall_s - sandbox_cpu_s / cores)) / ceiling


def _worker_ms(result: dict[str, Any], group: str) -> float:
    return float(result["cpu_ms_per_order"].get(group, 0.0)) or float("nan")


async def same_shape(b: Bench, skeleton_tag: str, direct_tag: str) -> dict[str, Any]:
    """One skeleton's history beside one pay order's (both of the warm-up, paid, waiting in
    their settlement window): event types in order, and the bytes of each history."""

    async def history(workflow_id: str) -> tuple[list[str], int]:
        events = (await b.client.get_workflow_handle(workflow_id).fetch_history()).events
        names = [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in events]
        return names, sum(e.ByteSize() for e in events)

    order = b.order_no(0, direct_tag)
    pay_order, pay_bytes = await history(domain.workflow_id_for(domain.pay_order_no_for(order)))
    skel, skel_bytes = await history(f"skeleton-po_{b.order_no(0, skeleton_tag)}")
    same = pay_order == skel
    say(
        f"same shape: {'yes' if same else 'NO'}; pay order {len(pay_order)} events,"
        f" {pay_bytes} bytes; skeleton {len(skel)} events, {skel_bytes} bytes"
    )
    if not same:
        say(f"  pay order: {pay_order}\n  skeleton:  {skel}")
    return {
        "same_event_types": same,
        "pay_order_events": pay_order,
        "skeleton_events": skel,
        "pay_order_bytes": pay_bytes,
        "skeleton_bytes": skel_bytes,
    }


# --- the API's own view of its webhooks ------------------------------------------------------


async def webhook_buckets(http: httpx.AsyncClient, api_url: str) -> dict[float, float]:
    """The API's cumulative webhook-duration histogram, ``le`` (seconds) -> count."""
    text = (await http.get(f"{api_url}/metrics")).text
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == DURATION_BUCKETS
                and s.labels.get("route") == WEBHOOK_ROUTE
                and s.labels.get("method") == "POST"
            ):
                out[float(s.labels["le"])] = s.value
    return out


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """The q-quantile (0..1) of what a cumulative histogram gained between two scrapes,
    interpolated linearly within its bucket as Prometheus' ``histogram_quantile`` does;
    NaN when it gained nothing."""
    bounds = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for le, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if le == float("inf"):
                return lower  # beyond the last finite bound: that bound is all we know
            return lower + (le - lower) * ((rank - below) / (c - below) if c > below else 1.0)
        lower, below = le, c
    return lower


async def delivered_at(b: Bench, nos: list[str], timeout: float = 60) -> dict[str, float]:
    """When the sandbox had the API's 2xx for each pay order's webhook (epoch seconds).

    The sandbox marks a batch of deliveries in one transaction, committed after the batch's
    last answer: a commit of ours can be seen before its delivery's mark is.
    """
    sql = (
        "SELECT pay_order_no, extract(epoch FROM delivered_at)::float8 AS delivered"
        f" FROM {b.settings.sandbox_schema}.webhook_delivery"
        " WHERE pay_order_no = ANY($1) AND delivered_at IS NOT NULL"
    )
    deadline = time.monotonic() + timeout
    while True:
        rows = await b.db.fetch(sql, nos)
        if len(rows) >= len(nos) or time.monotonic() > deadline:
            return {r["pay_order_no"]: r["delivered"] for r in rows}
        await asyncio.sleep(0.1)


async def latency_run(b: Bench, edge: Edge, n: int, rate: float) -> dict[str, Any]:
    """Orders paced at ``rate``: payment answered -> committed, and its parts."""
    tag = "lat"
    nos: list[str] = []

    async def job(i: int) -> None:
        no = await edge.checkout(b.order_no(i, tag))
        await edge.pay(no)
        nos.append(no)
        await b.commits.wait(no, timeout=120)

    before = await webhook_buckets(edge.http, edge.api_url)
    await paced(n, rate, job)
    delivered = await delivered_at(b, nos)
    after = await webhook_buckets(edge.http, edge.api_url)
    done = b.commits.succeeded
    paid = edge.paid_answered
    return {
        "orders": n,
        "rate_per_s": rate,
        "checkout_s": [edge.checkout_s[no] for no in nos],
        "paid_to_committed_s": [done[no] - paid[no] for no in nos],
        "paid_to_acknowledged_s": [delivered[no] - paid[no] for no in nos if no in delivered],
        "acknowledged_to_committed_s": [done[no] - delivered[no] for no in nos if no in delivered],
        "api_webhook_p50_s": histogram_quantile(0.5, before, after),
        "api_webhook_p99_s": histogram_quantile(0.99, before, after),
        "api_webhooks": after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0),
    }


# --- the run -----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    n, conc = args.orders, args.concurrency
    async with (
        bench_stack(
            "http_path",
            trivial_worker=True,
            workers=args.workers,
            api_processes=args.api_processes,
        ) as b,
        edge_of(b, conc) as edge,
    ):
        say("warm-up")
        await b.ceiling(100, conc, "warm-t")
        await b.skeleton(100, conc, "warm-s")
        await happy_round(b, 100, conc, "warm-d")
        await http_round(b, edge, 100, conc, "warm-h")
        await asyncio.sleep(1)  # the warm-up's last tasks and deliveries settle
        shapes = await same_shape(b, "warm-s", "warm-d")
        idle = await idle_cores(b, args.idle_s)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            runs = {
                "ceiling": lambda r=r: b.ceiling(n, conc, f"t{r}"),
                "skeleton": lambda r=r: b.skeleton(n, conc, f"s{r}"),
                "direct": lambda r=r: happy_round(b, n, conc, f"d{r}"),
                "http": lambda r=r: http_round(b, edge, n, conc, f"h{r}"),
            }
            # Every other round runs the paths in reverse order, so that a server that
            # slows down (or speeds up) through a run does not favour the paths run first.
            results = {
                path: await measured(b, n, runs[path])
                for path in (PATHS if r % 2 == 0 else tuple(reversed(PATHS)))
            }
            ceiling, skel = results["ceiling"], results["skeleton"]
            direct, via_http = results["direct"], results["http"]
            c = ceiling["per_s"]
            sandbox_s = via_http["cpu_s"].get("sandbox gateway", 0.0)
            rounds.append(
                {
                    "ceiling": ceiling,
                    "skeleton": skel,
                    "direct": direct,
                    "http": via_http,
                    "http_ratio": via_http["per_s"] / c,
                    "http_ratio_ex_sandbox": ratio_without_sandbox(
                        n, via_http["wall_s"], sandbox_s, c
                    ),
                    "direct_ratio": direct["per_s"] / c,
                    "skeleton_ratio": skel["per_s"] / c,
                    "direct_to_skeleton": direct["per_s"] / skel["per_s"],
                    "worker_to_skeleton_worker": _worker_ms(direct, "worker")
                    / _worker_ms(skel, REFERENCE_WORKER),
                    "worker_to_trivial_worker": _worker_ms(direct, "worker")
                    / _worker_ms(ceiling, REFERENCE_WORKER),
                }
            )
            say(
                f"round {r + 1}: ceiling {c:.1f}/s, skeleton {skel['per_s']:.1f}/s,"
                f" direct {direct['per_s']:.1f}/s,"
                f" HTTP {via_http['per_s']:.1f}/s; HTTP {rounds[-1]['http_ratio']:.2f} x"
                f" ({rounds[-1]['http_ratio_ex_sandbox']:.2f} x without the sandbox's CPU),"
                f" direct {rounds[-1]['direct_ratio']:.2f} x"
                f" ({rounds[-1]['direct_to_skeleton']:.2f} x the skeleton)"
            )
            for path, result in (
                ("ceiling", ceiling),
                ("skeleton", skel),
                ("direct", direct),
                ("http", via_http),
            ):
                per_order = result["cpu_ms_per_order"]
                say(
                    f"  {LABELS[path]}, ms of CPU per order: "
                    + ", ".join(
                        f"{GROUP_LABELS.get(g, g)} {per_order.get(g, 0.0):.1f}" for g in GROUPS
                    )
                )
        peak = median(r["http"]["per_s"] for r in rounds)
        lat_n = args.latency_orders or n
        say(f"latency: {lat_n} orders through HTTP at half the peak, {peak / 2:.1f}/s")
        latency = await latency_run(b, edge, lat_n, peak / 2)
        violations = await b.fund_violations()
    figures = _figures(args, rounds, latency, edge, violations)
    figures["idle_cores"] = idle
    figures["same_shape"] = shapes
    save("http_path", figures, _text(args, rounds, latency, figures))
    chart("http_path", lambda plt: _draw(plt, args, rounds))
    if violations:
        raise SystemExit(f"fund identity broken for {len(violations)} pay orders")
    return figures


def _figures(
    args: argparse.Namespace,
    rounds: list[dict[str, Any]],
    latency: dict[str, Any],
    edge: Edge,
    violations: list[str],
) -> dict[str, Any]:
    p2c = latency["paid_to_committed_s"]
    return {
        "orders": args.orders,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "api_processes": args.api_processes,
        "cores": os.cpu_count(),
        "rounds": rounds,
        "median": {
            "ceiling_per_s": median(r["ceiling"]["per_s"] for r in rounds),
            "direct_per_s": median(r["direct"]["per_s"] for r in rounds),
            "http_per_s": median(r["http"]["per_s"] for r in rounds),
            "http_ratio": median(r["http_ratio"] for r in rounds),
            "http_ratio_ex_sandbox": median(r["http_ratio_ex_sandbox"] for r in rounds),
            "direct_ratio": median(r["direct_ratio"] for r in rounds),
            "skeleton_per_s": median(r["skeleton"]["per_s"] for r in rounds),
            "skeleton_ratio": median(r["skeleton_ratio"] for r in rounds),
            "direct_to_skeleton": median(r["direct_to_skeleton"] for r in rounds),
            "worker_to_skeleton_worker": median(r["worker_to_skeleton_worker"] for r in rounds),
            "worker_to_trivial_worker": median(r["worker_to_trivial_worker"] for r in rounds),
        },
        "cpu_ms_per_order_median": {
            path: {
                g: median(r[path]["cpu_ms_per_order"].get(g, 0.0) for r in rounds) for g in GROUPS
            }
            for path in PATHS
        },
        "latency": latency,
        "paid_to_committed_p99_ms": ms(pct(p2c, 99)),
        "requests_answered_503_sent_again": edge.retries,
        "requests_dropped_sent_again": edge.resent,
        "violations": violations,
    }


def _ratio_cell(x: float) -> str:
    return f"{x:.2f}"


def _text(
    args: argparse.Namespace,
    rounds: list[dict[str, Any]],
    latency: dict[str, Any],
    figures: dict[str, Any],
) -> str:
    m = figures["median"]

    def row(name: str, r: dict[str, Any], per_s: dict[str, float], busy: bool) -> list[Any]:
        return [
            name,
            *(per_s[p] for p in PATHS),
            _ratio_cell(r["skeleton_ratio"]),
            _ratio_cell(r["direct_ratio"]),
            _ratio_cell(r["direct_to_skeleton"]),
            _ratio_cell(r["http_ratio"]),
            _ratio_cell(r["http_ratio_ex_sandbox"]),
            " / ".join(f"{r[p]['machine_busy_cores']:.2f}" for p in PATHS) if busy else "",
        ]

    rows: list[list[Any]] = [
        row(f"round {i + 1}", r, {p: r[p]["per_s"] for p in PATHS}, True)
        for i, r in enumerate(rounds)
    ]
    rows.append(
        row(
            "median",
            m,
            {
                "ceiling": m["ceiling_per_s"],
                "skeleton": m["skeleton_per_s"],
                "direct": m["direct_per_s"],
                "http": m["http_per_s"],
            },
            False,
        )
    )
    text = table(
        f"Through the HTTP edge: {args.orders:,} orders a round, {args.concurrency} in flight,"
        f" {args.workers} worker(s), {args.api_processes} API process(es)",
        [
            "",
            "ceiling /s",
            "skeleton /s",
            "direct /s",
            "HTTP /s",
            "skeleton / ceiling",
            "direct / ceiling",
            "direct / skeleton",
            "HTTP / ceiling",
            "HTTP / ceiling, sandbox CPU out",
            "machine busy cores (c / s / d / h)",
        ],
        rows,
    )
    cpu = figures["cpu_ms_per_order_median"]
    procs = rounds[-1]["http"]["processes"]
    cpu_rows: list[list[Any]] = [
        [
            GROUP_LABELS.get(g, g),
            procs.get(g, 0),
            *(cpu[p][g] for p in PATHS),
            ms(figures["idle_cores"].get(g, 0.0)),
        ]
        for g in GROUPS
    ]
    totals = {p: sum(cpu[p].values()) for p in PATHS}
    idle_total = ms(sum(figures["idle_cores"].values()))
    cpu_rows.append(["total", "", *(totals[p] for p in PATHS), idle_total])
    cpu_rows.append(
        [
            "total without the sandbox gateway",
            "",
            *(totals[p] - cpu[p]["sandbox gateway"] for p in PATHS),
            idle_total - ms(figures["idle_cores"].get("sandbox gateway", 0.0)),
        ]
    )
    text += table(
        "CPU per order (ms of CPU, median of the rounds), and idle (ms of CPU per second)",
        ["process group", "processes", *(LABELS[p] for p in PATHS), "idle, ms/s"],
        cpu_rows,
    )
    shape = figures["same_shape"]
    text += table(
        "The same shape: one pay order's history and one skeleton's, paid, in their"
        " settlement window",
        ["", "events", "bytes", "event types"],
        [
            [
                "pay order",
                len(shape["pay_order_events"]),
                shape["pay_order_bytes"],
                " ".join(shape["pay_order_events"]),
            ],
            [
                "skeleton",
                len(shape["skeleton_events"]),
                shape["skeleton_bytes"],
                "the same" if shape["same_event_types"] else " ".join(shape["skeleton_events"]),
            ],
        ],
    )
    lat_rows = [
        _lat_row(
            "checkout: POST /v1/pay-orders -> answered with its checkout", latency["checkout_s"]
        ),
        _lat_row("payment answered -> PAY_SUCCESS committed", latency["paid_to_committed_s"]),
        _lat_row(
            "payment answered -> webhook acknowledged (sandbox's clock)",
            latency["paid_to_acknowledged_s"],
        ),
        _lat_row(
            "webhook acknowledged -> PAY_SUCCESS committed", latency["acknowledged_to_committed_s"]
        ),
        [
            "API: webhook received -> answered (its /metrics histogram)",
            int(latency["api_webhooks"]),
            ms(latency["api_webhook_p50_s"]),
            ms(latency["api_webhook_p99_s"]),
            "",
        ],
    ]
    text += table(
        f"Checkout, and payment -> committed, through HTTP at half the peak"
        f" ({latency['rate_per_s']:.1f}/s)",
        ["", "orders", "p50 ms", "p99 ms", "max ms"],
        lat_rows,
    )
    text += table("Targets", ["target", "measured", ""], _targets(figures, latency))
    text += (
        f"\ncores: {figures['cores']}; requests sent again after a 503:"
        f" {figures['requests_answered_503_sent_again']}, after a dropped connection:"
        f" {figures['requests_dropped_sent_again']}; fund identity violations:"
        f" {len(figures['violations'])}\n"
    )
    return text


def _targets(figures: dict[str, Any], latency: dict[str, Any]) -> list[list[Any]]:
    m = figures["median"]
    cpu = figures["cpu_ms_per_order_median"]
    p99_ms = ms(pct(latency["paid_to_committed_s"], 99))
    checkout_p50 = ms(pct(latency["checkout_s"], 50))
    checkout_p99 = ms(pct(latency["checkout_s"], 99))

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    worker = cpu["direct"]["worker"]
    return [
        [
            "worker CPU per pay order (direct) <= 2 x the skeleton worker's"
            f" ({worker:.1f} / {cpu['skeleton'][REFERENCE_WORKER]:.1f} ms;"
            f" {m['worker_to_trivial_worker']:.1f} x the trivial worker's"
            f" {cpu['ceiling'][REFERENCE_WORKER]:.1f} ms)",
            f"{m['worker_to_skeleton_worker']:.2f} x",
            verdict(m["worker_to_skeleton_worker"] <= 2),
        ],
        [
            "direct >= 0.85 x the skeleton",
            _ratio_cell(m["direct_to_skeleton"]),
            verdict(m["direct_to_skeleton"] >= 0.85),
        ],
        [
            "direct >= 0.6 x ceiling",
            _ratio_cell(m["direct_ratio"]),
            verdict(m["direct_ratio"] >= 0.6),
        ],
        [
            "HTTP >= 0.5 x ceiling, the sandbox's CPU counted in",
            _ratio_cell(m["http_ratio"]),
            verdict(m["http_ratio"] >= 0.5),
        ],
        [
            "checkout p99 <= 150 ms at half the HTTP peak (p50 / p99)",
            f"{checkout_p50:.1f} / {checkout_p99:.1f} ms",
            verdict(checkout_p99 <= 150),
        ],
        [
            "payment answered -> committed p99 <= 100 ms at half the HTTP peak",
            f"{p99_ms:.1f} ms",
            verdict(p99_ms <= 100),
        ],
    ]


def _lat_row(name: str, xs: list[float]) -> list[Any]:
    if not xs:
        return [name, 0, "", "", ""]
    return [name, len(xs), ms(pct(xs, 50)), ms(pct(xs, 99)), ms(max(xs))]


def _draw(plt: Any, args: argparse.Namespace, rounds: list[dict[str, Any]]) -> None:
    _fig, (rates, costs) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = {"ceiling": "#9aa5b1", "skeleton": "#6c8a5a", "direct": "#2f6fdf", "http": "#e07b24"}
    xs = range(len(rounds))
    for k, path in enumerate(PATHS):
        offset = (k - 1.5) * 0.2
        rates.bar(
            [x + offset for x in xs],
            [r[path]["per_s"] for r in rounds],
            0.2,
            label=LABELS[path],
            color=colors[path],
        )
    for x, r in zip(xs, rounds, strict=True):
        rates.text(x + 0.3, r["http"]["per_s"], f"{r['http_ratio']:.2f}x", ha="center", va="bottom")
    rates.set_xticks(list(xs), [f"round {x + 1}" for x in xs])
    rates.set_ylabel("orders (workflows) per second")
    rates.set_title(f"{args.orders:,} a round, {args.concurrency} in flight, same server")
    rates.legend(loc="upper right", fontsize=8)
    bottom = [0.0] * len(PATHS)
    for g in GROUPS:
        values = [median(r[p]["cpu_ms_per_order"].get(g, 0.0) for r in rounds) for p in PATHS]
        costs.bar(list(range(len(PATHS))), values, 0.6, bottom=bottom, label=GROUP_LABELS.get(g, g))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    costs.set_xticks(list(range(len(PATHS))), [LABELS[p] for p in PATHS])
    costs.set_ylabel("ms of CPU per order")
    costs.set_title("CPU per order, by process group (median)")
    costs.legend(loc="upper left", fontsize=7)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="pay-order worker processes")
    p.add_argument("--api-processes", type=int, default=1, help="API processes on its port")
    p.add_argument(
        "--idle-s",
        type=float,
        default=3.0,
        help="seconds of nothing before the rounds, for each group's idle CPU",
    )
    p.add_argument(
        "--latency-orders",
        type=int,
        default=0,
        help="orders paced at half the HTTP peak for the latency figures (default: --orders)",
    )
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()

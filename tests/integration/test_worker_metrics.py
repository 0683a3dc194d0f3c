"""The worker's Prometheus endpoint: the SDK's ``temporal_*`` metrics and our ``payorders_*``
business metrics, scraped over HTTP from a worker on a Runtime with Prometheus on a free port.

A Runtime binds its port for the life of the process, so this module makes one. The module
has a database of its own: the refund gauges read the whole refund table, and other test
modules leave refunds of their own in the shared one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.runtime import Runtime
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities import reconcile as reconcile_activities
from payorders import pay_orders as api
from payorders.core import metrics
from payorders.core.domain import PayOrderStatus, RefundStatus
from payorders.core.reconcile import EXCEPTION, REPAIRED, Finding, Kind
from payorders.core.settings import Settings
from payorders.localstack import postgres as embedded
from payorders.sandbox.ledger import InProcessResources, in_process
from worker import MetricsUnavailable, build_worker, metrics_runtime

from ..conftest import Stack, assert_settled, make_settings, order_no, pay
from ..http_stack import free_port

ROOT = Path(__file__).resolve().parents[2]

COUNTERS = [
    "payorders_orders_created",
    "payorders_orders_succeeded",
    "payorders_orders_expired",
    "payorders_late_payments",
    "payorders_payments_refund_required",
    "payorders_refunds_attempted",
    "payorders_refunds_confirmed",
    "payorders_refunds_rejected",
]


@dataclass
class Endpoint:
    runtime: Runtime
    address: str

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    address = f"127.0.0.1:{free_port()}"
    yield Endpoint(metrics_runtime(address), address)


@pytest.fixture(scope="module")
async def db(pg_admin_url: str) -> str:
    return await embedded.ensure_database(pg_admin_url, f"payorders_metrics_{os.getpid()}")


@pytest.fixture(scope="module")
async def res(db: str) -> AsyncIterator[InProcessResources]:
    async with in_process(make_settings(), db) as r:
        yield r


@dataclass
class Scrape:
    text: str
    families: dict[str, Any]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        family = self.families.get(name)
        if family is None:
            return 0.0
        return sum(
            s.value
            for s in family.samples
            if s.name in (name, f"{name}_total") and labels.items() <= s.labels.items()
        )


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.get(url)
    resp.raise_for_status()
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    return Scrape(resp.text, families)


async def scrape_until(
    url: str, until: Callable[[Scrape], bool], within: float = 30, what: str = ""
) -> Scrape:
    """Scrape until ``until`` holds; an endpoint not up yet is tried again."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            got: Scrape | None = await scrape(url)
        except httpx.TransportError:
            got = None
        if got is not None and until(got):
            return got
        if asyncio.get_running_loop().time() > deadline:
            text = "no answer" if got is None else got.text
            payorders = "\n".join(ln for ln in text.splitlines() if ln.startswith("payorders_"))
            raise AssertionError(f"timed out waiting for {what}; payorders_* now:\n{payorders}")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_business_and_sdk_metrics_on_one_endpoint(
    endpoint: Endpoint, dev_env: WorkflowEnvironment, res: InProcessResources
) -> None:
    target = dev_env.client.service_client.config.target_host
    settings = make_settings(temporal_address=target)
    client = await api.connect(settings, runtime=endpoint.runtime)
    queue = {"task_queue": settings.task_queue}
    gauges = metrics.RefundGauges(endpoint.runtime.metric_meter, res.store)
    before = await scrape(endpoint.url)
    async with build_worker(client, res, task_queue=settings.task_queue):
        stack = Stack(
            env=dev_env,
            client=client,
            settings=settings,
            svc=res,
            api=api.PayOrders(client, res.store, settings),
        )
        # Paid in time.
        paid = await stack.api.start_pay_order(order_no=order_no(), amount=1999, currency="USD")
        await pay(stack, paid.pay_order_no, 1999)
        await stack.wait_view(paid.pay_order_no, lambda v: v.status is PayOrderStatus.PAY_SUCCESS)

        # Expired; its late payment's refund fails at the gateway until the fault is cleared.
        no = order_no()
        await res.sandbox.set_faults(f"po_{no}", fail_next_refunds=1_000)
        late = await stack.api.start_pay_order(
            order_no=no, amount=700, currency="USD", expires_in=timedelta(seconds=2)
        )
        await stack.wait_view(late.pay_order_no, lambda v: v.status is PayOrderStatus.PAY_EXPIRED)
        await pay(stack, late.pay_order_no, 700)
        held = await scrape_until(
            endpoint.url,
            lambda s: s.value("payorders_refunds_attempted", **queue) >= 2,
            what="a second refund attempt",
        )
        assert held.value("payorders_refunds_confirmed", **queue) == before.value(
            "payorders_refunds_confirmed", **queue
        )
        await asyncio.sleep(1)
        await gauges.refresh()
        pending = await scrape(endpoint.url)
        assert pending.value(metrics.REFUND_OLDEST_PENDING_SECONDS) >= 1.0
        assert pending.value(metrics.REFUNDS_PENDING) == 1

        await res.sandbox.clear_faults(f"po_{no}")
        await stack.wait_view(late.pay_order_no, lambda v: v.refunded_amount == 700)
        await gauges.refresh()
        after = await scrape_until(
            endpoint.url,
            lambda s: s.value("payorders_refunds_confirmed", **queue) >= 1,
            what="the refund's confirmation",
        )
        await assert_settled(
            stack,
            late.pay_order_no,
            status=PayOrderStatus.PAY_EXPIRED,
            paid=700,
            refunded=700,
            gateway_refunds=1,
        )
        view = await stack.view(late.pay_order_no)
        assert view.payments[0].refund_status is RefundStatus.SUCCEEDED

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **queue, **labels) - before.value(name, **queue, **labels)

    assert delta("payorders_orders_created") == 2
    assert delta("payorders_orders_succeeded") == 1
    assert delta("payorders_orders_expired") == 1
    assert delta("payorders_late_payments") == 1
    assert delta("payorders_payments_refund_required", reason="LATE") == 1
    assert delta("payorders_payments_refund_required") == 1
    assert delta("payorders_refunds_confirmed") == 1
    assert delta("payorders_refunds_rejected") == 0
    assert delta("payorders_refunds_attempted") >= 3  # two failed, then the one that confirmed
    # Workflow counters carry the workflow type, activity counters the activity type.
    assert delta("payorders_orders_expired", workflow_type="PayOrderWorkflow") == 1
    assert delta("payorders_refunds_confirmed", activity_type="refund_payment") == 1
    # Exposed exactly under these names: the exporter appends no _total to counters.
    for name in COUNTERS[:4] + COUNTERS[5:7]:
        assert f"# TYPE {name} counter" in after.text, name
        assert f"\n{name}{{" in after.text, name
    assert f"# TYPE {metrics.REFUND_OLDEST_PENDING_SECONDS} gauge" in after.text
    assert after.value(metrics.REFUND_OLDEST_PENDING_SECONDS) == 0
    assert after.value(metrics.REFUNDS_PENDING) == 0
    # The SDK's own metrics, for this worker's task queue, on the same endpoint.
    sdk = {n for n in after.families if n.startswith("temporal_")}
    assert "temporal_workflow_task_execution_latency" in sdk, sorted(sdk)
    assert "temporal_activity_execution_latency" in sdk, sorted(sdk)
    assert after.value("temporal_workflow_completed", **queue) == 0  # both still open (25 h)
    assert after.value("temporal_activity_execution_failed", **queue) >= 2


async def test_the_gauge_task_outlives_a_database_outage(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    class FlakyStore:
        calls = 0

        async def pending_refunds(self) -> tuple[int, float]:
            self.calls += 1
            if self.calls <= 2:
                raise ConnectionRefusedError("PostgreSQL is down")
            return 3, 42.5

    gauges = metrics.RefundGauges(endpoint.runtime.metric_meter, FlakyStore())  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="payorders.core.metrics"):
        task = asyncio.create_task(gauges.refresh_forever(every_s=0.05))
        try:
            got = await scrape_until(
                endpoint.url,
                lambda s: s.value(metrics.REFUNDS_PENDING) == 3,
                within=10,
                what="the gauges after the outage",
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert got.value(metrics.REFUND_OLDEST_PENDING_SECONDS) == 42.5
    assert sum("refund gauges not refreshed" in r.message for r in caplog.records) == 2


@pytest.mark.slow
async def test_the_worker_process_serves_its_metrics_and_stops_cleanly(
    dev_env: WorkflowEnvironment, db: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYORDERS_", "TEMPORAL_"))}
    env.update(
        {
            "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
            "PAYORDERS_DATABASE_URL": db,
            # Required at start; nothing in this test calls the gateway.
            "PAYORDERS_GATEWAY_URL": "http://127.0.0.1:9",
            "PAYORDERS_TASK_QUEUE": f"pay-orders-metrics-{uuid.uuid4().hex[:8]}",
            "PAYORDERS_WORKER_METRICS_ADDRESS": address,
            # No scheduled reconciliation (every 5 minutes by default) during the test.
            "PAYORDERS_RECONCILE_EVERY_S": str(24 * 3600),
        }
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        queue = {"task_queue": env["PAYORDERS_TASK_QUEUE"]}
        got = await scrape_until(
            f"http://{address}/metrics",
            lambda s: (
                s.value("temporal_num_pollers", **queue) > 0
                and metrics.REFUND_OLDEST_PENDING_SECONDS in s.families
            ),
            what="the worker's pollers and refund gauges",
        )
        assert metrics.REFUNDS_PENDING in got.families
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"metrics at http://{address}/metrics" in out


async def test_reconciliation_findings_are_counted_by_kind_and_action(endpoint: Endpoint) -> None:
    env = ActivityEnvironment()
    env.metric_meter = endpoint.runtime.metric_meter
    env.info = dataclasses.replace(env.info, task_queue=f"q-{uuid.uuid4().hex[:8]}")
    queue = {"task_queue": env.info.task_queue}
    findings = [
        Finding(Kind.REFUND_MISSING, REPAIRED, "x"),
        Finding(Kind.REFUND_MISSING, REPAIRED, "y"),
        Finding(Kind.MONEY_WITHOUT_ORDER, EXCEPTION, "z"),
    ]
    env.run(reconcile_activities._count, findings)
    env.run(reconcile_activities._count, [])
    got = await scrape(endpoint.url)
    name = "payorders_reconcile_findings"
    assert got.value(name, kind="refund_missing", action="REPAIRED", **queue) == 2
    assert got.value(name, kind="money_without_order", action="EXCEPTION", **queue) == 1
    assert got.value(name, **queue) == 3


def test_a_taken_metrics_port_stops_the_worker_with_a_clear_error(endpoint: Endpoint) -> None:
    with pytest.raises(MetricsUnavailable, match="PAYORDERS_WORKER_METRICS_ADDRESS"):
        metrics_runtime(endpoint.address)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("  ", None), ("0.0.0.0:9000", "0.0.0.0:9000"), ("[::1]:9464", "[::1]:9464")],
)
def test_the_metrics_address_setting(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str | None
) -> None:
    monkeypatch.setenv("PAYORDERS_WORKER_METRICS_ADDRESS", value)
    assert Settings().worker_metrics_address == expected


@pytest.mark.parametrize("value", ["9464", "localhost:9464", ":9464", "::1:9464", "1.2.3.4:0"])
def test_a_metrics_address_that_cannot_be_bound_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("PAYORDERS_WORKER_METRICS_ADDRESS", value)
    with pytest.raises(ValueError, match="IP:port"):
        Settings()

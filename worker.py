"""The pay-order worker: both workflows and all activities on one task queue.

Configuration comes from the environment (``PAYORDERS_*``, ``TEMPORAL_ADDRESS``,
``TEMPORAL_NAMESPACE``). Migrations run at start, under an advisory lock. With
``PAYORDERS_ORDER_EVENTS_URL`` set, the order-events relay runs beside the workers. Prometheus
metrics, the SDK's and ours, at ``http://$PAYORDERS_WORKER_METRICS_ADDRESS/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import TypedDict

import asyncpg
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    PollerBehavior,
    PollerBehaviorSimpleMaximum,
    UnsandboxedWorkflowRunner,
    Worker,
    WorkflowRunner,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.pay_order import PayOrderActivities
from activities.reconcile import ReconcileActivities
from payorders import logs
from payorders import pay_orders as api
from payorders.core.metrics import RefundGauges
from payorders.core.reconcile import ReconcileStore
from payorders.core.settings import Settings
from payorders.gateways.factory import GatewayNotConfigured
from payorders.localstack import postgres as embedded
from payorders.runtime import Resources, open_resources, settings_or_exit
from payorders.service import relay as order_events
from workflows.late_refund import LateRefundWorkflow
from workflows.merchant_refund import MerchantRefundWorkflow
from workflows.operator_refund import OperatorRefundWorkflow
from workflows.pay_order import PayOrderWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.redrive import RedriveWorkflow

log = logging.getLogger("payorders.worker")


class WorkerTuning(TypedDict):
    """The ``Worker`` arguments that decide how fast a worker runs workflows."""

    workflow_runner: WorkflowRunner
    workflow_task_poller_behavior: PollerBehavior
    activity_task_poller_behavior: PollerBehavior
    max_cached_workflows: int


def worker_tuning(settings: Settings) -> WorkerTuning:
    """The runner, pollers and cache of the pay-order worker, from ``settings``.

    One function for the product's worker and the benchmarks' trivial-workflow worker
    (``bench/_trivial_worker.py``), so the ceiling they are compared with cannot run with
    other settings than the product.
    """
    return WorkerTuning(
        # The sandbox re-creates each workflow's modules and guards every call: about 10 ms
        # of worker CPU per pay order (bench/README.md). Tests run with it, so a
        # non-deterministic call fails CI; deployments may turn it off for throughput.
        workflow_runner=SandboxedWorkflowRunner()
        if settings.workflow_sandbox
        else UnsandboxedWorkflowRunner(),
        workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(
            settings.worker_workflow_task_pollers
        ),
        activity_task_poller_behavior=PollerBehaviorSimpleMaximum(
            settings.worker_activity_task_pollers
        ),
        max_cached_workflows=settings.worker_max_cached_workflows,
    )


def build_worker(client: Client, res: Resources, *, task_queue: str) -> Worker:
    acts = PayOrderActivities(
        res.store,
        res.gateway,
        refund_alert_after_attempts=res.settings.refund_alert_after_attempts,
    )
    recon = ReconcileActivities(ReconcileStore(res.pool), res.store, res.gateway, res.settings)
    return Worker(
        client,
        task_queue=task_queue,
        **worker_tuning(res.settings),
        workflows=[
            PayOrderWorkflow,
            LateRefundWorkflow,
            ReconcileWorkflow,
            RedriveWorkflow,
            OperatorRefundWorkflow,
            MerchantRefundWorkflow,
        ],
        activities=[
            acts.create_pay_order,
            acts.get_pay_order_row,
            acts.record_payment,
            acts.expire_pay_order,
            acts.open_trade,
            acts.close_trade,
            acts.refund_payment,
            acts.refund_operator_payment,
            acts.refund_merchant,
            recon.start,
            recon.page,
            recon.statement,
            recon.finish,
        ],
    )


class MetricsUnavailable(RuntimeError):
    """The metrics endpoint cannot be served at the configured address."""


def metrics_runtime(address: str) -> Runtime:
    """An SDK runtime whose meter serves Prometheus at ``http://{address}/metrics``: the
    SDK's own metrics (``temporal_*``) and ours (``payorders_*``), on one endpoint.

    The port is bound here, once per process (a second runtime on it fails).
    """
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))
    except ValueError as e:  # e.g. "Failed starting Prometheus exporter: Address in use"
        raise MetricsUnavailable(
            f"cannot serve metrics at {address} ({e}): set PAYORDERS_WORKER_METRICS_ADDRESS"
            " to a free IP:port, or to empty for no endpoint"
        ) from e


async def run(settings: Settings) -> None:
    runtime: Runtime | None = None
    if settings.worker_metrics_address is not None:
        runtime = metrics_runtime(settings.worker_metrics_address)
        log.info("metrics at http://%s/metrics", settings.worker_metrics_address)
    else:
        log.info("no metrics endpoint (PAYORDERS_WORKER_METRICS_ADDRESS is empty)")
    keep: object = None
    database_url = settings.database_url
    if database_url is None:
        # No database given: run on an embedded PostgreSQL in the data directory.
        keep, admin_url = embedded.start_postgres(settings.data_dir, keep_running=True)
        database_url = await embedded.ensure_database(admin_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await _wait_for_database(database_url, stop)
    async with open_resources(settings, database_url) as res:
        client = await api.connect(settings, runtime=runtime)
        await api.ensure_reconcile_schedule(client, settings)
        worker = build_worker(client, res, task_queue=settings.task_queue)
        log.info("worker on task queue %s at %s", settings.task_queue, settings.temporal_address)
        async with worker:
            gauges: asyncio.Task[None] | None = None
            if runtime is not None:
                refunds = RefundGauges(runtime.metric_meter, res.store)
                gauges = asyncio.create_task(refunds.refresh_forever())
            relay: asyncio.Task[None] | None = None
            if settings.order_events_url is not None:
                # One relay per worker replica; they share the queue without breaking order.
                meter = runtime.metric_meter if runtime is not None else None
                relay = asyncio.create_task(
                    order_events.run_relay(settings, database_url, stop, meter=meter)
                )
            try:
                await stop.wait()
                log.info("stopping: finishing the tasks in hand")
            finally:
                if gauges is not None:
                    gauges.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await gauges
                if relay is not None:
                    await relay
    del keep


async def _wait_for_database(url: str, stop: asyncio.Event, within_s: float = 120) -> None:
    """A worker started while PostgreSQL restarts waits for it instead of exiting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not stop.is_set():
        try:
            conn = await asyncpg.connect(url, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as e:
            if loop.time() > deadline:
                raise
            log.warning("waiting for PostgreSQL: %s", e)
            await asyncio.sleep(1)
            continue
        await conn.close()
        return


def main() -> None:
    logs.configure(logging.INFO)
    settings = settings_or_exit("worker")
    try:
        asyncio.run(run(settings))
    except GatewayNotConfigured as e:
        log.error("cannot start: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()

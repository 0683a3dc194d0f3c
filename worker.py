"""The pay-order worker: both workflows and all activities on one task queue.

Configuration comes from the environment (``PAYORDERS_*``, ``TEMPORAL_ADDRESS``,
``TEMPORAL_NAMESPACE``). Migrations run at start, under an advisory lock.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import asyncpg
from temporalio.client import Client
from temporalio.worker import Worker

from activities.pay_order import PayOrderActivities
from activities.reconcile import ReconcileActivities
from payorders import api, embedded
from payorders.reconcile import ReconcileStore
from payorders.runtime import Resources, open_resources
from payorders.settings import Settings
from workflows.late_refund import LateRefundWorkflow
from workflows.pay_order import PayOrderWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.redrive import RedriveWorkflow

log = logging.getLogger("payorders.worker")


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
        workflows=[PayOrderWorkflow, LateRefundWorkflow, ReconcileWorkflow, RedriveWorkflow],
        activities=[
            acts.create_pay_order,
            acts.get_pay_order_row,
            acts.record_payment,
            acts.expire_pay_order,
            acts.close_trade,
            acts.refund_payment,
            recon.start,
            recon.page,
            recon.statement,
            recon.finish,
        ],
    )


async def run(settings: Settings) -> None:
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
        client = await api.connect(settings)
        await api.ensure_reconcile_schedule(client, settings)
        worker = build_worker(client, res, task_queue=settings.task_queue)
        log.info("worker on task queue %s at %s", settings.task_queue, settings.temporal_address)
        async with worker:
            await stop.wait()
            log.info("stopping: finishing the tasks in hand")
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(Settings()))


if __name__ == "__main__":
    main()

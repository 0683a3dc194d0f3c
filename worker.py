"""The pay-order worker: both workflows and all activities on one task queue.

Configuration comes from the environment (``PAYORDERS_*``, ``TEMPORAL_ADDRESS``,
``TEMPORAL_NAMESPACE``). Migrations run at start, under an advisory lock.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from temporalio.client import Client
from temporalio.worker import Worker

from activities.pay_order import PayOrderActivities
from payorders import api, embedded, store
from payorders.sandbox_gateway import SandboxGateway, TimeoutClient
from payorders.settings import Settings
from workflows.late_refund import LateRefundWorkflow
from workflows.pay_order import PayOrderWorkflow

log = logging.getLogger("payorders.worker")


@dataclass
class Services:
    """What a worker (or a test, or the CLI) needs, built from one settings object."""

    settings: Settings
    pool: asyncpg.Pool
    store: store.PayOrderStore
    sandbox: SandboxGateway
    activities: PayOrderActivities


@asynccontextmanager
async def services(settings: Settings, database_url: str) -> AsyncIterator[Services]:
    pool = await store.create_pool(
        database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
    )
    try:
        await store.migrate(pool)
        sandbox = SandboxGateway(
            pool,
            schema=settings.sandbox_schema,
            server_timeout_s=settings.gateway_server_timeout_ms / 1000,
        )
        await sandbox.install()
        pay_store = store.PayOrderStore(pool)
        gateway = TimeoutClient(sandbox, client_timeout_s=settings.gateway_client_timeout_ms / 1000)
        yield Services(
            settings=settings,
            pool=pool,
            store=pay_store,
            sandbox=sandbox,
            activities=PayOrderActivities(
                pay_store,
                gateway,
                refund_alert_after_attempts=settings.refund_alert_after_attempts,
            ),
        )
    finally:
        await pool.close()


def build_worker(client: Client, acts: PayOrderActivities, *, task_queue: str) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[PayOrderWorkflow, LateRefundWorkflow],
        activities=[
            acts.create_pay_order,
            acts.record_payment,
            acts.expire_pay_order,
            acts.close_trade,
            acts.refund_payment,
        ],
    )


async def run(settings: Settings) -> None:
    keep: object = None
    database_url = settings.database_url
    if database_url is None:
        keep, admin_url = embedded.start_postgres(settings.data_dir, keep_running=True)
        database_url = await embedded.ensure_database(admin_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with services(settings, database_url) as svc:
        client = await api.connect(settings)
        worker = build_worker(client, svc.activities, task_queue=settings.task_queue)
        log.info("worker on task queue %s at %s", settings.task_queue, settings.temporal_address)
        async with worker:
            await stop.wait()
    del keep


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(Settings()))


if __name__ == "__main__":
    main()

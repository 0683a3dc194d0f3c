"""The ceiling's worker, in its own process like the pay-order worker, with the same
poller settings (``PAYORDERS_WORKER_WORKFLOW_TASK_POLLERS``)."""

from __future__ import annotations

import asyncio
import signal
import sys

from temporalio.client import Client
from temporalio.worker import PollerBehaviorSimpleMaximum, Worker

from bench._harness import TRIVIAL_QUEUE, TrivialWorkflow
from payorders.core.settings import Settings


async def main(address: str) -> None:
    settings = Settings()
    client = await Client.connect(address, namespace=settings.temporal_namespace)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with Worker(
        client,
        task_queue=TRIVIAL_QUEUE,
        workflows=[TrivialWorkflow],
        workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(
            settings.worker_workflow_task_pollers
        ),
        max_cached_workflows=settings.worker_max_cached_workflows,
    ):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

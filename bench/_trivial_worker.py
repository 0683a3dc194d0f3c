"""The engine's references, each with its worker in one process of their own like the
pay-order worker and tuned by the same function (``worker.worker_tuning``): the same
workflow runner (sandboxed or not, by ``PAYORDERS_WORKFLOW_SANDBOX``), pollers and cache.

- the ceiling: a workflow that does nothing (``BenchTrivialWorkflow``);
- the same-shape skeleton (``bench/_skeleton.py``): a pay order's Temporal shape on the
  happy path with empty activities.

The workflows live in small modules, and everything else comes in through the sandbox's
pass-through block, as in ``workflows/``: a sandboxed run re-imports the workflow's module
alone, as a sandboxed pay order re-imports its workflow module, not the benchmark harness.

    python -m bench._trivial_worker    (settings from the environment, as the worker's)
"""

from __future__ import annotations

import asyncio
import signal

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from temporalio.client import Client
    from temporalio.worker import Worker

    from bench import _skeleton as skeleton
    from payorders import pay_orders
    from payorders.core.settings import Settings
    from worker import worker_tuning

TRIVIAL_QUEUE = "bench-trivial"


@workflow.defn(name="BenchTrivialWorkflow")
class TrivialWorkflow:
    """A workflow that returns its argument, so what it costs is the engine's alone."""

    @workflow.run
    async def run(self, n: int) -> int:
        return n


def build_trivial_worker(client: Client, settings: Settings) -> Worker:
    """The ceiling's worker, with the pay-order worker's tuning from the same settings."""
    return Worker(
        client,
        task_queue=TRIVIAL_QUEUE,
        workflows=[TrivialWorkflow],
        **worker_tuning(settings),
    )


def build_skeleton_worker(client: Client, settings: Settings) -> Worker:
    """The skeleton's worker: its workflow, its activities (empty) and the pay-order
    worker's tuning from the same settings."""
    return Worker(
        client,
        task_queue=skeleton.SKELETON_QUEUE,
        workflows=[skeleton.SkeletonWorkflow],
        activities=[
            skeleton.create_pay_order,
            skeleton.open_trade,
            skeleton.Recorder().record_payment,
            *skeleton.REGULAR,
        ],
        **worker_tuning(settings),
    )


async def main() -> None:
    settings = Settings()
    # The product's client (its data converter), as the pay-order worker connects.
    client = await pay_orders.connect(settings)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with build_trivial_worker(client, settings), build_skeleton_worker(client, settings):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())

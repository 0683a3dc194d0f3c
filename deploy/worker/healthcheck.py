"""Container healthcheck of a worker: is this container's worker polling its task queue?

Healthy when the Temporal server has seen, within ``FRESH``, a workflow-task poller on
the configured task queue whose identity names this host. The SDK's default worker
identity is ``{pid}@{hostname}`` and a container's hostname is its own, so another
replica's poller does not count. Configuration is the worker's own: the same settings
object, read from the same environment.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from datetime import UTC, datetime, timedelta

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from payorders import pay_orders as api
from payorders.core.settings import Settings

# A long poll waits up to about a minute before the worker polls again, so the freshest
# poll of a live worker is at most that old; two minutes leaves room without hiding a
# worker that has lost its connection for long.
FRESH = timedelta(minutes=2)


async def polling(settings: Settings) -> bool:
    client = await api.connect(settings)
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=settings.temporal_namespace,
            task_queue=TaskQueue(name=settings.task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        ),
        timeout=timedelta(seconds=5),
    )
    me = f"@{socket.gethostname()}"
    now = datetime.now(UTC)
    return any(
        poller.identity.endswith(me)
        and now - poller.last_access_time.ToDatetime(tzinfo=UTC) < FRESH
        for poller in response.pollers
    )


def main() -> int:
    try:
        ok = asyncio.run(polling(Settings()))
    except Exception as exc:  # any failure to ask is "not healthy", with the reason logged
        print(f"unhealthy: {exc!r}", file=sys.stderr)
        return 1
    if not ok:
        print("unhealthy: no recent poller from this host on the task queue", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the SDK's Rust threads can abort it after a client call
    # (temporalio/sdk-python#300), which would turn a healthy answer into exit 134.
    os._exit(code)

"""A whole HTTP stack inside the test process: the service API and the sandbox gateway on
real ports (uvicorn), a worker whose gateway is the HTTP client, on a real Temporal server
and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from starlette.types import ASGIApp
from temporalio.client import Client

from payorders.core.settings import Settings
from payorders.localstack.ports import free_port
from payorders.runtime import open_resources
from payorders.sandbox.app import create_sandbox_app
from payorders.service.app import create_app
from payorders.tools.http_clients import SandboxClient, ServiceClient
from worker import build_worker

from .conftest import make_settings


def payment_event(pay_order_no: str, txn_id: str, **data: Any) -> bytes:
    """The body of a ``payment.succeeded`` webhook; ``data`` overrides its fields."""
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "type": "payment.succeeded",
            "data": {
                "pay_order_no": pay_order_no,
                "txn_id": txn_id,
                "amount": 100,
                "currency": "USD",
                "paid_at": datetime.now(UTC).isoformat(),
                **data,
            },
        }
    ).encode()


ROOT = Path(__file__).resolve().parents[1]

# The stacks' API token: the deprecated PAYORDERS_API_TOKEN (one admin token named
# api-token), which is the one ServiceClient sends.
API_TOKEN = "tok-tests-admin-" + "k" * 24
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def worker_process(
    settings: Settings, temporal_address: str, db_url: str, **env: str
) -> subprocess.Popen[bytes]:
    """``worker.py`` as its own process (a test kills it), on the test's task queue and
    short timeouts; ``env`` adds ``PAYORDERS_*`` variables (the gateway's)."""
    s = settings
    return subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")],
        env={
            **os.environ,
            "TEMPORAL_ADDRESS": temporal_address,
            "PAYORDERS_DATABASE_URL": db_url,
            "PAYORDERS_TASK_QUEUE": s.task_queue,
            "PAYORDERS_GATEWAY_SERVER_TIMEOUT_MS": str(s.gateway_server_timeout_ms),
            "PAYORDERS_GATEWAY_CLIENT_TIMEOUT_MS": str(s.gateway_client_timeout_ms),
            "PAYORDERS_REFUND_RETRY_INITIAL_MS": str(s.refund_retry_initial_ms),
            "PAYORDERS_REFUND_RETRY_MAX_MS": str(s.refund_retry_max_ms),
            # Never the default 9464: tests run beside a local stack and one another.
            "PAYORDERS_WORKER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
            # The worker (re)creates the reconciliation Schedule, by default every 5 minutes
            # on the clock's 5-minute marks. A run that met a killed refund would confirm it
            # from the gateway's statement, correctly, before the restarted worker replays
            # it: these tests are about the replay, so no run comes during them.
            "PAYORDERS_RECONCILE_EVERY_S": str(24 * 3600),
            **env,
        },
        cwd=ROOT,
    )


@asynccontextmanager
async def serve(app: ASGIApp, port: int = 0) -> AsyncIterator[uvicorn.Server]:
    """``app`` under uvicorn on 127.0.0.1 (``port`` 0: a free one), as an asyncio task."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """``app`` on a free port of 127.0.0.1; yields its base URL."""
    async with serve(app) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"


@dataclass
class HttpStack:
    settings: Settings
    service: ServiceClient
    gateway: SandboxClient
    pool: asyncpg.Pool
    schema: str

    async def wait_order(
        self, pay_order_no: str, until: Callable[[dict[str, Any]], bool], within: float = 60
    ) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            order = await self.service.get(pay_order_no)
            if until(order):
                return order
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out; last: {order}")
            await asyncio.sleep(0.1)

    async def counts(self, *, timers: bool = True) -> dict[str, int]:
        """Every row that a request could have written, ours and the gateway's.

        ``timers=False`` leaves out the tables that an expiry writes to by itself (the
        outbox and the gateway's closed trades), for runs where orders expire meanwhile.
        """
        tables = ["pay_order", "payment", "refund", "webhook_event"]
        tables += [f"{self.schema}.{t}" for t in ("capture", "refund")]
        if timers:
            tables += ["outbox", f"{self.schema}.trade"]
        async with self.pool.acquire() as conn:
            return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


@asynccontextmanager
async def http_stack(
    client: Client, temporal_address: str, db_url: str, **overrides: Any
) -> AsyncIterator[HttpStack]:
    api_port, gateway_port = free_port(), free_port()
    schema = f"sbx_{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "temporal_address": temporal_address,
        "database_url": db_url,
        "api_url": f"http://127.0.0.1:{api_port}",
        "gateway_url": f"http://127.0.0.1:{gateway_port}",
        "webhook_url": f"http://127.0.0.1:{api_port}/v1/webhooks/gateway",
        "sandbox_schema": schema,
        "api_token": API_TOKEN,
        "webhook_secrets": ["whsec_test_new", "whsec_test_old"],
        "sandbox_webhook_retry_initial_ms": 200,
        "settlement_window_s": 2,
    }
    values.update(overrides)
    settings = make_settings(**values)
    async with AsyncExitStack() as stack:
        res = await stack.enter_async_context(open_resources(settings, db_url))
        await stack.enter_async_context(serve(create_sandbox_app(settings), gateway_port))
        await stack.enter_async_context(serve(create_app(settings), api_port))
        await stack.enter_async_context(build_worker(client, res, task_queue=settings.task_queue))
        service, gateway = ServiceClient(settings), SandboxClient(settings)
        stack.push_async_callback(service.aclose)
        stack.push_async_callback(gateway.aclose)
        yield HttpStack(
            settings=settings, service=service, gateway=gateway, pool=res.pool, schema=schema
        )

"""While Temporal is down the webhook adapter answers 503, so the gateway retries; once
Temporal is back the retry lands and the order settles. Temporal here is a file-backed
dev server of this test's own, so it can be stopped and started again."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from payorders.core import search_attributes as sa
from payorders.localstack.binaries import find_binary

from ..http_stack import free_port, http_stack

pytestmark = pytest.mark.slow


class TemporalServer:
    def __init__(self, db: Path, port: int) -> None:
        self.db = db
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        args = [
            find_binary("temporal"),
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db-filename",
            str(self.db),
            "--log-level",
            "error",
        ]
        for key in sa.ALL:
            kind = "Keyword" if key.indexed_value_type.name == "KEYWORD" else "Datetime"
            args += ["--search-attribute", f"{key.name}={kind}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                await Client.connect(self.address)
                return
            except RuntimeError:
                await asyncio.sleep(0.1)
        raise AssertionError("temporal did not start")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)


@pytest.fixture
def temporal_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="payorders-temporal-") as d:
        yield Path(d)


@pytest.fixture
async def temporal(temporal_dir: Path) -> AsyncIterator[TemporalServer]:
    server = TemporalServer(temporal_dir / "temporal.db", free_port())
    await server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


async def test_the_api_answers_503_while_temporal_is_down_and_the_gateway_retry_lands(
    temporal: TemporalServer, db_url: str
) -> None:
    client = await Client.connect(temporal.address, data_converter=pydantic_data_converter)
    async with http_stack(client, temporal.address, db_url) as web:
        doc = await web.service.create(order_no="outage-1", amount=250, currency="USD")
        no = doc["pay_order_no"]
        await web.wait_order(no, lambda o: o["workflow_status"] == "RUNNING")

        temporal.stop()
        async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["temporal"] != "ok"
        await web.gateway.pay(pay_order_no=no, amount=250, currency="USD")
        delivery = f"SELECT attempts, last_status, delivered_at FROM {web.schema}.webhook_delivery"
        async with web.pool.acquire() as conn:
            for _ in range(200):
                row = await conn.fetchrow(f"{delivery} WHERE pay_order_no = $1", no)
                if row is not None and row["attempts"] >= 1:
                    break
                await asyncio.sleep(0.1)
        assert row is not None and row["last_status"] == 503 and row["delivered_at"] is None
        order = await web.service.get(no)
        assert order["status"] == "PAYING" and order["payments"] == []

        await temporal.start()
        order = await web.wait_order(no, lambda o: o["status"] == "PAY_SUCCESS", within=90)
        assert order["fund_identity"]["holds"]
        async with web.pool.acquire() as conn:
            row = await conn.fetchrow(f"{delivery} WHERE pay_order_no = $1", no)
        assert row is not None and row["delivered_at"] is not None and row["attempts"] >= 2

"""The CLI's HTTP clients against a bare socket server that drops connections on purpose:
a connection dropped before any answer is sent again with the same body (every call is
idempotent), at most a few times; a slow answer is not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import pytest
import uvicorn

from payorders.core.settings import Settings
from payorders.gateways.http_sandbox import POOL_LIMITS
from payorders.tools.http_clients import (
    RESEND_ATTEMPTS,
    SandboxClient,
    ServiceClient,
    Unreachable,
)


@dataclass
class DroppingServer:
    """Reads each request whole, then drops the first ``drop`` connections unanswered and
    answers the rest with ``{"status": "PAYING"}``, or only after ``delay_s``."""

    drop: int
    delay_s: float = 0.0
    bodies: list[bytes] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.bodies.append(await reader.readexactly(length))
        if len(self.bodies) <= self.drop:
            writer.close()
            return
        await asyncio.sleep(self.delay_s)
        body = b'{"status": "PAYING"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()


@asynccontextmanager
async def serving(server: DroppingServer) -> AsyncIterator[DroppingServer]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        srv.close()
        await srv.wait_closed()


def test_clients_drop_idle_connections_before_uvicorn_closes_them() -> None:
    assert POOL_LIMITS.keepalive_expiry is not None
    assert POOL_LIMITS.keepalive_expiry < uvicorn.Config(app=None).timeout_keep_alive


def settings(url: str) -> Settings:
    return Settings(api_url=url, gateway_url=url)


async def test_a_dropped_connection_is_sent_again_and_answered() -> None:
    async with serving(DroppingServer(drop=RESEND_ATTEMPTS - 1)) as server:
        client = ServiceClient(settings(server.url))
        try:
            assert await client.get("po_1") == {"status": "PAYING"}
        finally:
            await client.aclose()
    assert len(server.bodies) == RESEND_ATTEMPTS


async def test_a_payment_sent_again_carries_the_same_txn_id() -> None:
    async with serving(DroppingServer(drop=1)) as server:
        client = SandboxClient(settings(server.url))
        try:
            await client.pay(pay_order_no="po_1", amount=100, currency="USD")
        finally:
            await client.aclose()
    first, second = (json.loads(b) for b in server.bodies)
    assert first == second
    assert first["txn_id"].startswith("txn_")


async def test_a_webhook_sent_again_is_the_same_event() -> None:
    async with serving(DroppingServer(drop=1)) as server:
        client = ServiceClient(settings(server.url))
        try:
            await client.send_webhook(
                pay_order_no="po_1",
                txn_id="txn_1",
                amount=100,
                currency="USD",
                paid_at=datetime.now(UTC),
            )
        finally:
            await client.aclose()
    assert len(server.bodies) == 2 and server.bodies[0] == server.bodies[1]


async def test_a_connection_dropped_every_time_is_reported_unreachable() -> None:
    async with serving(DroppingServer(drop=RESEND_ATTEMPTS)) as server:
        client = ServiceClient(settings(server.url))
        try:
            with pytest.raises(Unreachable, match="did not answer"):
                await client.get("po_1")
        finally:
            await client.aclose()
    assert len(server.bodies) == RESEND_ATTEMPTS


async def test_a_slow_answer_is_not_sent_again() -> None:
    async with serving(DroppingServer(drop=0, delay_s=1.0)) as server:
        client = ServiceClient(settings(server.url))
        client._http.timeout = httpx.Timeout(0.2)
        try:
            with pytest.raises(Unreachable, match="ReadTimeout"):
                await client.get("po_1")
        finally:
            await client.aclose()
    assert len(server.bodies) == 1

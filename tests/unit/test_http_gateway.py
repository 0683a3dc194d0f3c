"""The sandbox gateway's HTTP adapter against a bare socket server that answers what each test
scripts: what it sends (the idempotency key, the statement's window), and how every
transport outcome maps to the port's errors. A timeout or a connection dropped after the
request was sent is ambiguous (the gateway may have done it), a refused connection is
unavailable, a 4xx is a refusal, and nothing is ever sent twice by the client itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
import uvicorn

from payorders.core.domain import RefundStatus
from payorders.gateways.http_sandbox import KEEPALIVE_EXPIRY_S, HttpGateway
from payorders.gateways.port import (
    PROCESSING_HEADER,
    GatewayAmbiguous,
    GatewayRejected,
    GatewayUnavailable,
    RefundRequest,
)

REFUND_DOC = {
    "id": "rf_1",
    "idempotency_key": "key-1",
    "txn_id": "txn_1",
    "amount": 700,
    "currency": "USD",
    "status": "succeeded",
    "created_at": "2026-12-07T10:00:00+00:00",
}
REQUEST = RefundRequest(
    idempotency_key="key-1", pay_order_no="po_1", txn_id="txn_1", amount=700, currency="USD"
)


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


Reply = Callable[[Request], Awaitable[bytes | None]]


@dataclass
class ScriptedServer:
    """Reads each request whole, then writes what ``reply`` returns (None: closes the
    connection without an answer)."""

    reply: Reply
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                line, *lines = head.decode().split("\r\n")
                method, target, _ = line.split(" ")
                headers = {}
                for h in lines:
                    if h:
                        name, _, value = h.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                request = Request(method, target, headers, body)
                self.requests.append(request)
                answer = await self.reply(request)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()


def answer(status: int, doc: object, *, processing_ms: str | None = None) -> bytes:
    body = json.dumps(doc).encode()
    extra = f"{PROCESSING_HEADER}: {processing_ms}\r\n" if processing_ms else ""
    return (
        f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def always(data: bytes | None, *, delay_s: float = 0.0) -> Reply:
    async def reply(_: Request) -> bytes | None:
        await asyncio.sleep(delay_s)
        return data

    return reply


@asynccontextmanager
async def gateway(
    reply: Reply, *, timeout_s: float = 5.0
) -> AsyncIterator[tuple[HttpGateway, ScriptedServer]]:
    server = ScriptedServer(reply)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/"
    gw = HttpGateway(server.url, client_timeout_s=timeout_s)
    try:
        yield gw, server
    finally:
        await gw.aclose()
        srv.close()
        await srv.wait_closed()


def test_the_adapter_drops_idle_connections_before_uvicorn_closes_them() -> None:
    assert uvicorn.Config(app=None).timeout_keep_alive > KEEPALIVE_EXPIRY_S


async def test_a_refund_carries_its_key_and_body_and_reads_the_answer() -> None:
    async with gateway(always(answer(200, REFUND_DOC, processing_ms="3.5"))) as (gw, server):
        refund = await gw.refund(REQUEST)
        again = await gw.refund(REQUEST)  # the same kept-alive connection
    assert refund == again
    assert (refund.gateway_refund_id, refund.amount, refund.status) == (
        "rf_1",
        700,
        RefundStatus.SUCCEEDED,
    )
    first = server.requests[0]
    assert (first.method, first.target) == ("POST", "/v1/refunds")
    assert first.headers["idempotency-key"] == "key-1"
    assert first.headers["content-type"] == "application/json"
    assert json.loads(first.body) == {
        "pay_order_no": "po_1",
        "txn_id": "txn_1",
        "amount": 700,
        "currency": "USD",
    }


async def test_the_statement_window_reaches_the_gateway_intact() -> None:
    start = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    end = datetime(2026, 12, 7, 11, 0, 0, 500000, tzinfo=UTC)
    doc = {"captures": [], "refunds": [REFUND_DOC]}
    async with gateway(always(answer(200, doc))) as (gw, server):
        statement = await gw.statement(start, end)
    assert [r.idempotency_key for r in statement.refunds] == ["key-1"]
    query = parse_qs(urlsplit(server.requests[0].target).query)
    # "+00:00" must not arrive as " 00:00".
    assert query == {"start": [start.isoformat()], "end": [end.isoformat()]}


async def test_not_found_is_none_where_the_port_allows_it() -> None:
    async with gateway(always(answer(404, {"error": {"code": "not_found"}}))) as (gw, _):
        assert await gw.query_capture("txn_1") is None
        assert await gw.query_refund("key-1", "txn_1") is None
        assert await gw.refunds_of("txn_1") == []


async def test_a_4xx_is_a_refusal_with_the_gateways_message() -> None:
    doc = {"error": {"code": "invalid", "message": "amount exceeds the capture"}}
    async with gateway(always(answer(400, doc))) as (gw, _):
        with pytest.raises(GatewayRejected, match="amount exceeds the capture"):
            await gw.refund(REQUEST)


@pytest.mark.parametrize(
    ("status", "doc", "error"),
    [
        (503, {"error": {"code": "unavailable", "message": "down"}}, GatewayUnavailable),
        (503, {"error": {"code": "overloaded"}}, GatewayAmbiguous),
        (500, {}, GatewayAmbiguous),
        (502, "not json at all", GatewayAmbiguous),
    ],
)
async def test_5xx_is_ambiguous_unless_the_gateway_says_it_did_nothing(
    status: int, doc: object, error: type[Exception]
) -> None:
    async with gateway(always(answer(status, doc))) as (gw, server):
        with pytest.raises(error):
            await gw.refund(REQUEST)
    assert len(server.requests) == 1


async def test_no_answer_in_time_is_ambiguous_and_not_sent_again() -> None:
    async with gateway(always(answer(200, REFUND_DOC), delay_s=2.0), timeout_s=0.3) as (
        gw,
        server,
    ):
        with pytest.raises(GatewayAmbiguous, match="outcome unknown") as caught:
            await gw.refund(REQUEST)
    assert caught.value.observed_ms >= 300
    assert len(server.requests) == 1


async def test_a_connection_dropped_after_the_request_is_ambiguous_and_not_sent_again() -> None:
    async with gateway(always(None)) as (gw, server):
        with pytest.raises(GatewayAmbiguous):
            await gw.refund(REQUEST)
    assert len(server.requests) == 1


async def test_an_answer_cut_short_is_ambiguous() -> None:
    cut = answer(200, REFUND_DOC)[:-10]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(cut)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    gw = HttpGateway(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", client_timeout_s=5)
    try:
        with pytest.raises(GatewayAmbiguous):
            await gw.refund(REQUEST)
    finally:
        await gw.aclose()
        srv.close()
        await srv.wait_closed()


async def test_a_refused_connection_is_unavailable() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    gw = HttpGateway(f"http://127.0.0.1:{port}", client_timeout_s=5)
    try:
        with pytest.raises(GatewayUnavailable, match="cannot connect"):
            await gw.refund(REQUEST)
    finally:
        await gw.aclose()

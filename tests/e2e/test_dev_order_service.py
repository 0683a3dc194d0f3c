"""The local stack's example order service: a paid order's event goes from the worker to it,
signed with the stack's secret, and its line reaches the console and the log file."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from payorders.localstack import stackinfo
from payorders.localstack.stack import ORDER_SERVICE_PREFIX, DevStack
from payorders.sandbox.order_service import SIGNATURE_HEADER
from payorders.service.webhook import sign_header
from payorders.tools.http_clients import ServiceClient, gateway_client

pytestmark = pytest.mark.slow

WITHIN_S = 60


async def received_by(url: str, line: str) -> dict[str, Any]:
    """What the order service received, once ``line`` is among its lines."""
    deadline = time.monotonic() + WITHIN_S
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            doc: dict[str, Any] = (await http.get(url)).raise_for_status().json()
            if line in doc["lines"]:
                return doc
            assert time.monotonic() < deadline, f"{line!r} never came: {doc}"
            await asyncio.sleep(0.2)


async def test_a_paid_orders_event_reaches_the_order_service_and_its_line_is_printed() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="payorders-orders-"))
    printed: list[str] = []
    stack = DevStack.private(tmp / "data", console=printed.append)
    try:
        await stack.start(lambda _: None)
        info = stackinfo.read(stack.data_dir)
        assert info is not None and info.order_events_url == stack.order_events_url
        port = int(stack.orders_url.rsplit(":", 1)[1])
        listening = [
            c
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        ]
        assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening

        settings = stack.client_settings()
        service = ServiceClient(settings)
        gateway = gateway_client(settings, service)
        try:
            order_no = f"shop-{uuid.uuid4().hex[:8]}"
            created = await service.create(
                order_no=order_no, amount=1999, currency="USD", expires_in_s=600
            )
            no = created["pay_order_no"]
            capture = await gateway.pay(pay_order_no=no, amount=1999, currency="USD")
        finally:
            await service.aclose()
            await gateway.aclose()

        line = f"{order_no} paid: ship"
        doc = await received_by(stack.order_events_url, line)
        [event] = [e for e in doc["events"] if e["pay_order_no"] == no]
        assert re.fullmatch(r"evt_\d{16}", event["id"]), event
        assert (event["type"], event["sequence"]) == ("pay_order.succeeded", 1)
        assert event["data"]["order_no"] == order_no
        assert (event["data"]["amount"], event["data"]["currency"]) == (1999, "USD")
        assert event["data"]["status"] == "PAY_SUCCESS"
        assert event["data"]["txn_id"] == capture["txn_id"]
        assert doc["warnings"] == []

        # On the stack's console, read as the order service's, and in its log file.
        assert f"{ORDER_SERVICE_PREFIX}{line}" in printed
        assert line in (stack.logs / "orders.log").read_text()

        # A delivery not signed with the stack's secret is refused and changes nothing.
        forged = json.dumps({**event, "id": "evt_9999999999999999", "sequence": 2}).encode()
        async with httpx.AsyncClient(timeout=5) as http:
            resp = await http.post(
                stack.order_events_url,
                content=forged,
                headers={
                    SIGNATURE_HEADER: sign_header(["evsec_not_ours"], int(time.time()), forged)
                },
            )
            assert resp.status_code == 401
            after = (await http.get(stack.order_events_url)).json()
        assert [e["id"] for e in after["events"]].count("evt_9999999999999999") == 0
    finally:
        await asyncio.to_thread(stack.stop)
        shutil.rmtree(tmp, ignore_errors=True)

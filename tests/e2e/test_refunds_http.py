"""Merchant refunds over real HTTP (``/v1/pay-orders/{no}/refunds``): a shop refunds a paid
order in parts, the same request again changes nothing, every refusal writes nothing, and
refunds racing for the last money never exceed what was captured, counted in the sandbox
gateway's own ledger. One stack for the module: the API, the sandbox gateway and a worker
on a real Temporal dev server and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from ..http_stack import AUTH, HttpStack, http_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, db_url: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, db_url) as stack:
        yield stack


@pytest.fixture
async def http(web: HttpStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=30, headers=AUTH) as c:
        yield c


def key() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


async def paid(web: HttpStack, amount: int = 1000) -> str:
    created = await web.service.create(
        order_no=f"rf-{uuid.uuid4().hex[:10]}", amount=amount, currency="USD"
    )
    no: str = created["pay_order_no"]
    await web.gateway.pay(pay_order_no=no, amount=amount, currency="USD")
    await until(lambda: web.service.get(no), lambda d: d["status"] == "PAY_SUCCESS")
    return no


async def until(read: Any, done: Any, within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while not done(doc := await read()):
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(0.1)
    return doc


async def refund(http: httpx.AsyncClient, no: str, **body: Any) -> httpx.Response:
    return await http.post(f"/v1/pay-orders/{no}/refunds", json=body)


async def rows(web: HttpStack) -> int:
    async with web.pool.acquire() as conn:
        n: int = await conn.fetchval("SELECT count(*) FROM merchant_refund")
    return n


async def test_a_shop_refunds_a_paid_order_in_parts_and_each_goes_back_once(
    web: HttpStack, http: httpx.AsyncClient
) -> None:
    no = await paid(web)
    r1 = key()
    first = await refund(http, no, refund_no=r1, amount=300, reason="returned: wrong size")
    assert first.status_code == 201, first.text
    doc = first.json()
    assert (doc["status"], doc["amount"], doc["refundable_after"]) == ("REFUNDING", 300, 700)
    assert doc["requested_by"] == "api-token" and doc["source"] == "api"
    again = await refund(http, no, refund_no=r1, amount=300, reason="returned: wrong size")
    assert again.status_code == 200 and again.json()["refund_no"] == r1
    done = await until(
        lambda: http.get(f"/v1/pay-orders/{no}/refunds/{r1}"),
        lambda resp: resp.json()["status"] != "REFUNDING",
    )
    assert done.json()["status"] == "REFUND_SUCCESS" and done.json()["gateway_refund_id"]
    details = (await http.get(f"/v1/pay-orders/{no}")).json()
    merchant = ("refunded_by_merchant", "merchant_refund_in_flight", "refundable")
    assert [details[k] for k in merchant] == [300, 0, 700]
    second = await refund(http, no, refund_no=key(), amount=700)
    assert second.status_code == 201 and second.json()["refundable_after"] == 0
    listed = await until(
        lambda: http.get(f"/v1/pay-orders/{no}/refunds"),
        lambda resp: resp.json()["in_flight"] == 0,
    )
    body = listed.json()
    assert (body["refunded_by_merchant"], body["in_flight"], body["refundable"]) == (1000, 0, 0)
    assert [r["amount"] for r in body["refunds"]] == [300, 700]
    details = (await http.get(f"/v1/pay-orders/{no}")).json()
    assert [details[k] for k in merchant] == [1000, 0, 0] and details["fund_identity"]["holds"]
    ledger = await web.gateway.ledger(no)
    assert ledger["refunded"] == 1000 and len(ledger["refunds"]) == 2


async def test_what_cannot_be_refunded_is_refused_and_nothing_is_written(
    web: HttpStack, http: httpx.AsyncClient
) -> None:
    no = await paid(web, 500)
    taken = key()
    assert (await refund(http, no, refund_no=taken, amount=100)).status_code == 201
    before = await rows(web)
    unpaid = (await web.service.create(order_no=f"rf-{uuid.uuid4().hex[:8]}", amount=10,
                                       currency="USD"))["pay_order_no"]  # fmt: skip
    cases = [
        (no, {"refund_no": key(), "amount": 401}, 422, "exceeds_refundable", "at most 400"),
        (no, {"refund_no": taken, "amount": 101}, 409, "conflict", taken),
        (unpaid, {"refund_no": key(), "amount": 5}, 409, "not_refundable", "PAYING"),
        ("po_nobody-x", {"refund_no": key(), "amount": 5}, 404, "not_found", "po_nobody-x"),
        (no, {"refund_no": key(), "amount": 0}, 422, "invalid_request", "amount"),
        (no, {"refund_no": key(), "amount": 1.5}, 422, "invalid_request", "amount"),
        (no, {"refund_no": "has space", "amount": 5}, 422, "invalid_request", "refund_no"),
        (no, {"refund_no": "x" * 49, "amount": 5}, 422, "invalid_request", "refund_no"),
        (no, {"refund_no": key(), "amount": 5, "extra": 1}, 422, "invalid_request", "extra"),
    ]
    for pay_order_no, body, status, code, says in cases:
        resp = await refund(http, pay_order_no, **body)
        assert resp.status_code == status, (body, resp.text)
        error = resp.json()["error"]
        assert error["code"] == code and says in error["message"], (body, error)
    form = await http.post(f"/v1/pay-orders/{no}/refunds", content=b"refund_no=x&amount=5")
    assert form.status_code == 415
    assert await rows(web) == before
    shown = (await http.get(f"/v1/pay-orders/{unpaid}")).json()
    assert (shown["status"], shown["refundable"]) == ("PAYING", 0)


async def test_refunds_racing_for_the_last_money_never_exceed_the_capture(
    web: HttpStack, http: httpx.AsyncClient
) -> None:
    """Two support agents and a retry with a new key, ten requests at once for 400 of 1000:
    two go out, the others are refused naming what is left; the gateway's ledger agrees."""
    no = await paid(web, 1000)
    answers = await asyncio.gather(
        *(refund(http, no, refund_no=key(), amount=400) for _ in range(10))
    )
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 201] + [422] * 8, [a.text for a in answers]
    assert all(
        "at most 200" in a.json()["error"]["message"] for a in answers if a.status_code == 422
    )
    await until(
        lambda: http.get(f"/v1/pay-orders/{no}/refunds"),
        lambda resp: resp.json()["in_flight"] == 0,
    )
    ledger = await web.gateway.ledger(no)
    assert ledger["refunded"] == 800 and len(ledger["refunds"]) == 2

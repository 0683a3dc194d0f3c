"""Merchant refunds against each gateway's own records, over real HTTP: the sandbox gateway
(its ledger) and Stripe (localstripe's refunds, through the official SDK).

- A refund made at the gateway's dashboard reaches us by its webhook (the sandbox's
  ``refund.succeeded``, Stripe's ``charge.refunded``) and is recorded once as a merchant
  refund with ``source: gateway``; the webhook of a refund we sent records nothing more.
- On Stripe a partial refund carries ``metadata.refund_no``; a refund whose answer is lost
  after Stripe refunded, and a worker killed in the middle of one, each end with one refund
  at localstripe (which ignores idempotency keys and would refund past the capture).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from payorders.localstack import postgres as embedded
from payorders.localstack.localstripe import LocalStripe

from ..http_stack import AUTH, HttpStack, http_stack, worker_process
from ..stripe_stack import API_KEY, StripeStack, signed, stripe_stack

pytestmark = pytest.mark.slow


async def until(read: Any, done: Any, within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while not done(doc := await read()):
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(0.1)
    return doc


async def refunds_of(api_url: str, no: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=api_url, headers=AUTH, timeout=30) as http:
        resp = await http.get(f"/v1/pay-orders/{no}/refunds")
        assert resp.status_code == 200, resp.text
        found: list[dict[str, Any]] = resp.json()["refunds"]
        return found


async def refund(api_url: str, no: str, refund_no: str, amount: int) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api_url, headers=AUTH, timeout=30) as http:
        return await http.post(
            f"/v1/pay-orders/{no}/refunds", json={"refund_no": refund_no, "amount": amount}
        )


def final(refunds: list[dict[str, Any]]) -> bool:
    return bool(refunds) and all(r["status"] != "REFUNDING" for r in refunds)


async def outcomes(pool: Any, txn_id: str) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT outcome FROM webhook_event WHERE txn_id = $1 ORDER BY received_at", txn_id
        )
    return [r["outcome"] for r in rows]


# --- the sandbox gateway ---------------------------------------------------------------------


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, db_url: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, db_url) as stack:
        yield stack


async def test_a_sandbox_dashboard_refund_is_recorded_once_and_ours_not_again(
    web: HttpStack,
) -> None:
    created = await web.service.create(
        order_no=f"gr-{uuid.uuid4().hex[:10]}", amount=1000, currency="USD"
    )
    no = created["pay_order_no"]
    await web.gateway.pay(pay_order_no=no, amount=1000, currency="USD")
    order = await web.wait_order(no, lambda d: d["status"] == "PAY_SUCCESS")
    txn = order["payments"][0]["txn_id"]
    async with httpx.AsyncClient(base_url=web.settings.gateway_url, timeout=30) as gw:
        resp = await gw.post("/v1/dashboard/refunds", json={"txn_id": txn, "amount": 300})
        assert resp.status_code == 201, resp.text
        dashboard = resp.json()
        # Past what is left at the gateway: refused there, nothing to record.
        assert (
            await gw.post("/v1/dashboard/refunds", json={"txn_id": txn, "amount": 701})
        ).status_code == 422
    [made] = await until(lambda: refunds_of(web.settings.api_url, no), final)
    assert (made["source"], made["amount"], made["status"]) == ("gateway", 300, "REFUND_SUCCESS")
    assert made["refund_no"] == f"gateway-{dashboard['id']}"

    ours = f"r-{uuid.uuid4().hex[:10]}"
    resp = await refund(web.settings.api_url, no, ours, 700)
    assert resp.status_code == 201, resp.text
    await until(lambda: refunds_of(web.settings.api_url, no), lambda rs: len(rs) == 2 and final(rs))
    # Our refund's webhook, and the dashboard's, both seen; ours recorded nothing more.
    seen = await until(lambda: outcomes(web.pool, txn), lambda o: "REFUND_KNOWN" in o)
    assert seen.count("REFUND_RECORDED") == 1, seen
    rows = await refunds_of(web.settings.api_url, no)
    assert sorted((r["source"], r["amount"], r["status"]) for r in rows) == [
        ("api", 700, "REFUND_SUCCESS"),
        ("gateway", 300, "REFUND_SUCCESS"),
    ]
    held = await web.gateway.ledger(no)
    assert held["refunded"] == 1000 and len(held["refunds"]) == 2
    details = await web.service.get(no)
    assert (details["refunded_amount"], details["fund_identity"]["holds"]) == (0, True)
    events = [e["event_type"] for e in await _outbox(web, no)]
    assert events == ["pay_order.succeeded", "refund.succeeded", "refund.succeeded"]


async def _outbox(web: HttpStack, no: str) -> list[dict[str, Any]]:
    async with web.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM outbox WHERE pay_order_no = $1 ORDER BY id", no)
    return [dict(r) for r in rows]


# --- Stripe, against localstripe -------------------------------------------------------------


@pytest.fixture(scope="module")
async def stripe_db(pg_admin_url: str) -> str:
    return await embedded.ensure_database(pg_admin_url, f"stripe_refunds_{os.getpid()}")


@pytest.fixture(scope="module")
async def st(
    dev_env: WorkflowEnvironment, stripe_db: str, localstripe: LocalStripe
) -> AsyncIterator[StripeStack]:
    target = dev_env.client.service_client.config.target_host
    async with stripe_stack(dev_env.client, target, stripe_db, localstripe) as stack:
        yield stack


async def paid_on_stripe(st: StripeStack, amount: int) -> tuple[str, str]:
    doc = await st.checkout(amount)
    pi = await st.pay(doc["checkout"]["payment_intent"])
    await st.wait_order(doc["pay_order_no"], lambda o: o["status"] == "PAY_SUCCESS")
    return doc["pay_order_no"], pi.id


async def wire_faults(st: StripeStack, scope: str, **armed: Any) -> None:
    async with httpx.AsyncClient(base_url=st.settings.stripe_api_base) as http:
        resp = await http.put(f"/v1/faults/{scope}", json=armed)
        assert resp.status_code == 200, resp.text


async def test_partial_refunds_on_stripe_each_once_even_when_an_answer_is_lost(
    st: StripeStack,
) -> None:
    no, pi = await paid_on_stripe(st, 1100)
    first, lost = f"r-{uuid.uuid4().hex[:10]}", f"r-{uuid.uuid4().hex[:10]}"
    assert (await refund(st.settings.api_url, no, first, 400)).status_code == 201
    await until(lambda: refunds_of(st.settings.api_url, no), final)
    # Stripe refunds, the answer never arrives: the retry finds it by its metadata.
    await wire_faults(st, no, timeout_after_success_next=1)
    assert (await refund(st.settings.api_url, no, lost, 700)).status_code == 201
    rows = await until(
        lambda: refunds_of(st.settings.api_url, no), lambda rs: len(rs) == 2 and final(rs), 90
    )
    assert {r["refund_no"]: r["status"] for r in rows} == {
        first: "REFUND_SUCCESS",
        lost: "REFUND_SUCCESS",
    }
    # Nothing is left: refused before anything is sent to Stripe.
    over = await refund(st.settings.api_url, no, f"r-{uuid.uuid4().hex[:10]}", 1)
    assert over.status_code == 422, over.text
    at_stripe = await st.refunds_of(pi)
    assert sorted((r.amount, r.status, r.metadata["refund_no"]) for r in at_stripe) == sorted(
        [(400, "succeeded", first), (700, "succeeded", lost)]
    )
    assert {r.metadata["idempotency_key"] for r in at_stripe} == {
        f"mrefund-{first}",
        f"mrefund-{lost}",
    }


def stripe_event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "type": kind,
            "created": int(time.time()),
            "data": {"object": obj},
        }
    ).encode()


async def post_stripe(st: StripeStack, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=st.settings.api_url, timeout=30) as http:
        return await http.post("/v1/webhooks/stripe", content=body, headers=signed(body))


async def test_a_stripe_dashboard_refund_is_recorded_by_its_webhook_once(
    st: StripeStack,
) -> None:
    no, pi = await paid_on_stripe(st, 900)
    # The shop's staff refund at Stripe's dashboard: no metadata of ours.
    outside = await st.stripe.v1.refunds.create_async({"payment_intent": pi, "amount": 250})
    # localstripe sends no refund webhooks; Stripe sends charge.refunded (and refund.created).
    charge = {"id": "ch_x", "object": "charge", "payment_intent": pi, "amount_refunded": 250}
    body = stripe_event("charge.refunded", charge)
    resp = await post_stripe(st, body)
    assert resp.status_code == 200 and resp.json()["outcome"] == "REFUND_RECORDED", resp.text
    again = await post_stripe(st, body)
    assert again.json()["event_duplicate"] is True
    # Another event about the same refund (refund.created) records nothing more.
    other = await post_stripe(st, stripe_event("refund.created", {**outside.to_dict()}))
    assert other.json()["outcome"] == "REFUND_KNOWN", other.text
    [made] = await refunds_of(st.settings.api_url, no)
    assert (made["source"], made["amount"], made["refund_no"]) == (
        "gateway",
        250,
        f"gateway-{outside.id}",
    )
    # Our own refund, and its webhook: recorded once, as ours.
    ours = f"r-{uuid.uuid4().hex[:10]}"
    assert (await refund(st.settings.api_url, no, ours, 650)).status_code == 201
    await until(lambda: refunds_of(st.settings.api_url, no), lambda rs: len(rs) == 2 and final(rs))
    mine = [r for r in await st.refunds_of(pi) if r.metadata.to_dict().get("refund_no") == ours]
    resp = await post_stripe(st, stripe_event("refund.created", mine[0].to_dict()))
    assert resp.json()["outcome"] == "REFUND_KNOWN", resp.text
    rows = await refunds_of(st.settings.api_url, no)
    assert sorted((r["source"], r["amount"]) for r in rows) == [("api", 650), ("gateway", 250)]
    assert sum(r.amount for r in await st.refunds_of(pi)) == 900


async def test_a_worker_killed_mid_merchant_refund_refunds_once_after_restart(
    dev_env: WorkflowEnvironment, stripe_db: str, localstripe: LocalStripe
) -> None:
    target = dev_env.client.service_client.config.target_host
    async with stripe_stack(dev_env.client, target, stripe_db, localstripe, worker=False) as own:

        def start_worker() -> subprocess.Popen[bytes]:
            return worker_process(
                own.settings,
                target,
                stripe_db,
                PAYORDERS_GATEWAY="stripe",
                PAYORDERS_STRIPE_API_KEY=API_KEY,
                PAYORDERS_STRIPE_API_BASE=own.settings.stripe_api_base,
            )

        worker = start_worker()
        try:
            no, pi = await paid_on_stripe(own, 800)
            # Stripe refunds, the proxy withholds the answer: the worker dies meanwhile.
            await wire_faults(own, no, timeout_after_success_next=1)
            refund_no = f"r-{uuid.uuid4().hex[:10]}"
            assert (await refund(own.settings.api_url, no, refund_no, 800)).status_code == 201
            await until(lambda: own.refunds_of(pi), bool, 30)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            worker = start_worker()
            [row] = await until(lambda: refunds_of(own.settings.api_url, no), final, 90)
            assert row["status"] == "REFUND_SUCCESS"
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(20)
        assert [(r.amount, r.status) for r in await own.refunds_of(pi)] == [(800, "succeeded")]

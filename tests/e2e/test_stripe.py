"""Pay orders through the Stripe adapter against localstripe: a Stripe server nobody here
wrote, which ignores idempotency keys, has no over-refund check and sends each webhook once.
Money is counted in localstripe's own records, never in our answers alone."""

from __future__ import annotations

import asyncio
import json
import logging
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

from payorders.core.models import ReconcileReport
from payorders.core.reconcile import ReconcileStore
from payorders.localstack import postgres as embedded
from payorders.localstack.localstripe import LocalStripe
from workflows.reconcile import ReconcileWorkflow

from ..http_stack import worker_process
from ..stripe_stack import API_KEY, WEBHOOK_SECRET, StripeStack, signed, stripe_stack

pytestmark = pytest.mark.slow

SUCCESS, EXPIRED = "PAY_SUCCESS", "PAY_EXPIRED"


@pytest.fixture(scope="module")
async def stripe_db(pg_admin_url: str) -> str:
    # A database of its own: reconciliation here reads every pay order against Stripe.
    return await embedded.ensure_database(pg_admin_url, f"stripe_{os.getpid()}")


@pytest.fixture
async def st(
    dev_env: WorkflowEnvironment, stripe_db: str, localstripe: LocalStripe
) -> AsyncIterator[StripeStack]:
    target = dev_env.client.service_client.config.target_host
    async with stripe_stack(dev_env.client, target, stripe_db, localstripe) as stack:
        yield stack


async def faults(st: StripeStack, scope: str, **armed: Any) -> None:
    async with httpx.AsyncClient(base_url=st.settings.stripe_api_base) as http:
        resp = await http.put(f"/v1/faults/{scope}", json=armed)
        assert resp.status_code == 200, resp.text


async def post_event(st: StripeStack, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=st.settings.api_url) as http:
        return await http.post("/v1/webhooks/stripe", content=body, headers=headers)


def event(pi: dict[str, Any], *, type: str = "payment_intent.succeeded", **top: Any) -> bytes:
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "type": type,
            "created": int(time.time()),
            "data": {"object": pi},
            **top,
        }
    ).encode()


def settled(order: dict[str, Any]) -> bool:
    return order["status"] != "PAYING" and order["fund_identity"]["in_flight"] == 0


async def test_paid_in_time_settles_once_and_a_retried_checkout_gets_the_same_intent(
    st: StripeStack,
) -> None:
    doc = await st.checkout(1999)
    checkout = doc["checkout"]
    assert checkout["gateway"] == "stripe"
    assert checkout["payment_intent"].startswith("pi_")
    assert checkout["client_secret"].startswith(checkout["payment_intent"])
    again = await st.service.create(order_no=doc["order_no"], amount=1999, currency="USD")
    assert (again["created"], again["checkout"]) == (False, checkout)
    pi = await st.intent(checkout["payment_intent"])
    assert (pi.amount, pi.currency, pi.metadata["pay_order_no"]) == (
        1999,
        "usd",
        doc["pay_order_no"],
    )
    await st.pay(checkout["payment_intent"])
    order = await st.wait_order(doc["pay_order_no"], lambda o: o["status"] == SUCCESS)
    assert (order["paid_amount"], order["refunded_amount"]) == (1999, 0)
    assert order["trade_ref"] == checkout["payment_intent"]
    assert await st.refunds_of(checkout["payment_intent"]) == []


async def test_expired_unpaid_cancels_the_payment_intent(st: StripeStack) -> None:
    doc = await st.checkout(500, expires_in_s=1)
    pi_id = doc["checkout"]["payment_intent"]
    await st.wait_order(doc["pay_order_no"], lambda o: o["status"] == EXPIRED)
    assert (await st.intent(pi_id)).status == "canceled"


async def test_paid_at_the_instant_of_expiry_the_cancel_loses_and_the_order_succeeds(
    st: StripeStack,
) -> None:
    doc = await st.checkout(700, expires_in_s=1)
    no, pi_id = doc["pay_order_no"], doc["checkout"]["payment_intent"]
    # The customer pays as expiry cancels: localstripe refuses the cancel with a bare 400,
    # and the adapter reads the PaymentIntent back to learn it was paid.
    await faults(st, no, paid_on_close_amount=700, paid_on_close_currency="USD")
    order = await st.wait_order(no, settled)
    assert (order["status"], order["paid_amount"], order["refunded_amount"]) == (SUCCESS, 700, 0)
    assert (await st.intent(pi_id)).status == "succeeded"
    assert await st.refunds_of(pi_id) == []


async def test_a_second_payment_intent_paid_for_a_paid_order_is_refunded_once(
    st: StripeStack,
) -> None:
    doc = await st.checkout(1200)
    no = doc["pay_order_no"]
    await st.pay(doc["checkout"]["payment_intent"])
    await st.wait_order(no, lambda o: o["status"] == SUCCESS)
    second = await st.other_payment(no, 1200)
    order = await st.wait_order(no, lambda o: o["refunded_amount"] == 1200 and settled(o))
    assert (order["status"], order["paid_amount"]) == (SUCCESS, 2400)
    refunds = await st.refunds_of(second.id)
    assert [(r.amount, r.status) for r in refunds] == [(1200, "succeeded")]
    assert await st.refunds_of(doc["checkout"]["payment_intent"]) == []


async def test_a_refund_whose_answer_is_lost_after_stripe_refunded_exists_once(
    st: StripeStack,
) -> None:
    doc = await st.checkout(900, expires_in_s=1)
    no = doc["pay_order_no"]
    await st.wait_order(no, lambda o: o["status"] == EXPIRED)
    # localstripe ignores Idempotency-Key: only the adapter's own look-up before a retry
    # keeps a second refund from being made.
    await faults(st, no, timeout_after_success_next=1)
    late = await st.other_payment(no, 900)
    order = await st.wait_order(no, lambda o: o["refunded_amount"] == 900 and settled(o), 90)
    assert (order["status"], order["paid_amount"]) == (EXPIRED, 900)
    refunds = await st.refunds_of(late.id)
    assert [(r.amount, r.status) for r in refunds] == [(900, "succeeded")]
    assert refunds[0].metadata["idempotency_key"] == order["payments"][0]["refund_key"]


async def test_refunds_failing_twice_then_succeed_once(st: StripeStack) -> None:
    doc = await st.checkout(300, expires_in_s=1)
    no = doc["pay_order_no"]
    await st.wait_order(no, lambda o: o["status"] == EXPIRED)
    await faults(st, no, fail_next_refunds=2)
    late = await st.other_payment(no, 300)
    order = await st.wait_order(no, lambda o: o["refunded_amount"] == 300 and settled(o))
    assert order["payments"][0]["refund_attempts"] >= 3
    assert [(r.amount, r.status) for r in await st.refunds_of(late.id)] == [(300, "succeeded")]


async def test_a_webhook_lost_while_the_api_is_down_is_repaired_by_reconciliation(
    st: StripeStack,
) -> None:
    doc = await st.checkout(1500)
    no, pi_id = doc["pay_order_no"], doc["checkout"]["payment_intent"]
    # localstripe sends each webhook once and never again: aim it at a port nobody
    # listens on while the customer pays, as if the API were down.
    await st.localstripe.register_webhook("http://127.0.0.1:9/down", WEBHOOK_SECRET)
    await st.pay(pi_id)
    await asyncio.sleep(3)  # localstripe sends about 1 s after the payment
    assert (await st.service.get(no))["status"] == "PAYING"
    report = await reconcile(st)
    findings = await ReconcileStore(st.pool).findings(report.run_id)
    mine = [(f["kind"], f["action"]) for f in findings if f["pay_order_no"] == no]
    assert mine, findings
    order = await st.wait_order(no, lambda o: o["status"] == SUCCESS)
    assert (order["paid_amount"], order["refunded_amount"]) == (1500, 0)
    assert order["payments"][0]["txn_id"] == pi_id


async def reconcile(st: StripeStack) -> ReconcileReport:
    inp = st.settings.reconcile_input()
    report: ReconcileReport = await st.client.execute_workflow(
        ReconcileWorkflow.run,
        inp,
        id=f"reconcile-stripe-{uuid.uuid4().hex[:8]}",
        task_queue=st.settings.task_queue,
    )
    return report


async def test_a_worker_killed_mid_refund_refunds_once_after_restart(
    dev_env: WorkflowEnvironment, stripe_db: str, localstripe: LocalStripe
) -> None:
    target = dev_env.client.service_client.config.target_host
    async with stripe_stack(dev_env.client, target, stripe_db, localstripe, worker=False) as st:

        def start_worker() -> subprocess.Popen[bytes]:
            return worker_process(
                st.settings,
                target,
                stripe_db,
                PAYORDERS_GATEWAY="stripe",
                PAYORDERS_STRIPE_API_KEY=API_KEY,
                PAYORDERS_STRIPE_API_BASE=st.settings.stripe_api_base,
            )

        worker = start_worker()
        try:
            doc = await st.checkout(600, expires_in_s=1)
            no = doc["pay_order_no"]
            await st.wait_order(no, lambda o: o["status"] == EXPIRED)
            # Stripe refunds, the proxy withholds the answer: the worker dies meanwhile.
            await faults(st, no, timeout_after_success_next=1)
            late = await st.other_payment(no, 600)
            for _ in range(300):
                if await st.refunds_of(late.id):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the refund never reached Stripe")
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            worker = start_worker()
            order = await st.wait_order(
                no, lambda o: o["refunded_amount"] == 600 and settled(o), 90
            )
            assert (order["status"], order["paid_amount"]) == (EXPIRED, 600)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(20)
        assert [(r.amount, r.status) for r in await st.refunds_of(late.id)] == [(600, "succeeded")]


# --- bad input: a clear 4xx (2xx for types we ignore), nothing changes -----------------------


async def paid_intent(st: StripeStack) -> tuple[dict[str, Any], Any]:
    """A pay order paid through Stripe and settled, and its PaymentIntent."""
    doc = await st.checkout(1100)
    pi = await st.pay(doc["checkout"]["payment_intent"])
    await st.wait_order(doc["pay_order_no"], lambda o: o["status"] == SUCCESS)
    return doc, pi


def intent_json(pi: Any, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = pi.to_dict()
    doc.update(changes)
    return doc


async def test_bad_stripe_webhooks_are_refused_and_change_nothing(
    st: StripeStack, caplog: pytest.LogCaptureFixture
) -> None:
    doc, pi = await paid_intent(st)
    no = doc["pay_order_no"]
    other = await st.checkout(1100)
    good = intent_json(pi)
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = []
    body = event(good)
    cases += [
        ("no signature", body, {"Content-Type": "application/json"}, 401, "missing"),
        ("another secret", body, signed(body, "whsec_not_ours"), 401, "does not match"),
        ("stale", body, signed(body, at=int(time.time()) - 3600), 401, "tolerance"),
    ]
    unknown = event(intent_json(pi, id="pi_doesnotexist000000"))
    cases.append(("unknown intent", unknown, signed(unknown), 422, "no such transaction"))
    for label, meta, status, words in (
        ("no pay order", {}, 422, "metadata.pay_order_no"),
        ("another pay order", {"pay_order_no": other["pay_order_no"]}, 422, "must match"),
        ("not a pay order", {"pay_order_no": "order-1"}, 422, "metadata.pay_order_no"),
    ):
        b = event(intent_json(pi, metadata=meta))
        cases.append((label, b, signed(b), status, words))
    for label, changes in (
        ("amount", {"amount_received": 1, "amount": 1}),
        ("currency", {"currency": "eur"}),
    ):
        b = event(intent_json(pi, **changes))
        cases.append((f"{label} differs", b, signed(b), 422, "must match"))
    not_json = b"{not json"
    cases.append(("not JSON", not_json, signed(not_json), 400, "JSON"))
    before = await st.counts()
    caplog.set_level(logging.INFO)
    async with httpx.AsyncClient(base_url=st.settings.api_url) as http:
        for label, b, headers, status, words in cases:
            resp = await http.post("/v1/webhooks/stripe", content=b, headers=headers)
            assert resp.status_code == status, (label, resp.text)
            assert words in resp.json()["error"]["message"], (label, resp.text)
    assert await st.counts() == before
    order = await st.service.get(no)
    assert (order["paid_amount"], order["refunded_amount"], len(order["payments"])) == (
        1100,
        0,
        1,
    )
    logged = caplog.text
    assert WEBHOOK_SECRET not in logged and st.settings.stripe_api_key is not None
    assert st.settings.stripe_api_key.get_secret_value() not in logged
    assert pi.client_secret not in logged


async def test_a_replayed_event_and_an_ignored_type_move_nothing(st: StripeStack) -> None:
    doc, pi = await paid_intent(st)
    body = event(intent_json(pi))
    first = await post_event(st, body, signed(body))
    assert first.status_code == 200, first.text
    assert first.json()["txn_already_recorded"] is True
    before = await st.counts()
    replay = await post_event(st, body, signed(body))
    assert (replay.status_code, replay.json()["event_duplicate"]) == (200, True)
    ignored = event(intent_json(pi), type="charge.refunded")
    resp = await post_event(st, ignored, signed(ignored))
    assert (resp.status_code, resp.json()["outcome"]) == (200, "IGNORED")
    failed = event(
        intent_json(pi, status="requires_payment_method"), type="payment_intent.payment_failed"
    )
    resp = await post_event(st, failed, signed(failed))
    assert (resp.status_code, resp.json()["outcome"]) == (200, "IGNORED")
    assert await st.counts() == before
    order = await st.service.get(doc["pay_order_no"])
    assert (order["paid_amount"], order["refunded_amount"]) == (1100, 0)

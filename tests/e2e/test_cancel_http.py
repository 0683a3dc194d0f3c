"""Checkout cancels over real HTTP (``POST /v1/pay-orders/{no}/cancel``): the sandbox
gateway's trade closed first, the reason on the row, in the event and in Temporal's
visibility; bad requests refused with nothing changed; a cancel racing a payment; and the
same through the Stripe adapter against localstripe. Real Temporal dev server, real
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from payorders.localstack import postgres as embedded
from payorders.localstack.localstripe import LocalStripe
from payorders.service.app import create_app
from payorders.tools import cli
from payorders.tools.http_clients import ServiceError

from ..conftest import make_settings
from ..http_stack import API_TOKEN, AUTH, HttpStack, free_port, http_stack, serve
from ..stripe_stack import stripe_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, db_url: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, db_url) as stack:
        yield stack


def new_order() -> str:
    return f"cx-{uuid.uuid4().hex[:10]}"


def settled(order: dict[str, Any]) -> bool:
    return order["status"] != "PAYING" and order["fund_identity"]["in_flight"] == 0


async def visible(client: Client, query: str) -> list[str]:
    """Workflow ids matching ``query``, once visibility (eventually consistent) has them."""
    for _ in range(100):
        found = [w.id async for w in client.list_workflows(query)]
        if found:
            return found
        await asyncio.sleep(0.1)
    return []


async def outbox_reasons(web: HttpStack, no: str) -> list[tuple[str, str | None]]:
    async with web.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event_type, payload FROM outbox WHERE pay_order_no = $1 ORDER BY id", no
        )
    return [(r["event_type"], json.loads(r["payload"]).get("reason")) for r in rows]


async def test_a_cancel_closes_the_trade_and_says_so_once(
    web: HttpStack, dev_env: WorkflowEnvironment
) -> None:
    doc = await web.service.create(order_no=new_order(), amount=1999, currency="USD")
    no = doc["pay_order_no"]
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=30) as http:
        first = await http.post(f"/v1/pay-orders/{no}/cancel", headers=AUTH)
        assert first.status_code == 200, first.text
        assert first.json() == {
            "pay_order_no": no,
            "status": "PAY_EXPIRED",
            "reason": "CANCELLED",
            "closed": True,
        }
        before = await web.counts()
        # A repeat, with an empty JSON object this time: the same outcome, nothing moves.
        again = await http.post(f"/v1/pay-orders/{no}/cancel", json={}, headers=AUTH)
        assert again.status_code == 200, again.text
        assert again.json() == {**first.json(), "closed": False}
    assert await web.counts() == before
    order = await web.service.get(no)
    assert (order["status"], order["reason"]) == ("PAY_EXPIRED", "CANCELLED")
    assert order["workflow"]["close_reason"] == "CANCELLED"
    assert (await web.gateway.ledger(no))["trade_state"] == "CLOSED"
    assert await outbox_reasons(web, no) == [("pay_order.expired", "CANCELLED")]
    query = f"CloseReason = 'CANCELLED' AND OrderNo = '{order['order_no']}'"
    assert await visible(dev_env.client, query) == [f"pay-order-{no}"]


async def test_a_cancel_the_gateway_answers_already_paid_succeeds(web: HttpStack) -> None:
    no = f"po_{new_order()}"
    await web.gateway.set_faults(no, paid_on_close_amount=500, paid_on_close_currency="USD")
    await web.service.create(order_no=no.removeprefix("po_"), amount=500, currency="USD")
    answer = await web.service.cancel(no)
    assert answer == {"pay_order_no": no, "status": "PAY_SUCCESS", "reason": None, "closed": True}
    order = await web.wait_order(no, settled)
    assert (order["paid_amount"], order["refunded_amount"], order["reason"]) == (500, 0, None)
    assert order["fund_identity"]["holds"]
    assert [e for e, _ in await outbox_reasons(web, no)] == ["pay_order.succeeded"]


async def test_a_cancel_after_the_expiry_keeps_the_timers_reason(web: HttpStack) -> None:
    doc = await web.service.create(order_no=new_order(), amount=50, currency="USD", expires_in_s=1)
    no = doc["pay_order_no"]
    await web.wait_order(no, lambda o: o["status"] == "PAY_EXPIRED")
    before = await web.counts()
    answer = await web.service.cancel(no)
    assert answer == {
        "pay_order_no": no,
        "status": "PAY_EXPIRED",
        "reason": "EXPIRED",
        "closed": False,
    }
    assert await web.counts() == before
    assert await outbox_reasons(web, no) == [("pay_order.expired", "EXPIRED")]


async def test_a_payment_after_the_cancel_is_refunded(web: HttpStack) -> None:
    doc = await web.service.create(order_no=new_order(), amount=800, currency="EUR")
    no = doc["pay_order_no"]
    assert (await web.service.cancel(no))["closed"] is True
    await web.gateway.pay(pay_order_no=no, amount=800, currency="EUR")
    order = await web.wait_order(no, lambda o: o["refunded_amount"] == 800)
    assert (order["status"], order["reason"], order["paid_amount"]) == (
        "PAY_EXPIRED",
        "CANCELLED",
        800,
    )
    assert order["fund_identity"]["holds"]
    [payment] = order["payments"]
    assert (payment["refund_reason"], payment["refund_status"]) == ("LATE", "SUCCEEDED")
    assert len((await web.gateway.ledger(no))["refunds"]) == 1


# When each payment starts, after its cancel: from the same instant to well after the
# cancel's close reached the gateway, so both sides win some.
DELAYS_MS = [0, 0, 20, 40, 80, 120, 160, 240, 320, 480]


async def test_a_cancel_racing_a_payment_ends_in_one_state_with_the_money_right(
    web: HttpStack,
) -> None:
    amounts = [600 + i for i in range(10)]
    docs = [
        await web.service.create(order_no=new_order(), amount=a, currency="USD") for a in amounts
    ]

    async def race(i: int, doc: dict[str, Any]) -> dict[str, Any]:
        async def pay() -> None:
            await asyncio.sleep(DELAYS_MS[i] / 1000)
            await web.gateway.pay(
                pay_order_no=doc["pay_order_no"], amount=doc["amount"], currency="USD"
            )

        answer, _ = await asyncio.gather(web.service.cancel(doc["pay_order_no"]), pay())
        return dict(answer)

    answers = await asyncio.gather(*(race(i, d) for i, d in enumerate(docs)))
    outcomes: list[str] = []
    for doc, answer in zip(docs, answers, strict=True):
        no, amount = doc["pay_order_no"], doc["amount"]
        order = await web.wait_order(no, settled)
        # The answer told the outcome that stuck.
        assert (answer["status"], answer["reason"]) == (order["status"], order["reason"])
        ledger = await web.gateway.ledger(no)
        assert ledger["captured"] == amount and order["fund_identity"]["holds"]
        if order["status"] == "PAY_SUCCESS":
            assert (order["paid_amount"], order["refunded_amount"]) == (amount, 0)
            assert ledger["refunded"] == 0
            outcomes.append("paid as the cancel closed" if answer["closed"] else "paid first")
        else:
            assert answer["closed"] and order["reason"] == "CANCELLED"
            assert (order["paid_amount"], order["refunded_amount"]) == (amount, amount)
            assert ledger["refunded"] == amount and len(ledger["refunds"]) == 1
            outcomes.append("cancelled, payment refunded")
        kinds = [e for e, _ in await outbox_reasons(web, no)]
        assert kinds.count("pay_order.succeeded") + kinds.count("pay_order.expired") == 1
    print("cancel vs payment over HTTP:", {o: outcomes.count(o) for o in sorted(set(outcomes))})


def _bad_cancels(no: str) -> list[tuple[str, str, dict[str, Any], int]]:
    path = f"/v1/pay-orders/{no}/cancel"
    json_headers = {**AUTH, "Content-Type": "application/json"}
    return [
        ("no token", path, {}, 401),
        ("wrong token", path, {"headers": {"Authorization": "Bearer nope"}}, 401),
        ("no token, with a body", path, {"json": {"x": 1}}, 401),
        ("unknown pay order", "/v1/pay-orders/po_never-created/cancel", {"headers": AUTH}, 404),
        ("malformed pay order number", "/v1/pay-orders/x'--/cancel", {"headers": AUTH}, 422),
        ("a field", path, {"json": {"reason": "CANCELLED"}, "headers": AUTH}, 422),
        ("a list", path, {"json": [], "headers": AUTH}, 422),
        ("null", path, {"content": b"null", "headers": json_headers}, 422),
        ("a string", path, {"content": b'"cancel"', "headers": json_headers}, 422),
        ("a number", path, {"content": b"0", "headers": json_headers}, 422),
        ("malformed JSON", path, {"content": b"{oops", "headers": json_headers}, 422),
        ("form data", path, {"data": {"a": "b"}, "headers": AUTH}, 422),
        (
            "oversized body",
            path,
            {"content": b"{" + b" " * 100_000 + b"}", "headers": json_headers},
            413,
        ),
    ]


async def test_every_bad_cancel_is_refused_and_changes_nothing(web: HttpStack) -> None:
    doc = await web.service.create(order_no=new_order(), amount=100, currency="USD")
    no = doc["pay_order_no"]
    await web.wait_order(no, lambda o: o["workflow_status"] == "RUNNING" and o["lock_version"] == 0)
    before = await web.counts()
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=30) as http:
        for name, path, kwargs, status in _bad_cancels(no):
            resp = await http.post(path, **kwargs)
            assert resp.status_code == status, (name, resp.text)
            assert resp.json()["error"]["message"], name
    assert await web.counts() == before
    order = await web.service.get(no)
    assert (order["status"], order["reason"], order["lock_version"]) == ("PAYING", None, 0)
    assert order["workflow"]["cancel_requested_at"] is None
    with pytest.raises(ServiceError) as unknown:
        await web.service.cancel("po_never-created")
    assert unknown.value.status == 404


async def test_a_cancel_the_gateway_cannot_close_yet_answers_503_and_stands(
    dev_env: WorkflowEnvironment, db_url: str
) -> None:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, db_url, cancel_wait_ms=1_500) as short:
        doc = await short.service.create(order_no=new_order(), amount=90, currency="USD")
        no = doc["pay_order_no"]
        # Every gateway call now outlasts the gateway's own limit: the close keeps failing.
        await short.gateway.set_faults(no, delay_ms=5_000)
        with pytest.raises(ServiceError) as pending:
            await short.service.cancel(no)
        assert (pending.value.status, pending.value.code) == (503, "cancel_pending")
        # Read the row, not the workflow's view: a query waits for the workflow task that
        # keeps retrying the close (a local activity) to end.
        async with short.pool.acquire() as conn:
            status = await conn.fetchval("SELECT status FROM pay_order WHERE pay_order_no = $1", no)
        assert status == "PAYING"
        await short.gateway.clear_faults(no)
        # The cancel stood: the close went through once the gateway came back.
        order = await short.wait_order(no, lambda o: o["status"] != "PAYING")
        assert (order["status"], order["reason"]) == ("PAY_EXPIRED", "CANCELLED")
        again = await short.service.cancel(no)
        assert again == {
            "pay_order_no": no,
            "status": "PAY_EXPIRED",
            "reason": "CANCELLED",
            "closed": False,
        }


async def test_a_cancel_while_temporal_cannot_be_reached_answers_503(db_url: str) -> None:
    closed_port = free_port()  # nothing listens there
    api_port = free_port()
    settings = make_settings(
        temporal_address=f"127.0.0.1:{closed_port}",
        database_url=db_url,
        api_url=f"http://127.0.0.1:{api_port}",
        gateway_url=f"http://127.0.0.1:{free_port()}",
        api_token=API_TOKEN,
    )
    async with (
        serve(create_app(settings), api_port),
        httpx.AsyncClient(base_url=settings.api_url, timeout=30) as http,
    ):
        resp = await http.post("/v1/pay-orders/po_anything/cancel", headers=AUTH)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "temporal_unavailable"


# --- through the Stripe adapter (localstripe behind the wire) -------------------------------


@pytest.fixture(scope="module")
async def cancel_stripe_db(pg_admin_url: str) -> str:
    return await embedded.ensure_database(pg_admin_url, f"stripe_cancel_{os.getpid()}")


async def test_a_cancel_at_stripe_cancels_the_payment_intent_and_a_paid_one_succeeds(
    dev_env: WorkflowEnvironment, cancel_stripe_db: str, localstripe: LocalStripe
) -> None:
    target = dev_env.client.service_client.config.target_host
    async with stripe_stack(dev_env.client, target, cancel_stripe_db, localstripe) as st:
        unpaid = await st.checkout(1200)
        no = unpaid["pay_order_no"]
        answer = await st.service.cancel(no)
        assert answer == {
            "pay_order_no": no,
            "status": "PAY_EXPIRED",
            "reason": "CANCELLED",
            "closed": True,
        }
        assert (await st.intent(unpaid["checkout"]["payment_intent"])).status == "canceled"

        # The customer pays at the instant of the cancel (the wire's fault pays the
        # PaymentIntent just before it relays our cancel): localstripe refuses the cancel with
        # a bare 400, the adapter reads the PaymentIntent back, and the payment settles.
        paid = await st.checkout(1300)
        no = paid["pay_order_no"]
        pi = paid["checkout"]["payment_intent"]
        async with httpx.AsyncClient(base_url=st.settings.stripe_api_base) as http:
            armed = await http.put(
                f"/v1/faults/{no}",
                json={"paid_on_close_amount": 1300, "paid_on_close_currency": "USD"},
            )
            assert armed.status_code == 200, armed.text
        answer = await st.service.cancel(no)
        assert answer == {
            "pay_order_no": no,
            "status": "PAY_SUCCESS",
            "reason": None,
            "closed": True,
        }
        assert (await st.intent(pi)).status == "succeeded"
        # localstripe's webhook of that payment comes after: a repeat, and nothing moves.
        async with st.pool.acquire() as conn:
            for _ in range(200):
                if await conn.fetchval("SELECT 1 FROM webhook_event WHERE txn_id = $1", pi):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("localstripe's webhook never arrived")
        order = await st.wait_order(no, settled)
        assert (order["paid_amount"], order["refunded_amount"]) == (1300, 0)
        assert [p["txn_id"] for p in order["payments"]] == [pi]
        assert await st.refunds_of(pi) == []


# --- the CLI: payorders cancel, and the reason in payorders status ---------------------------


async def run_cli(
    web: HttpStack, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await cli.execute(cli.build_parser().parse_args(list(argv)), web.settings)
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_payorders_cancel_says_what_happened_and_status_shows_the_reason(
    web: HttpStack, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = await web.service.create(order_no=new_order(), amount=250, currency="USD")
    no = doc["pay_order_no"]
    code, out, err = await run_cli(web, capsys, "cancel", no)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split(None, 1) == ["outcome", "cancelled: the trade is closed at the gateway"]
    assert ["reason", "CANCELLED"] in [line.split() for line in lines]
    code, out, _ = await run_cli(web, capsys, "cancel", no, "--json")
    assert code == 0
    assert {k: v for k, v in json.loads(out).items() if k != "ui"} == {
        "pay_order_no": no,
        "status": "PAY_EXPIRED",
        "reason": "CANCELLED",
        "closed": False,
    }
    code, out, _ = await run_cli(web, capsys, "status", no)
    assert code == 0
    status = next(line for line in out.splitlines() if line.startswith("status"))
    assert status.split(None, 1)[1] == "PAY_EXPIRED (CANCELLED)"
    code, out, err = await run_cli(web, capsys, "cancel", "po_never-created")
    assert (code, out) == (1, "")
    assert err == "payorders cancel: error: no pay order po_never-created\n"


def test_payorders_cancel_refuses_what_is_not_a_pay_order_number(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["cancel", "order-42"])
    assert exited.value.code == 2
    assert "not a pay order number: 'order-42'" in capsys.readouterr().err

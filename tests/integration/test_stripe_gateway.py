"""The Stripe adapter with the official SDK against a real localstripe process (nothing of
Stripe mocked): opening a trade again after a lost answer, closing before and after the
payment, refunds exactly once per key although localstripe ignores Idempotency-Key, no
over-refund although localstripe has no such check, queries, the statement, a refused key,
how faults on the wire are classified, and ``LocalStripe`` itself.

localstripe is flushed before each test; every count below is read from its own records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
import stripe
from prometheus_client import REGISTRY

from payorders.core.domain import RefundStatus
from payorders.gateways.port import (
    GatewayAmbiguous,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
)
from payorders.gateways.stripe import StripeGateway, StripeKeyRefused
from payorders.localstack.localstripe import (
    DEFAULT_API_KEY,
    LocalStripe,
    money_by_pay_order,
    pay_payment_intent,
)

AMOUNT = 1999


@pytest.fixture
async def ls(localstripe: LocalStripe) -> LocalStripe:
    await localstripe.flush()
    return localstripe


@pytest.fixture
async def gw(ls: LocalStripe) -> AsyncIterator[StripeGateway]:
    gateway = StripeGateway(DEFAULT_API_KEY, api_base=ls.url, client_timeout_s=5)
    try:
        yield gateway
    finally:
        await gateway.aclose()


@pytest.fixture
async def sc(ls: LocalStripe) -> AsyncIterator[stripe.StripeClient]:
    """The customer's (and the test's) own SDK client of the same localstripe."""
    async with ls.client() as client:
        yield client


def new_trade(amount: int = AMOUNT, currency: str = "USD") -> OpenTrade:
    no = f"po_t-{uuid.uuid4().hex[:10]}"
    return OpenTrade(
        pay_order_no=no,
        amount=amount,
        currency=currency,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        idempotency_key=f"open-{no}",
    )


def refund_request(trade: OpenTrade, txn_id: str, amount: int = AMOUNT) -> RefundRequest:
    return RefundRequest(
        idempotency_key=f"refund-{trade.pay_order_no}-{txn_id}",
        pay_order_no=trade.pay_order_no,
        txn_id=txn_id,
        amount=amount,
        currency=trade.currency,
    )


async def paid_trade(gw: StripeGateway, sc: stripe.StripeClient) -> tuple[OpenTrade, str]:
    trade = new_trade()
    checkout = await gw.open_trade(trade)
    await pay_payment_intent(sc, checkout.trade_ref)
    return trade, checkout.trade_ref


async def intents_at_stripe(sc: stripe.StripeClient, pay_order_no: str) -> list[str]:
    page = await sc.v1.payment_intents.list_async({"limit": 100})
    assert not page.has_more
    return [pi.id for pi in page.data if pi.metadata.to_dict().get("pay_order_no") == pay_order_no]


async def refunds_at_stripe(sc: stripe.StripeClient, pi_id: str) -> list[stripe.Refund]:
    page = await sc.v1.refunds.list_async({"payment_intent": pi_id, "limit": 100})
    assert not page.has_more
    return list(page.data)


def calls(op: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "payorders_gateway_calls_total", {"op": op, "outcome": outcome}
    )
    return value or 0.0


# --- opening ---------------------------------------------------------------------------------


async def test_localstripe_ignores_idempotency_keys(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    """Why the adapter must look before it creates: the same key twice, two PaymentIntents
    (real Stripe would replay the first answer)."""
    trade = new_trade()
    first = await gw.open_trade(trade)
    second = await gw.open_trade(trade)
    assert first.trade_ref != second.trade_ref
    assert len(await intents_at_stripe(sc, trade.pay_order_no)) == 2


async def test_open_again_after_a_lost_answer_finds_the_same_payment_intent(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    trade = new_trade()
    first = await gw.open_trade(trade)
    again = await gw.open_trade(trade, first_attempt=False)
    once_more = await gw.open_trade(trade, first_attempt=False)
    assert again == once_more == first
    assert first.gateway == "stripe"
    assert first.details["payment_intent"] == first.trade_ref
    assert first.details["client_secret"].startswith(f"{first.trade_ref}_secret_")
    assert await intents_at_stripe(sc, trade.pay_order_no) == [first.trade_ref]
    pi = await sc.v1.payment_intents.retrieve_async(first.trade_ref)
    assert (pi.amount, pi.currency, pi.status) == (AMOUNT, "usd", "requires_payment_method")


async def test_a_retried_open_with_nothing_created_creates_one(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    trade = new_trade(amount=500, currency="EUR")
    checkout = await gw.open_trade(trade, first_attempt=False)
    assert await intents_at_stripe(sc, trade.pay_order_no) == [checkout.trade_ref]
    pi = await sc.v1.payment_intents.retrieve_async(checkout.trade_ref)
    assert (pi.amount, pi.currency) == (500, "eur")


# --- closing ---------------------------------------------------------------------------------


async def test_close_before_payment_cancels_and_nobody_can_pay_after(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    trade = new_trade()
    checkout = await gw.open_trade(trade)
    result = await gw.close_trade(trade.pay_order_no, checkout.trade_ref)
    assert result.closed and result.capture is None
    pi = await sc.v1.payment_intents.retrieve_async(checkout.trade_ref)
    assert pi.status == "canceled"
    # Closed twice: localstripe refuses the second cancel (a bare 400); read back, closed.
    again = await gw.close_trade(trade.pay_order_no, checkout.trade_ref)
    assert again.closed and again.capture is None
    with pytest.raises(stripe.InvalidRequestError):
        await pay_payment_intent(sc, checkout.trade_ref)


async def test_close_after_payment_reports_already_paid_with_the_capture(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    before = time.time()
    trade, pi_id = await paid_trade(gw, sc)
    result = await gw.close_trade(trade.pay_order_no, pi_id)
    assert not result.closed
    capture = result.capture
    assert capture is not None
    assert (capture.txn_id, capture.pay_order_no) == (pi_id, trade.pay_order_no)
    assert (capture.amount, capture.currency) == (AMOUNT, "USD")
    assert before - 2 <= capture.captured_at.timestamp() <= time.time() + 1
    assert (await sc.v1.payment_intents.retrieve_async(pi_id)).status == "succeeded"


async def test_close_without_trade_ref_finds_the_trade_by_pay_order(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    nothing = await gw.close_trade(new_trade().pay_order_no, None)
    assert nothing.closed and nothing.capture is None

    open_one = new_trade()
    checkout = await gw.open_trade(open_one)
    assert (await gw.close_trade(open_one.pay_order_no, None)).closed
    assert (await sc.v1.payment_intents.retrieve_async(checkout.trade_ref)).status == "canceled"

    trade, pi_id = await paid_trade(gw, sc)
    paid = await gw.close_trade(trade.pay_order_no, None)
    assert not paid.closed and paid.capture is not None and paid.capture.txn_id == pi_id


async def test_a_declined_card_leaves_the_trade_open_and_close_cancels_it(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    trade = new_trade()
    checkout = await gw.open_trade(trade)
    with pytest.raises(stripe.CardError):
        await pay_payment_intent(sc, checkout.trade_ref, "pm_card_chargeCustomerFail")
    assert await gw.query_capture(checkout.trade_ref) is None
    assert (await gw.close_trade(trade.pay_order_no, checkout.trade_ref)).closed


# --- refunds ---------------------------------------------------------------------------------


async def test_refund_twice_with_one_key_makes_one_refund(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    trade, pi_id = await paid_trade(gw, sc)
    request = refund_request(trade, pi_id)
    first = await gw.refund(request)
    second = await gw.refund(request)
    assert second == first
    assert first.status is RefundStatus.SUCCEEDED
    assert (first.txn_id, first.amount, first.currency) == (pi_id, AMOUNT, "USD")
    assert first.idempotency_key == request.idempotency_key
    at_stripe = await refunds_at_stripe(sc, pi_id)
    assert [r.id for r in at_stripe] == [first.gateway_refund_id]
    assert at_stripe[0].metadata is not None
    assert at_stripe[0].metadata.to_dict() == {
        "idempotency_key": request.idempotency_key,
        "pay_order_no": trade.pay_order_no,
    }


async def test_a_refund_whose_answer_was_lost_is_found_not_repeated(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    """The first attempt's create reached Stripe and its answer never came back; the retry
    (localstripe would replay nothing for its Idempotency-Key) returns that refund."""
    trade, pi_id = await paid_trade(gw, sc)
    request = refund_request(trade, pi_id)
    assert await gw.query_refund(request.idempotency_key, pi_id) is None
    lost = await sc.v1.refunds.create_async(
        {
            "payment_intent": pi_id,
            "amount": AMOUNT,
            "metadata": {
                "idempotency_key": request.idempotency_key,
                "pay_order_no": trade.pay_order_no,
            },
        },
        {"idempotency_key": request.idempotency_key},
    )
    found = await gw.query_refund(request.idempotency_key, pi_id)
    assert found is not None and found.gateway_refund_id == lost.id
    retried = await gw.refund(request)
    assert retried.gateway_refund_id == lost.id
    assert retried.status is RefundStatus.SUCCEEDED
    assert len(await refunds_at_stripe(sc, pi_id)) == 1
    money = (await money_by_pay_order(sc))[trade.pay_order_no]
    assert (money.captured, money.refunded, money.refunds) == (AMOUNT, AMOUNT, 1)


async def test_over_refund_is_refused_and_changes_nothing(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    trade, pi_id = await paid_trade(gw, sc)
    part = refund_request(trade, pi_id, amount=1000)
    await gw.refund(part)
    rest = RefundRequest(
        idempotency_key=f"{part.idempotency_key}-b",
        pay_order_no=trade.pay_order_no,
        txn_id=pi_id,
        amount=AMOUNT - 1000 + 1,
        currency="USD",
    )
    with pytest.raises(GatewayRejected, match="received 1999"):
        await gw.refund(rest)
    with pytest.raises(GatewayRejected, match="EUR"):
        await gw.refund(
            RefundRequest(
                idempotency_key=f"{part.idempotency_key}-c",
                pay_order_no=trade.pay_order_no,
                txn_id=pi_id,
                amount=1,
                currency="EUR",
            )
        )
    assert len(await refunds_at_stripe(sc, pi_id)) == 1
    exact = await gw.refund(
        RefundRequest(
            idempotency_key=f"{part.idempotency_key}-d",
            pay_order_no=trade.pay_order_no,
            txn_id=pi_id,
            amount=AMOUNT - 1000,
            currency="USD",
        )
    )
    assert exact.status is RefundStatus.SUCCEEDED
    money = (await money_by_pay_order(sc))[trade.pay_order_no]
    assert (money.captured, money.refunded, money.over_refunded) == (AMOUNT, AMOUNT, [])


async def test_refunds_of_what_was_never_captured_are_refused(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    trade = new_trade()
    unpaid = await gw.open_trade(trade)
    with pytest.raises(GatewayRejected, match="requires_payment_method"):
        await gw.refund(refund_request(trade, unpaid.trade_ref))
    await gw.close_trade(trade.pay_order_no, unpaid.trade_ref)
    with pytest.raises(GatewayRejected, match="canceled"):
        await gw.refund(refund_request(trade, unpaid.trade_ref))
    with pytest.raises(GatewayRejected, match="no PaymentIntent"):
        await gw.refund(refund_request(trade, "pi_doesnotexist"))
    with pytest.raises(GatewayRejected, match="no PaymentIntent"):
        await gw.refund(refund_request(trade, "txn_of_another_gateway"))


# --- queries ---------------------------------------------------------------------------------


async def test_query_capture_and_query_refund(gw: StripeGateway, sc: stripe.StripeClient) -> None:
    not_found = calls("query_capture", "not_found")
    assert await gw.query_capture("pi_doesnotexist") is None
    assert await gw.query_capture("txn_not_stripe") is None
    assert calls("query_capture", "not_found") == not_found + 2
    trade = new_trade()
    unpaid = await gw.open_trade(trade)
    assert await gw.query_capture(unpaid.trade_ref) is None
    assert await gw.query_refund("refund-x", unpaid.trade_ref) is None

    trade, pi_id = await paid_trade(gw, sc)
    capture = await gw.query_capture(pi_id)
    assert capture is not None
    assert (capture.txn_id, capture.pay_order_no, capture.amount, capture.currency) == (
        pi_id,
        trade.pay_order_no,
        AMOUNT,
        "USD",
    )
    request = refund_request(trade, pi_id)
    assert await gw.query_refund(request.idempotency_key, pi_id) is None
    made = await gw.refund(request)
    assert await gw.query_refund(request.idempotency_key, pi_id) == made
    assert await gw.query_refund("refund-another-key", pi_id) is None
    assert await gw.query_refund(request.idempotency_key, "pi_doesnotexist") is None


async def test_statement_maps_captures_and_refunds_to_pay_orders(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=2)
    kept, kept_pi = await paid_trade(gw, sc)
    refunded, refunded_pi = await paid_trade(gw, sc)
    ours = await gw.refund(refund_request(refunded, refunded_pi))
    # A refund made outside payorders (on the charge, no metadata of ours) still shows.
    charge = (await sc.v1.payment_intents.retrieve_async(kept_pi)).latest_charge
    assert isinstance(charge, stripe.Charge)  # localstripe embeds it (Stripe: an id)
    foreign = await sc.v1.refunds.create_async({"charge": charge.id, "amount": 100})
    end = datetime.now(UTC) + timedelta(seconds=2)

    stmt = await gw.statement(start, end)
    captures = {c.txn_id: c for c in stmt.captures}
    assert set(captures) == {kept_pi, refunded_pi}
    assert captures[kept_pi].pay_order_no == kept.pay_order_no
    assert captures[refunded_pi].pay_order_no == refunded.pay_order_no
    assert {(c.amount, c.currency) for c in stmt.captures} == {(AMOUNT, "USD")}
    refunds = {r.gateway_refund_id: r for r in stmt.refunds}
    assert set(refunds) == {ours.gateway_refund_id, foreign.id}
    assert refunds[ours.gateway_refund_id] == ours
    other = refunds[foreign.id]
    assert (other.idempotency_key, other.txn_id, other.amount) == (foreign.id, kept_pi, 100)

    earlier = await gw.statement(start - timedelta(hours=2), start - timedelta(hours=1))
    assert (earlier.captures, earlier.refunds) == ([], [])
    later = await gw.statement(end, end + timedelta(hours=1))
    assert (later.captures, later.refunds) == ([], [])


async def test_money_by_pay_order_sees_an_over_refund_made_behind_our_back(
    gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    """localstripe lets anyone refund beyond a charge; the final check must catch it."""
    trade, pi_id = await paid_trade(gw, sc)
    for _ in range(2):
        await sc.v1.refunds.create_async({"payment_intent": pi_id, "amount": AMOUNT})
    money = (await money_by_pay_order(sc))[trade.pay_order_no]
    assert money.payment_intents == [pi_id]
    assert (money.captured, money.refunded, money.refunds) == (AMOUNT, 2 * AMOUNT, 2)
    assert money.over_refunded == [pi_id]


# --- keys and faults -------------------------------------------------------------------------


async def test_a_refused_key_is_one_clear_error(ls: LocalStripe) -> None:
    """localstripe refuses only keys that do not start ``sk_`` or are 5 characters or
    fewer (real Stripe refuses every key it does not know, and restricted keys ``rk_``
    lacking a permission with a PermissionError)."""
    for key in ("rk_test_restricted", "sk_x"):
        gateway = StripeGateway(key, api_base=ls.url, client_timeout_s=5)
        try:
            with pytest.raises(StripeKeyRefused, match="refused the API key") as refused:
                await gateway.check_key()
            assert key not in str(refused.value)
            # The same key later, mid-call: no refusal of the refund itself, retried.
            with pytest.raises(GatewayUnavailable, match="API key"):
                await gateway.query_capture("pi_whatever")
        finally:
            await gateway.aclose()
    good = StripeGateway(DEFAULT_API_KEY, api_base=ls.url, client_timeout_s=5)
    try:
        await good.check_key()
    finally:
        await good.aclose()


@contextlib.asynccontextmanager
async def fault_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 that does to every connection what ``answer`` says."""
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, never answer (the gateway may be working on it), until the
    client gives up and closes."""
    with contextlib.suppress(Exception):
        while await reader.read(65536):
            pass
    writer.close()


def _status(code: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = json.dumps({"error": {"message": f"status {code}", "type": "api_error"}}).encode()
        writer.write(
            f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    return answer


async def _dropped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Take the request, then drop the connection without a word."""
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


async def _classify(api_base: str, timeout_s: float = 5) -> type[Exception] | None:
    gateway = StripeGateway(DEFAULT_API_KEY, api_base=api_base, client_timeout_s=timeout_s)
    trade = new_trade()
    try:
        await gateway.refund(refund_request(trade, "pi_somewhere"))
    except Exception as e:
        return type(e)
    finally:
        await gateway.aclose()
    return None


async def test_faults_on_the_wire_are_classified_as_the_port_says() -> None:
    """A timeout, a dropped connection and a 5xx prove nothing (ambiguous); a refused
    connection and a 429 mean nothing happened (unavailable)."""
    async with fault_server(_silent) as url:
        assert await _classify(url, timeout_s=0.3) is GatewayAmbiguous
    async with fault_server(_dropped) as url:
        assert await _classify(url) is GatewayAmbiguous
    async with fault_server(_status(500)) as url:
        assert await _classify(url) is GatewayAmbiguous
    async with fault_server(_status(503)) as url:
        assert await _classify(url) is GatewayAmbiguous
    async with fault_server(_status(429)) as url:
        assert await _classify(url) is GatewayUnavailable
    async with fault_server(_silent) as url:
        closed = url
    assert await _classify(closed) is GatewayUnavailable


async def test_an_unreachable_stripe_at_start_is_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with fault_server(_silent) as url:
        closed = url
    gateway = StripeGateway(DEFAULT_API_KEY, api_base=closed, client_timeout_s=1)
    try:
        with caplog.at_level(logging.WARNING, logger="payorders.gateways.stripe"):
            await gateway.check_key()
    finally:
        await gateway.aclose()
    ours = [r for r in caplog.records if r.name == "payorders.gateways.stripe"]
    assert [r.levelno for r in ours] == [logging.WARNING]
    assert "cannot check the Stripe API key now (check_key: cannot connect" in ours[0].getMessage()
    assert all(DEFAULT_API_KEY not in r.getMessage() for r in caplog.records)


async def test_logs_carry_no_key_and_no_client_secret(
    gw: StripeGateway, sc: stripe.StripeClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        trade = new_trade()
        checkout = await gw.open_trade(trade)
        await gw.open_trade(trade, first_attempt=False)
        await pay_payment_intent(sc, checkout.trade_ref)
        await gw.close_trade(trade.pay_order_no, checkout.trade_ref)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "gateway stripe open_trade ok" in text
    assert checkout.details["client_secret"] not in text
    assert DEFAULT_API_KEY not in text


# --- LocalStripe itself ----------------------------------------------------------------------


async def test_localstripe_keeps_its_state_in_our_folder_on_loopback_only() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="payorders-localstripe-own-"))
    shared = Path(tempfile.gettempdir()) / "localstripe.pickle"
    shared_before = shared.stat().st_mtime if shared.exists() else None
    try:
        server = LocalStripe(tmp)
        async with server:
            assert server.pid is not None
            listening = [
                c.laddr
                for c in psutil.Process(server.pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
            assert [a.ip for a in listening] == ["127.0.0.1"]
            async with server.client() as client:
                pi = await client.v1.payment_intents.create_async(
                    {"amount": 100, "currency": "usd", "metadata": {"pay_order_no": "po_x"}}
                )
        assert (tmp / "localstripe.pickle").exists()
        async with server:  # again, from the same folder: the state is back
            async with server.client() as client:
                back = await client.v1.payment_intents.retrieve_async(pi.id)
                assert back.metadata.to_dict() == {"pay_order_no": "po_x"}
            await server.flush()
            async with server.client() as client:
                assert (await client.v1.payment_intents.list_async()).data == []
        assert server.pid is None
        assert (shared.stat().st_mtime if shared.exists() else None) == shared_before
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def test_registered_webhook_receives_a_signed_payment_event(
    ls: LocalStripe, gw: StripeGateway, sc: stripe.StripeClient
) -> None:
    """Sent once, about 1 s after the payment, signed; verified with the SDK."""
    received: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()

    async def endpoint(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(
            line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
        )
        body = await reader.readexactly(int(headers["Content-Length"]))
        received.put_nowait((body, headers["Stripe-Signature"]))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    secret = "whsec_test_localstripe"

    async def event_of(payment_intent: str) -> tuple[bytes, str]:
        # A payment of an earlier test is announced about 1 s after it, to every endpoint
        # registered by then: this one may be handed that event first.
        while True:
            body, signature = await received.get()
            if payment_intent.encode() in body:
                return body, signature

    async with fault_server(endpoint) as url:
        await ls.register_webhook(f"{url}/v1/webhooks/stripe", secret, id="test-webhook")
        try:
            trade = new_trade()
            checkout = await gw.open_trade(trade)
            await pay_payment_intent(sc, checkout.trade_ref)
            body, signature = await asyncio.wait_for(event_of(checkout.trade_ref), 15)
        finally:
            # Registrations cannot be removed: this one now takes an event that never comes.
            await ls.register_webhook(url, secret, id="test-webhook", events=["none.ever"])
    event = stripe.Webhook.construct_event(body.decode(), signature, secret)
    assert event.type == "payment_intent.succeeded"
    assert event.data.object["id"] == checkout.trade_ref
    assert event.data.object["metadata"]["pay_order_no"] == trade.pay_order_no

"""The Stripe wire (``payorders.localstack.stripe_wire``) between the official SDK and a real
localstripe: every call forwarded as it came, every fault doing what it says on the wire
(counted at localstripe itself), faults per scope and consumed, and localstripe's webhooks
relayed byte for byte, dropped, duplicated or reordered on their way to a receiver that
stands where the API's Stripe endpoint would be."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from payorders.core.settings import Settings
from payorders.localstack.localstripe import LocalStripe
from payorders.localstack.stripe_wire import DELIVERIES_PATH, RELAY_PATH, StripeWire
from payorders.tools.http_clients import SandboxClient

from ..http_stack import serving

KEY = "sk_test_wire_tests"
SECRET = "whsec_wire_tests"
REORDER_HOLD_S = 4.0
"""Longer than the wire's default, so a webhook sent after a held one overtakes it even on a
loaded machine."""


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes

    def event(self) -> stripe.Event:
        """The event, verified as the API verifies it: over the exact bytes received."""
        return stripe.Webhook.construct_event(
            self.body.decode(), self.headers["stripe-signature"], SECRET
        )


@dataclass
class Receiver:
    """Where the API's ``POST /v1/webhooks/stripe`` would be: records every request."""

    hits: list[Hit] = field(default_factory=list)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            self.hits.append(Hit(dict(request.headers), await request.body()))
            return JSONResponse({"received": True})

        return Starlette(routes=[Route("/v1/webhooks/stripe", hook, methods=["POST"])])

    def of(self, pi_id: str) -> list[Hit]:
        return [h for h in self.hits if h.event().data.object["id"] == pi_id]

    async def wait(self, pi_id: str, count: int, within: float = 20) -> list[Hit]:
        deadline = time.monotonic() + within
        while len(self.of(pi_id)) < count:
            assert time.monotonic() < deadline, f"{pi_id}: {len(self.of(pi_id))} webhook(s)"
            await asyncio.sleep(0.05)
        return self.of(pi_id)


@dataclass
class Wire:
    """The proxy under test, what stands on each side of it, and SDK clients of both."""

    url: str
    wire: StripeWire
    localstripe: LocalStripe
    receiver: Receiver
    control: httpx.AsyncClient
    via_wire: stripe.StripeClient
    direct: stripe.StripeClient

    def client(self, timeout_s: float) -> stripe.StripeClient:
        """An SDK client of the wire, as the adapter would hold one (no SDK retries)."""
        return stripe.StripeClient(
            KEY,
            base_addresses={"api": self.url},
            max_network_retries=0,
            http_client=stripe.HTTPXClient(timeout=timeout_s),
        )

    async def arm(self, scope: str, **faults: Any) -> dict[str, Any]:
        resp = await self.control.put(f"/v1/faults/{scope}", json=faults)
        assert resp.status_code == 200, resp.text
        doc: dict[str, Any] = resp.json()
        return doc

    async def faults(self) -> list[dict[str, Any]]:
        doc: list[dict[str, Any]] = (await self.control.get("/v1/faults")).json()
        return doc

    async def delivery(self, event_type: str, pay_order_no: str, within: float = 20) -> Any:
        """The wire's record of what it did with the webhook of a pay order."""
        deadline = time.monotonic() + within
        while True:
            for d in (await self.control.get(DELIVERIES_PATH)).json():
                mine = d["pay_order_no"] == pay_order_no and d["type"] == event_type
                if mine and d["outcome"] != "pending":
                    return d
            assert time.monotonic() < deadline, f"no {event_type} webhook for {pay_order_no}"
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def wire() -> AsyncIterator[Wire]:
    tmp = Path(tempfile.mkdtemp(prefix="payorders-wire-"))
    receiver = Receiver()
    try:
        async with (
            LocalStripe(tmp) as localstripe,
            serving(receiver.app()) as receiver_url,
        ):
            proxy = StripeWire(
                upstream=localstripe.url,
                webhook_target=f"{receiver_url}/v1/webhooks/stripe",
                reorder_hold_s=REORDER_HOLD_S,
            )
            async with (
                serving(proxy.app()) as url,
                httpx.AsyncClient(base_url=url, timeout=10) as control,
                localstripe.client(KEY) as direct,
            ):
                await localstripe.register_webhook(f"{url}{RELAY_PATH}", SECRET, id="wire-test")
                w = Wire(url, proxy, localstripe, receiver, control, _client(url), direct)
                yield w
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _client(url: str, timeout_s: float = 10) -> stripe.StripeClient:
    return stripe.StripeClient(
        KEY,
        base_addresses={"api": url},
        max_network_retries=0,
        http_client=stripe.HTTPXClient(timeout=timeout_s),
    )


@pytest.fixture(autouse=True)
async def _no_faults_left(wire: Wire) -> AsyncIterator[None]:
    yield
    await wire.control.delete("/v1/faults")


def pay_order() -> str:
    return f"po_wire-{uuid.uuid4().hex[:10]}"


async def paid_intent(
    client: stripe.StripeClient, pay_order_no: str, amount: int = 1999
) -> stripe.PaymentIntent:
    """A PaymentIntent of the pay order, paid with a test card (through ``client``)."""
    pi = await client.v1.payment_intents.create_async(
        params={
            "amount": amount,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "metadata": {"pay_order_no": pay_order_no},
        }
    )
    return await client.v1.payment_intents.confirm_async(pi.id)


async def refund(
    client: stripe.StripeClient, pi: stripe.PaymentIntent, pay_order_no: str, key: str
) -> stripe.Refund:
    return await client.v1.refunds.create_async(
        params={
            "payment_intent": pi.id,
            "amount": pi.amount,
            "metadata": {"pay_order_no": pay_order_no},
        },
        options={"idempotency_key": key},
    )


async def refunds_at_localstripe(wire: Wire, pi_id: str) -> list[stripe.Refund]:
    page = await wire.direct.v1.refunds.list_async(params={"payment_intent": pi_id})
    return list(page.data)


# --- forwarding ------------------------------------------------------------------------------


async def test_a_call_reaches_localstripe_as_it_was_sent_and_its_answer_comes_back() -> None:
    seen: list[dict[str, Any]] = []

    async def echo(request: Request) -> Response:
        seen.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "body": await request.body(),
                "headers": dict(request.headers),
            }
        )
        return JSONResponse({"id": "pi_echo", "object": "payment_intent"}, status_code=201)

    upstream = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
    async with serving(upstream) as upstream_url:
        proxy = StripeWire(upstream=upstream_url, webhook_target="http://127.0.0.1:1/")
        async with serving(proxy.app()) as url, httpx.AsyncClient(base_url=url) as http:
            body = b"amount=1999&currency=usd&metadata[pay_order_no]=po_echo&expand[0]=x"
            sent = {
                "Authorization": f"Bearer {KEY}",
                "Idempotency-Key": "open-po_echo",
                "Stripe-Version": "2024-06-20",
                "Content-Type": "application/x-www-form-urlencoded",
            }
            resp = await http.post("/v1/payment_intents?a=1&b=%5Bx%5D", content=body, headers=sent)
            got = await http.get("/v1/refunds?payment_intent=pi_echo&limit=3", headers=sent)
    assert (resp.status_code, resp.json()) == (201, {"id": "pi_echo", "object": "payment_intent"})
    assert got.status_code == 201
    post, get = seen
    assert (post["method"], post["path"], post["query"]) == (
        "POST",
        "/v1/payment_intents",
        "a=1&b=%5Bx%5D",
    )
    assert post["body"] == body
    for name, value in sent.items():
        assert post["headers"][name.lower()] == value
    assert (get["method"], get["query"]) == ("GET", "payment_intent=pi_echo&limit=3")


async def test_the_sdk_works_through_the_wire_as_against_localstripe(wire: Wire) -> None:
    no = pay_order()
    pi = await paid_intent(wire.via_wire, no)
    assert pi.status == "succeeded"
    at_localstripe = await wire.direct.v1.payment_intents.retrieve_async(pi.id)
    assert at_localstripe.metadata["pay_order_no"] == no
    with pytest.raises(stripe.InvalidRequestError) as refused:  # localstripe's own answer
        await wire.via_wire.v1.payment_intents.cancel_async(pi.id)
    assert refused.value.http_status == 400
    bad_key = stripe.StripeClient("bad", base_addresses={"api": wire.url}, max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError):  # the Authorization header went through
        await bad_key.v1.payment_intents.retrieve_async(pi.id)


# --- refund faults ---------------------------------------------------------------------------


async def test_failing_refunds_never_reach_localstripe_and_only_that_order_fails(
    wire: Wire,
) -> None:
    no, other = pay_order(), pay_order()
    pi, other_pi = await paid_intent(wire.via_wire, no), await paid_intent(wire.via_wire, other)
    await wire.arm(no, fail_next_refunds=2)
    for _ in range(2):
        with pytest.raises(stripe.APIError) as failed:
            await refund(wire.via_wire, pi, no, f"refund-{no}")
        assert failed.value.http_status == 500
        assert failed.value.error is not None and failed.value.error.type == "api_error"
    assert await refunds_at_localstripe(wire, pi.id) == []
    await refund(wire.via_wire, other_pi, other, f"refund-{other}")  # another order: no fault
    assert await wire.faults() == []  # both failures spent
    made = await refund(wire.via_wire, pi, no, f"refund-{no}")
    assert [r.id for r in await refunds_at_localstripe(wire, pi.id)] == [made.id]


async def test_a_lost_refund_answer_is_a_timeout_after_localstripe_refunded_once(
    wire: Wire,
) -> None:
    no = pay_order()
    pi = await paid_intent(wire.via_wire, no)
    await wire.arm(no, timeout_after_success_next=1)
    impatient = wire.client(timeout_s=1.5)
    with pytest.raises(stripe.APIConnectionError):
        await refund(impatient, pi, no, f"refund-{no}")
    refunds = await refunds_at_localstripe(wire, pi.id)
    assert len(refunds) == 1
    assert refunds[0].metadata["pay_order_no"] == no and refunds[0].amount == pi.amount
    assert await wire.faults() == []
    # The next call's answer comes back: what the adapter finds before it refunds again.
    page = await impatient.v1.refunds.list_async(params={"payment_intent": pi.id})
    assert [r.id for r in page.data] == [refunds[0].id]


async def test_an_order_s_own_fault_is_taken_before_the_global_one(wire: Wire) -> None:
    no, other = pay_order(), pay_order()
    pi, other_pi = await paid_intent(wire.via_wire, no), await paid_intent(wire.via_wire, other)
    await wire.arm(no, fail_next_refunds=1)
    await wire.arm("*", fail_next_refunds=1)
    with pytest.raises(stripe.APIError):
        await refund(wire.via_wire, pi, no, f"refund-{no}")  # its own
    assert [f["scope"] for f in await wire.faults()] == ["*"]
    with pytest.raises(stripe.APIError):
        await refund(wire.via_wire, other_pi, other, f"refund-{other}")  # the global one
    assert await wire.faults() == []
    await refund(wire.via_wire, pi, no, f"refund-{no}")
    assert len(await refunds_at_localstripe(wire, pi.id)) == 1


async def test_a_payment_intent_the_wire_never_saw_still_gets_its_order_s_faults(
    wire: Wire,
) -> None:
    # Created past the wire (as if before the proxy restarted): it asks localstripe.
    no = pay_order()
    pi = await paid_intent(wire.direct, no)
    await wire.arm(no, fail_next_refunds=1)
    with pytest.raises(stripe.APIError):
        await wire.via_wire.v1.refunds.create_async(
            params={"payment_intent": pi.id, "amount": pi.amount}
        )
    assert await refunds_at_localstripe(wire, pi.id) == []


async def test_a_delay_slows_the_calls_of_its_order_only(wire: Wire) -> None:
    no, other = pay_order(), pay_order()
    await wire.arm(no, delay_ms=4000)
    impatient = wire.client(timeout_s=1.5)
    with pytest.raises(stripe.APIConnectionError):
        await impatient.v1.payment_intents.create_async(
            params={"amount": 500, "currency": "usd", "metadata": {"pay_order_no": no}}
        )
    # Delayed, not lost: the PaymentIntent is made once the delay has passed.
    deadline = time.monotonic() + 20
    while not [p for p in await _intents(wire) if p.metadata.to_dict().get("pay_order_no") == no]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    fast = await impatient.v1.payment_intents.create_async(
        params={"amount": 500, "currency": "usd", "metadata": {"pay_order_no": other}}
    )
    assert fast.metadata["pay_order_no"] == other


async def _intents(wire: Wire) -> list[stripe.PaymentIntent]:
    found: list[stripe.PaymentIntent] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"starting_after": after} if after else {})}
        page = await wire.direct.v1.payment_intents.list_async(params=params)
        found += page.data
        if not page.has_more:
            return found
        after = page.data[-1].id


# --- paid at the instant of expiry ---------------------------------------------------------


async def test_paid_on_close_pays_the_payment_intent_before_the_cancel_is_refused(
    wire: Wire,
) -> None:
    no, other = pay_order(), pay_order()
    await wire.arm(no, paid_on_close_amount=1999, paid_on_close_currency="USD")
    params = {"amount": 1999, "currency": "usd", "metadata": {"pay_order_no": no}}
    pi = await wire.via_wire.v1.payment_intents.create_async(params=params)
    with pytest.raises(stripe.InvalidRequestError):
        await wire.via_wire.v1.payment_intents.cancel_async(pi.id)
    assert (await wire.direct.v1.payment_intents.retrieve_async(pi.id)).status == "succeeded"
    [hit] = await wire.receiver.wait(pi.id, 1)  # its payment is notified as any other
    assert hit.event().type == "payment_intent.succeeded"
    params["metadata"] = {"pay_order_no": other}
    unpaid = await wire.via_wire.v1.payment_intents.create_async(params=params)
    canceled = await wire.via_wire.v1.payment_intents.cancel_async(unpaid.id)
    assert canceled.status == "canceled"


# --- webhooks ------------------------------------------------------------------------------


async def test_a_webhook_is_relayed_byte_for_byte_with_its_signature(wire: Wire) -> None:
    no = pay_order()
    pi = await paid_intent(wire.via_wire, no)
    [hit] = await wire.receiver.wait(pi.id, 1)
    event = hit.event()  # verifies Stripe-Signature over the body exactly as received
    assert event.type == "payment_intent.succeeded"
    assert event.data.object["metadata"]["pay_order_no"] == no
    assert hit.headers["content-type"].startswith("application/json")
    delivery = await wire.delivery("payment_intent.succeeded", no)
    assert (delivery["event_id"], delivery["outcome"], delivery["statuses"]) == (
        event.id,
        "delivered",
        [200],
    )


async def test_a_dropped_webhook_never_arrives_and_is_not_sent_again(wire: Wire) -> None:
    no = pay_order()
    await wire.arm(no, webhook_drop_next=1)
    pi = await paid_intent(wire.via_wire, no)
    delivery = await wire.delivery("payment_intent.succeeded", no)
    assert (delivery["outcome"], delivery["copies"]) == ("dropped", 0)
    assert wire.receiver.of(pi.id) == []
    assert await wire.faults() == []
    # Spent: the next order's webhook goes through.
    second = await paid_intent(wire.via_wire, no)
    await wire.receiver.wait(second.id, 1)
    assert wire.receiver.of(pi.id) == []  # localstripe never sends an event twice


async def test_a_duplicated_webhook_arrives_twice_identical(wire: Wire) -> None:
    no = pay_order()
    await wire.arm(no, webhook_duplicate_next=1)
    pi = await paid_intent(wire.via_wire, no)
    first, second = await wire.receiver.wait(pi.id, 2)
    assert first.body == second.body
    assert first.headers["stripe-signature"] == second.headers["stripe-signature"]
    assert first.event().id == second.event().id


async def test_a_delayed_webhook_waits_at_the_wire_then_arrives(wire: Wire) -> None:
    no = pay_order()
    await wire.arm(no, webhook_delay_ms=5000)
    pi = await paid_intent(wire.via_wire, no)
    deadline = time.monotonic() + 20
    while not [
        d
        for d in (await wire.control.get(DELIVERIES_PATH)).json()
        if d["pay_order_no"] == no and d["outcome"] == "pending"
    ]:
        assert time.monotonic() < deadline, "the webhook never reached the wire"
        await asyncio.sleep(0.05)
    assert wire.receiver.of(pi.id) == []  # held at the wire
    await wire.receiver.wait(pi.id, 1)
    assert (await wire.delivery("payment_intent.succeeded", no))["outcome"] == "delivered"


async def test_a_reordered_webhook_is_overtaken_by_a_later_one(wire: Wire) -> None:
    held, later = pay_order(), pay_order()
    await wire.arm(held, webhook_reorder_next=1)
    first = await paid_intent(wire.via_wire, held)
    second = await paid_intent(wire.via_wire, later)
    await wire.receiver.wait(first.id, 1, within=30)
    order = [h.event().data.object["id"] for h in wire.receiver.hits]
    assert order.index(second.id) < order.index(first.id)


# --- the control API -----------------------------------------------------------------------


async def test_the_faults_api_is_the_sandbox_s_so_its_client_drives_the_wire(
    wire: Wire,
) -> None:
    no = pay_order()
    client = SandboxClient(Settings(gateway_url=wire.url, webhook_secrets=[SecretStr(SECRET)]))
    try:
        await client.set_faults(no, fail_next_refunds=3, webhook_drop_next=1)
        await client.set_faults(no, delay_ms=5)  # the fields left out keep their values
        await client.set_faults("*", paid_on_close_amount=100, paid_on_close_currency="EUR")
        faults = await client.faults()
        assert [f["scope"] for f in faults] == ["*", no]
        assert {"fail_next_refunds": 3, "webhook_drop_next": 1, "delay_ms": 5}.items() <= faults[
            1
        ].items()
        assert faults[0]["paid_on_close_amount"] == 100
        await client.clear_faults(no)
        assert [f["scope"] for f in await client.faults()] == ["*"]
        await client.clear_faults()
        assert await client.faults() == []
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("scope", "body"),
    [
        ("po_x", {"fail_next_refunds": -1}),
        ("po_x", {"fail_next_refunds": "3"}),
        ("po_x", {"no_such_fault": 1}),
        ("po_x", {"paid_on_close_amount": 100}),
        ("po_x", {"paid_on_close_amount": 100, "paid_on_close_currency": "usd"}),
        ("not-a-pay-order", {"delay_ms": 1}),
    ],
)
async def test_bad_faults_are_refused_and_change_nothing(
    wire: Wire, scope: str, body: dict[str, Any]
) -> None:
    resp = await wire.control.put(f"/v1/faults/{scope}", json=body)
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_request"
    assert await wire.faults() == []

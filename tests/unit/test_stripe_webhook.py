"""Reading Stripe's webhooks: the SDK's signature check, rotation, tolerance, and which
events are payments. Pure: no server."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from payorders.core.settings import Settings
from payorders.gateways.factory import GatewayNotConfigured, open_gateway
from payorders.service import stripe_webhook, webhook
from payorders.service.stripe_webhook import IgnoredEvent, read_event
from payorders.service.webhook import PaymentEvent, WebhookRejected

SECRETS = ["whsec_new", "whsec_old"]


def body(type: str = "payment_intent.succeeded", **pi: Any) -> bytes:
    intent = {
        "id": "pi_123",
        "object": "payment_intent",
        "amount": 1999,
        "amount_received": 1999,
        "currency": "usd",
        "metadata": {"pay_order_no": "po_order-42"},
        "status": "succeeded",
        **pi,
    }
    return json.dumps(
        {"id": "evt_1", "type": type, "created": 1_800_000_000, "data": {"object": intent}}
    ).encode()


def header(b: bytes, secret: str = "whsec_new", at: int | None = None) -> str:
    return webhook.sign_header([secret], int(time.time()) if at is None else at, b)


def read(b: bytes, h: str | None) -> PaymentEvent | IgnoredEvent:
    return read_event(b, h, secrets=SECRETS, tolerance_s=300)


def test_a_payment_intent_that_succeeded_is_a_payment_in_our_words() -> None:
    got = read(body(), header(body()))
    assert isinstance(got, PaymentEvent)
    assert (got.event_id, got.pay_order_no, got.txn_id, got.amount, got.currency) == (
        "evt_1",
        "po_order-42",
        "pi_123",
        1999,
        "USD",
    )


def test_a_secret_being_rotated_out_still_verifies() -> None:
    assert isinstance(read(body(), header(body(), "whsec_old")), PaymentEvent)


@pytest.mark.parametrize(
    ("h", "code"),
    [
        (None, "missing_signature"),
        ("", "missing_signature"),
        # The SDK checks the signature before the age: a forged old one is a bad signature.
        ("t=1,v1=00", "bad_signature"),
        ("garbage", "bad_signature"),
    ],
)
def test_bad_headers_are_refused(h: str | None, code: str) -> None:
    with pytest.raises(WebhookRejected) as e:
        read(body(), h)
    assert (e.value.status, e.value.code) == (401, code)


def test_a_stale_but_genuine_signature_says_so() -> None:
    b = body()
    with pytest.raises(WebhookRejected) as e:
        read(b, header(b, at=int(time.time()) - 3600))
    assert (e.value.status, e.value.code) == (401, "stale_timestamp")


def test_another_secret_is_a_bad_signature() -> None:
    b = body()
    with pytest.raises(WebhookRejected) as e:
        read(b, header(b, "whsec_someone_else"))
    assert (e.value.status, e.value.code) == (401, "bad_signature")


def test_other_event_types_are_ignored_not_refused() -> None:
    b = body("charge.refunded")
    assert read(b, header(b)) == IgnoredEvent(event_id="evt_1", type="charge.refunded")


@pytest.mark.parametrize(
    ("pi", "words"),
    [
        ({"metadata": {}}, "metadata.pay_order_no"),
        ({"metadata": {"pay_order_no": "order-1"}}, "metadata.pay_order_no"),
        ({"amount_received": 0, "amount": 0}, "amount"),
        ({"currency": "xxx"}, "currency"),
        ({"id": "pi with spaces"}, "data.object.id"),
    ],
)
def test_a_payment_without_what_a_payment_needs_is_a_422(pi: dict[str, Any], words: str) -> None:
    b = body(**pi)
    with pytest.raises(WebhookRejected) as e:
        read(b, header(b))
    assert e.value.status == 422
    assert words in e.value.reason


def test_no_configured_secret_is_a_5xx_so_stripe_retries() -> None:
    b = body()
    with pytest.raises(WebhookRejected) as e:
        read_event(b, header(b), secrets=[], tolerance_s=300)
    assert e.value.status == 503


def test_the_header_name_is_stripes() -> None:
    assert stripe_webhook.HEADER == "Stripe-Signature"


@pytest.mark.parametrize("key", [None, "", "pk_test_123", "whsec_123"])
async def test_a_missing_or_wrong_kind_of_stripe_key_is_one_clear_error(key: str | None) -> None:
    settings = Settings(gateway="stripe", stripe_api_key=key)
    with pytest.raises(GatewayNotConfigured, match="PAYORDERS_STRIPE_API_KEY"):
        async with open_gateway(settings):
            pass

"""Stripe's webhooks, verified with the official SDK and read into our ``PaymentEvent``
or ``RefundNotice``.

Only ``payment_intent.succeeded`` is a payment; ``charge.refunded`` (its object a Charge)
and ``refund.created`` / ``refund.updated`` / ``charge.refund.updated`` (a Refund) say a
refund of a PaymentIntent was made, by us or at Stripe's dashboard: only the PaymentIntent
is taken from them, its refunds are then read from Stripe. Stripe sends many other event
types to an endpoint (and an endpoint may be subscribed to more than it needs), and each
gets a 2xx and changes nothing. The event is believed only as far as the gateway's own record of the
PaymentIntent, which the route checks next (``query_capture``), as for the sandbox's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import stripe

from payorders.core import domain
from payorders.service.webhook import PaymentEvent, RefundNotice, WebhookRejected

HEADER = "Stripe-Signature"
EVENT_PAYMENT_SUCCEEDED = "payment_intent.succeeded"
CHARGE_REFUNDED = "charge.refunded"
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "charge.refund.updated"})


@dataclass(frozen=True)
class IgnoredEvent:
    """A signed event of a type that moves no money for us."""

    event_id: str
    type: str


def read_event(
    body: bytes, header: str | None, *, secrets: Sequence[str], tolerance_s: int
) -> PaymentEvent | RefundNotice | IgnoredEvent:
    """Verify the signature with any accepted secret (rotation), then read the event.

    Raises:
        WebhookRejected: no or a bad signature, one older than the tolerance, or an event
            whose PaymentIntent lacks what a payment needs (its reason names the field).
    """
    if not header:
        raise WebhookRejected(f"missing {HEADER} header", status=401, code="missing_signature")
    if not secrets:
        # Misconfiguration, not the sender's fault: refuse with a 5xx so Stripe retries.
        raise WebhookRejected(
            "no Stripe webhook secret is configured", status=503, code="not_configured"
        )
    event = None
    stale = False
    for secret in secrets:
        try:
            event = stripe.Webhook.construct_event(body, header, secret, tolerance=tolerance_s)
            break
        except stripe.SignatureVerificationError as e:
            # The SDK checks the tolerance only once a signature matched.
            stale |= "tolerance" in str(e).lower()
        except ValueError:
            raise WebhookRejected(
                "body is not valid JSON", status=400, code="malformed_body"
            ) from None
    if event is None:
        if stale:
            raise WebhookRejected(
                f"signature timestamp outside the {tolerance_s}s tolerance",
                status=401,
                code="stale_timestamp",
            )
        raise WebhookRejected("signature does not match", status=401, code="bad_signature")
    return _payment_or_ignored(json.loads(body))


def _payment_or_ignored(doc: object) -> PaymentEvent | RefundNotice | IgnoredEvent:
    if not isinstance(doc, dict):
        raise WebhookRejected("body must be a JSON object", status=400, code="malformed_body")
    try:
        event_id = domain.check_identifier(doc.get("id"), "id")
    except domain.InvalidInput as e:
        raise WebhookRejected(str(e), status=422, code="invalid_event") from None
    kind = doc.get("type")
    if kind == CHARGE_REFUNDED or kind in REFUND_EVENTS:
        return _refund_notice(event_id, str(kind), doc)
    if kind != EVENT_PAYMENT_SUCCEEDED:
        return IgnoredEvent(event_id=event_id, type=str(kind))
    data = doc.get("data")
    pi = data.get("object") if isinstance(data, dict) else None
    if not isinstance(pi, dict):
        raise WebhookRejected("data.object must be an object", status=400, code="malformed_body")
    try:
        txn_id = domain.check_identifier(pi.get("id"), "data.object.id")
        metadata = pi.get("metadata")
        pay_order_no = metadata.get("pay_order_no") if isinstance(metadata, dict) else None
        if not isinstance(pay_order_no, str) or not pay_order_no.startswith("po_"):
            raise domain.InvalidInput(
                "data.object.metadata.pay_order_no must name a pay order (po_...)"
            )
        domain.check_identifier(pay_order_no.removeprefix("po_"), "metadata.pay_order_no")
        received = pi.get("amount_received") or pi.get("amount")
        amount = domain.check_amount(received, "data.object.amount_received")
        currency = pi.get("currency")
        if not isinstance(currency, str):
            raise domain.InvalidInput("data.object.currency must be a currency code")
        currency = domain.check_currency(currency.upper())
        created = doc.get("created")
        if not isinstance(created, int) or isinstance(created, bool):
            raise domain.InvalidInput("created must be a Unix time")
    except domain.InvalidInput as e:
        raise WebhookRejected(str(e), status=422, code="invalid_event") from None
    return PaymentEvent(
        event_id=event_id,
        pay_order_no=pay_order_no,
        txn_id=txn_id,
        amount=amount,
        currency=currency,
        paid_at=datetime.fromtimestamp(created, UTC),
    )


def _refund_notice(event_id: str, kind: str, doc: dict[str, object]) -> RefundNotice | IgnoredEvent:
    """The PaymentIntent whose refunds changed; an object without one (a refund of a charge
    made without a PaymentIntent: no payment of ours) is ignored."""
    data = doc.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise WebhookRejected("data.object must be an object", status=400, code="malformed_body")
    pi = obj.get("payment_intent")
    if isinstance(pi, dict):  # expanded
        pi = pi.get("id")
    if not isinstance(pi, str) or not pi.startswith("pi_"):
        return IgnoredEvent(event_id=event_id, type=kind)
    try:
        txn_id = domain.check_identifier(pi, "data.object.payment_intent")
    except domain.InvalidInput as e:
        raise WebhookRejected(str(e), status=422, code="invalid_event") from None
    metadata = obj.get("metadata")
    named = metadata.get("pay_order_no") if isinstance(metadata, dict) else None
    # A dashboard refund carries no metadata of ours: the pay order is found by the payment.
    return RefundNotice(
        event_id=event_id, pay_order_no=named if isinstance(named, str) else "", txn_id=txn_id
    )

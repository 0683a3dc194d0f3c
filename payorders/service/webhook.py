"""Signed gateway webhooks, Stripe-style: header ``t=<unix seconds>,v1=<hex>[,v1=<hex>...]``
where each ``v1`` is HMAC-SHA256 over ``"{t}.{raw body}"`` with a shared secret.

Several ``v1`` values (and several accepted secrets) let secrets rotate without downtime.
Pure functions: the caller gives the time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from payorders.core import domain

HEADER = "Payorders-Signature"
DEFAULT_TOLERANCE_S = 300
EVENT_PAYMENT_SUCCEEDED = "payment.succeeded"
EVENT_REFUND_SUCCEEDED = "refund.succeeded"


class WebhookRejected(ValueError):
    """The webhook cannot be accepted; ``reason`` is safe to log (no secrets, no body);
    ``code`` is a short stable name for the check that refused it (a metrics label)."""

    def __init__(self, reason: str, *, status: int, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code


def signature(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign_header(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """The header a gateway sends; one ``v1`` per active secret."""
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in secrets)])


def verify(
    header: str | None,
    body: bytes,
    *,
    secrets: Sequence[str],
    now: datetime,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> int:
    """Check the signature and its age; returns the signed timestamp.

    Raises:
        WebhookRejected: missing or malformed header, stale or future timestamp, or no
            ``v1`` matching any accepted secret (compared in constant time).
    """
    if not header:
        raise WebhookRejected(f"missing {HEADER} header", status=401, code="missing_signature")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise WebhookRejected(
                "malformed signature header", status=401, code="malformed_signature"
            )
        if key == "t":
            if not value.isdigit() or len(value) > 12:
                raise WebhookRejected(
                    "malformed signature timestamp", status=401, code="malformed_signature"
                )
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookRejected(
            "signature header needs t= and v1=", status=401, code="malformed_signature"
        )
    age = now.timestamp() - timestamp
    if abs(age) > tolerance_s:
        raise WebhookRejected(
            f"signature timestamp outside the {tolerance_s}s tolerance",
            status=401,
            code="stale_timestamp",
        )
    expected = [signature(s, timestamp, body) for s in secrets]
    # Compare every pair so timing reveals nothing about which one matched.
    matched = False
    for candidate in candidates:
        for want in expected:
            matched |= hmac.compare_digest(candidate.encode(), want.encode())
    if not matched:
        raise WebhookRejected("signature does not match", status=401, code="bad_signature")
    return timestamp


@dataclass(frozen=True)
class PaymentEvent:
    event_id: str
    pay_order_no: str
    txn_id: str
    amount: int
    currency: str
    paid_at: datetime


@dataclass(frozen=True)
class RefundNotice:
    """A gateway says a refund of ``txn_id`` was made (by us, or at its dashboard). Only the
    transaction is taken from it: what was refunded is read from the gateway itself."""

    event_id: str
    pay_order_no: str
    txn_id: str


def parse_event(body: bytes) -> PaymentEvent | RefundNotice:
    """A sandbox gateway webhook: ``payment.succeeded`` or ``refund.succeeded``."""
    doc, data = _event_doc(body)
    if doc.get("type") == EVENT_REFUND_SUCCEEDED:
        try:
            event_id = domain.check_identifier(doc.get("id"), "id")
            pay_order_no = _pay_order_no(data)
            txn_id = domain.check_identifier(data.get("txn_id"), "data.txn_id")
        except domain.InvalidInput as e:
            raise WebhookRejected(str(e), status=422, code="invalid_event") from None
        return RefundNotice(event_id=event_id, pay_order_no=pay_order_no, txn_id=txn_id)
    return parse_payment_event(body)


def _event_doc(body: bytes) -> tuple[dict[str, object], dict[str, object]]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WebhookRejected("body is not valid JSON", status=400, code="malformed_body") from None
    if not isinstance(doc, dict):
        raise WebhookRejected("body must be a JSON object", status=400, code="malformed_body")
    data = doc.get("data")
    if doc.get("type") in (EVENT_PAYMENT_SUCCEEDED, EVENT_REFUND_SUCCEEDED) and not isinstance(
        data, dict
    ):
        raise WebhookRejected("data must be an object", status=400, code="malformed_body")
    return doc, data if isinstance(data, dict) else {}


def _pay_order_no(data: dict[str, object]) -> str:
    pay_order_no = data.get("pay_order_no")
    if not isinstance(pay_order_no, str) or not pay_order_no.startswith("po_"):
        raise domain.InvalidInput("data.pay_order_no must be a pay order number (po_...)")
    domain.check_identifier(pay_order_no.removeprefix("po_"), "data.pay_order_no")
    return pay_order_no


def parse_payment_event(body: bytes) -> PaymentEvent:
    """The payload of a ``payment.succeeded`` webhook, validated field by field."""
    doc, data = _event_doc(body)
    if doc.get("type") != EVENT_PAYMENT_SUCCEEDED:
        raise WebhookRejected(
            f"unsupported event type (want {EVENT_PAYMENT_SUCCEEDED} or {EVENT_REFUND_SUCCEEDED})",
            status=400,
            code="malformed_body",
        )
    try:
        event_id = domain.check_identifier(doc.get("id"), "id")
        pay_order_no = _pay_order_no(data)
        txn_id = domain.check_identifier(data.get("txn_id"), "data.txn_id")
        amount = domain.check_amount(data.get("amount"), "data.amount")
        currency = domain.check_currency(data.get("currency"))
        paid_at_raw = data.get("paid_at")
        if not isinstance(paid_at_raw, str):
            raise domain.InvalidInput("data.paid_at must be an ISO 8601 time")
        try:
            paid_at = datetime.fromisoformat(paid_at_raw)
        except ValueError:
            raise domain.InvalidInput("data.paid_at must be an ISO 8601 time") from None
        if paid_at.tzinfo is None:
            raise domain.InvalidInput("data.paid_at needs a time zone")
    except domain.InvalidInput as e:
        raise WebhookRejected(str(e), status=422, code="invalid_event") from None
    return PaymentEvent(
        event_id=event_id,
        pay_order_no=pay_order_no,
        txn_id=txn_id,
        amount=amount,
        currency=currency,
        paid_at=paid_at,
    )


def refund_event_body(
    event_id: str,
    *,
    pay_order_no: str,
    txn_id: str,
    refund_id: str,
    amount: int,
    currency: str,
    refunded_at: datetime,
) -> bytes:
    """The JSON body of the sandbox's ``refund.succeeded`` webhook."""
    return json.dumps(
        {
            "id": event_id,
            "type": EVENT_REFUND_SUCCEEDED,
            "data": {
                "pay_order_no": pay_order_no,
                "txn_id": txn_id,
                "refund_id": refund_id,
                "amount": amount,
                "currency": currency,
                "refunded_at": refunded_at.isoformat(),
            },
        },
        separators=(",", ":"),
    ).encode()


def payment_event_body(event: PaymentEvent) -> bytes:
    """The JSON body a gateway sends for ``event`` (the sandbox uses it)."""
    return json.dumps(
        {
            "id": event.event_id,
            "type": EVENT_PAYMENT_SUCCEEDED,
            "data": {
                "pay_order_no": event.pay_order_no,
                "txn_id": event.txn_id,
                "amount": event.amount,
                "currency": event.currency,
                "paid_at": event.paid_at.isoformat(),
            },
        },
        separators=(",", ":"),
    ).encode()

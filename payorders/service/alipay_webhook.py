"""Alipay's asynchronous notifications, read into our ``PaymentEvent`` or ``RefundNotice``.

Alipay POSTs a form (``application/x-www-form-urlencoded``) signed with its RSA2 key over
every parameter but ``sign`` and ``sign_type``; the check is the SDK's, through the
adapter (``verify``). Its ``app_id`` must be ours, its ``notify_time`` recent, and its
``notify_id`` is the event id we deduplicate on. Only ``TRADE_SUCCESS`` without refund
fields is a payment; one carrying ``out_biz_no``/``gmt_refund``/``refund_fee`` says a
refund of the trade was made; ``WAIT_BUYER_PAY``, ``TRADE_CLOSED`` (unpaid) and
``TRADE_FINISHED`` move no money for us. (Alipay's notification page:
https://opendocs.alipay.com/open/194/103296.) Alipay retries anything but the literal
answer ``success`` (8 notifications over about 25 h), which the route sends only once the
payment is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import parse_qsl

from payorders.gateways.alipay import CURRENCY, from_china_time, from_yuan, pay_order_no_of
from payorders.service.webhook import PaymentEvent, RefundNotice, WebhookRejected

FORM = "application/x-www-form-urlencoded"
FUTURE_SKEW = timedelta(minutes=5)
"""How far ahead of our clock a ``notify_time`` may be (clocks differ a little)."""
REFUND_FIELDS = ("out_biz_no", "gmt_refund", "refund_fee")


@dataclass(frozen=True)
class IgnoredNotification:
    """A verified notification that moves no money for us (its trade's status)."""

    event_id: str
    trade_status: str


def form_of(body: bytes) -> dict[str, str]:
    """The notification's parameters, each once.

    Raises:
        WebhookRejected: not a UTF-8 form, a parameter given twice or without a name.
    """
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise WebhookRejected("not a form", status=400, code="malformed_body") from None
    form = dict(pairs)
    if len(form) != len(pairs) or "" in form:
        raise WebhookRejected(
            "a parameter given twice or without a name", status=400, code="malformed_body"
        )
    return form


def read_notification(
    form: dict[str, str],
    *,
    verify: Callable[[dict[str, str]], bool],
    app_id: str,
    now: datetime,
    max_age_s: int,
) -> PaymentEvent | RefundNotice | IgnoredNotification:
    """Check the signature, the app, the age, then read the notification.

    Raises:
        WebhookRejected: unsigned or signed by another key (401), for another app, stale,
            or lacking what a payment needs (the reason names the field).
    """
    if not form.get("sign"):
        raise WebhookRejected("no sign parameter", status=401, code="missing_signature")
    if not verify(form):
        raise WebhookRejected(
            "the sign does not verify with Alipay's public key", status=401, code="bad_signature"
        )
    if form.get("app_id") != app_id:
        raise WebhookRejected(
            f"app_id {form.get('app_id')!r} is not this service's", status=400, code="invalid_event"
        )
    try:
        sent = from_china_time(form.get("notify_time"))
    except ValueError:
        raise WebhookRejected(
            "notify_time must be yyyy-MM-dd HH:mm:ss", status=400, code="invalid_event"
        ) from None
    if not now - timedelta(seconds=max_age_s) <= sent <= now + FUTURE_SKEW:
        raise WebhookRejected(
            f"notify_time {form['notify_time']} is outside {max_age_s} s of now",
            status=401,
            code="stale_timestamp",
        )
    notify_id = _field(form, "notify_id")
    event_id = f"alipay-{notify_id}"
    status = _field(form, "trade_status")
    out_trade_no = _field(form, "out_trade_no")
    pay_order_no = pay_order_no_of(out_trade_no)
    if pay_order_no is None:
        raise WebhookRejected(
            f"out_trade_no {out_trade_no!r} is no pay order's", status=404, code="unknown_pay_order"
        )
    trade_no = _field(form, "trade_no")
    if any(form.get(k) for k in REFUND_FIELDS):
        return RefundNotice(event_id=event_id, pay_order_no=pay_order_no, txn_id=trade_no)
    if status != "TRADE_SUCCESS":
        return IgnoredNotification(event_id=event_id, trade_status=status)
    try:
        amount = from_yuan(form.get("total_amount"))
        paid_at = from_china_time(form.get("gmt_payment"))
    except ValueError as e:
        raise WebhookRejected(
            f"total_amount or gmt_payment: {e}", status=400, code="invalid_event"
        ) from None
    return PaymentEvent(
        event_id=event_id,
        pay_order_no=pay_order_no,
        txn_id=trade_no,
        amount=amount,
        currency=CURRENCY,
        paid_at=paid_at,
    )


def _field(form: dict[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise WebhookRejected(f"{name} is missing", status=400, code="invalid_event")
    return value

"""WeChat Pay's callbacks (API v3), read into our ``PaymentEvent`` or ``RefundNotice``.

WeChat Pay POSTs JSON signed with its key over ``"{timestamp}\\n{nonce}\\n{body}\\n"``
(``Wechatpay-Timestamp/-Nonce/-Signature/-Serial`` headers), its ``resource`` encrypted
with AEAD_AES_256_GCM under our APIv3 key. The signature check and the decryption are the
SDK's, through the adapter (``read``); the SDK does not look at the timestamp's age, which
is checked here first (WeChat Pay's advice: refuse a timestamp more than 5 minutes off,
https://pay.wechatpay.cn/docs/merchant/development/interface-rules/build-verify-sign-src.html).
Then the decrypted resource's ``mchid`` (and ``appid``, which a transaction carries and a
refund does not) must be ours, and the notification ``id`` is the event id we deduplicate
on. ``TRANSACTION.SUCCESS`` with ``trade_state`` ``SUCCESS`` is a payment (支付成功回调通知,
https://pay.weixin.qq.com/doc/v3/merchant/4012791882); ``REFUND.SUCCESS``/``.ABNORMAL``/
``.CLOSED`` say a refund of the trade changed (退款结果回调通知, .../4012791886); anything
else moves no money for us. WeChat Pay retries any answer but 200/204 (15 times over
24 h 4 min), which the route sends only once the payment is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from payorders.gateways.wechatpay import (
    CALLBACK_HEADERS,
    WechatPayCallbackRefused,
    from_rfc3339,
    header,
    is_digest,
    pay_order_no_of,
)
from payorders.service.webhook import PaymentEvent, RefundNotice, WebhookRejected

PAYMENT = "TRANSACTION.SUCCESS"
REFUND_PREFIX = "REFUND."
EVENT_ID_PREFIX = "wechatpay-"
# The event id is stored as [A-Za-z0-9_-]{1,64} (webhook_event); WeChat Pay's ids are UUIDs.
_NOTIFICATION_ID = re.compile(r"[A-Za-z0-9_-]{1,54}")
_TRANSACTION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")

Read = Callable[[Mapping[str, str], bytes], dict[str, Any] | None]


@dataclass(frozen=True)
class IgnoredCallback:
    """A verified callback that moves no money for us (its event type, and why)."""

    event_id: str
    event_type: str
    why: str


def read_callback(
    headers: Mapping[str, str],
    body: bytes,
    *,
    read: Read,
    mchid: str,
    appid: str,
    now: datetime,
    tolerance_s: int,
) -> PaymentEvent | RefundNotice | IgnoredCallback:
    """Check the headers, the timestamp, the signature and the decryption (``read``: the
    SDK's, through the adapter), the merchant and app, then read the callback.

    Raises:
        WebhookRejected: a signing header missing (401), a timestamp outside
            ``tolerance_s`` of ``now`` (401), a signature or ciphertext that does not
            verify (401), another merchant or app or a field missing (400), a trade that
            is no pay order's (404).
    """
    missing = [name for name in CALLBACK_HEADERS if not header(headers, name)]
    if missing:
        raise WebhookRejected(
            f"no {', '.join(missing)} header", status=401, code="missing_signature"
        )
    timestamp = header(headers, "Wechatpay-Timestamp") or ""
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise WebhookRejected(
            "Wechatpay-Timestamp must be Unix seconds", status=401, code="malformed_signature"
        )
    if abs(now.timestamp() - int(timestamp)) > tolerance_s:
        raise WebhookRejected(
            f"Wechatpay-Timestamp {timestamp} is outside {tolerance_s} s of now",
            status=401,
            code="stale_timestamp",
        )
    try:
        callback = read(headers, body)
    except WechatPayCallbackRefused as e:
        raise WebhookRejected(str(e), status=401, code="bad_signature") from None
    except Exception as e:  # whatever the reader could not verify is not believed
        raise WebhookRejected(
            f"the callback does not verify ({type(e).__name__})", status=401, code="bad_signature"
        ) from None
    if callback is None:
        raise WebhookRejected(
            "Wechatpay-Signature does not verify with WeChat Pay's public key",
            status=401,
            code="bad_signature",
        )
    resource = callback.get("resource")
    if not isinstance(resource, dict):
        raise WebhookRejected("no decrypted resource", status=400, code="invalid_event")
    event_type = _field(callback, "event_type")
    if resource.get("mchid") != mchid:
        raise WebhookRejected(
            f"resource.mchid {resource.get('mchid')!r} is not this service's",
            status=400,
            code="invalid_event",
        )
    if ("appid" in resource or not event_type.startswith(REFUND_PREFIX)) and resource.get(
        "appid"
    ) != appid:
        raise WebhookRejected(
            f"resource.appid {resource.get('appid')!r} is not this service's",
            status=400,
            code="invalid_event",
        )
    notification_id = _field(callback, "id")
    if not _NOTIFICATION_ID.fullmatch(notification_id):
        raise WebhookRejected(
            "id must be 1-54 of A-Z, a-z, 0-9, '_' or '-'", status=400, code="invalid_event"
        )
    event_id = EVENT_ID_PREFIX + notification_id
    is_payment = event_type == PAYMENT and resource.get("trade_state") == "SUCCESS"
    if not is_payment and not event_type.startswith(REFUND_PREFIX):
        return IgnoredCallback(event_id, event_type, "moves no money")
    pay_order_no = pay_order_no_of(resource)
    if pay_order_no is None:
        out_trade_no = resource.get("out_trade_no")
        if not is_payment and is_digest(out_trade_no) and "attach" not in resource:
            # A refund callback names a long pay order number's trade by its digest alone;
            # the refund itself is read by its out_refund_no, not from this callback.
            return IgnoredCallback(
                event_id, event_type, f"a refund of {out_trade_no}, whose pay order it omits"
            )
        raise WebhookRejected(
            f"out_trade_no {out_trade_no!r} is no pay order's",
            status=404,
            code="unknown_pay_order",
        )
    txn_id = _field(resource, "transaction_id")
    if not _TRANSACTION_ID.fullmatch(txn_id):
        raise WebhookRejected(
            "resource.transaction_id is not an id", status=400, code="invalid_event"
        )
    if not is_payment:
        return RefundNotice(event_id=event_id, pay_order_no=pay_order_no, txn_id=txn_id)
    amount = resource.get("amount")
    total = amount.get("total") if isinstance(amount, dict) else None
    currency = amount.get("currency") if isinstance(amount, dict) else None
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        raise WebhookRejected(
            "resource.amount.total must be a number of fen", status=400, code="invalid_event"
        )
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise WebhookRejected(
            "resource.amount.currency must be a currency code", status=400, code="invalid_event"
        )
    try:
        paid_at = from_rfc3339(resource.get("success_time"))
    except ValueError as e:
        raise WebhookRejected(
            f"resource.success_time: {e}", status=400, code="invalid_event"
        ) from None
    return PaymentEvent(
        event_id=event_id,
        pay_order_no=pay_order_no,
        txn_id=txn_id,
        amount=total,
        currency=currency,
        paid_at=paid_at,
    )


def _field(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise WebhookRejected(f"{name} is missing", status=400, code="invalid_event")
    return value

"""The payloads of a pay order's happy path, as sizes: what the same-shape skeleton
(``bench/_skeleton.py``) sends in their place, so that its history carries as many bytes as
a pay order's without any of our models or code.

Each size is the JSON of the product's own model for a pay order as the benchmarks make
them (numbers like ``po_1a2b3c4d-s0-123``, 1000 USD), measured once when this module is
first imported (outside the workflow sandbox: ``_skeleton`` imports it passed through).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from payorders.core import domain
from payorders.core.domain import PayOrderStatus
from payorders.core.models import (
    Checkout,
    CheckoutTerms,
    CreatePayOrder,
    OpenTradeCmd,
    PaymentNotification,
    PayOrderInput,
    PayOrderResult,
    PayOrderRow,
    RecordedPayment,
    RecordPayment,
)
from workflows._story import Story

_NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)
_NO = domain.pay_order_no_for("1a2b3c4d-s0-123")
_ORDER = "1a2b3c4d-s0-123"
_TXN = f"txn-{_NO}"
_AMOUNT, _CURRENCY = 1000, "USD"


def _size(model: Any) -> int:
    return len(model.model_dump_json())


WINDOW_SUMMARY = (
    f"pay order created: {_AMOUNT} {_CURRENCY}; trade opened at the sandbox gateway;"
    " payment window until 2026-12-07 12:00:00 UTC"
)
SETTLEMENT_SUMMARY = (
    f"{_TXN} {_AMOUNT} {_CURRENCY} settled: PAY_SUCCESS;"
    " settlement window until 2026-12-08 13:00:00 UTC"
)
"""The timers' summaries, as long as the pay order's (``Story.wait``)."""


def _story_sizes() -> tuple[int, int, int]:
    """The pay order's current details (its story) at its three waits: after the trade
    is open, after the payment settled, in the settlement window."""
    story = Story()
    story.tell(_NOW, f"pay order created: {_AMOUNT} {_CURRENCY}")
    story.tell(_NOW, "trade opened at the sandbox gateway")
    head = f"PAYING · {_AMOUNT} {_CURRENCY} · paid 0 · refunded 0"
    story.wait(_NOW, "payment window", _NOW + timedelta(hours=1))
    waiting = len(story.markdown(head))
    story.tell(_NOW, f"{_TXN} {_AMOUNT} {_CURRENCY} settled: PAY_SUCCESS")
    head = f"PAY_SUCCESS · {_AMOUNT} {_CURRENCY} · paid {_AMOUNT} · refunded 0"
    settled = len(story.markdown(head))
    story.wait(_NOW, "settlement window", _NOW + timedelta(hours=25))
    return waiting, settled, len(story.markdown(head))


_ORDER_FIELDS: dict[str, Any] = {
    "pay_order_no": _NO,
    "order_no": _ORDER,
    "amount": _AMOUNT,
    "currency": _CURRENCY,
    "expires_at": _NOW,
}
"""What the input, the create command and the row say alike of the pay order."""

_row = PayOrderRow(
    **_ORDER_FIELDS,
    status=PayOrderStatus.PAYING,
    paid_amount=0,
    refunded_amount=0,
    lock_version=1,
    created_at=_NOW,
    updated_at=_NOW,
)
_payment = PaymentNotification(txn_id=_TXN, amount=_AMOUNT, currency=_CURRENCY, paid_at=_NOW)

INPUT = _size(PayOrderInput(**_ORDER_FIELDS))
CREATE = _size(CreatePayOrder(**_ORDER_FIELDS))
ROW = _size(_row)
OPEN = _size(OpenTradeCmd(pay_order_no=_NO, amount=_AMOUNT, currency=_CURRENCY, expires_at=_NOW))
CHECKOUT = _size(Checkout(gateway="sandbox", trade_ref=_NO))
CHECKOUT_TERMS = _size(
    CheckoutTerms(
        checkout=Checkout(gateway="sandbox", trade_ref=_NO),
        amount=_AMOUNT,
        currency=_CURRENCY,
        expires_at=_NOW,
        start_id="0" * 32,
    )
)
PAYMENT = _size(_payment)
RECORD = _size(
    RecordPayment(pay_order_no=_NO, payment=_payment, refund_reason=None, expected_lock_version=1)
)
RECORDED = _size(
    RecordedPayment(
        txn_id=_TXN,
        pay_order_no=_NO,
        settled=True,
        refund_reason=None,
        refund_key=None,
        order_status=PayOrderStatus.PAY_SUCCESS,
        lock_version=2,
    )
)
RESULT = _size(
    PayOrderResult(
        pay_order_no=_NO,
        status=PayOrderStatus.PAY_SUCCESS,
        paid_amount=_AMOUNT,
        refunded_amount=0,
    )
)
DETAILS = tuple("x" * n for n in _story_sizes())
"""The current details at the three waits, as strings of their sizes."""


def padded(size: int, **fields: Any) -> dict[str, Any]:
    """``fields`` and a ``pad`` string that bring its JSON to about ``size`` bytes."""
    base = len(json.dumps(fields, separators=(",", ":"))) + len(',"pad":""')
    return {**fields, "pad": "x" * max(size - base, 0)}

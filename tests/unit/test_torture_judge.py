"""The torture's verdict can fail: each way money could go wrong with merchant refunds, fed
to ``judge`` as rows and gateway records, is a violation; the books that balance are not."""

from __future__ import annotations

from typing import Any

import pytest

from payorders.tools.http_clients import GatewayAudit, GatewayMoney
from payorders.tools.torture import AMOUNT, judge

NO = "po_t-1"


def row(**changes: Any) -> dict[str, Any]:
    """A paid order refunded 300 by the shop, and a late payment compensated."""
    base: dict[str, Any] = {
        "pay_order_no": NO,
        "status": "PAY_SUCCESS",
        "amount": AMOUNT,
        "paid_amount": 2 * AMOUNT,
        "refunded_amount": AMOUNT,
        "payments": 2 * AMOUNT,
        "refunds": AMOUNT,
        "refunds_succeeded": 1,
        "merchant_refunded": 300,
        "merchant_succeeded": 1,
        "merchant_failed": 0,
        "merchant_refunding": 0,
        "terminal_events": 1,
        "refund_events": 2,
        "refund_failed_events": 0,
    }
    return {**base, **changes}


def gateway(**changes: Any) -> GatewayAudit:
    money = {"captured": 2 * AMOUNT, "refunded": AMOUNT + 300, "merchant_refunded": 300}
    audit = {"refund_keys": ["refund-po_t-1-txn-2", "mrefund-t-1-r1"]}
    for k, value in changes.items():
        (money if k in money else audit)[k] = value
    return GatewayAudit(money={NO: GatewayMoney(**money)}, **audit)


KEYS = {"refund-po_t-1-txn-2", "mrefund-t-1-r1"}


def test_balanced_books_pass_and_are_totalled() -> None:
    violations, totals = judge([row()], gateway(), KEYS)
    assert violations == []
    assert (totals["gateway_merchant_refunded"], totals["merchant_refunded"]) == (300, 300)
    assert totals["merchant REFUND_SUCCESS"] == 1


@pytest.mark.parametrize(
    ("ours", "theirs", "keys", "says"),
    [
        # A merchant refund sent twice at the gateway: 600 out, 300 recorded.
        ({}, {"refunded": AMOUNT + 600, "merchant_refunded": 600}, KEYS, "for merchant refunds"),
        ({}, {"keys_executed_twice": 1}, KEYS, "executed twice"),
        # The gateway refunded it, our row never learned: lost money in our books.
        ({"merchant_refunded": 0, "merchant_succeeded": 0, "refund_events": 1}, {}, KEYS,
         "we recorded 0"),
        ({}, {}, {"refund-po_t-1-txn-2"}, "not recorded as succeeded here"),
        # Refunded past what was paid, at the gateway and here alike.
        ({"merchant_refunded": AMOUNT + 1},
         {"refunded": 2 * AMOUNT + 1, "merchant_refunded": AMOUNT + 1}, KEYS, "past 1000"),
        # A refund of an order that never succeeded.
        ({"status": "PAY_EXPIRED", "refunds": 2 * AMOUNT, "refunded_amount": 2 * AMOUNT},
         {"refunded": 2 * AMOUNT + 300}, KEYS, "past 0"),
        ({"merchant_refunding": 1}, {}, KEYS, "still REFUNDING"),
        ({"refund_events": 1}, {}, KEYS, "1 refund events for 2 refunds"),
        ({"merchant_failed": 1}, {}, KEYS, "0 refund.failed events"),
        # A merchant refund taken for a compensation leaves the customer short.
        ({}, {"merchant_refunded": 0}, KEYS, "gateway compensated 1300"),
        ({}, {"over_refunded": ["txn-1"]}, KEYS, "refunded beyond its amount"),
    ],
)  # fmt: skip
def test_each_way_money_goes_wrong_is_a_violation(
    ours: dict[str, Any], theirs: dict[str, Any], keys: set[str], says: str
) -> None:
    violations, _ = judge([row(**ours)], gateway(**theirs), keys)
    assert any(says in v for v in violations), violations

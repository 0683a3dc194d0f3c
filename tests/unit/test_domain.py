"""Pure rules of the pay order: no fixtures, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from payorders.core import domain
from payorders.core.domain import PayOrderStatus, RefundReason, Settle

NOW = datetime(2026, 11, 27, 11, 0, tzinfo=UTC)


def test_only_success_and_expired_are_terminal() -> None:
    assert [s for s in PayOrderStatus if domain.is_terminal(s)] == [
        PayOrderStatus.PAY_SUCCESS,
        PayOrderStatus.PAY_EXPIRED,
    ]


@pytest.mark.parametrize("current", list(PayOrderStatus))
@pytest.mark.parametrize("new", list(PayOrderStatus))
def test_only_paying_moves_and_only_to_a_terminal_state(
    current: PayOrderStatus, new: PayOrderStatus
) -> None:
    expected = current is PayOrderStatus.PAYING and new is not PayOrderStatus.PAYING
    assert domain.can_transition(current, new) is expected


def test_a_matching_payment_settles_a_paying_order() -> None:
    decision = domain.decide_payment(
        status=PayOrderStatus.PAYING,
        order_amount=100,
        order_currency="USD",
        amount=100,
        currency="USD",
    )
    assert decision is Settle.SETTLE


@pytest.mark.parametrize(
    ("status", "amount", "currency", "reason"),
    [
        (PayOrderStatus.PAY_EXPIRED, 100, "USD", RefundReason.LATE),
        (PayOrderStatus.PAY_SUCCESS, 100, "USD", RefundReason.DUPLICATE),
        (PayOrderStatus.PAYING, 99, "USD", RefundReason.AMOUNT_MISMATCH),
        (PayOrderStatus.PAYING, 100, "EUR", RefundReason.CURRENCY_MISMATCH),
        (PayOrderStatus.PAY_EXPIRED, 99, "EUR", RefundReason.CURRENCY_MISMATCH),
    ],
)
def test_payments_that_cannot_settle_are_refunded_with_a_reason(
    status: PayOrderStatus, amount: int, currency: str, reason: RefundReason
) -> None:
    decision = domain.decide_payment(
        status=status, order_amount=100, order_currency="USD", amount=amount, currency=currency
    )
    assert decision is reason


@pytest.mark.parametrize(
    ("status", "paid", "refunded", "holds", "in_flight"),
    [
        (PayOrderStatus.PAY_SUCCESS, 100, 0, True, 0),
        (PayOrderStatus.PAY_SUCCESS, 200, 100, True, 0),
        (PayOrderStatus.PAY_SUCCESS, 200, 0, False, 100),
        (PayOrderStatus.PAY_EXPIRED, 0, 0, True, 0),
        (PayOrderStatus.PAY_EXPIRED, 100, 100, True, 0),
        (PayOrderStatus.PAY_EXPIRED, 100, 0, False, 100),
        (PayOrderStatus.PAYING, 0, 0, True, 0),
        (PayOrderStatus.PAYING, 99, 0, False, 99),
        (PayOrderStatus.PAY_EXPIRED, 0, 100, False, -100),
    ],
)
def test_fund_identity(
    status: PayOrderStatus, paid: int, refunded: int, holds: bool, in_flight: int
) -> None:
    check = domain.fund_check(status=status, amount=100, paid_amount=paid, refunded_amount=refunded)
    assert (check.holds, check.in_flight) == (holds, in_flight)


def test_refund_key_is_one_per_payment() -> None:
    assert domain.refund_key("po_A1", "txn_9") == "refund-po_A1-txn_9"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("amount", 0, "greater than zero"),
        ("amount", -1, "greater than zero"),
        ("amount", 1.5, "integer"),
        ("amount", True, "integer"),
        ("amount", "100", "integer"),
        ("amount", domain.MAX_AMOUNT + 1, "at most"),
        ("currency", "usd", "ISO 4217"),
        ("currency", "XYZ", "ISO 4217"),
        ("order_no", "", "1-64"),
        ("order_no", "x" * 65, "1-64"),
        ("order_no", "a'; DROP TABLE pay_order;--", "1-64"),
        ("order_no", "line\nbreak", "1-64"),
    ],
)
def test_bad_checkout_input_is_refused_with_a_clear_message(
    field: str, value: object, message: str
) -> None:
    args: dict[str, object] = {"order_no": "ord-1", "amount": 100, "currency": "USD"}
    args[field] = value
    with pytest.raises(domain.InvalidPayOrder, match=message):
        domain.validate_new_pay_order(
            **args,
            expires_at=NOW + timedelta(hours=1),
            now=NOW,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize(
    ("expires_in", "message"),
    [
        (timedelta(0), "in the future"),
        (timedelta(seconds=-1), "in the future"),
        (timedelta(days=7, seconds=1), "7 days"),
    ],
)
def test_expiry_must_be_ahead_and_within_a_week(expires_in: timedelta, message: str) -> None:
    with pytest.raises(domain.InvalidPayOrder, match=message):
        domain.validate_new_pay_order(
            order_no="o", amount=1, currency="USD", expires_at=NOW + expires_in, now=NOW
        )


def test_a_good_payment_has_no_problem_and_bad_ones_say_why() -> None:
    assert domain.payment_problem(txn_id="t_1", amount=1, currency="CNY") is None
    assert "txn_id" in (domain.payment_problem(txn_id="t 1", amount=1, currency="CNY") or "")
    assert "zero" in (domain.payment_problem(txn_id="t1", amount=0, currency="CNY") or "")


# --- the deadline of a new pay order: an absolute time or a window, never both ------------

HOUR = timedelta(hours=1)


def test_with_neither_the_deadline_is_the_default_window() -> None:
    assert domain.pay_order_deadline(now=NOW, default=HOUR) == NOW + HOUR


def test_a_window_counts_from_now() -> None:
    window = timedelta(minutes=15)
    assert domain.pay_order_deadline(now=NOW, default=HOUR, expires_in=window) == NOW + window


def test_an_absolute_deadline_keeps_its_instant_and_is_stored_in_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    given = datetime(2026, 11, 28, 10, 0, tzinfo=tokyo)  # 01:00 UTC, 14 h after NOW
    deadline = domain.pay_order_deadline(now=NOW, default=HOUR, expires_at=given)
    assert deadline == given and deadline.utcoffset() == timedelta(0)


def test_the_last_allowed_deadline_is_seven_days_away() -> None:
    last = NOW + domain.MAX_EXPIRES_IN
    assert domain.pay_order_deadline(now=NOW, default=HOUR, expires_at=last) == last
    window = domain.MAX_EXPIRES_IN
    assert domain.pay_order_deadline(now=NOW, default=HOUR, expires_in=window) == last


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expires_at": NOW + HOUR, "expires_in": HOUR}, "expires_at or expires_in, not both"),
        ({"expires_at": datetime(2026, 11, 27, 12, 0)}, "expires_at must carry a time zone"),
        ({"expires_at": NOW}, "expires_at must be in the future"),
        ({"expires_at": NOW - timedelta(seconds=1)}, "expires_at must be in the future"),
        (
            {"expires_at": NOW + domain.MAX_EXPIRES_IN + timedelta(seconds=1)},
            "expires_at must be at most 7 days away",
        ),
        # The ends of the calendar, where converting to UTC would overflow.
        (
            {"expires_at": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))},
            "expires_at must be in the future",
        ),
        (
            {"expires_at": datetime(9999, 12, 31, 23, 59, tzinfo=timezone(-timedelta(hours=14)))},
            "expires_at must be at most 7 days away",
        ),
        ({"expires_in": timedelta(0)}, "expires_in must be longer than zero"),
        ({"expires_in": timedelta(minutes=-5)}, "expires_in must be longer than zero"),
        (
            {"expires_in": domain.MAX_EXPIRES_IN + timedelta(seconds=1)},
            "expires_in must be at most 7 days",
        ),
    ],
)
def test_a_bad_deadline_is_refused_naming_the_field_and_the_rule(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(domain.InvalidPayOrder, match=message):
        domain.pay_order_deadline(now=NOW, default=HOUR, **kwargs)


def test_each_caller_names_the_fields_its_own_way() -> None:
    with pytest.raises(domain.InvalidPayOrder, match="expires_at or expires_in_s, not both"):
        domain.pay_order_deadline(
            now=NOW,
            default=HOUR,
            expires_at=NOW + HOUR,
            expires_in=HOUR,
            window_field="expires_in_s",
        )
    with pytest.raises(domain.InvalidPayOrder, match=r"^the payment window must be longer"):
        domain.check_expires_in(timedelta(0), "the payment window")
    with pytest.raises(domain.InvalidPayOrder, match=r"^the deadline must be in the future"):
        domain.check_expires_at(NOW, now=NOW, what="the deadline")


def test_an_unpaid_order_closes_cancelled_only_when_checkout_asked_within_its_window() -> None:
    deadline = NOW + HOUR
    reason = domain.close_reason
    assert reason(cancel_requested_at=None, expires_at=deadline) is domain.CloseReason.EXPIRED
    assert (
        reason(cancel_requested_at=deadline - timedelta(seconds=1), expires_at=deadline)
        is domain.CloseReason.CANCELLED
    )
    # A cancel that comes at or after the deadline finds the window over: the timer's reason.
    assert reason(cancel_requested_at=deadline, expires_at=deadline) is domain.CloseReason.EXPIRED

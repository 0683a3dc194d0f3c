"""The pay-order rules: states, transitions, payment decisions and the fund identity.

Pure functions with no I/O and no clock of their own: time comes in as a parameter.
The workflow, the SQL layer and reconciliation all obey this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import assert_never

MAX_AMOUNT = 100_000_000_000
"""Largest amount we accept, in minor units (one billion major units of a 2-decimal currency)."""

MAX_EXPIRES_IN = timedelta(days=7)
DEFAULT_EXPIRES_IN = timedelta(hours=1)
DEFAULT_SETTLEMENT_WINDOW = timedelta(hours=25)

_IDENTIFIER = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Active ISO 4217 codes; an unknown currency is refused at the edge, never stored.
CURRENCIES = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN
    BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD
    FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY
    KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP
    MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR
    RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT
    TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR
    ZMW ZWG
    """.split()  # noqa: SIM905
)


class PayOrderStatus(StrEnum):
    PAYING = "PAYING"
    PAY_SUCCESS = "PAY_SUCCESS"
    PAY_EXPIRED = "PAY_EXPIRED"


class CloseReason(StrEnum):
    """Why a pay order closed unpaid (``PAY_EXPIRED``)."""

    EXPIRED = "EXPIRED"  # its payment window ran out
    CANCELLED = "CANCELLED"  # checkout cancelled it within its payment window


class RefundReason(StrEnum):
    """Why a payment does not settle its pay order and goes back to the customer."""

    LATE = "LATE"  # the order had expired
    DUPLICATE = "DUPLICATE"  # the order was already paid by another transaction
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"


class Settle(StrEnum):
    SETTLE = "SETTLE"


PaymentDecision = Settle | RefundReason


class RefundStatus(StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    REJECTED = "REJECTED"


class MerchantRefundStatus(StrEnum):
    """A refund the shop asked for after ``PAY_SUCCESS``; both ends are final."""

    REFUNDING = "REFUNDING"
    REFUND_SUCCESS = "REFUND_SUCCESS"
    REFUND_FAILED = "REFUND_FAILED"


class RefundSource(StrEnum):
    API = "api"  # asked through our API (or the CLI)
    GATEWAY = "gateway"  # made at the gateway's dashboard, recorded when we learn of it


DEFAULT_REFUND_WINDOW = timedelta(days=365)
_REFUND_NO = re.compile(r"[A-Za-z0-9_-]{1,48}")


class InvalidInput(ValueError):
    """Bad input from a caller: nothing was started or written."""


class InvalidPayOrder(InvalidInput):
    pass


class InvalidPayment(InvalidInput):
    pass


def is_terminal(status: PayOrderStatus) -> bool:
    """Whether no code path may move the pay order out of ``status``."""
    match status:
        case PayOrderStatus.PAYING:
            return False
        case PayOrderStatus.PAY_SUCCESS | PayOrderStatus.PAY_EXPIRED:
            return True
        case _:
            assert_never(status)


def can_transition(current: PayOrderStatus, new: PayOrderStatus) -> bool:
    """Only ``PAYING`` moves, and only to a terminal state."""
    return current is PayOrderStatus.PAYING and is_terminal(new)


def close_reason(*, cancel_requested_at: datetime | None, expires_at: datetime) -> CloseReason:
    """Why an unpaid pay order closes: ``CANCELLED`` when checkout asked before its payment
    window ran out, else ``EXPIRED`` (a cancel that comes after the deadline finds the
    window over already: the timer's expiry, whichever of the two woke the workflow)."""
    if cancel_requested_at is not None and cancel_requested_at < expires_at:
        return CloseReason.CANCELLED
    return CloseReason.EXPIRED


def decide_payment(
    *,
    status: PayOrderStatus,
    order_amount: int,
    order_currency: str,
    amount: int,
    currency: str,
) -> PaymentDecision:
    """What to do with a confirmed payment: settle the order with it, or refund it and why."""
    if currency != order_currency:
        return RefundReason.CURRENCY_MISMATCH
    if amount != order_amount:
        return RefundReason.AMOUNT_MISMATCH
    match status:
        case PayOrderStatus.PAYING:
            return Settle.SETTLE
        case PayOrderStatus.PAY_SUCCESS:
            return RefundReason.DUPLICATE
        case PayOrderStatus.PAY_EXPIRED:
            return RefundReason.LATE
        case _:
            assert_never(status)


@dataclass(frozen=True)
class FundCheck:
    """The fund identity of one pay order.

    ``in_flight`` is money we hold that must still go back (a payment awaiting its refund);
    the identity holds once nothing is in flight and the bounds are respected.
    """

    expected_net: int
    net: int
    in_flight: int
    holds: bool


def fund_check(
    *, status: PayOrderStatus, amount: int, paid_amount: int, refunded_amount: int
) -> FundCheck:
    """``paid - refunded`` must equal ``amount`` for PAY_SUCCESS and ``0`` otherwise."""
    expected = amount if status is PayOrderStatus.PAY_SUCCESS else 0
    net = paid_amount - refunded_amount
    bounded = 0 <= refunded_amount <= paid_amount
    return FundCheck(
        expected_net=expected,
        net=net,
        in_flight=net - expected,
        holds=bounded and net == expected,
    )


def refund_key(pay_order_no: str, txn_id: str) -> str:
    """The idempotency key of the one refund a payment can ever have."""
    return f"refund-{pay_order_no}-{txn_id}"


MERCHANT_REFUND_KEY_PREFIX = "mrefund-"


def merchant_refund_key(refund_no: str) -> str:
    """The gateway's idempotency key of a merchant refund: one per ``refund_no``, ever (at
    most 56 characters, inside the 64 Alipay and WeChat Pay take)."""
    return f"{MERCHANT_REFUND_KEY_PREFIX}{refund_no}"


def merchant_refund_workflow_id(refund_no: str) -> str:
    return f"merchant-refund-{refund_no}"


def check_refund_no(value: object) -> str:
    if not isinstance(value, str) or not _REFUND_NO.fullmatch(value):
        raise InvalidInput("refund_no must be 1-48 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value


@dataclass(frozen=True)
class MerchantRefunds:
    """What a paid pay order's merchant refunds add up to (DESIGN.md, "The fund identity").

    ``refunded`` is confirmed by the gateway, ``in_flight`` asked for and not yet
    confirmed; ``refundable`` is what may still be asked for. ``0 <= refunded <= amount``
    always, and ``refunded + in_flight <= amount`` for what we ask; a refund made at the
    gateway's dashboard can briefly leave less than our refunds in flight (the gateway then
    refuses one of ours). The customer finally keeps ``amount - refunded``.
    """

    amount: int
    refunded: int
    in_flight: int

    @property
    def refundable(self) -> int:
        return max(0, self.amount - self.refunded - self.in_flight)

    @property
    def holds(self) -> bool:
        return 0 <= self.refunded <= self.amount and self.in_flight >= 0

    def refundable_when(self, status: PayOrderStatus) -> int:
        """What a merchant refund may ask for now: nothing unless the order was paid."""
        return self.refundable if status is PayOrderStatus.PAY_SUCCESS else 0


def refund_window_closed(*, paid_at: datetime, now: datetime, window: timedelta) -> bool:
    """Whether a merchant refund of a payment made at ``paid_at`` comes too late."""
    return now > paid_at + window


def open_trade_key(pay_order_no: str) -> str:
    """The idempotency key of the one trade a pay order opens at its gateway, ever."""
    return f"open-{pay_order_no}"


def pay_order_no_for(order_no: str) -> str:
    """One pay order per order: a retried checkout lands on the same pay order."""
    return f"po_{order_no}"


def workflow_id_for(pay_order_no: str) -> str:
    return f"pay-order-{pay_order_no}"


def late_refund_workflow_id(txn_id: str) -> str:
    return f"late-refund-{txn_id}"


def check_identifier(value: object, what: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise InvalidInput(f"{what} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value


def check_amount(value: object, what: str = "amount") -> int:
    # bool is an int in Python; a payment of True cents is still bad input.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer number of minor units")
    if value <= 0:
        raise InvalidInput(f"{what} must be greater than zero")
    if value > MAX_AMOUNT:
        raise InvalidInput(f"{what} must be at most {MAX_AMOUNT} minor units")
    return value


def check_currency(value: object) -> str:
    if not isinstance(value, str) or value not in CURRENCIES:
        raise InvalidInput("currency must be an ISO 4217 code in upper case, such as USD")
    return value


def validate_new_pay_order(
    *, order_no: object, amount: object, currency: object, expires_at: datetime, now: datetime
) -> None:
    """Raises ``InvalidPayOrder`` with a clear message for any bad checkout input."""
    try:
        check_identifier(order_no, "order_no")
        check_amount(amount)
        check_currency(currency)
    except InvalidInput as e:
        raise InvalidPayOrder(str(e)) from None
    check_expires_at(expires_at, now=now)


def check_expires_in(window: timedelta, what: str = "expires_in") -> timedelta:
    """A payment window: longer than zero and at most ``MAX_EXPIRES_IN``."""
    if window <= timedelta(0):
        raise InvalidPayOrder(f"{what} must be longer than zero")
    if window > MAX_EXPIRES_IN:
        raise InvalidPayOrder(f"{what} must be at most {MAX_EXPIRES_IN.days} days")
    return window


def check_expires_at(expires_at: datetime, *, now: datetime, what: str = "expires_at") -> datetime:
    """A deadline: with a time zone, after ``now``, at most ``MAX_EXPIRES_IN`` away.

    Returns it in UTC. The range is checked first: converting a time at either end of the
    calendar to UTC overflows, comparing it does not.
    """
    if expires_at.utcoffset() is None:
        raise InvalidPayOrder(f"{what} must carry a time zone, e.g. 2026-11-27T11:00:00Z")
    if expires_at <= now:
        raise InvalidPayOrder(f"{what} must be in the future")
    if expires_at - now > MAX_EXPIRES_IN:
        raise InvalidPayOrder(f"{what} must be at most {MAX_EXPIRES_IN.days} days away")
    return expires_at.astimezone(UTC)


def pay_order_deadline(
    *,
    now: datetime,
    default: timedelta,
    expires_at: datetime | None = None,
    expires_in: timedelta | None = None,
    at_field: str = "expires_at",
    window_field: str = "expires_in",
) -> datetime:
    """When a new pay order expires: at ``expires_at``, or ``expires_in`` from ``now``, or
    the ``default`` window from ``now``; giving both is refused.

    ``at_field`` and ``window_field`` are the caller's names of the two, for the messages.

    Raises:
        InvalidPayOrder: both given, or the one given breaks the rules; the message names
            the field and the rule.
    """
    if expires_at is not None and expires_in is not None:
        raise InvalidPayOrder(f"give {at_field} or {window_field}, not both")
    if expires_at is not None:
        return check_expires_at(expires_at, now=now, what=at_field)
    if expires_in is not None:
        return now + check_expires_in(expires_in, window_field)
    return now + default


def payment_problem(*, txn_id: object, amount: object, currency: object) -> str | None:
    """Why a payment notification cannot be accepted, or ``None`` when it can."""
    try:
        check_identifier(txn_id, "txn_id")
        check_amount(amount)
        check_currency(currency)
    except InvalidInput as e:
        return str(e)
    return None


def validate_payment(*, txn_id: object, amount: object, currency: object) -> None:
    problem = payment_problem(txn_id=txn_id, amount=amount, currency=currency)
    if problem is not None:
        raise InvalidPayment(problem)

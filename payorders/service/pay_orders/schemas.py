"""What the pay order routes take and answer."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from payorders.core import domain

PAY_ORDER_NO = r"^po_[A-Za-z0-9_-]{1,64}$"


def _currency(value: str) -> str:
    return domain.check_currency(value)


Currency = Annotated[
    str,
    AfterValidator(_currency),
    Field(json_schema_extra={"enum": sorted(domain.CURRENCIES)}, examples=["USD"]),
]


def _iso_time(value: object) -> object:
    # Only ISO 8601 text: pydantic alone would also take 1700000000 (or "1700000000") as
    # Unix seconds, and a bare date as midnight. The zone and range rules are the domain's.
    if value is None or isinstance(value, datetime):
        return value
    try:
        if isinstance(value, str) and ("T" in value or " " in value.strip()):
            return datetime.fromisoformat(value)
    except ValueError:
        pass
    raise ValueError("expires_at must be an ISO 8601 date and time, e.g. 2026-11-27T11:00:00Z")


class CreatePayOrderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_no: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", examples=["order-42"])
    amount: StrictInt = Field(gt=0, le=domain.MAX_AMOUNT, description="minor units, e.g. 1999")
    currency: Currency
    expires_in_s: StrictInt | None = Field(
        default=None,
        gt=0,
        le=int(domain.MAX_EXPIRES_IN.total_seconds()),
        description="payment window in seconds; at most one of this and expires_at"
        " (neither: the service's default, 1 h)",
    )
    expires_at: Annotated[datetime | None, BeforeValidator(_iso_time)] = Field(
        default=None,
        description="the deadline, ISO 8601 with a time zone, in the future and at most"
        " 7 days away; at most one of this and expires_in_s",
        examples=["2026-11-27T11:00:00Z"],
    )


class PayOrderOut(BaseModel):
    pay_order_no: str
    order_no: str
    amount: int
    currency: str
    expires_at: datetime
    created: bool
    checkout: dict[str, str] | None = Field(
        description="what the front end needs to let the customer pay, the same for every"
        " retry: `gateway`, and for Stripe `payment_intent` and `client_secret` (confirm the"
        " PaymentIntent with Stripe.js); for the sandbox `trade_no` and `pay_url`. Null when"
        " the pay order can no longer be paid (`not_payable` says why)",
        examples=[
            {"gateway": "stripe", "payment_intent": "pi_123", "client_secret": "pi_123_secret_456"}
        ],
    )
    not_payable: str | None = None


class PaymentOut(BaseModel):
    txn_id: str
    amount: int
    currency: str
    paid_at: datetime
    settled: bool
    refund_reason: str | None
    refund_key: str | None
    refund_status: str | None
    refund_attempts: int | None


class FundOut(BaseModel):
    holds: bool
    expected_net: int
    net: int
    in_flight: int


class PayOrderDetailsOut(BaseModel):
    pay_order_no: str
    order_no: str
    amount: int
    currency: str
    status: str
    reason: str | None = Field(
        description="why it closed unpaid (PAY_EXPIRED only): EXPIRED (its payment window ran"
        " out) or CANCELLED (checkout cancelled it); null while PAYING and on PAY_SUCCESS"
    )
    cancel_requested_by: str | None = Field(
        default=None,
        description="the name of the API token (never the token) of the first caller that"
        " asked to cancel it while it was PAYING, whatever the outcome; null when nobody did",
    )
    expires_at: datetime
    paid_amount: int
    refunded_amount: int
    lock_version: int
    gateway: str | None = Field(description="the gateway that opened the pay order's trade")
    trade_ref: str | None = Field(
        description="the gateway's id of the trade (Stripe: the PaymentIntent)"
    )
    payments: list[PaymentOut]
    fund_identity: FundOut
    refunded_by_merchant: int = Field(
        description="merchant refunds the gateway confirmed (see GET .../refunds); the"
        " customer keeps amount - refunded_by_merchant"
    )
    merchant_refund_in_flight: int = Field(
        description="merchant refunds asked for and not yet confirmed by the gateway"
    )
    refundable: int = Field(
        description="what a merchant refund may still ask for: 0 unless PAY_SUCCESS"
    )
    workflow_status: str | None
    workflow: dict[str, Any] | None = Field(
        default=None, description="the open workflow's own view (query status)"
    )


class CancelOut(BaseModel):
    pay_order_no: str
    status: str = Field(
        description="the terminal status, PAY_EXPIRED or PAY_SUCCESS (PAYING only when an"
        " operator terminated its workflow: reconciliation re-drives it to expiry)"
    )
    reason: str | None = Field(
        description="CANCELLED when a cancel closed it unpaid, EXPIRED when its payment window"
        " had run out first; null on PAY_SUCCESS"
    )
    closed: bool = Field(
        description="this call closed the pay order (PAY_EXPIRED/CANCELLED, or PAY_SUCCESS"
        " when the gateway answered the close with an earlier payment); false when it was"
        " closed already: a repeated cancel, a payment, the timer"
    )

"""What the refunds routes take and answer."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from payorders.core import domain
from payorders.core.models import MerchantRefund

REFUND_NO = r"^[A-Za-z0-9_-]{1,48}$"


class CreateRefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refund_no: str = Field(
        pattern=REFUND_NO,
        description="the shop's key of this refund: the same refund_no again is the same"
        " refund (1-48 characters)",
        examples=["return-8812"],
    )
    amount: StrictInt = Field(
        gt=0, le=domain.MAX_AMOUNT, description="minor units, at most what is still refundable"
    )
    reason: str | None = Field(default=None, max_length=500, examples=["returned: wrong size"])


class RefundOut(BaseModel):
    refund_no: str
    pay_order_no: str
    amount: int
    currency: str
    reason: str | None
    status: str = Field(
        description="REFUNDING until the gateway confirms it; REFUND_SUCCESS, or REFUND_FAILED"
        " when the gateway finally refused it (both final)"
    )
    source: str = Field(description="api, or gateway for a refund made at its dashboard")
    requested_by: str | None = Field(description="the name of the API token that asked")
    gateway_refund_id: str | None
    failure_reason: str | None
    created_at: datetime
    finished_at: datetime | None
    refundable_after: int | None = Field(
        default=None,
        description="on POST: what the pay order still has to refund once this refund is"
        " counted (in flight or done)",
    )

    @classmethod
    def of(cls, r: MerchantRefund, refundable_after: int | None = None) -> RefundOut:
        return cls(
            **r.model_dump(
                include={
                    "refund_no",
                    "pay_order_no",
                    "amount",
                    "currency",
                    "reason",
                    "requested_by",
                    "gateway_refund_id",
                    "failure_reason",
                    "created_at",
                    "finished_at",
                }
            ),
            status=r.status.value,
            source=r.source.value,
            refundable_after=refundable_after,
        )


class RefundsOut(BaseModel):
    pay_order_no: str
    amount: int
    currency: str
    refunded_by_merchant: int = Field(description="confirmed by the gateway")
    in_flight: int = Field(description="asked for, not yet confirmed")
    refundable: int = Field(description="what may still be refunded")
    refunds: list[RefundOut]

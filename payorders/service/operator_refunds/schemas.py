"""What the operator refund routes take and answer."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

TXN_ID = r"^[A-Za-z0-9_-]{1,64}$"


class OperatorRefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    txn_id: str = Field(pattern=TXN_ID, description="the gateway's transaction id")


class OperatorRefundOut(BaseModel):
    txn_id: str
    pay_order_no: str = Field(description="the capture's pay order number at the gateway")
    refund_key: str
    amount: int
    currency: str
    captured_at: datetime
    status: str = Field(description="PENDING until the gateway confirms; SUCCEEDED or REJECTED")
    attempts: int
    gateway_refund_id: str | None
    last_error: str | None
    created_at: datetime
    succeeded_at: datetime | None
    created: bool | None = Field(
        default=None, description="on POST: false when this transaction was asked for before"
    )
    requested_by: str | None = Field(
        default=None,
        description="the name of the API token (never the token) that asked for it; null for"
        " refunds asked for before names were recorded",
    )
    workflow_id: str

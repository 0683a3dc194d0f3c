"""What the webhook routes answer."""

from __future__ import annotations

from pydantic import BaseModel, Field


class WebhookAccepted(BaseModel):
    received: bool
    outcome: str
    event_duplicate: bool = Field(
        description="this webhook event (its id) was accepted before: answered with its"
        " first outcome, nothing sent again"
    )
    txn_already_recorded: bool = Field(
        description="the pay order had already recorded a payment with this txn_id when the"
        " notification arrived: its workflow counts it as a duplicate notification and"
        " nothing moves (false while an earlier notification of it is still being handled)"
    )
    duplicate: bool = Field(deprecated=True, description="the same as event_duplicate")

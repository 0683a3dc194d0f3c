"""The faults a local gateway can be armed with, and the control API's body that arms them:
one shape for the sandbox gateway and for the Stripe wire, so ``payorders fault`` drives
either."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from payorders.core import domain

_INT32_MAX = 2**31 - 1


class FaultsPatch(BaseModel):
    """The fault fields to change for one scope (the ones left out keep their values)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    fail_next_refunds: Annotated[int, Field(ge=0, le=_INT32_MAX)] = 0
    timeout_after_success_next: Annotated[int, Field(ge=0, le=_INT32_MAX)] = 0
    delay_ms: Annotated[int, Field(ge=0, le=_INT32_MAX)] = 0
    paid_on_close_amount: Annotated[int, Field(gt=0, le=domain.MAX_AMOUNT)] | None = None
    paid_on_close_currency: str | None = None
    webhook_delay_ms: Annotated[int, Field(ge=0, le=_INT32_MAX)] = 0
    webhook_duplicate_next: Annotated[int, Field(ge=0, le=_INT32_MAX)] = 0
    webhook_drop_next: Annotated[int, Field(ge=0, le=_INT32_MAX)] = 0
    webhook_reorder_next: Annotated[int, Field(ge=0, le=_INT32_MAX)] = 0

    @field_validator("paid_on_close_currency")
    @classmethod
    def _currency(cls, v: str | None) -> str | None:
        return None if v is None else domain.check_currency(v)

    @model_validator(mode="after")
    def _paid_on_close_whole(self) -> FaultsPatch:
        if self.paid_on_close_amount is not None and self.paid_on_close_currency is None:
            raise ValueError("paid_on_close_amount needs paid_on_close_currency")
        return self

"""The faults a local gateway can be armed with, and the control API's body that arms them:
one shape for the sandbox gateway and for the Stripe wire, so ``payorders fault`` drives
either."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from payorders.core import domain

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Faults:
    """The faults armed for one scope (a pay order, or ``*`` for every order)."""

    fail_next_refunds: int = 0
    """The next N refunds fail before the gateway does anything."""
    timeout_after_success_next: int = 0
    """The next N refunds are made, and their answers never reach the caller in time."""
    delay_ms: int = 0
    """Every gateway call of the scope waits this long first."""
    paid_on_close_amount: int | None = None
    paid_on_close_currency: str | None = None
    """The customer pays at the very instant the trade is closed: the payment wins."""
    webhook_delay_ms: int = 0
    """The first delivery attempt of each new event waits this long."""
    webhook_duplicate_next: int = 0
    """The next N events are delivered twice (same event id and body)."""
    webhook_drop_next: int = 0
    """The first attempt of the next N events is lost (a gateway that retries sends it
    again; localstripe never does)."""
    webhook_reorder_next: int = 0
    """The next N events are held back, so later ones overtake them."""

    def armed(self) -> bool:
        """Whether anything is still armed (spent counters are not)."""
        return any(
            getattr(self, f.name) is not None if f.default is None else getattr(self, f.name) > 0
            for f in fields(self)
        )


COUNTERS = frozenset(
    {
        "fail_next_refunds",
        "timeout_after_success_next",
        "webhook_duplicate_next",
        "webhook_drop_next",
        "webhook_reorder_next",
    }
)
"""The faults that count down: each use takes one."""


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

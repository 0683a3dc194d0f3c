"""The gateway port: the few calls we make to a payment gateway, in our own vocabulary.

Adapters translate vendor statuses into these types at their edge; nothing else sees
vendor strings. A client-side timeout never proves the gateway failed, so the errors
separate "it did not happen" from "we cannot tell".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from payorders.core.domain import RefundStatus
from payorders.core.models import Checkout

PROCESSING_HEADER = "Gateway-Processing-Ms"
"""Response header in which a gateway reports the milliseconds it spent on a request."""


class GatewayError(Exception):
    """Base of gateway failures."""


class GatewayUnavailable(GatewayError):
    """The gateway refused or failed the call before doing anything: safe to retry."""


class GatewayAmbiguous(GatewayError):
    """We cannot tell whether the gateway did the work (client timeout, reset, 5xx).

    Retry with the same idempotency key, or query; never report it as a failure.
    """

    def __init__(self, message: str, *, observed_ms: float | None = None) -> None:
        super().__init__(message)
        self.observed_ms = observed_ms


class GatewayRejected(GatewayError):
    """A permanent business refusal (for example, refund exceeds the captured amount)."""


@dataclass(frozen=True)
class OpenTrade:
    """Open the trade of a pay order at the gateway, so that the customer can pay it."""

    pay_order_no: str
    amount: int
    currency: str
    expires_at: datetime
    idempotency_key: str
    """``open-{pay_order_no}``: the same pay order opens one trade, ever."""


@dataclass(frozen=True)
class Capture:
    txn_id: str
    pay_order_no: str
    amount: int
    currency: str
    captured_at: datetime


@dataclass(frozen=True)
class CloseResult:
    """``capture`` is set when the gateway answered "already paid": the success path."""

    closed: bool
    capture: Capture | None = None


@dataclass(frozen=True)
class RefundRequest:
    idempotency_key: str
    pay_order_no: str
    txn_id: str
    amount: int
    currency: str
    refund_no: str | None = None
    """The shop's ``refund_no`` of a merchant refund (None for a compensation): carried to
    the gateway where it has a place for it (Stripe ``metadata.refund_no``)."""


@dataclass(frozen=True)
class GatewayRefund:
    idempotency_key: str
    gateway_refund_id: str
    txn_id: str
    amount: int
    currency: str
    status: RefundStatus
    created_at: datetime


@dataclass(frozen=True)
class Statement:
    captures: list[Capture]
    refunds: list[GatewayRefund]


class TradeBook(Protocol):
    """Our records of the trades opened at a gateway, for a statement read trade by trade
    where the gateway lists none (Alipay's API v2; ``ReconcileStore`` is one)."""

    async def trades_payable_in(
        self, gateway: str, start: datetime, end: datetime, *, grace_s: float
    ) -> list[str]: ...

    async def refunds_in_flight_of(
        self, pay_order_nos: list[str]
    ) -> list[tuple[str, str, str]]: ...


class Gateway(Protocol):
    name: str
    """The gateway's name in checkout answers and logs (``sandbox``, ``stripe``)."""

    async def open_trade(self, trade: OpenTrade, *, first_attempt: bool = True) -> Checkout:
        """Open the trade (idempotent by pay order) and say what checkout's front end needs.

        ``first_attempt`` False: an earlier attempt may have opened it and lost the answer;
        a gateway that ignores idempotency keys must look for that trade before creating one.
        """
        ...

    async def close_trade(self, pay_order_no: str, trade_ref: str | None = None) -> CloseResult:
        """Close the trade so it can no longer be paid; or learn it already was.

        ``trade_ref``: the gateway's id of the trade, from ``open_trade`` (None for pay
        orders opened before trades were: the gateway then finds it by pay order, if at all).
        """
        ...

    async def refund(self, request: RefundRequest) -> GatewayRefund:
        """Refund by the original route. The same key refunds at most once, ever."""
        ...

    async def query_refund(self, idempotency_key: str, txn_id: str) -> GatewayRefund | None:
        """The refund of transaction ``txn_id`` made under this key, or None if none."""
        ...

    async def query_capture(self, txn_id: str) -> Capture | None:
        """The capture of a transaction, to verify a notification against the gateway."""
        ...

    async def refunds_of(self, txn_id: str) -> list[GatewayRefund]:
        """Every refund of transaction ``txn_id`` the gateway holds, whoever made it (ours
        under our keys, and the ones made at the gateway's dashboard): what a refund
        notification is believed by."""
        ...

    async def statement(self, start: datetime, end: datetime) -> Statement:
        """Captures and refunds made in ``[start, end)``."""
        ...

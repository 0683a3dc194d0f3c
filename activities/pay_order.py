"""Activities of the pay-order saga.

They hold no business rules: each is a guarded write or a gateway call under an
idempotency key, so Temporal may retry any of them at any moment.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from temporalio import activity
from temporalio.exceptions import ApplicationError

from payorders.core import domain, metrics
from payorders.core.domain import MerchantRefundStatus, RefundReason, RefundStatus
from payorders.core.models import (
    Checkout,
    CloseTrade,
    CloseTradeResult,
    CreatePayOrder,
    ExpirePayOrder,
    MerchantRefund,
    MerchantRefundInput,
    MerchantRefundResult,
    OpenTradeCmd,
    PaymentNotification,
    PayOrderRow,
    RecordedPayment,
    RecordPayment,
    RefundOutcome,
    RefundPayment,
    TransitionResult,
)
from payorders.core.store import PayOrderNotFound, PayOrderStore, TxnConflict
from payorders.gateways.port import (
    Gateway,
    GatewayAmbiguous,
    GatewayRefund,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
)

log = logging.getLogger(__name__)


def _merchant_result(row: MerchantRefund) -> MerchantRefundResult:
    return MerchantRefundResult(
        refund_no=row.refund_no,
        status=row.status,
        gateway_refund_id=row.gateway_refund_id,
        failure_reason=row.failure_reason,
    )


class RefundLedger(Protocol):
    """Where a refund is recorded: a pay order's (``PayOrderStore``) or an operator's
    (``OperatorRefunds``). The refund itself is the same either way."""

    async def refund_status(self, refund_key: str) -> RefundStatus | None: ...

    async def note_refund_attempt(
        self, refund_key: str, attempt: int, error: str | None
    ) -> None: ...

    async def confirm_refund(self, refund_key: str, gateway_refund_id: str) -> bool: ...

    async def reject_refund(self, refund_key: str, error: str) -> bool: ...


class PayOrderActivities:
    def __init__(
        self, store: PayOrderStore, gateway: Gateway, *, refund_alert_after_attempts: int = 10
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._alert_after = refund_alert_after_attempts

    @activity.defn(name="create_pay_order")
    async def create_pay_order(self, cmd: CreatePayOrder) -> PayOrderRow:
        try:
            return await self._store.create_pay_order(cmd)
        except TxnConflict as e:
            raise ApplicationError(str(e), type="OrderConflict", non_retryable=True) from e

    @activity.defn(name="get_pay_order_row")
    async def get_pay_order_row(self, pay_order_no: str) -> PayOrderRow:
        row = await self._store.get_pay_order(pay_order_no)
        if row is None:
            raise ApplicationError(
                f"unknown pay order {pay_order_no}", type="PayOrderNotFound", non_retryable=True
            )
        return row

    @activity.defn(name="record_payment")
    async def record_payment(self, cmd: RecordPayment) -> RecordedPayment:
        try:
            recorded, new = await self._store.record_payment_new(cmd)
        except TxnConflict as e:
            raise ApplicationError(str(e), type="TxnConflict", non_retryable=True) from e
        except PayOrderNotFound as e:
            raise ApplicationError(
                f"unknown pay order {e}", type="PayOrderNotFound", non_retryable=True
            ) from e
        # Counted here, where the store says this call recorded it: once per transaction,
        # whichever workflow (pay order, late refund, re-drive) records it, and however
        # often a retry or a second notification records it again.
        reason = recorded.refund_reason
        if new and not recorded.settled and reason is not None:
            meter = activity.metric_meter()
            metrics.PAYMENTS_REFUND_REQUIRED.add(meter, reason=reason.value)
            if reason is RefundReason.LATE:
                metrics.LATE_PAYMENTS.add(meter)
        return recorded

    @activity.defn(name="expire_pay_order")
    async def expire_pay_order(self, cmd: ExpirePayOrder) -> TransitionResult:
        return await self._store.expire(cmd.pay_order_no, cmd.expected_lock_version, cmd.reason)

    @activity.defn(name="open_trade")
    async def open_trade(self, cmd: OpenTradeCmd) -> Checkout:
        """Open the pay order's trade at the gateway, once: an attempt after the first may
        follow one that opened it and lost the answer, so the adapter looks for it first."""
        checkout = await self._gateway.open_trade(
            OpenTrade(
                pay_order_no=cmd.pay_order_no,
                amount=cmd.amount,
                currency=cmd.currency,
                expires_at=cmd.expires_at,
                idempotency_key=domain.open_trade_key(cmd.pay_order_no),
            ),
            first_attempt=activity.info().attempt == 1,
        )
        try:
            kept = await self._store.record_trade(
                cmd.pay_order_no, checkout.gateway, checkout.trade_ref
            )
        except PayOrderNotFound as e:
            raise ApplicationError(
                f"unknown pay order {e}", type="PayOrderNotFound", non_retryable=True
            ) from e
        if kept != checkout.trade_ref:
            # A second trade for one pay order (a gateway that ignored our key and an earlier
            # attempt's lost answer): the first one recorded is the one checkout hands out and
            # expiry closes. Close this one so nobody can pay it; the next attempt finds the
            # first (the adapter skips closed trades when it looks).
            log.error(
                "pay order %s: gateway opened %s, but %s was recorded first: closing %s",
                cmd.pay_order_no,
                checkout.trade_ref,
                kept,
                checkout.trade_ref,
            )
            await self._gateway.close_trade(cmd.pay_order_no, checkout.trade_ref)
            raise ApplicationError(
                f"pay order {cmd.pay_order_no} already has trade {kept}", type="TradeConflict"
            )
        return checkout

    @activity.defn(name="close_trade")
    async def close_trade(self, cmd: CloseTrade) -> CloseTradeResult:
        # An ambiguous close is simply retried: closing is idempotent at every gateway.
        result = await self._gateway.close_trade(cmd.pay_order_no, cmd.trade_ref)
        if result.capture is None:
            return CloseTradeResult(already_paid=False)
        c = result.capture
        return CloseTradeResult(
            already_paid=True,
            payment=PaymentNotification(
                txn_id=c.txn_id, amount=c.amount, currency=c.currency, paid_at=c.captured_at
            ),
        )

    @activity.defn(name="refund_payment")
    async def refund_payment(self, cmd: RefundPayment) -> RefundOutcome:
        """Refund once under ``cmd.refund_key``; every failure is retried with the same key."""
        return await self._refund(cmd, self._store)

    @activity.defn(name="refund_operator_payment")
    async def refund_operator_payment(self, cmd: RefundPayment) -> RefundOutcome:
        """The same refund, of a payment no pay order holds (an operator asked for it):
        the row it confirms is an ``operator_refund``, opened before the workflow starts."""
        ledger = self._store.operator_refunds
        if await ledger.refund_status(cmd.refund_key) is None:
            # Never move money that no row of ours will account for.
            raise ApplicationError(
                f"no operator refund {cmd.refund_key}",
                type="OperatorRefundNotFound",
                non_retryable=True,
            )
        return await self._refund(cmd, ledger)

    @activity.defn(name="refund_merchant")
    async def refund_merchant(self, cmd: MerchantRefundInput) -> MerchantRefundResult:
        """A merchant refund (after ``PAY_SUCCESS``) at the gateway, under its key: confirmed
        -> ``REFUND_SUCCESS``; refused for good (a documented decline, never a timeout) ->
        ``REFUND_FAILED``; anything ambiguous is asked about, then retried."""
        refunds = self._store.merchant_refunds
        row = await refunds.get(cmd.refund_no)
        if row is None:
            # Never move money that no row of ours will account for.
            raise ApplicationError(
                f"no merchant refund {cmd.refund_no}",
                type="MerchantRefundNotFound",
                non_retryable=True,
            )
        if row.status is not MerchantRefundStatus.REFUNDING:
            return _merchant_result(row)
        attempt = activity.info().attempt
        if attempt > self._alert_after:
            log.error(
                "merchant refund %s still not confirmed after %d attempts", row.refund_no, attempt
            )
        request = RefundRequest(
            idempotency_key=row.idempotency_key,
            pay_order_no=row.pay_order_no,
            txn_id=row.txn_id,
            amount=row.amount,
            currency=row.currency,
            refund_no=row.refund_no,
        )
        try:
            refund = await self._confirmed_refund(
                request, lambda error: refunds.note_attempt(row.refund_no, attempt, error)
            )
        except GatewayRejected as e:
            await refunds.fail(row.refund_no, str(e))
            log.error("merchant refund %s refused by the gateway: %s", row.refund_no, e)
            return _merchant_result(await refunds.get(row.refund_no) or row)
        await refunds.succeed(row.refund_no, refund.gateway_refund_id)
        return _merchant_result(await refunds.get(row.refund_no) or row)

    async def _refund(self, cmd: RefundPayment, ledger: RefundLedger) -> RefundOutcome:
        attempt = activity.info().attempt
        meter = activity.metric_meter()
        metrics.REFUNDS_ATTEMPTED.add(meter)
        if attempt > self._alert_after:
            log.error("refund %s still not confirmed after %d attempts", cmd.refund_key, attempt)
        if await ledger.refund_status(cmd.refund_key) is RefundStatus.SUCCEEDED:
            # Confirmed before (an earlier attempt whose answer was lost, or reconciliation):
            # counted by whoever confirmed it, not again here.
            return RefundOutcome(
                refund_key=cmd.refund_key, status=RefundStatus.SUCCEEDED, gateway_refund_id=None
            )
        request = RefundRequest(
            idempotency_key=cmd.refund_key,
            pay_order_no=cmd.pay_order_no,
            txn_id=cmd.txn_id,
            amount=cmd.amount,
            currency=cmd.currency,
        )
        try:
            refund = await self._confirmed_refund(
                request, lambda error: ledger.note_refund_attempt(cmd.refund_key, attempt, error)
            )
        except GatewayRejected as e:
            if await ledger.reject_refund(cmd.refund_key, str(e)):
                metrics.REFUNDS_REJECTED.add(meter)
            log.error("refund %s rejected by the gateway: %s", cmd.refund_key, e)
            return RefundOutcome(
                refund_key=cmd.refund_key, status=RefundStatus.REJECTED, gateway_refund_id=None
            )
        if await ledger.confirm_refund(cmd.refund_key, refund.gateway_refund_id):
            # Only the attempt whose write moved the row PENDING -> SUCCEEDED: once per key.
            metrics.REFUNDS_CONFIRMED.add(meter)
        return RefundOutcome(
            refund_key=cmd.refund_key,
            status=RefundStatus.SUCCEEDED,
            gateway_refund_id=refund.gateway_refund_id,
        )

    async def _confirmed_refund(
        self, request: RefundRequest, note: Callable[[str | None], Awaitable[None]]
    ) -> GatewayRefund:
        """The gateway's confirmed refund of ``request``; each attempt's error (or None) is
        noted on its row. A refund the gateway accepted but has not confirmed, and anything
        ambiguous, raise for Temporal to retry under the same key.

        Raises:
            GatewayRejected: the gateway's final refusal (not retried).
        """
        try:
            refund = await self._refund_or_resolve(request)
        except (GatewayUnavailable, GatewayAmbiguous) as e:
            await note(str(e))
            raise
        await note(None)
        if refund.status is RefundStatus.PENDING:
            raise ApplicationError("refund accepted, not yet confirmed", type="RefundPending")
        if refund.status is RefundStatus.REJECTED:
            # Accepted, then failed at the gateway (Stripe: a refund ``failed`` or ``canceled``
            # days later, found under our key): a final refusal, never a success.
            raise GatewayRejected(
                f"refund {refund.gateway_refund_id} of {request.txn_id} failed at the gateway"
            )
        return refund

    async def _refund_or_resolve(self, request: RefundRequest) -> GatewayRefund:
        try:
            return await self._gateway.refund(request)
        except GatewayAmbiguous as e:
            # The gateway may have refunded: ask before anything else.
            log.warning(
                "refund %s ambiguous after %.0f ms (%s); querying the gateway",
                request.idempotency_key,
                e.observed_ms or 0,
                e,
            )
            found = await self._gateway.query_refund(request.idempotency_key, request.txn_id)
            if found is None:
                raise
            return found

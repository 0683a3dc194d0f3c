"""PayOrderWorkflow: one pay order, from checkout to the end of its settlement window.

The workflow is the single writer of its pay order. Payments arrive as signals and are
queued; checkout's cancel arrives as an update and is a request. The run loop alone
decides, from state, never from which await woke first.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from payorders.core import domain, metrics
    from payorders.core import search_attributes as sa
    from payorders.core.domain import (
        CloseReason,
        PayOrderStatus,
        RefundReason,
        RefundStatus,
        Settle,
    )
    from payorders.core.models import (
        CancelResult,
        Checkout,
        CheckoutTerms,
        CloseTrade,
        CreatePayOrder,
        ExpirePayOrder,
        OpenTradeCmd,
        PaymentNotification,
        PaymentView,
        PayOrderInput,
        PayOrderResult,
        PayOrderRow,
        PayOrderView,
        RecordedPayment,
        RecordPayment,
        TransitionResult,
    )
    from workflows import _common
    from workflows._story import Story


@workflow.defn(name="PayOrderWorkflow")
class PayOrderWorkflow:
    @workflow.init
    def __init__(self, input: PayOrderInput) -> None:
        self._in = input
        self._status = PayOrderStatus.PAYING
        self._lock_version = 0
        self._inbox: list[PaymentNotification] = []
        self._seen: set[str] = set()
        self._payments: dict[str, PaymentView] = {}
        self._paid = 0
        self._refunded = 0
        self._refunds_in_flight = 0
        self._rejected = 0
        self._duplicates = 0
        self._settlement_ends_at: datetime | None = None
        self._local = False
        self._story = Story()
        self._checkout: Checkout | None = None
        self._no_checkout: str | None = None
        """Why checkout gets no trade to pay, once that is known."""
        self._close_reason: CloseReason | None = None
        self._cancel_requested_at: datetime | None = None
        self._cancel_close_txn: str | None = None
        """The payment the gateway reported when a cancel closed the trade (already paid)."""

    @workflow.signal(name="payment_succeeded")
    def payment_succeeded(self, payment: PaymentNotification) -> None:
        """Queue a confirmed payment; drop (never raise on) what cannot be accepted."""
        problem = domain.payment_problem(
            txn_id=payment.txn_id, amount=payment.amount, currency=payment.currency
        )
        if problem is not None:
            self._rejected += 1
            workflow.logger.warning("dropped payment notification: %s", problem)
            return
        if payment.txn_id in self._seen:
            self._duplicates += 1
            return
        self._seen.add(payment.txn_id)
        self._inbox.append(payment)

    @workflow.update(name="checkout")
    async def checkout(self) -> Checkout:
        """What checkout's front end needs to let the customer pay: waits until the trade
        is open at the gateway. The same answer to every retried checkout."""
        return await self._trade_to_pay()

    async def _trade_to_pay(self) -> Checkout:
        await workflow.wait_condition(
            lambda: self._checkout is not None or self._no_checkout is not None
        )
        if self._checkout is None:
            raise ApplicationError(self._no_checkout or "", type="NotPayable", non_retryable=True)
        return self._checkout

    @workflow.update(name="checkout_terms")
    async def checkout_terms(self) -> CheckoutTerms:
        """``checkout``'s answer with the terms this run was started with, so that checkout
        needs no describe of the run after its update-with-start (bench/README.md, issue
        23). Only reads: replays of earlier histories are unchanged."""
        checkout = await self._trade_to_pay()
        return CheckoutTerms(
            checkout=checkout,
            amount=self._in.amount,
            currency=self._in.currency,
            expires_at=self._in.expires_at,
            start_id=workflow.memo_value("start_id", None),
        )

    @workflow.update(name="cancel")
    async def cancel(self) -> CancelResult:
        """Checkout asks to close the pay order now, by the expiry's path: the run loop
        closes the trade first, and a gateway that says "already paid" settles the order.
        Answers once the terminal status is durable (its write done). A repeat, or a cancel
        of a closed order, answers the current status and changes nothing."""
        mine = self._status is PayOrderStatus.PAYING and self._cancel_requested_at is None
        if mine:
            # Only a request: the run loop wakes on it and decides.
            self._cancel_requested_at = workflow.now()
            self._tell("checkout asked to cancel: close the pay order now")
        await workflow.wait_condition(lambda: domain.is_terminal(self._status))
        return CancelResult(
            pay_order_no=self._in.pay_order_no,
            status=self._status,
            close_reason=self._close_reason,
            closed=mine and self._closed_by_cancel(),
        )

    @workflow.query(name="status")
    def status(self) -> PayOrderView:
        i = self._in
        return PayOrderView(
            pay_order_no=i.pay_order_no,
            order_no=i.order_no,
            amount=i.amount,
            currency=i.currency,
            status=self._status,
            expires_at=i.expires_at,
            paid_amount=self._paid,
            refunded_amount=self._refunded,
            payments=list(self._payments.values()),
            refunds_in_flight=self._refunds_in_flight,
            rejected_notifications=self._rejected,
            duplicate_notifications=self._duplicates,
            settlement_ends_at=self._settlement_ends_at,
            close_reason=self._close_reason,
            cancel_requested_at=self._cancel_requested_at,
        )

    @workflow.run
    async def run(self, input: PayOrderInput) -> PayOrderResult:
        self._local = input.version >= 2
        row = await _common.db_write(
            "create_pay_order",
            CreatePayOrder(
                pay_order_no=input.pay_order_no,
                order_no=input.order_no,
                amount=input.amount,
                currency=input.currency,
                expires_at=input.expires_at,
            ),
            PayOrderRow,
            input.timeouts,
            local=self._local,
            summary=f"create pay order {input.amount} {input.currency}",
        )
        self._lock_version = row.lock_version
        metrics.ORDERS_CREATED.add(workflow.metric_meter())
        if row.status is PayOrderStatus.PAYING:
            self._tell(f"pay order created: {input.amount} {input.currency}")
            await self._open_trade()
        else:
            self._became(row.status, row.close_reason)
            self._tell(f"pay order found {row.status.value}")
            self._no_checkout = f"pay order {input.pay_order_no} is {row.status.value}"

        while self._status is PayOrderStatus.PAYING:
            await self._drain()
            if self._status is not PayOrderStatus.PAYING:
                break
            remaining = input.expires_at - workflow.now()
            if remaining > timedelta(0) and not self._cancel_pending():
                await self._wait_for_payment(remaining, "payment window")
                continue
            await self._expire(
                domain.close_reason(
                    cancel_requested_at=self._cancel_requested_at, expires_at=input.expires_at
                )
            )

        assert self._settlement_ends_at is not None
        while (remaining := self._settlement_ends_at - workflow.now()) > timedelta(0):
            await self._drain()
            await self._wait_for_payment(remaining, "settlement window")
        # Complete only when every payment is handled and every refund has finished.
        while True:
            await workflow.wait_condition(
                lambda: (
                    bool(self._inbox)
                    or (self._refunds_in_flight == 0 and workflow.all_handlers_finished())
                )
            )
            if not self._inbox:
                break
            await self._drain()
        return PayOrderResult(
            pay_order_no=input.pay_order_no,
            status=self._status,
            paid_amount=self._paid,
            refunded_amount=self._refunded,
        )

    async def _open_trade(self) -> None:
        i = self._in
        if i.version < 3:
            # Started before trades were opened here: checkout had nothing to wait for.
            self._no_checkout = f"pay order {i.pay_order_no} opened no trade (version {i.version})"
            return
        try:
            self._checkout = await _common.open_trade(
                OpenTradeCmd(
                    pay_order_no=i.pay_order_no,
                    amount=i.amount,
                    currency=i.currency,
                    expires_at=i.expires_at,
                ),
                i,
                local=self._local,
            )
        except ActivityError as e:
            # The gateway did not open it within the payment window: nothing can be paid,
            # and expiry closes whatever an unanswered attempt may have opened.
            workflow.logger.error("pay order %s: trade not opened: %s", i.pay_order_no, e.cause)
            self._no_checkout = "the gateway did not open the trade within the payment window"
            self._tell("trade not opened at the gateway within the payment window")
            return
        self._tell(f"trade opened at the {self._checkout.gateway} gateway")

    async def _wait_for_payment(self, wait: timedelta, what: str) -> None:
        now = workflow.now()
        summary = self._story.wait(now, what, now + wait)
        self._publish()
        with contextlib.suppress(asyncio.TimeoutError):
            await workflow.wait_condition(
                lambda: bool(self._inbox) or self._cancel_pending(),
                timeout=wait,
                timeout_summary=summary,
            )

    def _cancel_pending(self) -> bool:
        """Checkout asked to cancel and the order still waits for payment."""
        return self._cancel_requested_at is not None and self._status is PayOrderStatus.PAYING

    def _closed_by_cancel(self) -> bool:
        """Whether the cancel's close ended the order: expired as cancelled, or settled by
        the payment the gateway reported when the cancel closed the trade."""
        if self._close_reason is CloseReason.CANCELLED:
            return True
        settled = next((p.txn_id for p in self._payments.values() if p.settled), None)
        return settled is not None and settled == self._cancel_close_txn

    async def _drain(self) -> None:
        while self._inbox:
            await self._handle(self._inbox.pop(0))

    async def _handle(self, payment: PaymentNotification) -> None:
        i = self._in
        decision = domain.decide_payment(
            status=self._status,
            order_amount=i.amount,
            order_currency=i.currency,
            amount=payment.amount,
            currency=payment.currency,
        )
        settle = decision is Settle.SETTLE
        try:
            recorded = await _common.record_payment(
                RecordPayment(
                    pay_order_no=i.pay_order_no,
                    payment=payment,
                    refund_reason=None if settle else RefundReason(decision),
                    expected_lock_version=self._lock_version if settle else None,
                ),
                i.timeouts,
                local=self._local,
            )
        except ActivityError as e:
            # Only non-retryable conflicts get here (a txn id reused with other facts):
            # nothing was written; reconciliation reports it for a person.
            workflow.logger.error("payment %s not recorded: %s", payment.txn_id, e.cause)
            self._tell(f"{_money(payment)} not recorded: it contradicts our records")
            return
        self._paid += payment.amount
        self._lock_version = recorded.lock_version
        self._payments[payment.txn_id] = PaymentView(
            txn_id=payment.txn_id,
            amount=payment.amount,
            currency=payment.currency,
            settled=recorded.settled,
            refund_reason=recorded.refund_reason,
            refund_key=recorded.refund_key,
            refund_status=None if recorded.settled else RefundStatus.PENDING,
        )
        if recorded.order_status is not self._status:
            self._became(recorded.order_status)
        if recorded.settled:
            self._tell(f"{_money(payment)} settled: {recorded.order_status.value}")
        else:
            self._refunds_in_flight += 1
            self._tell(f"{_money(payment)}: refund ({recorded.refund_reason or 'order closed'})")
            asyncio.create_task(self._refund(recorded, payment))  # noqa: RUF006

    async def _refund(self, recorded: RecordedPayment, payment: PaymentNotification) -> None:
        try:
            outcome = await _common.refund(
                recorded, payment.amount, payment.currency, self._in.refund_retry, self._in.timeouts
            )
            view = self._payments[payment.txn_id]
            self._payments[payment.txn_id] = view.model_copy(
                update={"refund_status": outcome.status}
            )
            if outcome.status is RefundStatus.SUCCEEDED:
                self._refunded += payment.amount
            else:
                workflow.logger.error("refund %s rejected by the gateway", recorded.refund_key)
        finally:
            self._refunds_in_flight -= 1
        self._tell(f"refund {_money(payment)}: {outcome.status.value}")

    async def _expire(self, reason: CloseReason) -> None:
        """Close the trade at the gateway, then expire the order for ``reason`` (the timer's
        or checkout's cancel); a gateway that was already paid settles it instead."""
        i = self._in
        cancelled = reason is CloseReason.CANCELLED
        trade_ref = None if self._checkout is None else self._checkout.trade_ref
        closed = await _common.close_trade(
            CloseTrade(pay_order_no=i.pay_order_no, trade_ref=trade_ref),
            i,
            local=self._local,
            summary="checkout cancelled: close the trade at the gateway" if cancelled else None,
        )
        if closed.already_paid and closed.payment is not None:
            self._tell(f"trade close refused: already paid by {closed.payment.txn_id}")
            if closed.payment.txn_id not in self._seen:
                # The gateway was paid before it could close: that payment settles the order.
                self._seen.add(closed.payment.txn_id)
                self._inbox.insert(0, closed.payment)
                if cancelled:
                    self._cancel_close_txn = closed.payment.txn_id
                return
            if self._inbox:
                return
        elif not closed.already_paid:
            self._tell("trade closed at the gateway")
        result = await _common.db_write(
            "expire_pay_order",
            ExpirePayOrder(
                pay_order_no=i.pay_order_no, expected_lock_version=self._lock_version, reason=reason
            ),
            TransitionResult,
            i.timeouts,
            local=self._local,
            summary="trade closed: expire the pay order"
            + (" (cancelled by checkout)" if cancelled else ""),
        )
        row = result.row
        self._lock_version = row.lock_version
        expired = row.status is PayOrderStatus.PAY_EXPIRED
        # A row written before migration 0007 (a replayed history) carries no reason.
        self._became(row.status, (row.close_reason or reason) if expired else None)
        by_checkout = self._close_reason is CloseReason.CANCELLED
        self._tell(
            f"pay order {row.status.value}" + (" (cancelled by checkout)" if by_checkout else "")
        )

    def _tell(self, step: str) -> None:
        self._story.tell(workflow.now(), step)
        self._publish()

    def _publish(self) -> None:
        """The story so far as the workflow's current details (the UI's User Metadata)."""
        i = self._in
        cancelled = " (CANCELLED)" if self._close_reason is CloseReason.CANCELLED else ""
        headline = (
            f"{self._status.value}{cancelled} · {i.amount} {i.currency}"
            f" · paid {self._paid} · refunded {self._refunded}"
        )
        if self._refunds_in_flight:
            headline += f" · refunds in flight: {self._refunds_in_flight}"
        workflow.set_current_details(self._story.markdown(headline))

    def _became(self, status: PayOrderStatus, reason: CloseReason | None = None) -> None:
        self._status = status
        self._close_reason = reason
        if domain.is_terminal(status) and self._no_checkout is None and self._checkout is None:
            self._no_checkout = f"pay order {self._in.pay_order_no} is {status.value}"
        if domain.is_terminal(status) and self._settlement_ends_at is None:
            self._settlement_ends_at = workflow.now() + timedelta(
                seconds=self._in.settlement_window_s
            )
            # Once per pay order: this branch runs only on its first terminal status.
            metrics.became_terminal(workflow.metric_meter(), status)
        updates = [sa.PAY_ORDER_STATUS.value_set(status.value)]
        if reason is not None:
            updates.append(sa.CLOSE_REASON.value_set(reason.value))
        workflow.upsert_search_attributes(updates)


def _money(p: PaymentNotification) -> str:
    return f"{p.txn_id} {p.amount} {p.currency}"

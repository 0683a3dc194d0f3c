"""RedriveWorkflow: a pay order left PAYING past its expiry with no workflow (an operator
terminated it, say) is driven to its terminal state the way its own workflow would have:
close the trade, then settle with the gateway's payment or expire."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from payorders.core.domain import PayOrderStatus
    from payorders.core.models import (
        CloseTrade,
        CloseTradeResult,
        ExpirePayOrder,
        PayOrderRow,
        RecordPayment,
        RedriveInput,
        TransitionResult,
    )
    from workflows import _common


@workflow.defn(name="RedriveWorkflow")
class RedriveWorkflow:
    @workflow.run
    async def run(self, input: RedriveInput) -> PayOrderStatus:
        db = timedelta(milliseconds=input.timeouts.db_activity_start_to_close_ms)
        row: PayOrderRow = await workflow.execute_activity(
            "get_pay_order_row",
            input.pay_order_no,
            result_type=PayOrderRow,
            start_to_close_timeout=db,
            retry_policy=_common.DB_RETRY,
            summary="read the stuck pay order",
        )
        if row.status is not PayOrderStatus.PAYING:
            return row.status
        closed: CloseTradeResult = await workflow.execute_activity(
            "close_trade",
            CloseTrade(pay_order_no=row.pay_order_no, trade_ref=row.trade_ref),
            result_type=CloseTradeResult,
            start_to_close_timeout=timedelta(
                milliseconds=input.timeouts.activity_start_to_close_ms
            ),
            retry_policy=_common.until_success(input.refund_retry),
            summary="close the trade at the gateway",
        )
        if closed.already_paid and closed.payment is not None:
            p = closed.payment
            settle = (p.amount, p.currency) == (row.amount, row.currency)
            recorded = await _common.record_payment(
                RecordPayment(
                    pay_order_no=row.pay_order_no,
                    payment=p,
                    refund_reason=None,
                    expected_lock_version=row.lock_version if settle else None,
                ),
                input.timeouts,
            )
            if not recorded.settled:
                await _common.refund(
                    recorded, p.amount, p.currency, input.refund_retry, input.timeouts
                )
            return recorded.order_status
        result: TransitionResult = await workflow.execute_activity(
            "expire_pay_order",
            ExpirePayOrder(pay_order_no=row.pay_order_no, expected_lock_version=row.lock_version),
            result_type=TransitionResult,
            start_to_close_timeout=db,
            retry_policy=_common.DB_RETRY,
            summary="trade closed: expire the pay order",
        )
        return result.row.status

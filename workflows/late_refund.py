"""LateRefundWorkflow: money for a pay order whose workflow has already closed goes back.

Started by the gateway adapter as ``late-refund-{txn_id}``; records the payment (once, by
txn_id) and refunds it under the same idempotency key any other path would use.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from payorders.core.domain import RefundStatus
    from payorders.core.models import LateRefundInput, LateRefundResult, RecordPayment
    from workflows import _common


@workflow.defn(name="LateRefundWorkflow")
class LateRefundWorkflow:
    @workflow.run
    async def run(self, input: LateRefundInput) -> LateRefundResult:
        p = input.payment
        # No lock version and no reason: nobody may settle with it; the store says why not.
        recorded = await _common.record_payment(
            RecordPayment(
                pay_order_no=input.pay_order_no,
                payment=p,
                refund_reason=None,
                expected_lock_version=None,
            ),
            input.timeouts,
        )
        if recorded.settled:
            # A duplicate notification of the payment that settled the order.
            return LateRefundResult(txn_id=p.txn_id, refunded=False, refund_key=None)
        outcome = await _common.refund(
            recorded, p.amount, p.currency, input.refund_retry, input.timeouts
        )
        return LateRefundResult(
            txn_id=p.txn_id,
            refunded=outcome.status is RefundStatus.SUCCEEDED,
            refund_key=recorded.refund_key,
        )

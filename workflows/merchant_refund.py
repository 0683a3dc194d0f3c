"""MerchantRefundWorkflow: a shop gives money back after ``PAY_SUCCESS`` (a return, a
goodwill credit), by the original route.

Started as ``merchant-refund-{refund_no}`` once the service has opened the
``merchant_refund`` row under the pay order's lock (``payorders.core.merchant_refunds``, the
one writer that decides whether it fits). One small workflow per refund: a pay order
refunded many times adds nothing to any one history, and a refund months after the pay
order's own workflow completed needs nothing of it. The refund activity runs under the key
``mrefund-{refund_no}``, retried without a limit until the gateway confirms it or refuses
it for good (``REFUND_FAILED``).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from payorders.core.models import MerchantRefundInput, MerchantRefundResult
    from workflows import _common


@workflow.defn(name="MerchantRefundWorkflow")
class MerchantRefundWorkflow:
    @workflow.run
    async def run(self, input: MerchantRefundInput) -> MerchantRefundResult:
        result: MerchantRefundResult = await workflow.execute_activity(
            "refund_merchant",
            input,
            result_type=MerchantRefundResult,
            start_to_close_timeout=timedelta(
                milliseconds=input.timeouts.activity_start_to_close_ms
            ),
            retry_policy=_common.until_success(input.refund_retry),
            summary=f"refund {input.amount} {input.currency} of {input.pay_order_no}"
            f" ({input.refund_no}) by {input.txn_id}",
        )
        return result

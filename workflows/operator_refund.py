"""OperatorRefundWorkflow: an operator gives back money the gateway captured for a pay order
we never had (``payorders refund --txn``, ``POST /v1/operator-refunds``).

Started as ``operator-refund-{txn_id}`` once the service has opened the ``operator_refund``
row from the gateway's own record of the capture. It refunds under the key any other path
would use, ``refund-{pay_order_no}-{txn_id}``, with the refund activity's discipline:
retried without a limit on attempts until the gateway confirms or rejects it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from payorders.core.models import OperatorRefundInput, OperatorRefundResult, RefundOutcome
    from workflows import _common


@workflow.defn(name="OperatorRefundWorkflow")
class OperatorRefundWorkflow:
    @workflow.run
    async def run(self, input: OperatorRefundInput) -> OperatorRefundResult:
        r = input.refund
        outcome: RefundOutcome = await workflow.execute_activity(
            "refund_operator_payment",
            r,
            result_type=RefundOutcome,
            start_to_close_timeout=timedelta(
                milliseconds=input.timeouts.activity_start_to_close_ms
            ),
            retry_policy=_common.until_success(input.refund_retry),
            summary=f"operator refund {r.txn_id} {r.amount} {r.currency} (no pay order here)",
        )
        return OperatorRefundResult(txn_id=r.txn_id, refund_key=r.refund_key, status=outcome.status)

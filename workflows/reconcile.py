"""ReconcileWorkflow: one reconciliation run, started by the Temporal Schedule (or by
``payorders reconcile``). It pages through the gateway's statement by time window and
through our pay orders by keyset, one activity per slice, and continues as new before its
history grows large, so a run over millions of orders stays bounded."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from payorders.core.models import (
        ReconcileInput,
        ReconcilePage,
        ReconcilePageResult,
        ReconcileReport,
        ReconcileStart,
        ReconcileWindow,
    )
    from workflows import _common

# Continue as new past this many history events (Temporal's limit is 51,200).
HISTORY_LIMIT = 2_000
SLICE_TIMEOUT = timedelta(minutes=10)


@workflow.defn(name="ReconcileWorkflow")
class ReconcileWorkflow:
    @workflow.run
    async def run(self, input: ReconcileInput) -> ReconcileReport:
        run_id = workflow.info().workflow_id
        end = input.period_end or workflow.now()
        start = input.period_start or end - timedelta(seconds=input.lookback_s)
        if input.period_end is None:
            await workflow.execute_activity(
                "reconcile_start",
                ReconcileStart(run_id=run_id, period_start=start, period_end=end),
                start_to_close_timeout=SLICE_TIMEOUT,
                retry_policy=_common.DB_RETRY,
                summary=f"reconciliation {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M}",
            )
        state = input.model_copy(update={"period_start": start, "period_end": end})

        window = timedelta(seconds=input.window_s)
        n_windows = -(-int((end - start).total_seconds()) // input.window_s)
        for i in range(input.next_window, n_windows):
            w_start = start + i * window
            await workflow.execute_activity(
                "reconcile_statement",
                ReconcileWindow(
                    run_id=run_id,
                    start=w_start,
                    end=min(w_start + window, end),
                    timeouts=input.timeouts,
                    refund_retry=input.refund_retry,
                ),
                result_type=int,
                start_to_close_timeout=SLICE_TIMEOUT,
                retry_policy=_common.DB_RETRY,
                summary=f"gateway statement from {w_start:%Y-%m-%d %H:%M}",
            )
            if workflow.info().get_current_history_length() > HISTORY_LIMIT:
                workflow.continue_as_new(state.model_copy(update={"next_window": i + 1}))

        cursor = input.page_cursor or ""
        while True:
            page: ReconcilePageResult = await workflow.execute_activity(
                "reconcile_page",
                ReconcilePage(
                    run_id=run_id,
                    after=cursor,
                    limit=input.page_size,
                    pending_after_s=input.pending_after_s,
                    stuck_after_s=input.stuck_after_s,
                    timeouts=input.timeouts,
                    refund_retry=input.refund_retry,
                ),
                result_type=ReconcilePageResult,
                start_to_close_timeout=SLICE_TIMEOUT,
                retry_policy=_common.DB_RETRY,
                summary=f"pay orders after {cursor or 'the first'}",
            )
            if page.last is None:
                break
            cursor = page.last
            if workflow.info().get_current_history_length() > HISTORY_LIMIT:
                workflow.continue_as_new(
                    state.model_copy(update={"next_window": n_windows, "page_cursor": cursor})
                )
        report: ReconcileReport = await workflow.execute_activity(
            "reconcile_finish",
            run_id,
            result_type=ReconcileReport,
            start_to_close_timeout=SLICE_TIMEOUT,
            retry_policy=_common.DB_RETRY,
            summary="report",
        )
        return report

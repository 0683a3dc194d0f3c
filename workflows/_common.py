"""Activity options shared by the two workflows: retry policies are chosen here, where the
activities are called, from values the workflow input carries (never the environment)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from payorders.core.models import (
        Checkout,
        CloseTrade,
        CloseTradeResult,
        OpenTradeCmd,
        PayOrderInput,
        RecordedPayment,
        RecordPayment,
        RefundOutcome,
        RefundPayment,
        RetryConfig,
        Timeouts,
    )

T = TypeVar("T")

# Short database writes: retried without a limit, since a database outage is temporary.
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=30)
)


def until_success(cfg: RetryConfig) -> RetryPolicy:
    """Unlimited attempts, capped backoff: gateway calls are retried until they succeed."""
    return RetryPolicy(
        initial_interval=timedelta(milliseconds=cfg.initial_interval_ms),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(milliseconds=cfg.maximum_interval_ms),
        maximum_attempts=0,
    )


async def _execute(
    name: str,
    arg: Any,
    result_type: type[T],
    *,
    local: bool,
    start_to_close: timedelta,
    retry: RetryPolicy,
    summary: str,
    schedule_to_close: timedelta | None = None,
) -> T:
    """One activity, local (inside the workflow task) or regular, with the same options."""
    run = workflow.execute_local_activity if local else workflow.execute_activity
    result: T = await run(
        name,
        arg,
        result_type=result_type,
        start_to_close_timeout=start_to_close,
        schedule_to_close_timeout=schedule_to_close,
        retry_policy=retry,
        summary=summary,
    )
    return result


async def db_write(
    name: str,
    arg: Any,
    result_type: type[T],
    timeouts: Timeouts,
    *,
    local: bool,
    summary: str,
) -> T:
    """A short, idempotent database write, retried without a limit.

    ``local``: run it as a local activity, inside the workflow task: one marker in the
    history instead of three activity events and another workflow task, and no round trip
    through the server's task queue. Pay orders of version 1 replay with regular ones.
    """
    return await _execute(
        name,
        arg,
        result_type,
        local=local,
        start_to_close=timedelta(milliseconds=timeouts.db_activity_start_to_close_ms),
        retry=DB_RETRY,
        summary=summary,
    )


async def close_trade(
    cmd: CloseTrade, input: PayOrderInput, *, local: bool, summary: str | None = None
) -> CloseTradeResult:
    """Close the trade at the gateway: idempotent at every gateway, so retried until it
    succeeds, and safe to repeat if a worker dies after the gateway closed it.

    ``local``: inside the expiry's workflow task (one task per expiry instead of two plus
    an activity task: the expiry burst's drain rate). A gateway outage keeps it retrying
    in the worker for a minute, then with workflow timers between attempts. ``summary``:
    why it closes (default: the payment window is over).
    """
    return await _execute(
        "close_trade",
        cmd,
        CloseTradeResult,
        local=local,
        start_to_close=timedelta(milliseconds=input.timeouts.activity_start_to_close_ms),
        retry=until_success(input.refund_retry),
        summary=summary or "payment window over: close the trade at the gateway",
    )


async def open_trade(cmd: OpenTradeCmd, input: PayOrderInput, *, local: bool) -> Checkout:
    """Open the trade at the gateway, retried until it succeeds or the payment window ends
    (then nothing can be paid anyway, and expiry closes whatever a lost answer opened)."""
    window = max(input.expires_at - workflow.now(), timedelta(seconds=1))
    return await _execute(
        "open_trade",
        cmd,
        Checkout,
        local=local,
        start_to_close=timedelta(milliseconds=input.timeouts.activity_start_to_close_ms),
        schedule_to_close=window,
        retry=until_success(input.refund_retry),
        summary=f"open the trade at the gateway: {cmd.amount} {cmd.currency}",
    )


async def record_payment(
    cmd: RecordPayment, timeouts: Timeouts, *, local: bool = False
) -> RecordedPayment:
    p = cmd.payment
    intent = "settle" if cmd.settles else f"refund ({cmd.refund_reason or 'order closed'})"
    return await db_write(
        "record_payment",
        cmd,
        RecordedPayment,
        timeouts,
        local=local,
        summary=f"record payment {p.txn_id} {p.amount} {p.currency} -> {intent}",
    )


async def refund(
    recorded: RecordedPayment, amount: int, currency: str, retry: RetryConfig, timeouts: Timeouts
) -> RefundOutcome:
    assert recorded.refund_key is not None
    outcome: RefundOutcome = await workflow.execute_activity(
        "refund_payment",
        RefundPayment(
            refund_key=recorded.refund_key,
            pay_order_no=recorded.pay_order_no,
            txn_id=recorded.txn_id,
            amount=amount,
            currency=currency,
        ),
        result_type=RefundOutcome,
        start_to_close_timeout=timedelta(milliseconds=timeouts.activity_start_to_close_ms),
        retry_policy=until_success(retry),
        summary=f"refund {recorded.txn_id} {amount} {currency} ({recorded.refund_reason})",
    )
    return outcome

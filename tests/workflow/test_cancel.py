"""Checkout cancels (the workflow's ``cancel`` update) on the time-skipping test server, real
PostgreSQL and the sandbox gateway: the expiry's path, at once, with its own reason."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.testing import WorkflowEnvironment

from payorders.core import search_attributes as sa
from payorders.core.domain import CloseReason, PayOrderStatus
from payorders.core.models import CancelResult
from payorders.pay_orders import UnknownPayOrder
from payorders.sandbox.ledger import InProcessResources

from ..conftest import Stack, assert_settled, order_no, pay, running_stack

SUCCESS = PayOrderStatus.PAY_SUCCESS
EXPIRED = PayOrderStatus.PAY_EXPIRED
CANCELLED = CloseReason.CANCELLED


async def start(stack: Stack, amount: int = 1999, **faults: object) -> str:
    no = order_no("cx")
    if faults:
        await stack.svc.sandbox.set_faults(f"po_{no}", **faults)
    started = await stack.api.start_pay_order(
        order_no=no, amount=amount, currency="USD", now=await stack.now()
    )
    return started.pay_order_no


async def current_details(stack: Stack, no: str) -> list[str]:
    """The workflow's story (its current details: the UI's User Metadata), line by line."""
    metadata = await stack.handle(no).query(
        "__temporal_workflow_metadata", result_type=WorkflowMetadata
    )
    return metadata.current_details.splitlines()


async def footprint(stack: Stack, no: str) -> tuple[object, ...]:
    """Everything a cancel could write: our row and events, the gateway's ledger."""
    row = await stack.svc.store.get_pay_order(no)
    assert row is not None
    outbox = await stack.svc.store.outbox_of(no)
    ledger = await stack.svc.sandbox.ledger_of(no)
    return (
        row,
        [(e["event_type"], e["payload"]) for e in outbox],
        ledger["trade_state"],
        ledger["captured"],
        ledger["refunded"],
    )


async def test_a_cancel_closes_the_trade_and_expires_the_order_as_cancelled(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await start(stack)
        answer = await stack.api.cancel_pay_order(no)
        assert answer == CancelResult(
            pay_order_no=no, status=EXPIRED, close_reason=CANCELLED, closed=True
        )
        # Durable before the answer: the row, its event and the gateway's trade say so now.
        row = await svc.store.get_pay_order(no)
        assert row is not None and (row.status, row.close_reason) == (EXPIRED, CANCELLED)
        [event] = await svc.store.outbox_of(no)
        assert event["event_type"] == "pay_order.expired"
        assert json.loads(event["payload"])["reason"] == "CANCELLED"
        assert (await svc.sandbox.ledger_of(no))["trade_state"] == "CLOSED"
        view = await stack.view(no)
        assert (view.status, view.close_reason) == (EXPIRED, CANCELLED)
        assert view.cancel_requested_at is not None
        assert view.cancel_requested_at < view.expires_at
        attrs = (await stack.handle(no).describe()).typed_search_attributes
        assert attrs.get(sa.PAY_ORDER_STATUS) == "PAY_EXPIRED"
        assert attrs.get(sa.CLOSE_REASON) == "CANCELLED"
        story = await current_details(stack, no)
        assert story[0] == "**PAY_EXPIRED (CANCELLED) · 1999 USD · paid 0 · refunded 0**"
        steps = [line.split("` ", 1)[-1] for line in story[2:]]
        at = steps.index("checkout asked to cancel: close the pay order now")
        assert steps[at + 1 : at + 3] == [
            "trade closed at the gateway",
            "pay order PAY_EXPIRED (cancelled by checkout)",
        ]
        await stack.result(no)
        await assert_settled(stack, no, status=EXPIRED, paid=0, refunded=0, gateway_refunds=0)


async def test_a_cancel_the_gateway_answers_already_paid_settles_the_order(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await start(stack, 2500, paid_on_close_amount=2500, paid_on_close_currency="USD")
        answer = await stack.api.cancel_pay_order(no)
        assert answer == CancelResult(
            pay_order_no=no, status=SUCCESS, close_reason=None, closed=True
        )
        row = await svc.store.get_pay_order(no)
        assert row is not None and (row.status, row.close_reason) == (SUCCESS, None)
        attrs = (await stack.handle(no).describe()).typed_search_attributes
        assert attrs.get(sa.PAY_ORDER_STATUS) == "PAY_SUCCESS"
        assert attrs.get(sa.CLOSE_REASON) is None
        await stack.result(no)
        await assert_settled(stack, no, status=SUCCESS, paid=2500, refunded=0, gateway_refunds=0)


async def test_a_payment_after_the_cancel_is_refunded_as_late(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await start(stack, 700)
        assert (await stack.api.cancel_pay_order(no)).closed
        txn = await pay(stack, no, 700)
        await stack.result(no)
        await assert_settled(stack, no, status=EXPIRED, paid=700, refunded=700, gateway_refunds=1)
        [payment] = await svc.store.payments_of(no)
        assert (payment["txn_id"], payment["refund_reason"]) == (txn, "LATE")
        row = await svc.store.get_pay_order(no)
        assert row is not None and row.close_reason is CANCELLED


async def test_a_repeated_cancel_answers_the_same_and_changes_nothing(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await start(stack)
        # Two at once: one of them closes it, the other waits for the same outcome.
        both = await asyncio.gather(stack.api.cancel_pay_order(no), stack.api.cancel_pay_order(no))
        assert sorted(a.closed for a in both) == [False, True]
        assert {(a.status, a.close_reason) for a in both} == {(EXPIRED, CANCELLED)}
        before = await footprint(stack, no)
        again = await stack.api.cancel_pay_order(no)
        assert again == CancelResult(
            pay_order_no=no, status=EXPIRED, close_reason=CANCELLED, closed=False
        )
        assert await footprint(stack, no) == before
        await stack.result(no)
        # After the settlement window the workflow is gone; the row answers the same.
        assert await stack.api.cancel_pay_order(no) == again
        await assert_settled(stack, no, status=EXPIRED, paid=0, refunded=0, gateway_refunds=0)


async def test_a_cancel_after_the_expiry_keeps_the_timers_reason(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await start(stack)
        await stack.env.sleep(timedelta(hours=2))
        await stack.wait_view(no, lambda v: v.status is EXPIRED)
        before = await footprint(stack, no)
        answer = await stack.api.cancel_pay_order(no)
        assert answer == CancelResult(
            pay_order_no=no, status=EXPIRED, close_reason=CloseReason.EXPIRED, closed=False
        )
        assert await footprint(stack, no) == before
        view = await stack.view(no)
        assert (view.close_reason, view.cancel_requested_at) == (CloseReason.EXPIRED, None)
        attrs = (await stack.handle(no).describe()).typed_search_attributes
        assert attrs.get(sa.CLOSE_REASON) == "EXPIRED"
        await stack.result(no)


async def test_a_cancel_of_a_paid_order_answers_success_and_changes_nothing(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await start(stack, 100)
        await pay(stack, no, 100)
        await stack.wait_view(no, lambda v: v.status is SUCCESS)
        before = await footprint(stack, no)
        answer = await stack.api.cancel_pay_order(no)
        assert answer == CancelResult(
            pay_order_no=no, status=SUCCESS, close_reason=None, closed=False
        )
        assert await footprint(stack, no) == before
        assert (await svc.sandbox.ledger_of(no))["trade_state"] == "PAID"
        await stack.result(no)


async def test_a_cancel_and_a_payment_at_the_same_instant_end_in_one_state_with_the_money_right(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        orders = [await start(stack, 300 + i) for i in range(8)]

        async def race(no: str, amount: int, delay_ms: int) -> CancelResult:
            async def pay_later() -> None:
                await asyncio.sleep(delay_ms / 1000)
                await pay(stack, no, amount)

            answer, _ = await asyncio.gather(stack.api.cancel_pay_order(no), pay_later())
            return answer

        # From the same instant to 150 ms after the cancel (wall time: nothing is skipped
        # while these calls run), so either side may win.
        delays = [0, 0, 10, 25, 50, 75, 100, 150]
        answers = await asyncio.gather(
            *(race(no, 300 + i, delays[i]) for i, no in enumerate(orders))
        )

        for i, (no, answer) in enumerate(zip(orders, answers, strict=True)):
            amount = 300 + i
            await stack.result(no)
            row = await svc.store.get_pay_order(no)
            assert row is not None
            # The answer tells the outcome that stuck.
            assert (answer.status, answer.close_reason) == (row.status, row.close_reason)
            if row.status is SUCCESS:
                assert row.close_reason is None
                await assert_settled(
                    stack, no, status=SUCCESS, paid=amount, refunded=0, gateway_refunds=0
                )
            else:
                assert answer.closed and row.close_reason is CANCELLED
                await assert_settled(
                    stack, no, status=EXPIRED, paid=amount, refunded=amount, gateway_refunds=1
                )
        print(
            "cancel vs payment:",
            sum(a.status is SUCCESS and not a.closed for a in answers),
            "paid first,",
            sum(a.status is SUCCESS and a.closed for a in answers),
            "paid as the cancel closed,",
            sum(a.status is EXPIRED for a in answers),
            "cancelled (payment refunded)",
        )


async def test_a_cancel_of_an_unknown_pay_order_is_refused_and_starts_nothing(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = f"po_{order_no('never')}"
        with pytest.raises(UnknownPayOrder):
            await stack.api.cancel_pay_order(no)
        with pytest.raises(Exception, match="not found"):
            await stack.handle(no).describe()
        assert await svc.store.get_pay_order(no) is None

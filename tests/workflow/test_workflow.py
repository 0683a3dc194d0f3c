"""PayOrderWorkflow on the time-skipping test server, real PostgreSQL and sandbox gateway."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.testing import WorkflowEnvironment

from payorders.core.domain import PayOrderStatus, RefundReason
from payorders.sandbox.ledger import InProcessResources

from ..conftest import Stack, assert_settled, order_no, pay, running_stack

PAYING = PayOrderStatus.PAYING
SUCCESS = PayOrderStatus.PAY_SUCCESS
EXPIRED = PayOrderStatus.PAY_EXPIRED


async def expire_then_pay(stack: Stack, amount: int, currency: str = "USD", **faults: Any) -> str:
    """An order expires unpaid; then its payment lands. ``faults`` arm the gateway first."""
    no = order_no()
    if faults:
        await stack.svc.sandbox.set_faults(f"po_{no}", **faults)
    started = await stack.api.start_pay_order(
        order_no=no, amount=amount, currency=currency, now=await stack.now()
    )
    await stack.env.sleep(timedelta(hours=2))
    await stack.wait_view(started.pay_order_no, lambda v: v.status is EXPIRED)
    await pay(stack, started.pay_order_no, amount, currency)
    await stack.result(started.pay_order_no)
    return started.pay_order_no


async def test_paid_before_expiry_succeeds_and_closes_after_the_25h_window(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        started = await stack.api.start_pay_order(
            order_no=order_no(), amount=1999, currency="USD", now=await stack.now()
        )
        assert started.expires_at - await stack.now() <= timedelta(hours=1)
        # The workflow opened the trade before checkout answered; a retry gets the same one.
        assert started.checkout is not None
        assert started.checkout.gateway == "sandbox"
        assert started.checkout.trade_ref == started.pay_order_no
        assert (await stack.svc.store.get_pay_order(started.pay_order_no)).trade_ref == (
            started.pay_order_no
        )
        again = await stack.api.start_pay_order(
            order_no=started.order_no, amount=1999, currency="USD", now=await stack.now()
        )
        assert (again.created, again.checkout) == (False, started.checkout)
        await pay(stack, started.pay_order_no, 1999)
        result = await stack.result(started.pay_order_no)
        assert result.status is SUCCESS
        await assert_settled(
            stack, started.pay_order_no, status=SUCCESS, paid=1999, refunded=0, gateway_refunds=0
        )


async def test_unpaid_order_expires_after_the_default_hour(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        t0 = await stack.now()
        started = await stack.api.start_pay_order(
            order_no=order_no(), amount=500, currency="EUR", now=t0
        )
        assert started.expires_at == t0 + timedelta(hours=1)
        result = await stack.result(started.pay_order_no)
        assert result.status is EXPIRED
        # The workflow stayed open for the whole settlement window after expiring.
        assert await stack.now() >= t0 + timedelta(hours=26)
        await assert_settled(
            stack, started.pay_order_no, status=EXPIRED, paid=0, refunded=0, gateway_refunds=0
        )
        ledger = await svc.sandbox.ledger_of(started.pay_order_no)
        assert ledger["trade_state"] == "CLOSED"


async def test_gateway_already_paid_at_close_takes_the_success_path_without_refund(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = order_no()
        await svc.sandbox.set_faults(
            f"po_{no}", paid_on_close_amount=2500, paid_on_close_currency="USD"
        )
        started = await stack.api.start_pay_order(
            order_no=no, amount=2500, currency="USD", now=await stack.now()
        )
        result = await stack.result(started.pay_order_no)
        assert result.status is SUCCESS
        await assert_settled(
            stack, started.pay_order_no, status=SUCCESS, paid=2500, refunded=0, gateway_refunds=0
        )


async def test_late_payment_after_expiry_is_refunded_once(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await expire_then_pay(stack, 700, "GBP")
        await assert_settled(stack, no, status=EXPIRED, paid=700, refunded=700, gateway_refunds=1)
        [payment] = await svc.store.payments_of(no)
        assert payment["refund_reason"] == "LATE"


async def test_refund_failing_five_times_then_succeeding_refunds_exactly_once(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await expire_then_pay(stack, 300, fail_next_refunds=5)
        await assert_settled(stack, no, status=EXPIRED, paid=300, refunded=300, gateway_refunds=1)
        ledger = await svc.sandbox.ledger_of(no)
        outcomes = [outcome for _, outcome in ledger["refund_calls"]]
        assert outcomes == ["FAILED_INJECTED"] * 5 + ["SUCCEEDED"]
        [payment] = await svc.store.payments_of(no)
        assert payment["attempts"] == 6


async def test_refund_timing_out_after_the_gateway_refunded_is_not_refunded_twice(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        no = await expire_then_pay(stack, 4200, "JPY", timeout_after_success_next=1)
        await assert_settled(stack, no, status=EXPIRED, paid=4200, refunded=4200, gateway_refunds=1)
        ledger = await svc.sandbox.ledger_of(no)
        outcomes = [outcome for _, outcome in ledger["refund_calls"]]
        # The caller saw a timeout after the money moved; it asked instead of refunding again.
        assert outcomes == ["SUCCEEDED", "ANSWER_WITHHELD"]


async def test_the_same_notification_twice_is_ignored(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        started = await stack.api.start_pay_order(
            order_no=order_no(), amount=100, currency="USD", now=await stack.now()
        )
        txn = await pay(stack, started.pay_order_no, 100)
        await pay(stack, started.pay_order_no, 100, txn_id=txn)
        view = await stack.wait_view(
            started.pay_order_no, lambda v: v.status is SUCCESS and v.duplicate_notifications == 1
        )
        assert len(view.payments) == 1
        await stack.result(started.pay_order_no)
        await assert_settled(
            stack, started.pay_order_no, status=SUCCESS, paid=100, refunded=0, gateway_refunds=0
        )


async def test_a_second_payment_is_refunded_as_a_duplicate(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        started = await stack.api.start_pay_order(
            order_no=order_no(), amount=100, currency="USD", now=await stack.now()
        )
        first = await pay(stack, started.pay_order_no, 100)
        second = await pay(stack, started.pay_order_no, 100)
        result = await stack.result(started.pay_order_no)
        assert (result.status, result.paid_amount, result.refunded_amount) == (SUCCESS, 200, 100)
        await assert_settled(
            stack, started.pay_order_no, status=SUCCESS, paid=200, refunded=100, gateway_refunds=1
        )
        by_txn = {p["txn_id"]: p for p in await svc.store.payments_of(started.pay_order_no)}
        assert by_txn[first]["settled"] and by_txn[second]["refund_reason"] == "DUPLICATE"


async def test_a_wrong_amount_or_currency_is_refunded_and_the_order_still_waits(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        started = await stack.api.start_pay_order(
            order_no=order_no(), amount=1000, currency="USD", now=await stack.now()
        )
        no = started.pay_order_no
        await pay(stack, no, 999)
        await pay(stack, no, 1000, "EUR")
        view = await stack.wait_view(
            no, lambda v: len(v.payments) == 2 and v.refunds_in_flight == 0
        )
        assert view.status is PAYING
        assert {p.refund_reason for p in view.payments} == {
            RefundReason.AMOUNT_MISMATCH,
            RefundReason.CURRENCY_MISMATCH,
        }
        await pay(stack, no, 1000)
        result = await stack.result(no)
        assert (result.status, result.paid_amount, result.refunded_amount) == (
            SUCCESS,
            2999,
            1999,
        )
        await assert_settled(stack, no, status=SUCCESS, paid=2999, refunded=1999, gateway_refunds=2)


async def test_malformed_signals_are_dropped_without_crashing_the_workflow(
    ts_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(ts_env, svc) as stack:
        started = await stack.api.start_pay_order(
            order_no=order_no(), amount=100, currency="USD", now=await stack.now()
        )
        handle = stack.client.get_workflow_handle(started.workflow_id)
        paid_at = (await stack.now()).isoformat()
        for bad in (
            {"txn_id": "t-neg", "amount": -5, "currency": "USD", "paid_at": paid_at},
            {"txn_id": "t-zero", "amount": 0, "currency": "USD", "paid_at": paid_at},
            {"txn_id": "t cur", "amount": 100, "currency": "usd", "paid_at": paid_at},
            {"txn_id": "t-frac", "amount": 1.5, "currency": "USD", "paid_at": paid_at},
            {"txn_id": "t-str", "amount": "100", "currency": "USD", "paid_at": paid_at},
            {"amount": 100, "currency": "USD"},
            "not even an object",
        ):
            await handle.signal("payment_succeeded", bad)
        await pay(stack, started.pay_order_no, 100)
        view = await stack.wait_view(started.pay_order_no, lambda v: v.status is SUCCESS)
        assert view.rejected_notifications == 3  # the rest never decoded: dropped by the SDK
        await stack.result(started.pay_order_no)
        await assert_settled(
            stack, started.pay_order_no, status=SUCCESS, paid=100, refunded=0, gateway_refunds=0
        )

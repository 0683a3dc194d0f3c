"""Scenarios on the real ``temporal`` dev server, real PostgreSQL, and real worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio import workflow
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from payorders.core.domain import InvalidPayment, InvalidPayOrder, PayOrderStatus, RefundStatus
from payorders.core.models import Checkout, CheckoutTerms, LateRefundResult, PayOrderInput
from payorders.pay_orders import NotifyOutcome, StartedPayOrder, UnknownPayOrder
from payorders.sandbox.app import create_sandbox_app
from payorders.sandbox.ledger import InProcessResources
from workflows.late_refund import LateRefundWorkflow

from ..conftest import Stack, assert_settled, make_settings, order_no, pay, running_stack
from ..http_stack import free_port, serve, worker_process

pytestmark = pytest.mark.slow

SUCCESS = PayOrderStatus.PAY_SUCCESS
EXPIRED = PayOrderStatus.PAY_EXPIRED
HISTORIES = Path(__file__).resolve().parents[1] / "histories"


async def sleep_until(when: datetime) -> None:
    await asyncio.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()))


async def test_payment_and_expiry_landing_together_end_in_exactly_one_terminal_state(
    dev_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(dev_env, svc, settlement_window_s=3) as stack:
        started = await asyncio.gather(
            *(
                stack.api.start_pay_order(
                    order_no=order_no("race"),
                    amount=1000 + i,
                    currency="USD",
                    expires_in=timedelta(seconds=4),
                )
                for i in range(50)
            )
        )

        async def pay_at(i: int, order: StartedPayOrder) -> None:
            # Payments land from 100 ms before to 300 ms after the expiry instant.
            await sleep_until(order.expires_at + timedelta(milliseconds=100 * (i % 5) - 100))
            await pay(stack, order.pay_order_no, order.amount)

        await asyncio.gather(*(pay_at(i, s) for i, s in enumerate(started)))
        results = await asyncio.gather(*(stack.result(s.pay_order_no) for s in started))
        outcomes = [r.status for r in results]
        assert set(outcomes) <= {SUCCESS, EXPIRED}
        print(f"race: {outcomes.count(SUCCESS)} paid, {outcomes.count(EXPIRED)} expired")
        for s, r in zip(started, results, strict=True):
            refunded = 0 if r.status is SUCCESS else s.amount
            await assert_settled(
                stack,
                s.pay_order_no,
                status=r.status,
                paid=s.amount,
                refunded=refunded,
                gateway_refunds=1 if refunded else 0,
            )


async def test_a_notification_after_the_workflow_closed_is_refunded_by_a_late_refund_workflow(
    dev_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(dev_env, svc, settlement_window_s=1) as stack:
        started = await stack.api.start_pay_order(order_no=order_no(), amount=250, currency="EUR")
        settling_txn = await pay(stack, started.pay_order_no, 250, "EUR")
        assert (await stack.result(started.pay_order_no)).status is SUCCESS
        late_txn = await pay(stack, started.pay_order_no, 250, "EUR")
        late = stack.client.get_workflow_handle_for(
            LateRefundWorkflow.run, f"late-refund-{late_txn}"
        )
        assert await late.result() == LateRefundResult(
            txn_id=late_txn, refunded=True, refund_key=f"refund-{started.pay_order_no}-{late_txn}"
        )
        # The settling payment's notification retried after close: recorded, not refunded.
        capture = (await svc.sandbox.ledger_of(started.pay_order_no))["captures"][0]
        assert capture.txn_id == settling_txn
        outcome = await stack.api.notify_payment(
            pay_order_no=started.pay_order_no,
            txn_id=settling_txn,
            amount=250,
            currency="EUR",
            paid_at=capture.captured_at,
        )
        assert outcome is NotifyOutcome.LATE_REFUND_STARTED
        dup = stack.client.get_workflow_handle_for(
            LateRefundWorkflow.run, f"late-refund-{settling_txn}"
        )
        assert (await dup.result()).refunded is False
        again = await stack.api.notify_payment(
            pay_order_no=started.pay_order_no,
            txn_id=late_txn,
            amount=250,
            currency="EUR",
            paid_at=capture.captured_at,
        )
        assert again is NotifyOutcome.LATE_REFUND_EXISTS
        await assert_settled(
            stack, started.pay_order_no, status=SUCCESS, paid=500, refunded=250, gateway_refunds=1
        )


async def test_bad_calls_are_refused_and_start_nothing(
    dev_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(dev_env, svc) as stack:
        for kwargs in (
            {"amount": 0, "currency": "USD"},
            {"amount": -5, "currency": "USD"},
            {"amount": 10.5, "currency": "USD"},
            {"amount": 100, "currency": "ABC"},
            {"amount": 100, "currency": "USD", "expires_in": timedelta(seconds=-1)},
            {"amount": 100, "currency": "USD", "expires_in": timedelta(days=8)},
        ):
            no = order_no("bad")
            with pytest.raises(InvalidPayOrder):
                await stack.api.start_pay_order(order_no=no, **kwargs)  # type: ignore[arg-type]
            with pytest.raises(Exception, match="not found"):
                await stack.client.get_workflow_handle(f"pay-order-po_{no}").describe()
        for bad_no in ("", "x" * 65, "o'; DROP TABLE pay_order;--"):
            with pytest.raises(InvalidPayOrder):
                await stack.api.start_pay_order(order_no=bad_no, amount=1, currency="USD")
        now = datetime.now(UTC)
        with pytest.raises(UnknownPayOrder):
            await stack.api.notify_payment(
                pay_order_no="po_never-created", txn_id="t1", amount=1, currency="USD", paid_at=now
            )
        started = await stack.api.start_pay_order(order_no=order_no(), amount=9, currency="USD")
        for txn, amount in (("bad txn", 9), ("t-ok", 0), ("t-ok", -9)):
            with pytest.raises(InvalidPayment):
                await stack.api.notify_payment(
                    pay_order_no=started.pay_order_no,
                    txn_id=txn,
                    amount=amount,
                    currency="USD",
                    paid_at=now,
                )
        view = await stack.wait_view(started.pay_order_no, lambda v: True)
        assert view.payments == [] and view.rejected_notifications == 0


async def test_checkout_retried_returns_the_same_pay_order_and_refuses_another_amount(
    dev_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    from payorders.pay_orders import PayOrderConflict

    async with running_stack(dev_env, svc) as stack:
        no = order_no()
        first = await stack.api.start_pay_order(order_no=no, amount=100, currency="USD")
        again = await stack.api.start_pay_order(order_no=no, amount=100, currency="USD")
        assert first.created and not again.created
        assert (again.pay_order_no, again.expires_at) == (first.pay_order_no, first.expires_at)
        with pytest.raises(PayOrderConflict):
            await stack.api.start_pay_order(order_no=no, amount=101, currency="USD")


async def test_checkout_answers_the_runs_terms_without_a_describe(
    dev_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(dev_env, svc) as stack:
        no = order_no()
        started = await stack.api.start_pay_order(order_no=no, amount=100, currency="USD")
        handle = stack.client.get_workflow_handle(started.workflow_id)
        terms = await handle.execute_update("checkout_terms", result_type=CheckoutTerms)
        memo = await (await handle.describe()).memo()
    # The update's terms are the describe's memo, which checkout read before.
    assert (terms.amount, terms.currency, terms.expires_at.isoformat(), terms.start_id) == (
        memo["amount"],
        memo["currency"],
        memo["expires_at"],
        memo["start_id"],
    )
    assert terms.checkout == started.checkout


@workflow.defn(name="PayOrderWorkflow", sandboxed=False)
class WorkflowBeforeCheckoutTerms:
    """A pay order's run as a worker older than the ``checkout_terms`` update runs it."""

    def __init__(self) -> None:
        self._no = ""

    @workflow.update(name="checkout")
    async def checkout(self) -> Checkout:
        return Checkout(gateway="sandbox", trade_ref=self._no)

    @workflow.run
    async def run(self, input: PayOrderInput) -> None:
        self._no = input.pay_order_no
        await workflow.wait_condition(lambda: False)


async def test_checkout_on_a_worker_older_than_checkout_terms_asks_checkout_and_describes(
    dev_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    from payorders.pay_orders import PayOrderConflict, PayOrders

    settings = make_settings()
    async with Worker(
        dev_env.client,
        task_queue=settings.task_queue,
        workflows=[WorkflowBeforeCheckoutTerms],
    ):
        api = PayOrders(dev_env.client, svc.store, settings)
        no = order_no("rolling")
        first = await api.start_pay_order(order_no=no, amount=100, currency="USD")
        again = await api.start_pay_order(order_no=no, amount=100, currency="USD")
        with pytest.raises(PayOrderConflict):
            await api.start_pay_order(order_no=no, amount=101, currency="USD")
        await dev_env.client.get_workflow_handle(first.workflow_id).terminate()
    assert (
        first.checkout
        == again.checkout
        == Checkout(gateway="sandbox", trade_ref=first.pay_order_no)
    )
    assert first.created and not again.created
    assert again.expires_at == first.expires_at


async def test_operators_find_orders_by_search_attributes(
    dev_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    async with running_stack(dev_env, svc, settlement_window_s=60) as stack:
        no = order_no("sa")
        started = await stack.api.start_pay_order(order_no=no, amount=10, currency="USD")
        await pay(stack, started.pay_order_no, 10)
        await stack.wait_view(started.pay_order_no, lambda v: v.status is SUCCESS)
        query = f"PayOrderStatus = 'PAY_SUCCESS' AND OrderNo = '{no}'"
        for _ in range(100):  # visibility is eventually consistent
            found = [w.id async for w in stack.client.list_workflows(query)]
            if found:
                break
            await asyncio.sleep(0.1)
        assert found == [started.workflow_id]


def _worker_process(stack: Stack, db_url: str, gateway_url: str) -> subprocess.Popen[bytes]:
    target = stack.env.client.service_client.config.target_host
    return worker_process(stack.settings, target, db_url, PAYORDERS_GATEWAY_URL=gateway_url)


async def test_a_worker_killed_in_the_middle_of_a_refund_refunds_once_after_restart(
    dev_env: WorkflowEnvironment, svc: InProcessResources, db_url: str
) -> None:
    from ..conftest import make_settings

    settings = make_settings(settlement_window_s=1)
    from payorders.pay_orders import PayOrders

    stack = Stack(
        env=dev_env,
        client=dev_env.client,
        settings=settings,
        svc=svc,
        api=PayOrders(dev_env.client, svc.store, settings),
    )
    no = order_no("kill")
    pay_order_no = f"po_{no}"
    # The gateway refunds, then withholds its answer: the worker dies while it waits.
    await svc.sandbox.set_faults(pay_order_no, timeout_after_success_next=1)
    # The worker process reaches the sandbox's ledger (svc.sandbox's) over HTTP, as it
    # would reach any gateway; its webhooks go nowhere (this test reports payments itself).
    gateway_port = free_port()
    sandbox_settings = settings.model_copy(
        update={
            "database_url": db_url,
            "webhook_url": "http://127.0.0.1:9/closed",
            "webhook_secrets": [SecretStr("whsec_" + "n" * 32)],
        }
    )
    async with serve(create_sandbox_app(sandbox_settings), gateway_port):
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        worker = _worker_process(stack, db_url, gateway_url)
        try:
            started = await stack.api.start_pay_order(
                order_no=no, amount=60, currency="USD", expires_in=timedelta(seconds=1)
            )
            await stack.wait_view(pay_order_no, lambda v: v.status is EXPIRED)
            await pay(stack, pay_order_no, 60)
            for _ in range(200):
                calls = (await svc.sandbox.ledger_of(pay_order_no))["refund_calls"]
                if any(outcome == "ANSWER_WITHHELD" for _, outcome in calls):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the refund never reached the gateway")
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            # The gateway has the money back; our record cannot know yet.
            assert await svc.store.refund_status(calls[0][0]) is RefundStatus.PENDING
            worker = _worker_process(stack, db_url, gateway_url)
            result = await stack.result(started.pay_order_no)
            assert (result.status, result.refunded_amount) == (EXPIRED, 60)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(20)
    await assert_settled(
        stack, pay_order_no, status=EXPIRED, paid=60, refunded=60, gateway_refunds=1
    )
    outcomes = [o for _, o in (await svc.sandbox.ledger_of(pay_order_no))["refund_calls"]]
    assert outcomes == ["SUCCEEDED", "ANSWER_WITHHELD", "REPLAYED"]


HISTORY_PATHS = [
    "paid",
    "expired",
    "late_refund",
    "already_paid_on_close",
    "double_payment",
    "wrong_amount_then_paid",
    "late_payment_refund_retried",
    "late_payment_refund_ambiguous",
    "cancelled",
    "cancelled_already_paid",
]

# Version 3 adds three events to a pay order: the trade opened (a local activity's marker)
# and checkout's update (accepted, completed), delivered with the start in its first task.
MAX_EVENTS = {
    "paid": 23,
    "expired": 22,
    "late_refund": 17,
    "already_paid_on_close": 22,
    "double_payment": 40,
    "wrong_amount_then_paid": 40,
    "late_payment_refund_retried": 45,
    "late_payment_refund_ambiguous": 45,
    # Expiry's cost plus the cancel update (accepted, completed), which the task that closes
    # the trade answers; the payment window's timer is cancelled instead of fired.
    "cancelled": 24,
    "cancelled_already_paid": 24,
}


@pytest.mark.parametrize("path", HISTORY_PATHS)
async def test_histories_of_each_path_replay(
    dev_env: WorkflowEnvironment, svc: InProcessResources, path: str
) -> None:
    """Runs each branch of the workflows and replays its fresh history; with
    PAYORDERS_RECORD_HISTORIES=1 it also saves it to tests/histories/ for the replay suite."""
    from temporalio.worker import Replayer

    from workflows.pay_order import PayOrderWorkflow

    async with running_stack(dev_env, svc, settlement_window_s=1) as stack:
        no = order_no(path.replace("_", "-"))
        faults: dict[str, Any] = {
            "already_paid_on_close": {"paid_on_close_amount": 42, "paid_on_close_currency": "USD"},
            "late_payment_refund_retried": {"fail_next_refunds": 2},
            "late_payment_refund_ambiguous": {"timeout_after_success_next": 1},
            "cancelled_already_paid": {"paid_on_close_amount": 42, "paid_on_close_currency": "USD"},
        }.get(path, {})
        if faults:
            await svc.sandbox.set_faults(f"po_{no}", **faults)
        started = await stack.api.start_pay_order(
            order_no=no, amount=42, currency="USD", expires_in=timedelta(seconds=2)
        )
        if path in ("paid", "double_payment"):
            await pay(stack, started.pay_order_no, 42)
        if path == "double_payment":
            await pay(stack, started.pay_order_no, 42)
        if path == "wrong_amount_then_paid":
            await pay(stack, started.pay_order_no, 41)
            await pay(stack, started.pay_order_no, 42)
        if path.startswith("cancelled"):
            answer = await stack.api.cancel_pay_order(started.pay_order_no)
            assert answer.closed and answer.status is (SUCCESS if "paid" in path else EXPIRED)
        if path.startswith("late_payment"):
            await stack.wait_view(started.pay_order_no, lambda v: v.status is EXPIRED)
            await pay(stack, started.pay_order_no, 42)
        handle = stack.handle(started.pay_order_no)
        await stack.result(started.pay_order_no)
        if path == "late_refund":
            txn = await pay(stack, started.pay_order_no, 42)
            handle = stack.client.get_workflow_handle(f"late-refund-{txn}")
            await handle.result()
        desc = await handle.describe()
        assert desc.status is WorkflowExecutionStatus.COMPLETED
        history = await handle.fetch_history()
        # History size is a cost proxy (engine work, hosted-Temporal billing). The happy
        # path's budget is 20 events; the other single-signal paths are held at today's
        # cost; the rest vary with timing (signals and retries may or may not share a
        # workflow task), so they get a loose cap.
        assert len(history.events) <= MAX_EVENTS[path], [e.event_type for e in history.events]
        await Replayer(
            workflows=[PayOrderWorkflow, LateRefundWorkflow],
            data_converter=dev_env.client.data_converter,
        ).replay_workflow(history)
        if os.environ.get("PAYORDERS_RECORD_HISTORIES") == "1":
            HISTORIES.mkdir(exist_ok=True)
            (HISTORIES / f"{path}.json").write_text(
                json.dumps(json.loads(history.to_json()), indent=1) + "\n"
            )

"""Reconciliation on a database of its own: a clean system has no findings; each
discrepancy injected on purpose is found, repaired where possible, reported where not;
a second run repairs nothing twice; the Schedule exists and fires."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from payorders import pay_orders as api
from payorders.core.domain import RefundReason
from payorders.core.models import PaymentNotification, ReconcileReport, RecordPayment
from payorders.core.reconcile import ReconcileStore
from payorders.gateways.port import RefundRequest
from payorders.localstack import postgres as embedded
from payorders.sandbox.ledger import InProcessResources, in_process
from workflows.reconcile import ReconcileWorkflow

from ..conftest import Stack, make_settings, order_no, pay, running_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def own_db(pg_admin_url: str) -> AsyncIterator[InProcessResources]:
    url = await embedded.ensure_database(pg_admin_url, f"reconcile_{os.getpid()}")
    async with in_process(make_settings(sandbox_schema="sbx_reconcile"), url) as res:
        yield res


@pytest.fixture
async def stack(dev_env: WorkflowEnvironment, own_db: InProcessResources) -> AsyncIterator[Stack]:
    async with running_stack(dev_env, own_db, settlement_window_s=1) as s:
        yield s


async def reconcile(stack: Stack, **overrides: Any) -> tuple[ReconcileReport, list[dict[str, Any]]]:
    inp = stack.settings.reconcile_input().model_copy(update={"stuck_after_s": 1, **overrides})
    report = await stack.client.execute_workflow(
        ReconcileWorkflow.run,
        inp,
        id=f"reconcile-test-{uuid.uuid4().hex[:8]}",
        task_queue=stack.settings.task_queue,
    )
    findings = await ReconcileStore(stack.svc.pool).findings(report.run_id)
    return report, findings


def kinds(findings: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((f["kind"], f["action"]) for f in findings)


async def settled_order(stack: Stack, *, paid: bool, late: bool = False) -> str:
    started = await stack.api.start_pay_order(
        order_no=order_no("rc"), amount=100, currency="USD", expires_in=timedelta(seconds=1)
    )
    if paid:
        await pay(stack, started.pay_order_no, 100)
    await stack.result(started.pay_order_no)
    if late:
        txn = await pay(stack, started.pay_order_no, 100)
        await stack.client.get_workflow_handle(f"late-refund-{txn}").result()
    return started.pay_order_no


async def test_a_clean_system_reports_no_findings_and_a_second_run_repairs_nothing_twice(
    stack: Stack,
) -> None:
    for paid, late in ((True, False), (False, False), (False, True)):
        await settled_order(stack, paid=paid, late=late)
    report, findings = await reconcile(stack)
    assert findings == [], findings
    assert report.checked >= 3 and report.consistent == report.checked
    assert (report.repaired, report.exceptions, report.money_in_flight) == (0, 0, 0)


async def test_every_injected_discrepancy_is_found_repaired_or_reported(stack: Stack) -> None:
    svc = stack.svc
    # 1. A dropped webhook: the gateway captured, we never heard of it.
    open_order = await stack.api.start_pay_order(
        order_no=order_no("lost"), amount=100, currency="USD", expires_in=timedelta(minutes=10)
    )
    await stack.wait_view(open_order.pay_order_no, lambda v: True)
    await svc.sandbox.capture(pay_order_no=open_order.pay_order_no, amount=100, currency="USD")
    # 2. A refund row deleted after the refund succeeded.
    deleted = await settled_order(stack, paid=False, late=True)
    async with svc.pool.acquire() as conn:
        await conn.execute("DELETE FROM refund WHERE pay_order_no = $1", deleted)
    # 3. A refund that succeeded at the gateway while our record says pending.
    pending = await settled_order(stack, paid=False)
    capture = await svc.sandbox.capture(pay_order_no=pending, amount=100, currency="USD")
    recorded = await svc.store.record_payment(
        RecordPayment(
            pay_order_no=pending,
            payment=PaymentNotification(
                txn_id=capture.txn_id, amount=100, currency="USD", paid_at=capture.captured_at
            ),
            refund_reason=RefundReason.LATE,
            expected_lock_version=None,
        )
    )
    assert recorded.refund_key is not None
    await svc.sandbox.refund(
        RefundRequest(
            idempotency_key=recorded.refund_key,
            pay_order_no=pending,
            txn_id=capture.txn_id,
            amount=100,
            currency="USD",
        )
    )
    # 4. A direct SQL change of paid_amount.
    tampered = await settled_order(stack, paid=True)
    async with svc.pool.acquire() as conn:
        await conn.execute(
            "UPDATE pay_order SET paid_amount = paid_amount + 50 WHERE pay_order_no = $1", tampered
        )
    # 5. Money at the gateway for a pay order we never had.
    ghost = await svc.sandbox.capture(
        pay_order_no=f"po_{order_no('ghost')}", amount=999, currency="USD"
    )
    # 6. A pay order stuck in PAYING: an operator terminated its workflow.
    stuck = await stack.api.start_pay_order(
        order_no=order_no("stuck"), amount=100, currency="USD", expires_in=timedelta(seconds=1)
    )
    await stack.wait_view(stuck.pay_order_no, lambda v: True)
    await stack.handle(stuck.pay_order_no).terminate("operator mistake")
    await asyncio.sleep(2.5)

    report, findings = await reconcile(stack)
    by_order = {(f["pay_order_no"], f["kind"]): f["action"] for f in findings}
    assert by_order[(open_order.pay_order_no, "lost_notification")] == "REPAIRED"
    assert by_order[(deleted, "refund_restored")] == "REPAIRED"
    assert by_order[(pending, "refund_confirmed_at_gateway")] == "REPAIRED"
    assert by_order[(tampered, "paid_amount_mismatch")] == "EXCEPTION"
    assert by_order[(ghost.pay_order_no, "money_without_order")] == "EXCEPTION"
    assert by_order[(stuck.pay_order_no, "stuck_paying")] == "REPAIRED"
    assert report.repaired == 4 and report.exceptions == 2, kinds(findings)

    # The repairs took effect, each once.
    view = await stack.wait_view(open_order.pay_order_no, lambda v: v.status.value == "PAY_SUCCESS")
    assert view.paid_amount == 100
    restored = await svc.store.payments_of(deleted)
    assert [p["refund_status"] for p in restored] == ["SUCCEEDED"]
    row = await svc.store.get_pay_order(deleted)
    assert row is not None and (row.paid_amount, row.refunded_amount) == (100, 100)
    row = await svc.store.get_pay_order(pending)
    assert row is not None and (row.paid_amount, row.refunded_amount) == (100, 100)
    redrive = stack.client.get_workflow_handle(f"redrive-{stuck.pay_order_no}")
    try:
        assert await asyncio.wait_for(redrive.result(), 30) == "PAY_EXPIRED"
    except TimeoutError:
        async for e in redrive.fetch_history_events():
            print(e)
        raise

    # A second run repairs nothing again and still reports what needs a person.
    again, findings2 = await reconcile(stack)
    assert again.repaired == 0, kinds(findings2)
    assert kinds(findings2) == [
        ("money_without_order", "EXCEPTION"),
        ("paid_amount_mismatch", "EXCEPTION"),
    ]
    ledger = await svc.sandbox.ledger_of(deleted)
    assert len(ledger["refunds"]) == 1


async def test_the_schedule_exists_after_worker_start_and_fires(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"reconcile_every_s": 1})
    handle = stack.client.get_schedule_handle(api.RECONCILE_SCHEDULE_ID)
    # Worker processes of other tests share this server and created the Schedule for
    # their own task queues, now without a worker: start from none.
    with contextlib.suppress(RPCError):
        await handle.delete()
    created = datetime.now(UTC)
    await api.ensure_reconcile_schedule(stack.client, settings)
    await api.ensure_reconcile_schedule(stack.client, settings)  # idempotent
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while not (desc := await handle.describe()).info.recent_actions:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert desc.info.recent_actions, "the schedule never fired"
        fired = desc.info.recent_actions[0]
        assert fired.started_at >= created - timedelta(seconds=1)
        started = fired.action
        run = stack.client.get_workflow_handle_for(
            ReconcileWorkflow.run,
            started.workflow_id,  # type: ignore[attr-defined]
        )
        assert (await run.describe()).task_queue == stack.settings.task_queue
        report = await asyncio.wait_for(run.result(), 60)
        assert report.run_id == started.workflow_id  # type: ignore[attr-defined]
        assert report.finished_at is not None
        assert (await run.describe()).status is WorkflowExecutionStatus.COMPLETED
    finally:
        await handle.delete()

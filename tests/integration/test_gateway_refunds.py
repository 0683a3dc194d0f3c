"""Refunds made at the gateway's dashboard, and reconciliation of merchant refunds, on a real
PostgreSQL and Temporal with the sandbox gateway in process (migration 0010).

A dashboard refund is recorded once as a merchant refund with ``source: gateway``, whoever
reports it; ours are never recorded a second time. Reconciliation records what the gateway
did that we did not, confirms what we left ``REFUNDING``, restarts a refund whose workflow
never ran, and reports one we recorded that the gateway does not show. Money is counted in
the sandbox's own ledger."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from payorders.core.domain import (
    MerchantRefundStatus,
    PayOrderStatus,
    RefundSource,
    merchant_refund_workflow_id,
)
from payorders.core.merchant_refunds import RefundRefused, Refusal, SeenAtGateway
from payorders.core.models import MerchantRefundResult, ReconcileReport, RecordPayment
from payorders.core.reconcile import ReconcileStore
from payorders.gateways.port import RefundRequest
from payorders.localstack import postgres as embedded
from payorders.sandbox.ledger import InProcessResources, in_process
from workflows.reconcile import ReconcileWorkflow

from ..conftest import Stack, make_settings, order_no, pay, running_stack
from .test_store import new_order, payment

pytestmark = pytest.mark.slow

NOW = datetime.now(UTC)


def seen(txn: str, amount: int, key: str | None = None) -> SeenAtGateway:
    gw = f"rf_{uuid.uuid4().hex[:20]}"
    return SeenAtGateway(
        key=key or f"dashboard-{gw}",
        gateway_refund_id=gw,
        txn_id=txn,
        amount=amount,
        currency="USD",
        created_at=NOW,
    )


async def paid_row(svc: InProcessResources, amount: int = 1000) -> tuple[str, str]:
    no = await new_order(svc, amount)
    txn = order_no("t")
    await svc.store.record_payment(
        RecordPayment(
            pay_order_no=no, payment=payment(txn, amount), refund_reason=None,
            expected_lock_version=0,
        )
    )  # fmt: skip
    return no, txn


async def test_a_dashboard_refund_is_recorded_once_and_ours_never_twice(
    svc: InProcessResources,
) -> None:
    refunds = svc.store.merchant_refunds
    no, txn = await paid_row(svc, 1000)
    ours = order_no("r")
    await refunds.open(
        pay_order_no=no, refund_no=ours, amount=700, reason=None, requested_by=None, now=NOW
    )
    # Ours, by its key: nothing recorded, nothing announced.
    assert await refunds.record_gateway_made(seen(txn, 700, key=f"mrefund-{ours}")) is None
    # Made at the dashboard while 700 of ours is in flight: a fact, counted against what is
    # refunded (0), not against ours in flight; nothing more may be asked for meanwhile.
    outside = seen(txn, 500)
    made = await refunds.record_gateway_made(outside)
    assert made is not None and made.source is RefundSource.GATEWAY
    assert (made.status, made.amount, made.gateway_refund_id) == (
        MerchantRefundStatus.REFUND_SUCCESS,
        500,
        outside.gateway_refund_id,
    )
    assert made.refund_no == f"gateway-{outside.gateway_refund_id}"
    assert await refunds.record_gateway_made(outside) is None  # its webhook again
    totals = await refunds.totals(no, 1000)
    assert (totals.refunded, totals.in_flight, totals.refundable, totals.holds) == (
        500,
        700,
        0,
        True,
    )
    # More than is left beyond what is refunded: refused, nothing written.
    with pytest.raises(RefundRefused) as refused:
        await refunds.record_gateway_made(seen(txn, 501))
    assert refused.value.refusal is Refusal.EXCEEDS
    events = [e for e in await svc.store.outbox_of(no) if e["event_type"] == "refund.succeeded"]
    assert len(events) == 1
    body = json.loads(events[0]["payload"])
    assert (body["refund_no"], body["source"], body["amount"]) == (made.refund_no, "gateway", 500)
    assert len(await refunds.of_pay_order(no)) == 2


async def test_a_gateway_refund_of_money_that_is_no_merchant_refund_is_refused(
    svc: InProcessResources,
) -> None:
    refunds = svc.store.merchant_refunds
    unpaid = await new_order(svc, 100)
    with pytest.raises(RefundRefused) as refused:
        await refunds.record_gateway_made(seen(order_no("nope"), 100))
    assert refused.value.refusal is Refusal.NOT_FOUND
    # A second payment of a paid order is the saga's (a compensation), never the shop's.
    no, _ = await paid_row(svc, 100)
    second = order_no("t")
    await svc.store.record_payment(
        RecordPayment(
            pay_order_no=no, payment=payment(second, 100), refund_reason=None,
            expected_lock_version=None,
        )
    )  # fmt: skip
    with pytest.raises(RefundRefused) as refused:
        await refunds.record_gateway_made(seen(second, 100))
    assert refused.value.refusal is Refusal.NOT_PAID
    assert await refunds.of_pay_order(no) == [] and await refunds.of_pay_order(unpaid) == []


# --- reconciliation, on a database of its own ---------------------------------------------


@pytest.fixture(scope="module")
async def own_db(pg_admin_url: str) -> AsyncIterator[InProcessResources]:
    url = await embedded.ensure_database(pg_admin_url, f"mrecon_{os.getpid()}")
    async with in_process(make_settings(sandbox_schema="sbx_mrecon"), url) as res:
        yield res


async def reconcile(stack: Stack, **overrides: Any) -> tuple[ReconcileReport, list[dict[str, Any]]]:
    inp = stack.settings.reconcile_input().model_copy(update=overrides)
    report = await stack.client.execute_workflow(
        ReconcileWorkflow.run,
        inp,
        id=f"reconcile-test-{uuid.uuid4().hex[:8]}",
        task_queue=stack.settings.task_queue,
    )
    return report, await ReconcileStore(stack.svc.pool).findings(report.run_id)


async def paid_order(stack: Stack, amount: int = 1000) -> tuple[str, str]:
    started = await stack.api.start_pay_order(
        order_no=order_no("mr"), amount=amount, currency="USD", expires_in=timedelta(minutes=5)
    )
    txn = await pay(stack, started.pay_order_no, amount)
    deadline = asyncio.get_running_loop().time() + 30
    while (row := await stack.svc.store.get_pay_order(started.pay_order_no)) is None or (
        row.status is not PayOrderStatus.PAY_SUCCESS
    ):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    return started.pay_order_no, txn


async def test_reconciliation_accounts_for_every_merchant_refund(
    dev_env: WorkflowEnvironment, own_db: InProcessResources
) -> None:
    svc = own_db
    refunds = svc.store.merchant_refunds
    async with running_stack(dev_env, svc, settlement_window_s=1) as stack:
        # 1. Refunded at the dashboard; its webhook never came.
        dash_no, dash_txn = await paid_order(stack)
        dashboard = await svc.sandbox.dashboard_refund(txn_id=dash_txn, amount=250)
        # 2. The API opened the row and died before the workflow started (nobody asked again).
        orphan_no, _ = await paid_order(stack)
        orphan = order_no("r")
        await refunds.open(
            pay_order_no=orphan_no, refund_no=orphan, amount=400, reason=None,
            requested_by=None, now=datetime.now(UTC),
        )  # fmt: skip
        # 3. The gateway refunded, then the worker died before recording it.
        done_no, done_txn = await paid_order(stack)
        done = order_no("r")
        await refunds.open(
            pay_order_no=done_no, refund_no=done, amount=300, reason=None,
            requested_by=None, now=datetime.now(UTC),
        )  # fmt: skip
        await svc.sandbox.refund(
            RefundRequest(
                idempotency_key=f"mrefund-{done}", pay_order_no=done_no, txn_id=done_txn,
                amount=300, currency="USD",
            )
        )  # fmt: skip
        # 4. Recorded as refunded here, unknown at the gateway (a row written by hand).
        ghost_no, _ = await paid_order(stack)
        ghost = order_no("r")
        await refunds.open(
            pay_order_no=ghost_no, refund_no=ghost, amount=100, reason=None,
            requested_by=None, now=datetime.now(UTC),
        )  # fmt: skip
        await refunds.succeed(ghost, "rf_nowhere")

        report, findings = await reconcile(stack, pending_after_s=0)
        got = {(f["pay_order_no"], f["kind"], f["action"]) for f in findings}
        assert (dash_no, "gateway_refund_recorded", "REPAIRED") in got, findings
        assert (orphan_no, "refund_pending_too_long", "REPAIRED") in got, findings
        assert (done_no, "refund_confirmed_at_gateway", "REPAIRED") in got, findings
        assert (ghost_no, "refund_absent_at_gateway", "EXCEPTION") in got, findings
        mine = {dash_no, orphan_no, done_no, ghost_no}
        assert {f["pay_order_no"] for f in findings} <= mine, findings

        [recorded] = await refunds.of_pay_order(dash_no)
        assert (recorded.source, recorded.amount, recorded.gateway_refund_id) == (
            RefundSource.GATEWAY,
            250,
            dashboard.gateway_refund_id,
        )
        restarted = await asyncio.wait_for(
            stack.client.get_workflow_handle(
                merchant_refund_workflow_id(orphan), result_type=MerchantRefundResult
            ).result(),
            60,
        )
        assert restarted.status is MerchantRefundStatus.REFUND_SUCCESS
        confirmed = await refunds.get(done)
        assert confirmed is not None and confirmed.status is MerchantRefundStatus.REFUND_SUCCESS
        # Counted at the gateway: one refund each, none twice.
        for no, want in ((dash_no, 250), (orphan_no, 400), (done_no, 300), (ghost_no, 0)):
            held = await svc.sandbox.ledger_of(no)
            assert held["refunded"] == want, (no, held)
            assert len(held["refunds"]) == (1 if want else 0)

        # A second run repairs nothing twice; the row the gateway lacks is still reported.
        _, again = await reconcile(stack, pending_after_s=0)
        assert sorted((f["pay_order_no"], f["kind"], f["action"]) for f in again) == [
            (ghost_no, "refund_absent_at_gateway", "EXCEPTION")
        ], again
        assert report.exceptions >= 1


async def test_the_api_dying_after_it_opened_a_refund_leaves_it_to_the_shops_retry(
    dev_env: WorkflowEnvironment, own_db: InProcessResources
) -> None:
    """The row is open, the workflow never started (the API was killed between the two):
    the shop asking again with the same ``refund_no`` starts it, and it refunds once."""
    svc = own_db
    async with running_stack(dev_env, svc, settlement_window_s=1) as stack:
        no, txn = await paid_order(stack, 600)
        refund_no = order_no("r")
        await svc.store.merchant_refunds.open(
            pay_order_no=no, refund_no=refund_no, amount=600, reason="return",
            requested_by="shop", now=datetime.now(UTC),
        )  # fmt: skip
        again = await stack.api.refund_pay_order(no, refund_no=refund_no, amount=600)
        assert not again.created
        done = await asyncio.wait_for(
            stack.client.get_workflow_handle(
                merchant_refund_workflow_id(refund_no), result_type=MerchantRefundResult
            ).result(),
            60,
        )
        assert done.status is MerchantRefundStatus.REFUND_SUCCESS
        held = await svc.sandbox.ledger_of(no)
        assert [(r.idempotency_key, r.amount) for r in held["refunds"]] == [
            (f"mrefund-{refund_no}", 600)
        ]
        assert held["refunds"][0].txn_id == txn

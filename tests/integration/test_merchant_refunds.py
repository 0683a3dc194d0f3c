"""Merchant refunds' one writer on a real PostgreSQL: what opens, what is refused with
nothing written, and refunds racing for the last money (migration 0009)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from temporalio.testing import WorkflowEnvironment

from payorders.core.domain import (
    MerchantRefundStatus,
    PayOrderStatus,
    RefundSource,
    merchant_refund_workflow_id,
)
from payorders.core.merchant_refunds import MerchantRefunds, RefundRefused, Refusal
from payorders.core.models import MerchantRefundResult, RecordPayment
from payorders.gateways.port import RefundRequest
from payorders.sandbox.ledger import InProcessResources
from payorders.service.events.feed import EventFeed

from ..conftest import Stack, order_no, pay, running_stack
from .test_store import new_order, payment

NOW = datetime.now(UTC)


async def paid_order(svc: InProcessResources, amount: int = 1000) -> tuple[str, str]:
    no = await new_order(svc, amount)
    txn = order_no("t")
    await svc.store.record_payment(
        RecordPayment(
            pay_order_no=no,
            payment=payment(txn, amount),
            refund_reason=None,
            expected_lock_version=0,
        )
    )
    return no, txn


def refunds(svc: InProcessResources) -> MerchantRefunds:
    return MerchantRefunds(svc.pool)


async def open_(svc: InProcessResources, no: str, refund_no: str, amount: int, **kw: object):  # type: ignore[no-untyped-def]
    return await refunds(svc).open(
        pay_order_no=no,
        refund_no=refund_no,
        amount=amount,
        reason=kw.pop("reason", "return"),  # type: ignore[arg-type]
        requested_by=kw.pop("requested_by", "support"),  # type: ignore[arg-type]
        now=kw.pop("now", NOW),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


async def count(svc: InProcessResources, no: str) -> tuple[int, int]:
    async with svc.pool.acquire() as conn:
        rows = await conn.fetchval("SELECT count(*) FROM merchant_refund WHERE pay_order_no=$1", no)
        events = await conn.fetchval("SELECT count(*) FROM outbox WHERE pay_order_no=$1", no)
    return rows, events


async def test_a_partial_refund_opens_and_the_same_key_again_answers_it(
    svc: InProcessResources,
) -> None:
    no, txn = await paid_order(svc)
    key = order_no("r")
    first = await open_(svc, no, key, 300)
    assert first.created and first.refund.status is MerchantRefundStatus.REFUNDING
    assert (first.refund.txn_id, first.refund.amount, first.refund.currency) == (txn, 300, "USD")
    assert first.refund.idempotency_key == f"mrefund-{key}"
    assert first.refund.requested_by == "support" and first.refund.source is RefundSource.API
    assert (first.totals.refunded, first.totals.in_flight, first.totals.refundable) == (0, 300, 700)
    again = await open_(svc, no, key, 300, requested_by="admin")
    assert not again.created and again.refund == first.refund
    with pytest.raises(RefundRefused) as e:
        await open_(svc, no, key, 301)
    assert e.value.refusal is Refusal.CONFLICT
    other, _ = await paid_order(svc)
    with pytest.raises(RefundRefused) as e:
        await open_(svc, other, key, 300)
    assert e.value.refusal is Refusal.CONFLICT
    assert await count(svc, other) == (0, 1)  # its pay_order.succeeded only


async def test_what_cannot_be_refunded_is_refused_with_nothing_written(
    svc: InProcessResources,
) -> None:
    no, _ = await paid_order(svc, 1000)
    cases = [
        (dict(amount=1001), Refusal.EXCEEDS, "at most 1000"),
        (dict(now=NOW + timedelta(days=366)), Refusal.WINDOW_CLOSED, "365 days"),
        (
            dict(window=timedelta(days=30), now=NOW + timedelta(days=31)),
            Refusal.WINDOW_CLOSED,
            "30",
        ),
    ]
    for kw, refusal, says in cases:
        with pytest.raises(RefundRefused) as e:
            await open_(svc, no, order_no("r"), **{"amount": 10, **kw})  # type: ignore[arg-type]
        assert e.value.refusal is refusal and says in str(e.value)
    with pytest.raises(RefundRefused) as e:
        await open_(svc, "po_nobody-here", order_no("r"), 10)
    assert e.value.refusal is Refusal.NOT_FOUND
    paying = await new_order(svc)
    with pytest.raises(RefundRefused) as e:
        await open_(svc, paying, order_no("r"), 10)
    assert e.value.refusal is Refusal.NOT_PAID and "PAYING" in str(e.value)
    assert await count(svc, no) == (0, 1) and await count(svc, paying) == (0, 0)


async def test_refunds_racing_for_the_last_money_never_exceed_the_capture(
    svc: InProcessResources,
) -> None:
    """Twenty requests with keys of their own, each for 300 of 1000, at once: exactly
    three open (900), the others are refused naming what is left, and the fourth that
    fits (100) still can."""
    no, _ = await paid_order(svc, 1000)
    results = await asyncio.gather(
        *(open_(svc, no, order_no("r"), 300) for _ in range(20)), return_exceptions=True
    )
    opened = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, RefundRefused)]
    assert len(opened) == 3 and len(refused) == 17, results
    assert all(r.refusal is Refusal.EXCEEDS for r in refused)
    last = await open_(svc, no, order_no("r"), 100)
    assert last.totals.refundable == 0
    with pytest.raises(RefundRefused, match="at most 0"):
        await open_(svc, no, order_no("r"), 1)
    assert (await refunds(svc).totals(no, 1000)).in_flight == 1000


async def test_the_database_itself_refuses_a_refund_past_the_amount(
    svc: InProcessResources,
) -> None:
    """Whatever writes: a raw insert past the amount, or on an unpaid order, is refused."""
    no, txn = await paid_order(svc, 500)
    sql = """INSERT INTO merchant_refund (refund_no, pay_order_no, txn_id, amount, currency,
             idempotency_key) VALUES ($1, $2, $3, $4, 'USD', 'mrefund-' || $1)"""
    async with svc.pool.acquire() as conn:
        await conn.execute(sql, order_no("r"), no, txn, 400)
        with pytest.raises(asyncpg.CheckViolationError, match="past its amount"):
            await conn.execute(sql, order_no("r"), no, txn, 101)
        paying = await new_order(svc)
        with pytest.raises(asyncpg.CheckViolationError, match="only a paid order"):
            await conn.execute(sql, order_no("r"), paying, txn, 1)


async def test_success_and_failure_are_final_and_announced_once(svc: InProcessResources) -> None:
    no, _ = await paid_order(svc, 1000)
    ok, bad = order_no("r"), order_no("r")
    await open_(svc, no, ok, 400)
    await open_(svc, no, bad, 600)
    assert await refunds(svc).succeed(ok, "gw_1") is True
    assert await refunds(svc).succeed(ok, "gw_1") is False
    assert await refunds(svc).fail(bad, "charge too old") is True
    assert await refunds(svc).fail(bad, "again") is False
    got = {r.refund_no: r for r in await refunds(svc).of_pay_order(no)}
    assert got[ok].status is MerchantRefundStatus.REFUND_SUCCESS and got[ok].finished_at
    assert got[bad].status is MerchantRefundStatus.REFUND_FAILED
    assert got[bad].failure_reason == "charge too old"
    totals = await refunds(svc).totals(no, 1000)
    # A failed refund gives its amount back to what may still be refunded.
    assert (totals.refunded, totals.in_flight, totals.refundable) == (400, 0, 600)
    events = await svc.store.outbox_of(no)
    mine = [e for e in events if e["event_type"].startswith("refund.")]
    assert [e["event_type"] for e in mine] == ["refund.succeeded", "refund.failed"]
    succeeded, failed = (json.loads(e["payload"]) for e in mine)
    # What may still be refunded when each was announced: 600 in flight, then given back.
    assert (succeeded["refund_no"], succeeded["refundable"]) == (ok, 0)
    assert (failed["refund_no"], failed["refundable"], failed["failure_reason"]) == (
        bad,
        600,
        "charge too old",
    )
    # As the order service receives them (the relay's and the feed's body).
    bodies, after = [], None
    while page := (await EventFeed(svc.pool).after(after, 1000))["events"]:
        bodies += [e for e in page if e["pay_order_no"] == no]
        after = page[-1]["id"]
    bodies = bodies[1:]  # after its pay_order.succeeded
    assert [(e["type"], e["data"]["refund"]["refund_no"]) for e in bodies] == [
        ("refund.succeeded", ok),
        ("refund.failed", bad),
    ]
    assert bodies[1]["data"]["refund"]["failure_reason"] == "charge too old"
    assert bodies[1]["data"]["refund"]["refundable"] == 600
    async with svc.pool.acquire() as conn:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="terminal"):
            await conn.execute(
                "UPDATE merchant_refund SET status = 'REFUNDING' WHERE refund_no = $1", ok
            )
        # The compensations' column never counts them.
        assert (
            await conn.fetchval("SELECT refunded_amount FROM pay_order WHERE pay_order_no = $1", no)
            == 0
        )


# --- through the workflow, on the dev server --------------------------------------------


async def _paid_through_the_saga(stack: Stack, amount: int) -> str:
    started = await stack.api.start_pay_order(
        order_no=order_no("mr"), amount=amount, currency="USD", expires_in=timedelta(minutes=5)
    )
    await pay(stack, started.pay_order_no, amount)
    deadline = asyncio.get_running_loop().time() + 30
    while (row := await stack.svc.store.get_pay_order(started.pay_order_no)) is None or (
        row.status is not PayOrderStatus.PAY_SUCCESS
    ):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    return started.pay_order_no


async def _finished(stack: Stack, refund_no: str) -> MerchantRefundResult:
    handle = stack.client.get_workflow_handle(
        merchant_refund_workflow_id(refund_no), result_type=MerchantRefundResult
    )
    return await asyncio.wait_for(handle.result(), 60)


async def test_a_merchant_refund_goes_back_once_by_the_original_route_whatever_fails(
    dev_env: WorkflowEnvironment, svc: InProcessResources
) -> None:
    """Counted in the sandbox's own ledger: a refund whose answer is lost after the gateway
    did it, and one failing three times, each end REFUND_SUCCESS with one refund at the
    gateway; one for more than the gateway still holds ends REFUND_FAILED with its reason."""
    async with running_stack(dev_env, svc, settlement_window_s=2) as stack:
        no = await _paid_through_the_saga(stack, 1000)
        lost, failing = order_no("r"), order_no("r")
        await svc.sandbox.set_faults(no, timeout_after_success_next=1)
        first = await stack.api.refund_pay_order(
            no, refund_no=lost, amount=300, requested_by="shop"
        )
        assert first.created and first.refund.status is MerchantRefundStatus.REFUNDING
        assert (await _finished(stack, lost)).status is MerchantRefundStatus.REFUND_SUCCESS
        await svc.sandbox.set_faults(no, fail_next_refunds=3)
        await stack.api.refund_pay_order(no, refund_no=failing, amount=200)
        done = await _finished(stack, failing)
        assert done.status is MerchantRefundStatus.REFUND_SUCCESS and done.gateway_refund_id
        again = await stack.api.refund_pay_order(no, refund_no=failing, amount=200)
        assert not again.created and again.refund.status is MerchantRefundStatus.REFUND_SUCCESS
        ledger = await svc.sandbox.ledger_of(no)
        keys = sorted(r.idempotency_key for r in ledger["refunds"])
        assert (
            keys == sorted([f"mrefund-{lost}", f"mrefund-{failing}"]) and ledger["refunded"] == 500
        )
        row = await svc.store.merchant_refunds.get(failing)
        assert row is not None and row.attempts >= 4

        # The gateway gives back less than we asked (an outside refund took the rest): its
        # documented refusal ends the refund, and what it held is refundable again.
        outside = RefundRequest(
            idempotency_key=f"dash-{no}", pay_order_no=no, txn_id=row.txn_id, amount=400,
            currency="USD",
        )  # fmt: skip
        await svc.sandbox.refund(outside)
        refused = order_no("r")
        await stack.api.refund_pay_order(no, refund_no=refused, amount=500)
        final = await _finished(stack, refused)
        assert final.status is MerchantRefundStatus.REFUND_FAILED
        assert final.failure_reason and "exceeds" in final.failure_reason
        totals = await svc.store.merchant_refunds.totals(no, 1000)
        assert (totals.refunded, totals.in_flight, totals.refundable) == (500, 0, 500)
        kinds = [e["event_type"] for e in await svc.store.outbox_of(no)]
        assert kinds == [
            "pay_order.succeeded",
            "refund.succeeded",
            "refund.succeeded",
            "refund.failed",
        ]
        # The saga's own identity is untouched: these are not compensations.
        details = await stack.api.get_pay_order(no)
        assert details.fund.holds and details.row.refunded_amount == 0

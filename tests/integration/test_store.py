"""Our tables on a real PostgreSQL: guarded updates, constraints, triggers, migrations,
and the sandbox gateway's ledger."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from importlib import resources

import asyncpg
import pytest

from payorders.core import store
from payorders.core.domain import CloseReason, PayOrderStatus, RefundReason
from payorders.core.models import CreatePayOrder, PaymentNotification, RecordPayment
from payorders.core.reconcile import ReconcileStore
from payorders.gateways.port import GatewayRejected, RefundRequest
from payorders.sandbox.ledger import InProcessResources

from ..conftest import order_no

ALL_MIGRATIONS = sorted(
    f.name.removesuffix(".sql")
    for f in resources.files("payorders.core.migrations").iterdir()
    if f.name.endswith(".sql")
)


def test_the_migrations_are_the_ones_we_ship() -> None:
    assert ALL_MIGRATIONS[:3] == ["0001_pay_orders", "0002_webhook_events", "0003_reconciliation"]


async def new_order(svc: InProcessResources, amount: int = 100) -> str:
    no = order_no("st")
    row = await svc.store.create_pay_order(
        CreatePayOrder(
            pay_order_no=f"po_{no}",
            order_no=no,
            amount=amount,
            currency="USD",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
    )
    return row.pay_order_no


def payment(txn: str, amount: int = 100) -> PaymentNotification:
    return PaymentNotification(txn_id=txn, amount=amount, currency="USD", paid_at=datetime.now(UTC))


async def test_creating_twice_returns_the_same_row(svc: InProcessResources) -> None:
    no = await new_order(svc)
    row = await svc.store.get_pay_order(no)
    assert row is not None
    again = await svc.store.create_pay_order(
        CreatePayOrder(
            pay_order_no=no,
            order_no=row.order_no,
            amount=100,
            currency="USD",
            expires_at=row.expires_at,
        )
    )
    assert again == row


@pytest.mark.parametrize("terminal", ["PAY_SUCCESS", "PAY_EXPIRED"])
async def test_the_database_refuses_to_move_a_pay_order_out_of_a_terminal_state(
    svc: InProcessResources, terminal: str
) -> None:
    no = await new_order(svc)
    async with svc.pool.acquire() as conn:
        await conn.execute("UPDATE pay_order SET status = $2 WHERE pay_order_no = $1", no, terminal)
        for target in {"PAYING", "PAY_SUCCESS", "PAY_EXPIRED"} - {terminal}:
            with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="terminal"):
                await conn.execute(
                    "UPDATE pay_order SET status = $2 WHERE pay_order_no = $1", no, target
                )
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="deleted"):
            await conn.execute("DELETE FROM pay_order WHERE pay_order_no = $1", no)
        assert (
            await conn.fetchval("SELECT status FROM pay_order WHERE pay_order_no = $1", no)
            == terminal
        )


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE pay_order SET refunded_amount = paid_amount + 1 WHERE pay_order_no = $1",
        "UPDATE pay_order SET refunded_amount = -1 WHERE pay_order_no = $1",
        "UPDATE pay_order SET status = 'REFUNDED' WHERE pay_order_no = $1",
        "UPDATE pay_order SET amount = 1 WHERE pay_order_no = $1",
    ],
)
async def test_check_constraints_refuse_impossible_rows(svc: InProcessResources, sql: str) -> None:
    no = await new_order(svc)
    async with svc.pool.acquire() as conn:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError):
            await conn.execute(sql, no)


async def test_the_conditional_update_lets_only_one_terminal_state_win(
    svc: InProcessResources,
) -> None:
    no = await new_order(svc)
    settle = RecordPayment(
        pay_order_no=no,
        payment=payment(order_no("t")),
        refund_reason=None,
        expected_lock_version=0,
    )
    expired, settled = await asyncio.gather(
        svc.store.expire(no, 0), svc.store.record_payment(settle)
    )
    row = await svc.store.get_pay_order(no)
    assert row is not None and row.lock_version == 1
    if expired.changed:
        assert row.status is PayOrderStatus.PAY_EXPIRED
        assert not settled.settled and settled.refund_reason is RefundReason.LATE
    else:
        assert row.status is PayOrderStatus.PAY_SUCCESS and settled.settled
    assert (await svc.store.expire(no, 0)).changed is False


async def test_recording_a_payment_twice_counts_its_money_once(svc: InProcessResources) -> None:
    no = await new_order(svc)
    cmd = RecordPayment(
        pay_order_no=no,
        payment=payment(order_no("t"), 50),
        refund_reason=RefundReason.LATE,
        expected_lock_version=None,
    )
    first, second = await asyncio.gather(
        svc.store.record_payment(cmd), svc.store.record_payment(cmd)
    )
    assert first == second
    row = await svc.store.get_pay_order(no)
    assert row is not None and row.paid_amount == 50
    assert first.refund_key is not None
    assert await svc.store.confirm_refund(first.refund_key, "rf_1") is True
    assert await svc.store.confirm_refund(first.refund_key, "rf_1") is False
    row = await svc.store.get_pay_order(no)
    assert row is not None and row.refunded_amount == 50
    assert [e["event_type"] for e in await svc.store.outbox_of(no)] == ["refund.succeeded"]


async def test_settling_twice_at_once_settles_once_with_one_event(svc: InProcessResources) -> None:
    no = await new_order(svc)
    txn = order_no("t")
    cmd = RecordPayment(
        pay_order_no=no, payment=payment(txn), refund_reason=None, expected_lock_version=0
    )
    first, second = await asyncio.gather(
        svc.store.record_payment_new(cmd), svc.store.record_payment_new(cmd)
    )
    assert first[0] == second[0] and first[0].settled and first[0].lock_version == 1
    assert sorted([first[1], second[1]]) == [False, True]  # one of them wrote it
    row = await svc.store.get_pay_order(no)
    assert row is not None and (row.status, row.paid_amount) == (PayOrderStatus.PAY_SUCCESS, 100)
    [event] = await svc.store.outbox_of(no)
    assert (event["event_type"], event["dedupe_key"]) == (
        "pay_order.succeeded",
        f"pay_order.succeeded:{no}",
    )
    assert json.loads(event["payload"]) == {
        "pay_order_no": no,
        "order_no": row.order_no,
        "txn_id": txn,
        "amount": 100,
        "currency": "USD",
    }


async def test_two_payments_racing_to_settle_settle_one_and_refund_the_other(
    svc: InProcessResources,
) -> None:
    no = await new_order(svc)
    a, b = (
        RecordPayment(
            pay_order_no=no,
            payment=payment(order_no("t")),
            refund_reason=None,
            expected_lock_version=0,
        )
        for _ in range(2)
    )
    results = await asyncio.gather(svc.store.record_payment(a), svc.store.record_payment(b))
    assert sorted(r.settled for r in results) == [False, True]
    [refunded] = [r for r in results if not r.settled]
    assert refunded.refund_reason is RefundReason.DUPLICATE and refunded.refund_key
    row = await svc.store.get_pay_order(no)
    assert row is not None and (row.paid_amount, row.lock_version) == (200, 1)
    assert [e["event_type"] for e in await svc.store.outbox_of(no)] == ["pay_order.succeeded"]


async def test_a_payment_kept_for_refund_never_settles_the_order_later(
    svc: InProcessResources,
) -> None:
    no = await new_order(svc)
    pay = payment(order_no("t"), 60)
    kept = await svc.store.record_payment(
        RecordPayment(
            pay_order_no=no,
            payment=pay,
            refund_reason=RefundReason.AMOUNT_MISMATCH,
            expected_lock_version=None,
        )
    )
    again, new = await svc.store.record_payment_new(
        RecordPayment(pay_order_no=no, payment=pay, refund_reason=None, expected_lock_version=0)
    )
    assert (again, new) == (kept, False)
    row = await svc.store.get_pay_order(no)
    assert row is not None and (row.status, row.paid_amount) == (PayOrderStatus.PAYING, 60)


async def test_expiring_writes_its_event_once(svc: InProcessResources) -> None:
    no = await new_order(svc)
    assert (await svc.store.expire(no, 0)).changed
    assert not (await svc.store.expire(no, 0)).changed
    row = await svc.store.get_pay_order(no)
    assert row is not None
    [event] = await svc.store.outbox_of(no)
    assert event["event_type"] == "pay_order.expired"
    assert json.loads(event["payload"]) == {
        "pay_order_no": no,
        "order_no": row.order_no,
        "reason": "EXPIRED",
    }


async def test_a_connection_given_back_inside_a_transaction_comes_back_rolled_back(
    svc: InProcessResources,
) -> None:
    no = await new_order(svc)
    async with svc.pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("UPDATE pay_order SET paid_amount = 7 WHERE pay_order_no = $1", no)
    for _ in range(svc.pool.get_max_size()):  # whichever connection it was
        async with svc.pool.acquire() as conn:
            assert not conn.is_in_transaction()
    row = await svc.store.get_pay_order(no)
    assert row is not None and row.paid_amount == 0


async def test_a_txn_id_reused_with_other_facts_is_refused(svc: InProcessResources) -> None:
    no = await new_order(svc)
    txn = order_no("t")
    await svc.store.record_payment(
        RecordPayment(
            pay_order_no=no,
            payment=payment(txn, 10),
            refund_reason=RefundReason.LATE,
            expected_lock_version=None,
        )
    )
    with pytest.raises(store.TxnConflict):
        await svc.store.record_payment(
            RecordPayment(
                pay_order_no=no,
                payment=payment(txn, 11),
                refund_reason=RefundReason.LATE,
                expected_lock_version=None,
            )
        )


async def test_migrations_are_safe_when_workers_start_together(db_url: str) -> None:
    pools = [await store.create_pool(db_url, min_size=1, max_size=2) for _ in range(3)]
    try:
        results = await asyncio.gather(*(store.migrate(p) for p in pools))
        assert results == [[], [], []]  # already applied by the session's first worker
        async with pools[0].acquire() as conn:
            versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [v["version"] for v in versions] == ALL_MIGRATIONS
    finally:
        for p in pools:
            await p.close()


async def test_migrations_apply_once_on_a_fresh_database(pg_admin_url: str) -> None:
    from payorders.localstack import postgres as embedded

    url = await embedded.ensure_database(pg_admin_url, f"fresh_{order_no('db').replace('-', '_')}")
    pools = [await store.create_pool(url, min_size=1, max_size=1) for _ in range(3)]
    try:
        results = await asyncio.gather(*(store.migrate(p) for p in pools))
        assert sorted(results) == [[], [], ALL_MIGRATIONS]
    finally:
        for p in pools:
            await p.close()


async def test_the_sandbox_refunds_a_key_once_whatever_the_concurrency(
    svc: InProcessResources,
) -> None:
    no = f"po_{order_no('gw')}"
    cap = await svc.sandbox.capture(pay_order_no=no, amount=80, currency="USD")
    req = RefundRequest(
        idempotency_key=f"refund-{no}-{cap.txn_id}",
        pay_order_no=no,
        txn_id=cap.txn_id,
        amount=80,
        currency="USD",
    )
    refunds = await asyncio.gather(*(svc.sandbox.refund(req) for _ in range(5)))
    assert len({r.gateway_refund_id for r in refunds}) == 1
    ledger = await svc.sandbox.ledger_of(no)
    assert (ledger["captured"], ledger["refunded"], len(ledger["refunds"])) == (80, 80, 1)
    other_key = RefundRequest(
        idempotency_key=f"refund-{no}-other",
        pay_order_no=no,
        txn_id=cap.txn_id,
        amount=80,
        currency="USD",
    )
    with pytest.raises(GatewayRejected, match="exceeds"):
        await svc.sandbox.refund(other_key)


async def test_who_asked_to_cancel_is_noted_once_while_paying_and_moves_nothing(
    svc: InProcessResources,
) -> None:
    no = await new_order(svc)
    assert await svc.store.note_cancel_requested(no, "checkout-eu")
    assert not await svc.store.note_cancel_requested(no, "checkout-us")  # the first wins
    row = await svc.store.get_pay_order(no)
    assert row is not None and row.cancel_requested_by == "checkout-eu"
    assert (row.status, row.lock_version) == (PayOrderStatus.PAYING, 0)
    # A closed order notes nobody: a cancel of it changes nothing.
    closed = await new_order(svc)
    assert (await svc.store.expire(closed, 0, CloseReason.EXPIRED)).changed
    assert not await svc.store.note_cancel_requested(closed, "checkout-eu")
    after = await svc.store.get_pay_order(closed)
    assert after is not None and after.cancel_requested_by is None
    assert not await svc.store.note_cancel_requested("po_never-created", "checkout-eu")
    # Only a token's name: the database refuses anything else.
    async with svc.pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "UPDATE pay_order SET cancel_requested_by = 'not a name' WHERE pay_order_no = $1",
                no,
            )


async def test_the_trade_book_names_the_trades_payable_in_a_window_and_their_open_refunds(
    svc: InProcessResources,
) -> None:
    """What the Alipay statement asks Alipay about (``ReconcileStore``, the trade book)."""
    book = ReconcileStore(svc.pool)
    nos = [await new_order(svc) for _ in range(3)]
    opened, other_gateway, unopened = nos
    await svc.store.record_trade(opened, "alipay", f"t-{opened}")
    await svc.store.record_trade(other_gateway, "stripe", f"pi-{other_gateway}")
    row = await svc.store.get_pay_order(opened)
    assert row is not None
    created, expires = row.created_at, row.expires_at
    second = timedelta(seconds=1)

    def payable(start: datetime, end: datetime) -> Awaitable[list[str]]:
        return book.trades_payable_in("alipay", start, end, grace_s=1.0)

    assert opened in await payable(created, expires)
    assert unopened not in await payable(created, expires)
    assert other_gateway not in await payable(created, expires)
    assert opened not in await payable(created - 2 * second, created)  # before it was opened
    assert opened in await payable(expires + second / 2, expires + 2 * second)  # Alipay's grain
    assert opened not in await payable(expires + 2 * second, expires + 3 * second)

    late = RecordPayment(
        pay_order_no=opened,
        payment=payment(order_no("t"), 100),
        refund_reason=RefundReason.LATE,
        expected_lock_version=None,
    )
    recorded = await svc.store.record_payment(late)
    assert recorded.refund_key is not None
    assert await book.refunds_in_flight_of([opened, unopened]) == [
        (recorded.refund_key, opened, late.payment.txn_id)
    ]
    await svc.store.confirm_refund(recorded.refund_key, "rf_t")
    assert await book.refunds_in_flight_of([opened]) == []

"""Why a pay order closed unpaid (migration 0007): on the row, in the expired event, and
guarded by the database like the status it belongs to."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from importlib import resources

import asyncpg
import pytest

from payorders.core import store
from payorders.core.domain import CloseReason, PayOrderStatus
from payorders.core.models import RecordPayment
from payorders.localstack import postgres as embedded
from payorders.sandbox.ledger import InProcessResources

from ..conftest import order_no
from .test_store import new_order, payment

EXPIRED, CANCELLED = CloseReason.EXPIRED, CloseReason.CANCELLED


async def test_a_cancelled_expiry_keeps_its_reason_on_the_row_and_in_the_event(
    svc: InProcessResources,
) -> None:
    no = await new_order(svc)
    done = await svc.store.expire(no, 0, CANCELLED)
    assert done.changed
    assert (done.row.status, done.row.close_reason) == (PayOrderStatus.PAY_EXPIRED, CANCELLED)
    # A repeat (a retried activity, the timer after a cancel) writes nothing: the first wins.
    again = await svc.store.expire(no, 0, EXPIRED)
    assert not again.changed and again.row.close_reason is CANCELLED
    [event] = await svc.store.outbox_of(no)
    assert event["event_type"] == "pay_order.expired"
    assert json.loads(event["payload"])["reason"] == "CANCELLED"


async def test_a_paid_order_has_no_close_reason(svc: InProcessResources) -> None:
    no = await new_order(svc)
    await svc.store.record_payment(
        RecordPayment(
            pay_order_no=no,
            payment=payment(order_no("t")),
            refund_reason=None,
            expected_lock_version=0,
        )
    )
    assert not (await svc.store.expire(no, 1, CANCELLED)).changed
    row = await svc.store.get_pay_order(no)
    assert row is not None and (row.status, row.close_reason) == (PayOrderStatus.PAY_SUCCESS, None)


async def test_an_expiry_by_hand_means_the_timer_and_the_reason_is_final(
    svc: InProcessResources,
) -> None:
    no = await new_order(svc)
    async with svc.pool.acquire() as conn:
        await conn.execute(
            "UPDATE pay_order SET status = 'PAY_EXPIRED' WHERE pay_order_no = $1", no
        )
        assert (
            await conn.fetchval("SELECT close_reason FROM pay_order WHERE pay_order_no = $1", no)
            == "EXPIRED"
        )
        for sql in (
            "UPDATE pay_order SET close_reason = 'CANCELLED' WHERE pay_order_no = $1",
            "UPDATE pay_order SET close_reason = NULL WHERE pay_order_no = $1",
        ):
            with pytest.raises(asyncpg.IntegrityConstraintViolationError):
                await conn.execute(sql, no)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE pay_order SET close_reason = 'CANCELLED' WHERE pay_order_no = $1",
        "UPDATE pay_order SET close_reason = 'ABANDONED' WHERE pay_order_no = $1",
        "UPDATE pay_order SET status = 'PAY_SUCCESS', close_reason = 'EXPIRED'"
        " WHERE pay_order_no = $1",
    ],
)
async def test_the_database_refuses_a_reason_on_an_order_that_did_not_close_unpaid(
    svc: InProcessResources, sql: str
) -> None:
    no = await new_order(svc)
    async with svc.pool.acquire() as conn:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError):
            await conn.execute(sql, no)
        row = await conn.fetchrow(
            "SELECT status, close_reason FROM pay_order WHERE pay_order_no = $1", no
        )
    assert row is not None and (row["status"], row["close_reason"]) == ("PAYING", None)


async def test_the_migration_gives_orders_expired_before_it_the_timers_reason(
    pg_admin_url: str,
) -> None:
    """A database as it was before 0007: its expired orders get EXPIRED, their updated_at
    untouched; paid and paying orders get none."""
    name = f"before_0007_{uuid.uuid4().hex[:8]}"
    url = await embedded.ensure_database(pg_admin_url, name)
    migrations = sorted(
        (f.name.removesuffix(".sql"), f.read_text())
        for f in resources.files("payorders.core.migrations").iterdir()
        if f.name.endswith(".sql")
    )
    stamp = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    try:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(store.SQL_MIGRATIONS_TABLE)
            for version, sql in migrations:
                if version >= "0007":
                    break
                await conn.execute(sql)
                await conn.execute(store.SQL_RECORD_MIGRATION, version)
            for no, status in (
                ("old-e", "PAY_EXPIRED"),
                ("old-s", "PAY_SUCCESS"),
                ("old-p", "PAYING"),
            ):
                await conn.execute(
                    "INSERT INTO pay_order (pay_order_no, order_no, amount, currency, status,"
                    " paid_amount, expires_at, created_at, updated_at)"
                    " VALUES ($1, $2, 100, 'USD', $3, $4, $5, $5, $5)",
                    f"po_{no}",
                    no,
                    status,
                    100 if status == "PAY_SUCCESS" else 0,
                    stamp,
                )
        finally:
            await conn.close()
        pool = await store.create_pool(url, min_size=1, max_size=2)
        try:
            applied = await store.migrate(pool)
            assert applied[0] == "0007_cancel"
            async with pool.acquire() as c:
                rows = await c.fetch("SELECT pay_order_no, close_reason, updated_at FROM pay_order")
        finally:
            await pool.close()
        assert {r["pay_order_no"]: r["close_reason"] for r in rows} == {
            "po_old-e": "EXPIRED",
            "po_old-s": None,
            "po_old-p": None,
        }
        assert {r["updated_at"] for r in rows} == {stamp}
    finally:
        admin = await asyncpg.connect(pg_admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

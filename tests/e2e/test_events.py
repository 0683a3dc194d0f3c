"""Order events end to end: pay orders through the service API and the sandbox gateway over
HTTP (real Temporal dev server, real PostgreSQL), the relay as its own process
(``python -m payorders.service.relay``) delivering to a real HTTP receiver, and the pull
feed ``GET /v1/events`` returning the same events in order; its bad requests change
nothing."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from payorders.localstack import postgres as embedded
from payorders.service.events import feed as events

from ..event_receiver import EventReceiver, RelayProcess
from ..http_stack import AUTH, HttpStack, http_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def events_db(pg_admin_url: str) -> str:
    """A database of this module's own: its feed holds only this module's events."""
    return await embedded.ensure_database(pg_admin_url, f"payorders_events_{os.getpid()}")


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, events_db: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, events_db) as stack:
        yield stack


async def feed(web: HttpStack, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=web.settings.api_url) as http:
        return await http.get("/v1/events", params=params, headers=AUTH)


async def test_every_outcome_reaches_the_order_service_once_and_the_feed_has_the_same(
    web: HttpStack, events_db: str, receiver: EventReceiver, relay_processes: list[RelayProcess]
) -> None:
    relay = RelayProcess(events_db, receiver.url)
    relay_processes.append(relay)
    await relay.start()
    tag = uuid.uuid4().hex[:8]
    paid = (await web.service.create(order_no=f"ev-paid-{tag}", amount=1999, currency="USD"))[
        "pay_order_no"
    ]
    expired = (
        await web.service.create(
            order_no=f"ev-expired-{tag}", amount=500, currency="EUR", expires_in_s=1
        )
    )["pay_order_no"]
    await web.gateway.pay(pay_order_no=paid, amount=1999, currency="USD")
    await web.wait_order(paid, lambda o: o["status"] == "PAY_SUCCESS")
    await web.wait_order(expired, lambda o: o["status"] == "PAY_EXPIRED")
    late = await web.gateway.pay(pay_order_no=expired, amount=500, currency="EUR")
    await web.wait_order(expired, lambda o: o["refunded_amount"] == 500)
    async with web.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id FROM outbox WHERE pay_order_no = ANY($1)", [paid, expired]
        )
    ids = {events.event_id(r["id"]) for r in rows}
    assert len(ids) == 3
    await receiver.wait_acked(ids)
    assert await relay.stop() == 0

    assert len(receiver.requests) == 3 and all(d.verified for d in receiver.requests)
    assert receiver.violations == []
    got = {(e["type"], e["pay_order_no"], e["sequence"]) for e in receiver.acked.values()}
    assert got == {
        ("pay_order.succeeded", paid, 1),
        ("pay_order.expired", expired, 1),
        ("refund.succeeded", expired, 2),
    }
    refund = next(e for e in receiver.acked.values() if e["type"] == "refund.succeeded")
    assert refund["data"]["refund"] == {
        "refund_key": f"refund-{expired}-{late['txn_id']}",
        "txn_id": late["txn_id"],
        "amount": 500,
        "currency": "EUR",
    }
    assert refund["data"]["status"] == "PAY_EXPIRED" and refund["data"]["amount"] == 500

    # The pull feed, two at a time: the same bodies, in id order, then nothing more.
    pulled: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = (await feed(web, limit=2, **({"after": after} if after else {}))).json()
        pulled += page["events"]
        if not page["events"]:
            assert page["next_after"] == after
            break
        after = page["next_after"]
        assert after == page["events"][-1]["id"]
    assert [e["id"] for e in pulled] == sorted(e["id"] for e in pulled)
    mine = [e for e in pulled if e["id"] in ids]
    assert [e["id"] for e in mine] == sorted(ids)
    assert mine == [receiver.acked[e["id"]] for e in mine]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"after": "abc"}, "after"),
        ({"after": ""}, "after"),
        ({"after": "evt_1"}, "after"),
        ({"after": "evt_00000000000000001"}, "after"),
        ({"after": "evt_000000000000000x"}, "after"),
        ({"after": "po_order-42"}, "after"),
        ({"limit": 0}, "limit"),
        ({"limit": events.MAX_LIMIT + 1}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
async def test_a_bad_after_or_limit_is_a_422_and_changes_nothing(
    web: HttpStack, params: dict[str, Any], field: str
) -> None:
    before = await _queue(web)
    answer = await feed(web, **params)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["message"].startswith(f"{field}:")
    assert await _queue(web) == before


async def test_the_feed_needs_the_token(web: HttpStack) -> None:
    async with httpx.AsyncClient(base_url=web.settings.api_url) as http:
        assert (await http.get("/v1/events")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await http.get("/v1/events", headers=wrong)).status_code == 401


async def _queue(web: HttpStack) -> list[tuple[Any, ...]]:
    async with web.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, sequence, attempts, delivered_at, next_attempt_at FROM outbox ORDER BY id"
        )
    return [tuple(r) for r in rows]

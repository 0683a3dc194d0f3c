"""The sandbox gateway as an HTTP service: uvicorn on a real port, real PostgreSQL, and a
second uvicorn app receiving its webhooks. Payments and their signed webhooks (retries and
injected webhook faults), refunds by idempotency key, close, statement, faults, bad input
and the processing-time header, all through HTTP as a caller would see them."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Request, Response
from pydantic import SecretStr

from payorders.core import store
from payorders.core.settings import Settings
from payorders.sandbox.app import PROCESSING_HEADER, create_sandbox_app
from payorders.sandbox.ledger import SandboxGateway
from payorders.service import webhook

from ..http_stack import serving

SECRET = "whsec_sandbox_http_test"
SCHEMA = f"sbx_{uuid.uuid4().hex[:12]}"
RETRY_INITIAL_MS = 100


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Hit:
    at: float
    status: int
    headers: dict[str, str]
    body: bytes
    event: webhook.PaymentEvent


@dataclass
class Receiver:
    """Our side of the webhooks: records every request; can fail an order's first ones."""

    hits: list[Hit] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            event = webhook.parse_payment_event(body)
            status = 200
            if self.fail_first.get(event.pay_order_no, 0) > 0:
                self.fail_first[event.pay_order_no] -= 1
                status = 500
            self.hits.append(Hit(time.monotonic(), status, dict(request.headers), body, event))
            return Response(status_code=status)

        return app

    def of(self, pay_order_no: str, *, ok_only: bool = True) -> list[Hit]:
        return [
            h
            for h in self.hits
            if h.event.pay_order_no == pay_order_no and (h.status == 200 or not ok_only)
        ]

    async def wait(self, pay_order_no: str, count: int, within: float = 15) -> list[Hit]:
        deadline = time.monotonic() + within
        while len(self.of(pay_order_no)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{pay_order_no}: got {self.of(pay_order_no, ok_only=False)}")
            await asyncio.sleep(0.02)
        return self.of(pay_order_no)


def sandbox_settings(db_url: str, schema: str, webhook_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        sandbox_schema=schema,
        webhook_url=webhook_url,
        webhook_secrets=[SecretStr(SECRET)],
        sandbox_webhook_retry_initial_ms=RETRY_INITIAL_MS,
        sandbox_webhook_max_attempts=6,
        gateway_server_timeout_ms=1_000,
        gateway_client_timeout_ms=1_500,
        db_pool_min=1,
        db_pool_max=10,
    )


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    async with serving(r.app()) as url:
        yield r, f"{url}/hook"


@pytest.fixture(scope="module")
async def gateway_url(db_url: str, receiver: tuple[Receiver, str]) -> AsyncIterator[str]:
    app = create_sandbox_app(sandbox_settings(db_url, SCHEMA, receiver[1]))
    async with serving(app) as url:
        yield url


@pytest.fixture
async def http(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        yield client


@pytest.fixture
def hooks(receiver: tuple[Receiver, str]) -> Receiver:
    return receiver[0]


# --- helpers ---------------------------------------------------------------------------------


def new_no() -> str:
    return f"po_{uuid.uuid4().hex[:12]}"


async def pay(http: httpx.AsyncClient, no: str, amount: int = 100, **extra: Any) -> dict[str, Any]:
    resp = await http.post(
        "/v1/payments", json={"pay_order_no": no, "amount": amount, "currency": "USD", **extra}
    )
    assert resp.status_code == 201, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


async def refund(
    http: httpx.AsyncClient, capture: dict[str, Any], *, amount: int | None = None, **kw: Any
) -> httpx.Response:
    key = f"refund-{capture['pay_order_no']}-{capture['txn_id']}"
    return await http.post(
        "/v1/refunds",
        headers={"Idempotency-Key": key},
        json={
            "pay_order_no": capture["pay_order_no"],
            "txn_id": capture["txn_id"],
            "amount": capture["amount"] if amount is None else amount,
            "currency": capture["currency"],
        },
        **kw,
    )


async def ledger(http: httpx.AsyncClient, no: str) -> dict[str, Any]:
    resp = await http.get(f"/v1/ledger/{no}")
    assert resp.status_code == 200
    doc: dict[str, Any] = resp.json()
    return doc


async def delivered(http: httpx.AsyncClient, no: str, within: float = 15) -> list[dict[str, Any]]:
    """The order's webhook rows once each was delivered as often as owed. The receiver sees
    a webhook a moment before the gateway commits that it was delivered, so poll."""
    deadline = time.monotonic() + within
    while True:
        rows: list[dict[str, Any]] = (await ledger(http, no))["webhooks"]
        if all(r["deliveries"] == r["copies"] for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"{no}: webhooks not settled: {rows}")
        await asyncio.sleep(0.02)


async def arm(http: httpx.AsyncClient, scope: str, **faults: Any) -> None:
    resp = await http.put(f"/v1/faults/{scope}", json=faults)
    assert resp.status_code == 200, resp.text


# --- payments and webhooks -------------------------------------------------------------------


async def test_a_payment_is_captured_and_its_webhook_delivered_once_signed(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    capture = await pay(http, no, 1999, txn_id=f"txn_{uuid.uuid4().hex[:10]}")
    assert (capture["pay_order_no"], capture["amount"], capture["currency"]) == (no, 1999, "USD")
    assert (await http.get(f"/v1/captures/{capture['txn_id']}")).json() == capture

    [hit] = await hooks.wait(no, 1)
    assert hit.headers["content-type"] == "application/json"
    header = hit.headers[webhook.HEADER.lower()]
    webhook.verify(header, hit.body, secrets=[SECRET], now=datetime.now(UTC))
    with pytest.raises(webhook.WebhookRejected):
        webhook.verify(header, hit.body, secrets=["whsec_other"], now=datetime.now(UTC))
    event = hit.event
    assert event.event_id.startswith("evt_")
    assert (event.txn_id, event.amount, event.currency) == (capture["txn_id"], 1999, "USD")
    assert event.paid_at == datetime.fromisoformat(capture["captured_at"])

    await asyncio.sleep(0.5)
    assert len(hooks.of(no, ok_only=False)) == 1
    [delivery] = await delivered(http, no)
    assert delivery["event_id"] == event.event_id
    assert (delivery["attempts"], delivery["deliveries"], delivery["last_status"]) == (1, 1, 200)
    assert delivery["delivered_at"] is not None


async def test_a_replayed_payment_queues_no_second_webhook(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    txn = f"txn_{uuid.uuid4().hex[:10]}"
    first = await pay(http, no, txn_id=txn)
    assert await pay(http, no, txn_id=txn) == first
    conflict = await http.post(
        "/v1/payments", json={"pay_order_no": no, "amount": 5, "currency": "USD", "txn_id": txn}
    )
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "txn_conflict"
    await hooks.wait(no, 1)
    await asyncio.sleep(0.3)
    assert len(hooks.of(no, ok_only=False)) == 1
    assert len((await ledger(http, no))["webhooks"]) == 1


async def test_a_webhook_answered_500_twice_is_delivered_on_the_third_attempt(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    hooks.fail_first[no] = 2
    await pay(http, no)
    await hooks.wait(no, 1)
    hits = hooks.of(no, ok_only=False)
    assert [h.status for h in hits] == [500, 500, 200]
    assert len({h.event.event_id for h in hits}) == 1
    # Backoff doubles: the retries wait at least 100 ms, then 200 ms.
    assert hits[1].at - hits[0].at >= RETRY_INITIAL_MS / 1000
    assert hits[2].at - hits[1].at >= 2 * RETRY_INITIAL_MS / 1000
    [delivery] = await delivered(http, no)
    assert (delivery["attempts"], delivery["deliveries"], delivery["last_status"]) == (3, 1, 200)


async def test_a_dropped_first_attempt_is_delivered_by_the_retry(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    await arm(http, no, webhook_drop_next=1)
    started = time.monotonic()
    await pay(http, no)
    [hit] = await hooks.wait(no, 1)
    assert hit.at - started >= RETRY_INITIAL_MS / 1000
    assert len(hooks.of(no, ok_only=False)) == 1  # the lost attempt never reached us
    [delivery] = await delivered(http, no)
    assert (delivery["attempts"], delivery["deliveries"]) == (2, 1)
    # The fault was for one event only: the next one arrives at its first attempt.
    await pay(http, no)
    await hooks.wait(no, 2)
    later = (await delivered(http, no))[1]
    assert (later["attempts"], later["deliveries"]) == (1, 1)


async def test_a_duplicated_event_is_delivered_twice_with_the_same_id_and_body(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    await arm(http, no, webhook_duplicate_next=1)
    await pay(http, no)
    first, second = await hooks.wait(no, 2)
    assert first.event.event_id == second.event.event_id
    assert first.body == second.body
    await asyncio.sleep(0.4)
    assert len(hooks.of(no, ok_only=False)) == 2
    [delivery] = await delivered(http, no)
    assert (delivery["copies"], delivery["deliveries"]) == (2, 2)


async def test_a_delayed_webhook_is_not_sent_before_its_delay(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    await arm(http, no, webhook_delay_ms=700)
    started = time.monotonic()
    await pay(http, no)
    await asyncio.sleep(0.5)
    assert hooks.of(no, ok_only=False) == []
    [hit] = await hooks.wait(no, 1)
    assert hit.at - started >= 0.7


async def test_a_reordered_event_is_overtaken_by_a_later_one(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    await arm(http, no, webhook_reorder_next=1)
    held = await pay(http, no)
    later = await pay(http, no)
    first, second = await hooks.wait(no, 2)
    assert (first.event.txn_id, second.event.txn_id) == (later["txn_id"], held["txn_id"])
    assert second.at - first.at > 1.0


# --- refunds ---------------------------------------------------------------------------------


async def test_the_same_idempotency_key_refunds_once_also_concurrently(
    http: httpx.AsyncClient,
) -> None:
    capture = await pay(http, new_no(), 300)
    first = await refund(http, capture)
    assert first.status_code == 200, first.text
    doc = first.json()
    assert doc["status"] == "succeeded"
    assert (doc["txn_id"], doc["amount"], doc["currency"]) == (capture["txn_id"], 300, "USD")
    assert doc["idempotency_key"] == f"refund-{capture['pay_order_no']}-{capture['txn_id']}"
    assert 0 <= doc["processing_ms"] < 1000
    again = await refund(http, capture)
    assert again.json() == doc
    together = await asyncio.gather(*(refund(http, capture) for _ in range(5)))
    assert {r.status_code for r in together} == {200}
    assert {r.json()["id"] for r in together} == {doc["id"]}
    assert (await http.get(f"/v1/refunds/{doc['idempotency_key']}")).json() == doc

    held = await ledger(http, capture["pay_order_no"])
    assert (held["captured"], held["refunded"], len(held["refunds"])) == (300, 300, 1)
    assert held["refunds"][0] == doc
    outcomes = [c["outcome"] for c in held["refund_calls"]]
    assert outcomes == ["SUCCEEDED"] + ["REPLAYED"] * 6


async def test_a_refund_failing_at_the_gateway_answers_503_and_moves_no_money(
    http: httpx.AsyncClient,
) -> None:
    capture = await pay(http, new_no())
    await arm(http, capture["pay_order_no"], fail_next_refunds=1)
    failed = await refund(http, capture)
    assert failed.status_code == 503
    assert failed.json()["error"]["code"] == "unavailable"
    assert (await ledger(http, capture["pay_order_no"]))["refunds"] == []
    retried = await refund(http, capture)
    assert retried.status_code == 200
    assert retried.json()["status"] == "succeeded"


async def test_a_refund_beyond_the_capture_or_reusing_a_key_is_rejected_with_422(
    http: httpx.AsyncClient,
) -> None:
    capture = await pay(http, new_no(), 100)
    too_much = await refund(http, capture, amount=101)
    assert too_much.status_code == 422
    assert too_much.json()["error"]["code"] == "refund_rejected"
    assert "exceeds" in too_much.json()["error"]["message"]
    assert (await refund(http, capture, amount=40)).status_code == 200
    reused = await refund(http, capture, amount=50)
    assert reused.status_code == 422
    assert "reused" in reused.json()["error"]["message"]
    held = await ledger(http, capture["pay_order_no"])
    assert held["refunded"] == 40


async def test_a_refund_timing_out_after_success_still_succeeded_at_the_gateway(
    http: httpx.AsyncClient, gateway_url: str
) -> None:
    capture = await pay(http, new_no())
    await arm(http, capture["pay_order_no"], timeout_after_success_next=1)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=gateway_url, timeout=1) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await refund(impatient, capture)
    assert time.monotonic() - started < 2
    key = f"refund-{capture['pay_order_no']}-{capture['txn_id']}"
    found = await http.get(f"/v1/refunds/{key}")
    assert found.status_code == 200
    assert found.json()["status"] == "succeeded"
    # The gateway was quick; only its answer was late: the data behind "ambiguous".
    assert found.json()["processing_ms"] < 1000
    retried = await refund(http, capture)
    assert retried.json()["id"] == found.json()["id"]
    calls = [c["outcome"] for c in (await ledger(http, capture["pay_order_no"]))["refund_calls"]]
    assert calls == ["SUCCEEDED", "ANSWER_WITHHELD", "REPLAYED"]


async def test_a_withheld_answer_does_not_keep_the_server_from_stopping(
    db_url: str, receiver: tuple[Receiver, str]
) -> None:
    app = create_sandbox_app(sandbox_settings(db_url, f"{SCHEMA}_stop", receiver[1]))
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            capture = await pay(client, new_no())
            await arm(client, capture["pay_order_no"], timeout_after_success_next=1)
        async with httpx.AsyncClient(base_url=url, timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await refund(impatient, capture)
        stopping = time.monotonic()
    # uvicorn waits for running requests before it stops: the abandoned one must be gone.
    assert time.monotonic() - stopping < 3


async def test_a_request_slower_than_the_server_timeout_answers_503_having_done_nothing(
    http: httpx.AsyncClient,
) -> None:
    capture = await pay(http, new_no())
    await arm(http, capture["pay_order_no"], delay_ms=1_500)
    resp = await refund(http, capture)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "unavailable"
    assert float(resp.headers[PROCESSING_HEADER]) >= 1_000
    held = await ledger(http, capture["pay_order_no"])
    assert (held["refunds"], held["refund_calls"]) == ([], [])


# --- close and statement ---------------------------------------------------------------------


async def test_close_then_a_later_payment_is_still_captured_and_notified(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    closed = await http.post(f"/v1/trades/{no}/close")
    assert closed.status_code == 200
    assert closed.json() == {"status": "closed"}
    capture = await pay(http, no)
    held = await ledger(http, no)
    assert (held["trade_state"], held["captured"]) == ("CLOSED", 100)
    [hit] = await hooks.wait(no, 1)
    assert hit.event.txn_id == capture["txn_id"]


async def test_closing_a_paid_trade_answers_already_paid_with_the_capture(
    http: httpx.AsyncClient,
) -> None:
    no = new_no()
    capture = await pay(http, no)
    resp = await http.post(f"/v1/trades/{no}/close")
    assert resp.json() == {"status": "already_paid", "capture": capture}
    assert (await ledger(http, no))["trade_state"] == "PAID"


async def test_a_payment_at_the_instant_of_closing_is_already_paid_and_notified(
    http: httpx.AsyncClient, hooks: Receiver
) -> None:
    no = new_no()
    await arm(http, no, paid_on_close_amount=1234, paid_on_close_currency="EUR")
    resp = await http.post(f"/v1/trades/{no}/close")
    doc = resp.json()
    assert doc["status"] == "already_paid"
    assert (doc["capture"]["amount"], doc["capture"]["currency"]) == (1234, "EUR")
    [hit] = await hooks.wait(no, 1)
    assert hit.event.txn_id == doc["capture"]["txn_id"]


async def test_the_statement_holds_what_was_made_in_its_half_open_window(
    http: httpx.AsyncClient,
) -> None:
    capture = await pay(http, new_no())
    made = (await refund(http, capture)).json()
    captured_at = datetime.fromisoformat(capture["captured_at"])
    refunded_at = datetime.fromisoformat(made["created_at"])
    tick = timedelta(microseconds=1)

    async def window(start: datetime, end: datetime) -> tuple[list[str], list[str]]:
        resp = await http.get(
            "/v1/statement", params={"start": start.isoformat(), "end": end.isoformat()}
        )
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        return [c["txn_id"] for c in doc["captures"]], [r["id"] for r in doc["refunds"]]

    caps, refs = await window(captured_at, refunded_at + tick)
    assert capture["txn_id"] in caps
    assert made["id"] in refs
    caps, refs = await window(captured_at + tick, refunded_at)
    assert capture["txn_id"] not in caps
    assert made["id"] not in refs
    naive = await http.get("/v1/statement", params={"start": "2025-01-01T00:00:00", "end": "x"})
    assert naive.status_code == 422
    naive = await http.get(
        "/v1/statement",
        params={"start": "2025-01-01T00:00:00", "end": "2025-01-02T00:00:00"},
    )
    assert naive.status_code == 422
    assert "time zone" in naive.json()["error"]["message"]


# --- the processing header, bad input, faults ------------------------------------------------


async def test_every_response_carries_the_gateway_processing_time(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    no = new_no()
    capture = await pay(http, no)
    await arm(http, no, fail_next_refunds=1)
    calls: list[Callable[[], Awaitable[httpx.Response]]] = [
        lambda: http.get("/healthz"),
        lambda: http.post("/v1/payments", json={"pay_order_no": no, "amount": 1}),
        lambda: http.post(
            "/v1/payments", json={"pay_order_no": no, "amount": 1, "currency": "USD"}
        ),
        lambda: http.get(f"/v1/captures/{capture['txn_id']}"),
        lambda: http.get("/v1/captures/txn_none"),
        lambda: refund(http, capture),
        lambda: http.get("/v1/faults"),
        lambda: http.delete(f"/v1/faults/{no}"),
        lambda: http.get("/v1/nowhere"),
    ]
    statuses = []
    for call in calls:
        resp = await call()
        statuses.append(resp.status_code)
        assert re.fullmatch(r"\d+\.\d{3}", resp.headers[PROCESSING_HEADER]), resp.headers
    assert statuses == [200, 422, 201, 200, 404, 503, 200, 204, 404]

    async def broken(self: SandboxGateway, txn_id: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(SandboxGateway, "query_capture", broken)
    crashed = await http.get(f"/v1/captures/{capture['txn_id']}")
    assert crashed.status_code == 500
    assert crashed.json()["error"]["code"] == "internal"
    assert PROCESSING_HEADER in crashed.headers
    monkeypatch.undo()

    await arm(http, no, delay_ms=300)
    slow = await http.post(f"/v1/trades/{no}/close")
    assert slow.status_code == 200
    assert float(slow.headers[PROCESSING_HEADER]) >= 300


BAD_PAYMENTS = [
    ({"amount": "100"}, "integer"),
    ({"amount": 0}, "greater than zero"),
    ({"amount": True}, "integer"),
    ({"amount": 1.5}, "integer"),
    ({"currency": "usd"}, "ISO 4217"),
    ({"pay_order_no": "order-1"}, "pay order number"),
    ({"pay_order_no": "po_bad no"}, "pay_order_no"),
    ({"txn_id": "bad txn!"}, "txn_id"),
    ({"tip": 5}, "unknown field"),
    ({"amount": None}, "integer"),
]


@pytest.mark.parametrize(("change", "message"), BAD_PAYMENTS)
async def test_a_bad_payment_is_refused_with_422_and_nothing_is_written(
    http: httpx.AsyncClient, hooks: Receiver, change: dict[str, Any], message: str
) -> None:
    no = new_no()
    body = {"pay_order_no": no, "amount": 100, "currency": "USD", **change}
    resp = await http.post("/v1/payments", json=body)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "invalid_request"
    assert message in error["message"]
    held = await ledger(http, no)
    assert (held["captures"], held["webhooks"], held["trade_state"]) == ([], [], None)


async def test_a_body_that_is_not_a_json_object_is_refused_with_422(
    http: httpx.AsyncClient,
) -> None:
    for content in (b"{", b"[1, 2]", b""):
        resp = await http.post(
            "/v1/payments", content=content, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 422, content
        assert resp.json()["error"]["code"] == "invalid_request"


async def test_a_bad_refund_request_is_refused_with_422_and_nothing_is_written(
    http: httpx.AsyncClient,
) -> None:
    capture = await pay(http, new_no())
    body = {
        "pay_order_no": capture["pay_order_no"],
        "txn_id": capture["txn_id"],
        "amount": 100,
        "currency": "USD",
    }
    no_key = await http.post("/v1/refunds", json=body)
    assert no_key.status_code == 422
    assert "idempotency-key" in no_key.json()["error"]["message"]
    long_key = await http.post("/v1/refunds", json=body, headers={"Idempotency-Key": "k" * 256})
    assert long_key.status_code == 422
    negative = await http.post(
        "/v1/refunds", json={**body, "amount": -1}, headers={"Idempotency-Key": "k1"}
    )
    assert negative.status_code == 422
    assert "greater than zero" in negative.json()["error"]["message"]
    held = await ledger(http, capture["pay_order_no"])
    assert (held["refunds"], held["refund_calls"]) == ([], [])
    assert (await http.get("/v1/refunds/k1")).status_code == 404


async def test_faults_are_set_in_part_listed_and_cleared_over_http(
    http: httpx.AsyncClient,
) -> None:
    no = new_no()
    first = await http.put(f"/v1/faults/{no}", json={"fail_next_refunds": 2})
    assert first.status_code == 200
    second = await http.put(f"/v1/faults/{no}", json={"webhook_delay_ms": 5})
    assert second.json()["fail_next_refunds"] == 2
    assert second.json()["webhook_delay_ms"] == 5
    listed = [f for f in (await http.get("/v1/faults")).json() if f["scope"] == no]
    assert len(listed) == 1
    assert (listed[0]["fail_next_refunds"], listed[0]["webhook_delay_ms"]) == (2, 5)
    for bad in (
        {"fail_next_refunds": -1},
        {"fail_next_refunds": True},
        {"drop_everything": 1},
        {"paid_on_close_amount": 100},
        {"paid_on_close_amount": 100, "paid_on_close_currency": "usd"},
    ):
        resp = await http.put(f"/v1/faults/{no}", json=bad)
        assert resp.status_code == 422, bad
        assert resp.json()["error"]["code"] == "invalid_request"
    # A scope is "*" or the name the gateway knows a trade by: an identifier.
    assert (await http.put("/v1/faults/not%20an%20order", json={"delay_ms": 1})).status_code == 422
    assert (await http.delete(f"/v1/faults/{no}")).status_code == 204
    assert [f for f in (await http.get("/v1/faults")).json() if f["scope"] == no] == []

    # "*" arms every order; clearing everything leaves nothing armed.
    await arm(http, "*", webhook_delay_ms=1)
    await arm(http, no, delay_ms=1)
    assert {"*", no} <= {f["scope"] for f in (await http.get("/v1/faults")).json()}
    assert (await http.delete("/v1/faults")).status_code == 204
    assert (await http.get("/v1/faults")).json() == []


# --- the gateway object underneath -----------------------------------------------------------


OLD_SCHEMA = """
CREATE SCHEMA {s};
CREATE TABLE {s}.capture (
    txn_id text PRIMARY KEY, pay_order_no text NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0), currency text NOT NULL,
    captured_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE {s}.refund (
    idempotency_key text PRIMARY KEY, gateway_refund_id text NOT NULL UNIQUE,
    txn_id text NOT NULL REFERENCES {s}.capture, amount bigint NOT NULL CHECK (amount > 0),
    currency text NOT NULL, status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE {s}.fault (
    scope text PRIMARY KEY,
    fail_next_refunds integer NOT NULL DEFAULT 0 CHECK (fail_next_refunds >= 0),
    timeout_after_success_next integer NOT NULL DEFAULT 0
        CHECK (timeout_after_success_next >= 0),
    delay_ms integer NOT NULL DEFAULT 0 CHECK (delay_ms >= 0),
    paid_on_close_amount bigint CHECK (paid_on_close_amount > 0),
    paid_on_close_currency text);
INSERT INTO {s}.capture VALUES ('txn_old', 'po_old', 100, 'USD', now());
INSERT INTO {s}.refund VALUES ('refund-po_old-txn_old', 'rf_old', 'txn_old', 100, 'USD',
    'SUCCEEDED', now());
INSERT INTO {s}.fault (scope, fail_next_refunds) VALUES ('po_old', 3);
"""


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await store.create_pool(db_url, min_size=1, max_size=4)
    yield p
    await p.close()


async def test_install_upgrades_an_existing_ledger_in_place(pool: asyncpg.Pool) -> None:
    schema = f"sbx_old_{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await conn.execute(OLD_SCHEMA.format(s=schema))
    gateway = SandboxGateway(pool, schema=schema, server_timeout_s=1)
    await gateway.install()
    constraints_sql = (
        "SELECT count(*) FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c'"
    )
    async with pool.acquire() as conn:
        checks = await conn.fetchval(constraints_sql, f"{schema}.fault")
    await gateway.install()
    async with pool.acquire() as conn:
        after = await conn.fetchval(constraints_sql, f"{schema}.fault")
    # Four checks from before, four with the new columns; a second install adds none.
    assert after == checks == 8
    faults = await gateway.faults_of("po_old")
    assert (faults.fail_next_refunds, faults.webhook_drop_next) == (3, 0)
    [old] = (await gateway.ledger_of("po_old"))["refunds"]
    assert (old.gateway_refund_id, old.processing_ms) == ("rf_old", None)
    await gateway.set_faults("po_old", webhook_drop_next=1)
    assert (await gateway.faults_of("po_old")).fail_next_refunds == 3


async def test_deliver_due_retries_with_a_capped_backoff_until_max_attempts(
    pool: asyncpg.Pool,
) -> None:
    schema = f"sbx_dlv_{uuid.uuid4().hex[:8]}"
    gateway = SandboxGateway(pool, schema=schema, server_timeout_s=1)
    await gateway.install()
    await gateway.capture(pay_order_no="po_quiet", amount=5, currency="USD")
    await gateway.capture(pay_order_no="po_a", amount=5, currency="USD", notify=True, txn_id="t1")
    await gateway.capture(pay_order_no="po_a", amount=5, currency="USD", notify=True, txn_id="t1")
    sent: list[tuple[str, dict[str, str], bytes]] = []

    async def unreachable(url: str, headers: dict[str, str], body: bytes) -> int:
        sent.append((url, headers, body))
        raise httpx.ConnectError("refused")

    async def deliver(send: Any, retry_initial_ms: int = 1) -> int:
        delivered: int = await gateway.deliver_due(
            send,
            url="http://hooks.invalid/x",
            secrets=[SECRET, "whsec_next"],
            max_attempts=2,
            retry_initial_ms=retry_initial_ms,
        )
        return delivered

    assert await deliver(unreachable) == 0
    await asyncio.sleep(0.01)
    assert await deliver(unreachable) == 0
    assert len(sent) == 2  # one event (the replayed capture and notify=False queue nothing)
    assert sent[0][2] == sent[1][2]
    assert sent[0][1][webhook.HEADER].count("v1=") == 1  # signed with the first secret only
    await asyncio.sleep(0.01)
    assert await deliver(unreachable) == 0
    assert len(sent) == 2  # max_attempts reached: given up
    [row] = (await gateway.ledger_of("po_a"))["webhooks"]
    assert (row["attempts"], row["deliveries"], row["last_status"]) == (2, 0, None)
    assert "ConnectError" in row["last_error"]
    assert (await gateway.ledger_of("po_quiet"))["webhooks"] == []

    await gateway.capture(pay_order_no="po_b", amount=5, currency="USD", notify=True)

    async def busy(url: str, headers: dict[str, str], body: bytes) -> int:
        return 503

    assert await deliver(busy, retry_initial_ms=10_000_000) == 0
    [row] = (await gateway.ledger_of("po_b"))["webhooks"]
    wait = row["next_attempt_at"] - datetime.now(UTC)
    assert timedelta(seconds=55) < wait <= timedelta(seconds=60)
    assert (row["last_status"], row["last_error"]) == (503, "HTTP 503")

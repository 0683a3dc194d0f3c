"""End to end over real HTTP: checkout through the service API, customers paying at the
sandbox gateway, whose signed webhooks reach the adapter; refunds through the HTTP
gateway client. Real Temporal dev server, real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from payorders.core import domain
from payorders.service import webhook
from payorders.tools.http_clients import ServiceError

from ..http_stack import API_TOKEN, AUTH, HttpStack, http_stack, payment_event

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, db_url: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, db_url) as stack:
        yield stack


def new_order() -> str:
    return f"web-{uuid.uuid4().hex[:10]}"


async def test_checkout_is_idempotent_and_a_payment_settles_through_the_webhook(
    web: HttpStack,
) -> None:
    no = new_order()
    first = await web.service.create(order_no=no, amount=1999, currency="USD")
    again = await web.service.create(order_no=no, amount=1999, currency="USD")
    assert first["created"] is True and again["created"] is False
    assert again["pay_order_no"] == first["pay_order_no"]
    with pytest.raises(ServiceError) as conflict:
        await web.service.create(order_no=no, amount=2000, currency="USD")
    assert conflict.value.status == 409
    await web.gateway.pay(pay_order_no=first["pay_order_no"], amount=1999, currency="USD")
    order = await web.wait_order(first["pay_order_no"], lambda o: o["status"] == "PAY_SUCCESS")
    assert order["fund_identity"]["holds"] and order["paid_amount"] == 1999
    ledger = await web.gateway.ledger(first["pay_order_no"])
    assert ledger["captured"] == 1999 and ledger["trade_state"] == "PAID"


async def test_an_unpaid_order_expires_and_a_late_payment_is_refunded_over_http(
    web: HttpStack,
) -> None:
    doc = await web.service.create(order_no=new_order(), amount=500, currency="EUR", expires_in_s=1)
    no = doc["pay_order_no"]
    await web.wait_order(no, lambda o: o["status"] == "PAY_EXPIRED")
    assert (await web.gateway.ledger(no))["trade_state"] == "CLOSED"
    await web.gateway.pay(pay_order_no=no, amount=500, currency="EUR")
    order = await web.wait_order(no, lambda o: o["refunded_amount"] == 500)
    assert order["fund_identity"]["holds"]
    assert len((await web.gateway.ledger(no))["refunds"]) == 1


async def test_duplicated_and_reordered_webhooks_settle_once(web: HttpStack) -> None:
    doc = await web.service.create(order_no=new_order(), amount=300, currency="USD")
    no = doc["pay_order_no"]
    await web.gateway.set_faults(no, webhook_duplicate_next=2, webhook_reorder_next=1)
    first = await web.gateway.pay(pay_order_no=no, amount=300, currency="USD")
    second = await web.gateway.pay(pay_order_no=no, amount=300, currency="USD")
    order = await web.wait_order(
        no, lambda o: o["status"] == "PAY_SUCCESS" and o["refunded_amount"] == 300
    )
    assert order["paid_amount"] == 600 and order["fund_identity"]["holds"]
    assert {p["txn_id"] for p in order["payments"]} == {first["txn_id"], second["txn_id"]}
    async with web.pool.acquire() as conn:
        events = await conn.fetchval(
            "SELECT count(*) FROM webhook_event WHERE pay_order_no = $1"
            " AND outcome NOT LIKE 'REFUND_%'",
            no,
        )
    assert events == 2  # four deliveries, two payment events (the refund's has its own)


async def test_a_lost_webhook_is_delivered_by_the_gateways_retry(web: HttpStack) -> None:
    doc = await web.service.create(order_no=new_order(), amount=42, currency="USD")
    no = doc["pay_order_no"]
    await web.gateway.set_faults(no, webhook_drop_next=1)
    await web.gateway.pay(pay_order_no=no, amount=42, currency="USD")
    await web.wait_order(no, lambda o: o["status"] == "PAY_SUCCESS")
    async with web.pool.acquire() as conn:
        attempts = await conn.fetchval(
            f"SELECT attempts FROM {web.schema}.webhook_delivery WHERE pay_order_no = $1", no
        )
    assert attempts >= 2


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_refund_that_times_out_after_success_across_the_network_is_made_once(
    web: HttpStack,
) -> None:
    doc = await web.service.create(order_no=new_order(), amount=777, currency="USD", expires_in_s=1)
    no = doc["pay_order_no"]
    await web.gateway.set_faults(no, timeout_after_success_next=1)
    ambiguous_before = _metric(
        "payorders_gateway_calls_total", op="refund", outcome="ambiguous_timeout"
    )
    await web.wait_order(no, lambda o: o["status"] == "PAY_EXPIRED")
    await web.gateway.pay(pay_order_no=no, amount=777, currency="USD")
    order = await web.wait_order(no, lambda o: o["refunded_amount"] == 777)
    assert order["fund_identity"]["holds"]
    ledger = await web.gateway.ledger(no)
    assert len(ledger["refunds"]) == 1
    assert (
        _metric("payorders_gateway_calls_total", op="refund", outcome="ambiguous_timeout")
        == ambiguous_before + 1
    )


# --- attacks and bad input: each a clear 4xx, and nothing changes --------------------------


def _event(pay_order_no: str, txn_id: str, amount: Any = 100, currency: Any = "USD") -> bytes:
    return payment_event(pay_order_no, txn_id, amount=amount, currency=currency)


def _signed(
    body: bytes, *, secret: str = "whsec_test_new", at: int | None = None
) -> dict[str, str]:
    t = int(time.time()) if at is None else at
    return {
        webhook.HEADER: webhook.sign_header([secret], t, body),
        "Content-Type": "application/json",
    }


@pytest.fixture(scope="module")
async def paid(web: HttpStack) -> dict[str, Any]:
    """A pay order with a real capture at the gateway, to aim attacks at."""
    doc = await web.service.create(order_no=new_order(), amount=100, currency="USD")
    capture = await web.gateway.pay(pay_order_no=doc["pay_order_no"], amount=100, currency="USD")
    await web.wait_order(doc["pay_order_no"], lambda o: o["status"] == "PAY_SUCCESS")
    return capture


def _webhook_attacks(p: dict[str, Any]) -> list[tuple[str, dict[str, Any], int]]:
    no, txn = p["pay_order_no"], p["txn_id"]
    good = _event(no, txn)
    now = int(time.time())
    return [
        (
            "missing signature",
            {"content": good, "headers": {"Content-Type": "application/json"}},
            401,
        ),
        (
            "forged signature",
            {
                "content": good,
                "headers": {
                    webhook.HEADER: f"t={now},v1={'0' * 64}",
                    "Content-Type": "application/json",
                },
            },
            401,
        ),
        ("unknown secret", {"content": good, "headers": _signed(good, secret="guess")}, 401),
        ("expired timestamp", {"content": good, "headers": _signed(good, at=now - 301)}, 401),
        # A minute past the tolerance: the cases before it take time, and a signature only
        # 301 s ahead of ``now`` is back inside the 300 s window once a second has passed.
        ("future timestamp", {"content": good, "headers": _signed(good, at=now + 360)}, 401),
        (
            "malformed header",
            {
                "content": good,
                "headers": {webhook.HEADER: "garbage", "Content-Type": "application/json"},
            },
            401,
        ),
        (
            "signature over another body",
            {"content": _event(no, txn, amount=1), "headers": _signed(good)},
            401,
        ),
        ("malformed JSON", {"content": b"{not json", "headers": _signed(b"{not json")}, 400),
        (
            "wrong event type",
            {
                "content": b'{"id":"e1","type":"x","data":{}}',
                "headers": _signed(b'{"id":"e1","type":"x","data":{}}'),
            },
            400,
        ),
        (
            "wrong content type",
            {"content": good, "headers": {**_signed(good), "Content-Type": "text/plain"}},
            415,
        ),
        ("oversized body", {"content": b"x" * 100_000, "headers": _signed(b"x" * 100_000)}, 413),
        *[
            (name, {"content": (b := _event(no, txn, **kw)), "headers": _signed(b)}, 422)
            for name, kw in [
                ("negative amount", {"amount": -100}),
                ("zero amount", {"amount": 0}),
                ("fractional amount", {"amount": 10.5}),
                ("huge amount", {"amount": 10**18}),
                ("amount as string", {"amount": "100"}),
                ("unknown currency", {"currency": "XXX"}),
                ("amount differs from the capture", {"amount": 99}),
                ("currency differs from the capture", {"currency": "EUR"}),
            ]
        ],
        *[
            (name, {"content": (b := _event(bad_no, txn)), "headers": _signed(b)}, 422)
            for name, bad_no in [
                ("SQL in the pay order number", "po_x'; DROP TABLE pay_order;--"),
                ("control characters in the pay order number", "po_a\nb\x00"),
                ("not a pay order number", "order-1"),
            ]
        ],
        (
            "transaction unknown to the gateway",
            {"content": (b := _event(no, "txn_never")), "headers": _signed(b)},
            422,
        ),
    ]


def _in(delta: timedelta, zone: timezone = UTC) -> str:
    return (datetime.now(UTC) + delta).astimezone(zone).isoformat()


# Each bad checkout body: (name, fields that differ from a good body, the field the 422's
# message must name, the rule it must state).
CHECKOUT_REFUSALS: list[tuple[str, dict[str, Any], str, str]] = [
    ("negative amount", {"amount": -1}, "amount", "greater than 0"),
    ("zero amount", {"amount": 0}, "amount", "greater than 0"),
    ("fractional amount", {"amount": 1.5}, "amount", "valid integer"),
    ("huge amount", {"amount": 10**18}, "amount", "less than or equal to 100000000000"),
    ("boolean amount", {"amount": True}, "amount", "valid integer"),
    ("unknown currency", {"currency": "ABC"}, "currency", "ISO 4217"),
    ("lower-case currency", {"currency": "usd"}, "currency", "upper case"),
    ("SQL in order_no", {"order_no": "o'; DROP TABLE x;--"}, "order_no", "match pattern"),
    ("control chars in order_no", {"order_no": "a\x00b"}, "order_no", "match pattern"),
    ("empty order_no", {"order_no": ""}, "order_no", "match pattern"),
    ("long order_no", {"order_no": "x" * 65}, "order_no", "match pattern"),
    ("expiry zero", {"expires_in_s": 0}, "expires_in_s", "greater than 0"),
    ("expiry negative", {"expires_in_s": -300}, "expires_in_s", "greater than 0"),
    ("expiry over 7 days", {"expires_in_s": 8 * 86400}, "expires_in_s", "less than or equal"),
    ("unknown field", {"status": "PAY_SUCCESS"}, "status", "Extra inputs"),
    (
        "deadline without a zone",
        {"expires_at": _in(timedelta(hours=1)).removesuffix("+00:00")},
        "expires_at",
        "time zone",
    ),
    ("deadline in the past", {"expires_at": _in(-timedelta(minutes=1))}, "expires_at", "future"),
    ("deadline over 7 days", {"expires_at": _in(timedelta(days=8))}, "expires_at", "7 days"),
    (
        "deadline and window both",
        {"expires_at": _in(timedelta(hours=1)), "expires_in_s": 900},
        "expires_at or expires_in_s",
        "not both",
    ),
    ("deadline not a time", {"expires_at": "tomorrow"}, "expires_at", "ISO 8601"),
    ("deadline a bare date", {"expires_at": "2026-12-01"}, "expires_at", "ISO 8601"),
    ("deadline as Unix seconds", {"expires_at": 1_900_000_000}, "expires_at", "ISO 8601"),
    ("deadline at year 1", {"expires_at": "0001-01-01T00:00:00+01:00"}, "expires_at", "future"),
    ("deadline at year 9999", {"expires_at": "9999-12-31T23:59:59-14:00"}, "expires_at", "7 days"),
]


def _api_attacks(token: str) -> list[tuple[str, str, str, dict[str, Any], int]]:
    auth = {"Authorization": f"Bearer {token}"}

    def body(**kw: Any) -> dict[str, Any]:
        return {
            "json": {"order_no": new_order(), "amount": 100, "currency": "USD", **kw},
            "headers": auth,
        }

    return [
        ("no token", "POST", "/v1/pay-orders", {"json": body()["json"]}, 401),
        (
            "wrong token",
            "POST",
            "/v1/pay-orders",
            {"json": body()["json"], "headers": {"Authorization": "Bearer nope"}},
            401,
        ),
        ("read without token", "GET", "/v1/pay-orders/po_x", {}, 401),
        *[
            (name, "POST", "/v1/pay-orders", body(**kw), 422)
            for name, kw, _, _ in CHECKOUT_REFUSALS
        ],
        (
            "malformed JSON",
            "POST",
            "/v1/pay-orders",
            {"content": b"{oops", "headers": {**auth, "Content-Type": "application/json"}},
            422,
        ),
        (
            "wrong content type",
            "POST",
            "/v1/pay-orders",
            {"content": b"order_no=x", "headers": {**auth, "Content-Type": "text/plain"}},
            415,
        ),
        (
            "oversized body",
            "POST",
            "/v1/pay-orders",
            {
                "content": b"{" + b" " * 100_000 + b"}",
                "headers": {**auth, "Content-Type": "application/json"},
            },
            413,
        ),
        ("unknown pay order", "GET", "/v1/pay-orders/po_never", {"headers": auth}, 404),
        ("malformed pay order number", "GET", "/v1/pay-orders/x'--", {"headers": auth}, 422),
    ]


async def test_every_attack_gets_a_clear_4xx_changes_nothing_and_logs_no_secret(
    web: HttpStack, paid: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="payorders.pay_orders")
    before = await web.counts()
    answers: list[tuple[str, int]] = []
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as http:
        for name, kwargs, status in _webhook_attacks(paid):
            resp = await http.post("/v1/webhooks/gateway", **kwargs)
            answers.append((name, resp.status_code))
            assert resp.status_code == status, (name, resp.text)
            assert resp.json()["error"]["message"], name
        for name, method, path, kwargs, status in _api_attacks(API_TOKEN):
            resp = await http.request(method, path, **kwargs)
            answers.append((name, resp.status_code))
            assert resp.status_code == status, (name, resp.text)
    assert len(answers) >= 40
    assert await web.counts() == before
    logged = caplog.text
    for secret in ("whsec_test_new", "whsec_test_old", API_TOKEN):
        assert secret not in logged
    assert "webhook rejected" in logged


async def test_a_replayed_webhook_is_answered_once_and_changes_nothing(
    web: HttpStack, paid: dict[str, Any]
) -> None:
    body = _event(paid["pay_order_no"], paid["txn_id"])
    headers = _signed(body)
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as http:
        first = await http.post("/v1/webhooks/gateway", content=body, headers=headers)
        before = await web.counts()
        replay = await http.post("/v1/webhooks/gateway", content=body, headers=headers)
    # The event is new, the transaction is not: the order settled with it already.
    assert first.status_code == 200
    assert {k: first.json()[k] for k in ("event_duplicate", "txn_already_recorded")} == {
        "event_duplicate": False,
        "txn_already_recorded": True,
    }
    assert replay.status_code == 200
    assert {k: replay.json()[k] for k in ("event_duplicate", "txn_already_recorded")} == {
        "event_duplicate": True,
        "txn_already_recorded": True,
    }
    # The old name of event_duplicate, kept for existing clients.
    assert (first.json()["duplicate"], replay.json()["duplicate"]) == (False, True)
    assert await web.counts() == before


def _valid_order_no(value: str) -> bool:
    try:
        domain.check_identifier(value, "order_no")
    except domain.InvalidInput:
        return False
    return True


async def test_every_checkout_refusal_names_the_field_and_the_rule_and_starts_nothing(
    web: HttpStack, dev_env: WorkflowEnvironment
) -> None:
    before = await web.counts()
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as http:
        for name, overrides, field, rule in CHECKOUT_REFUSALS:
            body = {"order_no": new_order(), "amount": 100, "currency": "USD", **overrides}
            resp = await http.post("/v1/pay-orders", json=body, headers=AUTH)
            assert resp.status_code == 422, (name, resp.text)
            message = resp.json()["error"]["message"]
            assert field in message and rule in message, (name, message)
            if not _valid_order_no(body["order_no"]):
                continue  # no workflow id to look for
            with pytest.raises(RPCError, match="not found"):
                await dev_env.client.get_workflow_handle(
                    f"pay-order-po_{body['order_no']}"
                ).describe()
        malformed = await http.post(
            "/v1/pay-orders",
            content=b'{"order_no": ',
            headers={**AUTH, "Content-Type": "application/json"},
        )
    assert malformed.status_code == 422
    assert malformed.json()["error"]["message"].startswith("body: not valid JSON")
    assert await web.counts() == before


async def test_checkout_takes_an_absolute_deadline_and_the_order_expires_then(
    web: HttpStack,
) -> None:
    no = new_order()
    deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    tokyo = deadline.astimezone(timezone(timedelta(hours=9))).isoformat()  # any zone will do
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as http:
        sent = {"order_no": no, "amount": 250, "currency": "USD", "expires_at": tokyo}
        auth = AUTH
        first = await http.post("/v1/pay-orders", json=sent, headers=auth)
        again = await http.post("/v1/pay-orders", json=sent, headers=auth)
    assert (first.status_code, again.status_code) == (201, 200), (first.text, again.text)
    assert first.json()["created"] is True and again.json()["created"] is False
    assert datetime.fromisoformat(first.json()["expires_at"]) == deadline
    order = await web.wait_order(first.json()["pay_order_no"], lambda o: o["status"] != "PAYING")
    assert order["status"] == "PAY_EXPIRED"
    assert datetime.fromisoformat(order["expires_at"]) == deadline


async def test_the_cli_client_passes_on_the_reason_of_a_422(web: HttpStack) -> None:
    with pytest.raises(ServiceError) as refused:
        await web.service.create(order_no=new_order(), amount=100, currency="USD", expires_in_s=0)
    assert refused.value.status == 422
    assert refused.value.message == "expires_in_s: Input should be greater than 0"


async def test_a_notification_the_gateway_contradicts_names_the_field(
    web: HttpStack, paid: dict[str, Any]
) -> None:
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as http:
        wrong = _event(paid["pay_order_no"], paid["txn_id"], amount=99)
        resp = await http.post("/v1/webhooks/gateway", content=wrong, headers=_signed(wrong))
        assert resp.status_code == 422
        assert resp.json()["error"]["message"].startswith("data.amount: ")
        unknown = _event(paid["pay_order_no"], "txn_never")
        resp = await http.post("/v1/webhooks/gateway", content=unknown, headers=_signed(unknown))
        assert resp.status_code == 422
        assert resp.json()["error"]["message"].startswith("data.txn_id txn_never: ")


async def test_health_and_readiness(web: HttpStack) -> None:
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {
            "postgres": "ok",
            "temporal": "ok",
        }
        spec = (await http.get("/openapi.json")).json()
        assert {"/v1/pay-orders", "/v1/pay-orders/{pay_order_no}", "/v1/webhooks/gateway"} <= set(
            spec["paths"]
        )


RAW_SIGNALS = [
    (
        "negative amount",
        '{"txn_id":"t1","amount":-5,"currency":"USD","paid_at":"2026-11-27T11:00:00Z"}',
    ),
    ("zero amount", '{"txn_id":"t2","amount":0,"currency":"USD","paid_at":"2026-11-27T11:00:00Z"}'),
    (
        "fractional amount",
        '{"txn_id":"t3","amount":1.5,"currency":"USD","paid_at":"2026-11-27T11:00:00Z"}',
    ),
    (
        "amount as string",
        '{"txn_id":"t4","amount":"100","currency":"USD","paid_at":"2026-11-27T11:00:00Z"}',
    ),
    (
        "unknown currency",
        '{"txn_id":"t5","amount":100,"currency":"XXX","paid_at":"2026-11-27T11:00:00Z"}',
    ),
    (
        "SQL in txn_id",
        '{"txn_id":"t\'; DROP TABLE payment;--","amount":100,"currency":"USD",'
        '"paid_at":"2026-11-27T11:00:00Z"}',
    ),
    (
        "control characters in txn_id",
        '{"txn_id":"t\\u0000x","amount":100,"currency":"USD","paid_at":"2026-11-27T11:00:00Z"}',
    ),
    ("missing fields", '{"amount":100}'),
    ("not an object", '"hello"'),
    (
        "huge payload",
        '{"txn_id":"'
        + "x" * 200_000
        + '","amount":1,"currency":"USD","paid_at":"2026-11-27T11:00:00Z"}',
    ),
]


async def test_raw_signals_sent_with_the_temporal_cli_change_nothing(
    web: HttpStack, dev_env: WorkflowEnvironment
) -> None:
    """Hostile payloads sent straight to the workflow, bypassing every edge check."""
    import asyncio
    import subprocess
    import tempfile

    from payorders.localstack.binaries import find_binary

    doc = await web.service.create(order_no=new_order(), amount=100, currency="USD")
    no = doc["pay_order_no"]
    # Wait for the workflow's first activity to write the row (reads answer before it does).
    async with web.pool.acquire() as conn:
        for _ in range(300):
            if await conn.fetchval("SELECT 1 FROM pay_order WHERE pay_order_no = $1", no):
                break
            await asyncio.sleep(0.02)
    before = await web.counts()
    address = dev_env.client.service_client.config.target_host
    for name, payload in RAW_SIGNALS:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write(payload)
            f.flush()
            done = await asyncio.to_thread(
                subprocess.run,
                [
                    find_binary("temporal"),
                    "workflow",
                    "signal",
                    "--address",
                    address,
                    "--workflow-id",
                    f"pay-order-{no}",
                    "--name",
                    "payment_succeeded",
                    "--input-file",
                    f.name,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        # The server takes the signal (or refuses the oversized one); either way nothing moves.
        assert done.returncode == 0 or name == "huge payload", (name, done.stderr)
    # Six decode and are refused by the handler; four never decode and the SDK drops them.
    order = await web.wait_order(no, lambda o: o["workflow"]["rejected_notifications"] == 6)
    assert order["status"] == "PAYING" and order["payments"] == []
    assert order["workflow_status"] == "RUNNING"
    assert await web.counts() == before


async def test_checkout_answers_checkout_pending_while_the_gateway_is_slow_then_the_same_trade(
    dev_env: WorkflowEnvironment, db_url: str
) -> None:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, db_url, checkout_wait_ms=200) as slow:
        no = new_order()
        # Every gateway call of this pay order takes 5 s, past our 1.5 s client timeout:
        # no attempt opens the trade while the fault is armed. (Checkout's wait is the
        # update RPC's deadline, which the API's client may retry within its 2 s budget:
        # a delay shorter than that could open the trade inside the wait.)
        await slow.gateway.set_faults(f"po_{no}", delay_ms=5_000)
        with pytest.raises(ServiceError) as pending:
            await slow.service.create(order_no=no, amount=700, currency="USD")
        assert (pending.value.status, pending.value.code) == (503, "checkout_pending")
        await slow.gateway.clear_faults(f"po_{no}")
        for _ in range(100):  # a client retries the same request until the trade is open
            try:
                again = await slow.service.create(order_no=no, amount=700, currency="USD")
                break
            except ServiceError as e:
                assert (e.status, e.code) == (503, "checkout_pending")
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the trade never opened")
        assert again["created"] is False
        assert again["checkout"] == {
            "gateway": "sandbox",
            "trade_no": f"po_{no}",
            "pay_url": "/v1/payments",
        }

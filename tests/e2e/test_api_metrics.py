"""The service API's Prometheus metrics, read back from its own ``/metrics``.

The registry is process-global (and the API runs inside the test process), so every check
compares a scrape before with a scrape after.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import WorkflowEnvironment

from payorders.gateways.port import Capture, GatewayUnavailable
from payorders.pay_orders import UnknownPayOrder
from payorders.service import metrics as api_metrics
from payorders.service import webhook
from payorders.service.app import create_app
from payorders.service.deps import Deps

from ..conftest import make_settings
from ..http_stack import API_TOKEN, AUTH, HttpStack, http_stack
from ..http_stack import payment_event as event

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

REQUESTS = "payorders_api_requests_total"
DURATION_COUNT = "payorders_api_request_duration_seconds_count"
REJECTIONS = "payorders_api_webhook_rejections_total"
ACCEPTED = "payorders_api_webhooks_accepted_total"
WEBHOOK = "/v1/webhooks/gateway"
SECRET = "whsec_test_new"


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(http: httpx.AsyncClient) -> Samples:
    resp = await http.get("/metrics")
    assert resp.status_code == 200, resp.text
    return parse(resp.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rejections(samples: Samples) -> dict[str, float]:
    return {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == REJECTIONS}


def signed(body: bytes, *, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    t = int(time.time()) if at is None else at
    return {
        webhook.HEADER: webhook.sign_header([secret], t, body),
        "Content-Type": "application/json",
    }


# --- against the real stack ------------------------------------------------------------------


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, db_url: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, db_url) as stack:
        yield stack


@pytest.fixture
async def http(web: HttpStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
async def paid(web: HttpStack) -> dict[str, Any]:
    """A paid pay order with a real capture, whose one webhook has been accepted and counted
    (so no delivery from the sandbox is still under way while a test measures)."""
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as http:
        before = value(await scrape(http), ACCEPTED)
        doc = await web.service.create(
            order_no=f"met-{uuid.uuid4().hex[:10]}", amount=100, currency="USD"
        )
        capture = await web.gateway.pay(
            pay_order_no=doc["pay_order_no"], amount=100, currency="USD"
        )
        await web.wait_order(doc["pay_order_no"], lambda o: o["status"] == "PAY_SUCCESS")
        for _ in range(200):
            if value(await scrape(http), ACCEPTED) == before + 1:
                return capture
            await asyncio.sleep(0.05)
        raise AssertionError("the sandbox's webhook was never counted as accepted")


@pytest.mark.slow
async def test_checkout_and_reads_are_counted_once_under_their_route_template(
    web: HttpStack, http: httpx.AsyncClient
) -> None:
    no = f"met-{uuid.uuid4().hex[:10]}"
    before = await scrape(http)
    created = await web.service.create(order_no=no, amount=1999, currency="USD")
    await web.service.create(order_no=no, amount=1999, currency="USD")
    await web.service.get(created["pay_order_no"])
    after = await scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(REQUESTS, method="POST", route="/v1/pay-orders", status="201") == 1
    assert delta(REQUESTS, method="POST", route="/v1/pay-orders", status="200") == 1
    assert delta(DURATION_COUNT, method="POST", route="/v1/pay-orders") == 2
    detail = "/v1/pay-orders/{pay_order_no}"
    assert delta(REQUESTS, method="GET", route=detail, status="200") == 1
    assert delta(DURATION_COUNT, method="GET", route=detail) == 1
    assert not any(created["pay_order_no"] in str(key) for key in after)


@pytest.mark.slow
async def test_a_raw_path_is_never_a_label(web: HttpStack, http: httpx.AsyncClient) -> None:
    marker = uuid.uuid4().hex[:12]
    auth = AUTH
    before = await scrape(http)
    assert (await http.get(f"/v1/pay-orders/po_x{marker}", headers=auth)).status_code == 404
    assert (await http.get(f"/v1/pay-orders/po_y{marker}")).status_code == 401
    assert (await http.get(f"/no/such/{marker}")).status_code == 404
    assert (await http.request("PROPFIND", "/healthz")).status_code == 405
    after = await scrape(http)
    detail = "/v1/pay-orders/{pay_order_no}"
    for labels, raised in [
        ({"method": "GET", "route": detail, "status": "404"}, 1),
        ({"method": "GET", "route": detail, "status": "401"}, 1),
        ({"method": "GET", "route": "unmatched", "status": "404"}, 1),
        ({"method": "other", "route": "/healthz", "status": "405"}, 1),
    ]:
        assert value(after, REQUESTS, **labels) - value(before, REQUESTS, **labels) == raised
    assert not any(marker in str(key) for key in after)
    assert not any("PROPFIND" in str(key) for key in after)


@pytest.mark.slow
async def test_metrics_needs_no_token_shows_the_gateway_client_and_does_not_count_itself(
    web: HttpStack,
) -> None:
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=10) as anonymous:
        first = await anonymous.get("/metrics")
        second = await anonymous.get("/metrics")
        spec = (await anonymous.get("/openapi.json")).json()
    assert first.status_code == second.status_code == 200
    assert first.headers["content-type"].startswith("text/plain")
    assert "# HELP payorders_gateway_calls_total " in first.text
    assert "# TYPE payorders_api_requests_total counter" in first.text
    assert "# TYPE payorders_api_request_duration_seconds histogram" in first.text
    samples = parse(second.text)
    assert not any(("route", "/metrics") in labels for _, labels in samples)
    assert "/metrics" not in spec["paths"]


@pytest.mark.slow
async def test_every_refused_webhook_is_counted_once_by_its_reason(
    web: HttpStack, http: httpx.AsyncClient, paid: dict[str, Any]
) -> None:
    no, txn = paid["pay_order_no"], paid["txn_id"]
    good = event(no, txn)
    now = int(time.time())
    json_type = {"Content-Type": "application/json"}
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("missing signature", good, json_type, 401, "missing_signature"),
        (
            "forged signature",
            good,
            {webhook.HEADER: f"t={now},v1={'0' * 64}", **json_type},
            401,
            "bad_signature",
        ),
        ("unknown secret", good, signed(good, secret="guess"), 401, "bad_signature"),
        ("stale timestamp", good, signed(good, at=now - 301), 401, "stale_timestamp"),
        (
            "garbage header",
            good,
            {webhook.HEADER: "garbage", **json_type},
            401,
            "malformed_signature",
        ),
        ("malformed JSON", b"{not json", signed(b"{not json"), 400, "malformed_body"),
        ("negative amount", (b := event(no, txn, amount=-1)), signed(b), 422, "invalid_event"),
        (
            "wrong content type",
            good,
            {**signed(good), "Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        ("oversized body", b"x" * 100_000, signed(b"x" * 100_000), 413, "too_large"),
        (
            "unknown transaction",
            (b := event(no, "txn_never")),
            signed(b),
            422,
            "unknown_transaction",
        ),
        ("amount differs", (b := event(no, txn, amount=99)), signed(b), 422, "mismatch"),
    ]
    for name, body, headers, status, reason in cases:
        before = await scrape(http)
        resp = await http.post(WEBHOOK, content=body, headers=headers)
        after = await scrape(http)
        assert resp.status_code == status, (name, resp.text)
        # The reason is the JSON error code, or a finer word for the code webhook_rejected.
        code = "webhook_rejected" if reason in api_metrics.WEBHOOK_CHECK_REASONS else reason
        assert resp.json()["error"]["code"] == code, name
        moved = {
            r: n - rejections(before).get(r, 0.0)
            for r, n in rejections(after).items()
            if n != rejections(before).get(r, 0.0)
        }
        assert moved == {reason: 1}, name
        assert value(after, ACCEPTED) == value(before, ACCEPTED), name
        labels = {"method": "POST", "route": WEBHOOK, "status": str(status)}
        assert value(after, REQUESTS, **labels) - value(before, REQUESTS, **labels) == 1, name


@pytest.mark.slow
async def test_an_accepted_webhook_is_counted_as_accepted_not_rejected(
    http: httpx.AsyncClient, paid: dict[str, Any]
) -> None:
    body = event(paid["pay_order_no"], paid["txn_id"])
    before = await scrape(http)
    first = await http.post(WEBHOOK, content=body, headers=signed(body))
    replay = await http.post(WEBHOOK, content=body, headers=signed(body))
    after = await scrape(http)
    assert first.status_code == replay.status_code == 200
    assert value(after, ACCEPTED) - value(before, ACCEPTED) == 2
    assert rejections(after) == rejections(before)
    labels = {"method": "POST", "route": WEBHOOK, "status": "200"}
    assert value(after, REQUESTS, **labels) - value(before, REQUESTS, **labels) == 2


# --- in process, with stand-ins for what a real stack cannot be made to do on demand ---------


def _stand_ins(
    *, capture: Callable[[str], Any], notify: Callable[..., Any], seen: Exception | None = None
) -> dict[str, Any]:
    """The gateway, the workflows' front and the store, as far as the webhook reaches them."""

    async def query_capture(txn_id: str) -> Any:
        return capture(txn_id)

    async def notify_payment(**kwargs: Any) -> Any:
        return notify(**kwargs)

    async def webhook_seen(event_id: str, **_: str) -> tuple[None, bool]:
        if seen is not None:
            raise seen
        return None, False

    return {
        "gateway": SimpleNamespace(query_capture=query_capture),
        "orders": SimpleNamespace(notify_payment=notify_payment),
        "store": SimpleNamespace(webhook_seen=webhook_seen),
    }


def _raise(e: Exception) -> Callable[..., Any]:
    def raiser(*args: Any, **kwargs: Any) -> Any:
        raise e

    return raiser


def _capture(txn_id: str) -> Capture:
    return Capture(
        txn_id=txn_id,
        pay_order_no="po_x",
        amount=100,
        currency="USD",
        captured_at=datetime.now(UTC),
    )


@pytest.mark.parametrize(
    ("stand_ins", "status", "reason"),
    [
        (
            {"capture": _raise(GatewayUnavailable("down")), "notify": _raise(AssertionError())},
            503,
            "gateway_unavailable",
        ),
        (
            {"capture": _capture, "notify": _raise(RuntimeError("no temporal"))},
            503,
            "temporal_unavailable",
        ),
        (
            {"capture": _capture, "notify": _raise(UnknownPayOrder("po_x"))},
            404,
            "unknown_pay_order",
        ),
        (
            {"capture": _capture, "notify": _raise(AssertionError()), "seen": OSError("db")},
            500,
            "internal_error",
        ),
    ],
)
async def test_refusals_after_the_checks_are_counted_by_their_error_code(
    stand_ins: dict[str, Any], status: int, reason: str
) -> None:
    settings = make_settings(webhook_secrets=[SECRET], api_token=API_TOKEN)
    app = create_app(settings)  # no lifespan: the stand-ins replace Temporal, the DB, the gateway
    app.state.deps = Deps(settings=settings, client=cast(Any, None), **_stand_ins(**stand_ins))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        body = event("po_x", "txn_1")
        before = await scrape(http)
        resp = await http.post(WEBHOOK, content=body, headers=signed(body))
        after = await scrape(http)
    assert resp.status_code == status, resp.text
    if status != 500:
        assert resp.json()["error"]["code"] == reason
    assert rejections(after)[reason] - rejections(before).get(reason, 0.0) == 1
    assert sum(rejections(after).values()) - sum(rejections(before).values()) == 1
    labels = {"method": "POST", "route": WEBHOOK, "status": str(status)}
    assert value(after, REQUESTS, **labels) - value(before, REQUESTS, **labels) == 1


def test_every_refusal_of_the_signature_and_payload_checks_has_its_reason() -> None:
    """Each check of ``payorders.service.webhook`` names its refusal with its own code."""
    now = datetime.now(UTC)
    t = int(now.timestamp())
    body = event("po_x", "txn_1")

    def reason_of(header: str | None, payload: bytes = body) -> str:
        with pytest.raises(webhook.WebhookRejected) as e:
            webhook.verify(header, payload, secrets=[SECRET], now=now, tolerance_s=300)
            webhook.parse_payment_event(payload)
        return api_metrics.webhook_check_reason(e.value)

    def ok(payload: bytes) -> str:
        return webhook.sign_header([SECRET], t, payload)

    assert reason_of(None) == "missing_signature"
    assert reason_of("") == "missing_signature"
    assert reason_of("garbage") == "malformed_signature"
    assert reason_of("t=abc,v1=00") == "malformed_signature"
    assert reason_of(f"t={t}") == "malformed_signature"
    assert reason_of(webhook.sign_header([SECRET], t - 301, body)) == "stale_timestamp"
    assert reason_of(webhook.sign_header([SECRET], t + 301, body)) == "stale_timestamp"
    assert reason_of(webhook.sign_header(["guess"], t, body)) == "bad_signature"
    assert reason_of(ok(b"{x"), b"{x") == "malformed_body"
    assert reason_of(ok(b"[]"), b"[]") == "malformed_body"
    wrong_type = b'{"id":"e1","type":"x","data":{}}'
    assert reason_of(ok(wrong_type), wrong_type) == "malformed_body"
    bad_amount = event("po_x", "txn_1", amount=-1)
    assert reason_of(ok(bad_amount), bad_amount) == "invalid_event"
    assert set(api_metrics.WEBHOOK_CHECK_REASONS) == {
        "missing_signature",
        "malformed_signature",
        "stale_timestamp",
        "bad_signature",
        "malformed_body",
        "invalid_event",
    }

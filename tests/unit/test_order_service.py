"""The example order service (``payorders/sandbox/order_service.py``) through its ASGI app:
signatures, duplicates, sequences, and the lines a shop acts on."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from payorders.sandbox.order_service import (
    SIGNATURE_HEADER,
    create_order_service,
    format_money,
)
from payorders.service import relay
from payorders.service.webhook import sign_header

SECRET = "evsec_test"
NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


class Shop:
    """The order service on a fixed clock, with what it printed."""

    def __init__(self) -> None:
        self.printed: list[str] = []
        app = create_order_service(SECRET, now=lambda: NOW, say=self.printed.append)
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://orders.test"
        )

    async def deliver(
        self,
        event: dict[str, Any],
        *,
        secret: str = SECRET,
        signed_at: datetime = NOW,
        body: bytes | None = None,
    ) -> httpx.Response:
        raw = json.dumps(event).encode()
        header = sign_header([secret], int(signed_at.timestamp()), raw)
        return await self.http.post(
            "/events", content=raw if body is None else body, headers={SIGNATURE_HEADER: header}
        )

    async def received(self) -> dict[str, Any]:
        doc: dict[str, Any] = (await self.http.get("/events")).json()
        return doc


def event(
    n: int,
    kind: str = "pay_order.succeeded",
    *,
    order_no: str = "order-42",
    sequence: int = 1,
    reason: str | None = None,
    refund: dict[str, Any] | None = None,
    amount: int = 1999,
    currency: str = "USD",
) -> dict[str, Any]:
    status = "PAY_SUCCESS" if kind == "pay_order.succeeded" else "PAY_EXPIRED"
    return {
        "id": f"evt_{n:016d}",
        "type": kind,
        "pay_order_no": f"po_{order_no}",
        "sequence": sequence,
        "created_at": NOW.isoformat(),
        "data": {
            "order_no": order_no,
            "amount": amount,
            "currency": currency,
            "status": status,
            "reason": reason,
            "txn_id": "txn-1",
            "refund": refund,
        },
    }


def refund_event(n: int, *, order_no: str, sequence: int, amount: int, currency: str) -> Any:
    refund = {"refund_key": f"refund-po_{order_no}-t", "txn_id": "t", "amount": amount}
    return event(
        n,
        "refund.succeeded",
        order_no=order_no,
        sequence=sequence,
        refund={**refund, "currency": currency},
        amount=amount,
        currency=currency,
    )


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    s = Shop()
    async with s.http:
        yield s


async def test_prints_what_a_shop_does_for_each_event(shop: Shop) -> None:
    deliveries = [
        event(1, order_no="order-42"),
        event(2, "pay_order.expired", order_no="order-43", reason="EXPIRED"),
        event(3, "pay_order.expired", order_no="order-45", reason="CANCELLED"),
        refund_event(4, order_no="order-43", sequence=2, amount=1999, currency="USD"),
    ]
    for e in deliveries:
        assert (await shop.deliver(e)).json() == {"received": True, "duplicate": False}
    lines = [
        "order-42 paid: ship",
        "order-43 expired: release stock and coupon",
        "order-45 cancelled at checkout: release stock and coupon",
        "refund of 19.99 USD for order-43 confirmed",
    ]
    assert shop.printed == lines
    got = await shop.received()
    assert got["lines"] == lines
    assert got["events"] == deliveries
    assert got["warnings"] == []


async def test_an_expired_event_before_reasons_existed_reads_as_expired(shop: Shop) -> None:
    await shop.deliver(event(1, "pay_order.expired", order_no="order-43", reason=None))
    assert shop.printed == ["order-43 expired: release stock and coupon"]


async def test_refund_amounts_follow_the_currency_exponent(shop: Shop) -> None:
    await shop.deliver(refund_event(1, order_no="jp-1", sequence=1, amount=500, currency="JPY"))
    await shop.deliver(refund_event(2, order_no="kw-1", sequence=1, amount=1005, currency="KWD"))
    await shop.deliver(refund_event(3, order_no="us-1", sequence=1, amount=5, currency="USD"))
    assert (await shop.received())["lines"] == [
        "refund of 500 JPY for jp-1 confirmed",
        "refund of 1.005 KWD for kw-1 confirmed",
        "refund of 0.05 USD for us-1 confirmed",
    ]


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (1999, "USD", "19.99 USD"),
        (100, "EUR", "1.00 EUR"),
        (0, "USD", "0.00 USD"),
        (1999, "JPY", "1999 JPY"),
        (1999, "KRW", "1999 KRW"),
        (1, "BHD", "0.001 BHD"),
        (100_000_000_000, "USD", "1000000000.00 USD"),
    ],
)
def test_money_is_formatted_from_integers(amount: int, currency: str, text: str) -> None:
    assert format_money(amount, currency) == text


@pytest.mark.parametrize(
    "tamper",
    ["wrong secret", "stale", "from the future", "body changed", "no header", "garbage header"],
)
async def test_a_bad_signature_is_401_and_changes_nothing(shop: Shop, tamper: str) -> None:
    e = event(1)
    raw = json.dumps(e).encode()
    if tamper == "wrong secret":
        resp = await shop.deliver(e, secret="evsec_other")
    elif tamper == "stale":
        resp = await shop.deliver(e, signed_at=NOW - timedelta(seconds=301))
    elif tamper == "from the future":
        resp = await shop.deliver(e, signed_at=NOW + timedelta(seconds=301))
    elif tamper == "body changed":
        resp = await shop.deliver(e, body=raw.replace(b"order-42", b"order-99"))
    elif tamper == "no header":
        resp = await shop.http.post("/events", content=raw)
    else:
        resp = await shop.http.post("/events", content=raw, headers={SIGNATURE_HEADER: "v1=abc"})
    assert resp.status_code == 401, resp.text
    assert await shop.received() == {"lines": [], "events": [], "warnings": []}
    assert not any("paid" in line for line in shop.printed)
    # The same event, signed properly, is then handled as the first one.
    assert (await shop.deliver(e)).status_code == 200
    assert (await shop.received())["lines"] == ["order-42 paid: ship"]


async def test_a_signature_within_the_tolerance_is_accepted(shop: Shop) -> None:
    assert (await shop.deliver(event(1), signed_at=NOW - timedelta(seconds=299))).status_code == 200


async def test_a_redelivered_event_is_acknowledged_and_acted_on_once(shop: Shop) -> None:
    first = await shop.deliver(event(1))
    again = await shop.deliver(event(1))
    assert first.json()["duplicate"] is False
    assert again.status_code == 200 and again.json()["duplicate"] is True
    got = await shop.received()
    assert got["lines"] == ["order-42 paid: ship"]
    assert len(got["events"]) == 1
    assert got["warnings"] == ["evt_0000000000000001 delivered again: already handled"]


async def test_a_gap_in_the_sequence_is_logged_and_the_event_acted_on(shop: Shop) -> None:
    await shop.deliver(event(1, "pay_order.expired", order_no="order-43", sequence=1))
    resp = await shop.deliver(
        refund_event(7, order_no="order-43", sequence=3, amount=1999, currency="USD")
    )
    assert resp.status_code == 200
    got = await shop.received()
    assert got["lines"] == [
        "order-43 expired: release stock and coupon",
        "refund of 19.99 USD for order-43 confirmed",
    ]
    assert got["warnings"] == [
        "po_order-43: sequence 3 after 1: missed 2..2 (the feed GET /v1/events has them)"
    ]


async def test_a_repeated_sequence_is_acknowledged_and_not_acted_on(shop: Shop) -> None:
    await shop.deliver(event(1, order_no="order-42", sequence=1))
    await shop.deliver(
        refund_event(2, order_no="order-42", sequence=2, amount=1999, currency="USD")
    )
    resp = await shop.deliver(
        refund_event(3, order_no="order-42", sequence=2, amount=1999, currency="USD")
    )
    assert resp.status_code == 200 and resp.json()["duplicate"] is False
    got = await shop.received()
    assert got["lines"] == ["order-42 paid: ship", "refund of 19.99 USD for order-42 confirmed"]
    assert got["warnings"] == ["po_order-42: sequence 2 after 2: a repeat, not acted on"]


async def test_sequences_are_per_pay_order(shop: Shop) -> None:
    await shop.deliver(event(1, order_no="a", sequence=1))
    await shop.deliver(event(2, "pay_order.expired", order_no="b", sequence=1))
    await shop.deliver(refund_event(3, order_no="b", sequence=2, amount=1999, currency="USD"))
    assert (await shop.received())["warnings"] == []
    assert len((await shop.received())["lines"]) == 3


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({**event(1), "sequence": "1"}).encode(),
        json.dumps({**event(1), "sequence": 0}).encode(),
        json.dumps({**event(1), "data": {"amount": 1999}}).encode(),
        json.dumps(event(1, "refund.succeeded", refund=None)).encode(),
        json.dumps(
            event(1, "refund.succeeded", refund={"amount": "19.99", "currency": "USD"})
        ).encode(),
    ],
)
async def test_a_signed_body_that_is_not_an_event_is_400_and_changes_nothing(
    shop: Shop, body: bytes
) -> None:
    header = sign_header([SECRET], int(NOW.timestamp()), body)
    resp = await shop.http.post("/events", content=body, headers={SIGNATURE_HEADER: header})
    assert resp.status_code == 400, resp.text
    assert await shop.received() == {"lines": [], "events": [], "warnings": []}


async def test_an_unknown_event_type_is_acknowledged(shop: Shop) -> None:
    assert (await shop.deliver(event(1, "pay_order.disputed"))).status_code == 200
    assert (await shop.received())["lines"] == [
        "order-42: pay_order.disputed ignored (not a type this shop handles)"
    ]


def test_the_service_reads_the_header_the_relay_signs() -> None:
    assert SIGNATURE_HEADER == relay.SIGNATURE_HEADER


def test_the_service_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="signing secret"):
        create_order_service("")


def readme_consumer_check() -> Callable[..., bool]:
    """The signature check the README gives shops, run as a shop would paste it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n### The order service's side\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "payorders" not in code.replace("signed_by_payorders", "")
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    check: Callable[..., bool] = namespace["signed_by_payorders"]
    return check


def test_the_readme_consumer_check_agrees_with_ours() -> None:
    check = readme_consumer_check()
    body = json.dumps(event(1)).encode()
    now = int(time.time())
    assert check(sign_header([SECRET], now, body), body, SECRET)
    assert check(sign_header(["evsec_old", SECRET], now, body), body, SECRET)  # rotation
    assert not check(sign_header(["evsec_other"], now, body), body, SECRET)
    assert not check(sign_header([SECRET], now, body), body + b" ", SECRET)
    assert not check(sign_header([SECRET], now - 301, body), body, SECRET)
    assert not check(sign_header([SECRET], now + 301, body), body, SECRET)
    assert not check("v1=" + "0" * 64, body, SECRET)
    assert not check("", body, SECRET)

"""The Alipay adapter (``AlipayGateway``) against the local Alipay, on a real port and a real
PostgreSQL: every call signed by python-alipay-sdk, every answer verified by it. The
port's promises, with the trade states, codes and faults Alipay answers with."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import httpx
import pytest

from payorders.gateways.alipay import AlipayConfig, AlipayGateway, out_trade_no_of
from payorders.gateways.port import (
    GatewayAmbiguous,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
    TradeBook,
)
from payorders.service import alipay_webhook
from payorders.service.webhook import PaymentEvent

from .test_local_alipay import Keys, Receiver, new_keys, running

APP_ID = "2021000000000077"
SCHEMA = f"alipay_gw_{uuid.uuid4().hex[:10]}"


@dataclass
class Local:
    url: str
    http: httpx.AsyncClient
    receiver: Receiver
    keys: Keys
    notify_url: str

    def gateway(
        self,
        *,
        private: str | None = None,
        alipay_public: str | None = None,
        timeout: float = 5,
        book: TradeBook | None = None,
    ) -> AlipayGateway:
        return AlipayGateway(
            AlipayConfig(
                app_id=APP_ID,
                private_key_pem=private or self.keys.app_private,
                alipay_public_key_pem=alipay_public or self.keys.server_public,
                notify_url=self.notify_url,
                gateway_url=f"{self.url}/gateway.do",
            ),
            client_timeout_s=timeout,
            book=book,
        )

    async def pay(self, out_trade_no: str, amount: int = 1999) -> httpx.Response:
        body = {"pay_order_no": out_trade_no, "amount": amount, "currency": "CNY"}
        return await self.http.post("/v1/payments", json=body)

    async def arm(self, out_trade_no: str, **faults: object) -> None:
        resp = await self.http.put(f"/v1/faults/{out_trade_no}", json=faults)
        assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def keys() -> Keys:
    return new_keys()


@pytest.fixture(scope="module")
async def local(db_url: str, keys: Keys) -> AsyncIterator[Local]:
    async with (
        running(db_url, keys, app_id=APP_ID, schema=SCHEMA) as (url, notify_url, receiver),
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        yield Local(url, http, receiver, keys, notify_url)


@pytest.fixture(scope="module")
def gateway(local: Local) -> AlipayGateway:
    return local.gateway()


def new_no() -> str:
    """A pay order number with a ``-``, which Alipay's out_trade_no does not take."""
    return f"po_order-{uuid.uuid4().hex[:12]}"


def trade(no: str, amount: int = 1999, *, within: timedelta = timedelta(minutes=30)) -> OpenTrade:
    return OpenTrade(
        pay_order_no=no,
        amount=amount,
        currency="CNY",
        expires_at=datetime.now(UTC) + within,
        idempotency_key=f"open-{no}",
    )


def refund(no: str, txn_id: str, amount: int, key: str) -> RefundRequest:
    return RefundRequest(
        idempotency_key=key, pay_order_no=no, txn_id=txn_id, amount=amount, currency="CNY"
    )


async def paid(local: Local, gateway: AlipayGateway, amount: int = 1999) -> tuple[str, str]:
    """A pay order whose trade was opened and paid: (pay_order_no, trade_no)."""
    no = new_no()
    checkout = await gateway.open_trade(trade(no, amount))
    resp = await local.pay(checkout.trade_ref, amount)
    assert resp.status_code == 201, resp.text
    return no, resp.json()["txn_id"]


async def test_checkout_opens_one_trade_under_an_out_trade_no_alipay_takes(
    local: Local, gateway: AlipayGateway
) -> None:
    no = new_no()
    first = await gateway.open_trade(trade(no))
    assert first.gateway == "alipay"
    assert first.trade_ref == out_trade_no_of(no) == first.details["out_trade_no"]
    assert first.details["qr_code"].startswith("https://qr.alipay.com/")
    again = await gateway.open_trade(trade(no), first_attempt=False)
    assert again == first  # precreate again answers the same QR code


async def test_what_alipay_cannot_take_is_refused_before_any_call(gateway: AlipayGateway) -> None:
    for bad in [
        OpenTrade("po_a", 100, "USD", datetime.now(UTC), "open-po_a"),
        trade("po_a", 0),
        trade("po_a", 100_000_000 * 100 + 1),
        trade("po_" + "a-" * 31),
    ]:
        with pytest.raises(GatewayRejected):
            await gateway.open_trade(bad)


async def test_an_unscanned_trade_is_closed_for_us_and_a_late_scan_is_still_a_capture(
    local: Local, gateway: AlipayGateway
) -> None:
    no = new_no()
    checkout = await gateway.open_trade(trade(no))
    closed = await gateway.close_trade(no, checkout.trade_ref)
    assert closed.closed and closed.capture is None  # ACQ.TRADE_NOT_EXIST
    # Alipay closed nothing: the buyer scans and pays before time_expire. The money is a
    # capture of this pay order, which the workflow refunds (the order is expired).
    resp = await local.pay(checkout.trade_ref)
    assert resp.status_code == 201
    capture = await gateway.query_capture(resp.json()["txn_id"])
    assert capture is not None
    assert (capture.pay_order_no, capture.amount, capture.currency) == (no, 1999, "CNY")


async def test_a_paid_trade_does_not_close_it_settles_with_its_payment(
    local: Local, gateway: AlipayGateway
) -> None:
    no, trade_no = await paid(local, gateway)
    result = await gateway.close_trade(no)
    assert not result.closed
    assert result.capture is not None
    assert (result.capture.txn_id, result.capture.pay_order_no) == (trade_no, no)

    other = new_no()
    checkout = await gateway.open_trade(trade(other))
    await local.arm(checkout.trade_ref, paid_on_close_amount=1999, paid_on_close_currency="CNY")
    try:
        on_close = await gateway.close_trade(other)
    finally:
        await local.http.delete(f"/v1/faults/{checkout.trade_ref}")
    assert not on_close.closed and on_close.capture is not None
    assert on_close.capture.pay_order_no == other


async def test_a_scanned_trade_closes_and_then_takes_no_payment(
    local: Local, gateway: AlipayGateway
) -> None:
    no = new_no()
    checkout = await gateway.open_trade(trade(no))
    scan = await local.http.post("/v1/scans", json={"pay_order_no": checkout.trade_ref})
    assert scan.status_code == 200, scan.text
    assert (await gateway.close_trade(no)).closed
    assert (await gateway.close_trade(no)).closed  # closed again: TRADE_STATUS_ERROR, read back
    assert (await local.pay(checkout.trade_ref)).status_code == 409
    assert await gateway.query_capture(scan.json()["trade_no"]) is None


async def test_a_refund_is_made_once_under_its_key(local: Local, gateway: AlipayGateway) -> None:
    no, trade_no = await paid(local, gateway)
    key = f"refund-{no}-{trade_no}"
    first = await gateway.refund(refund(no, trade_no, 500, key))
    assert (first.idempotency_key, first.txn_id, first.amount) == (key, trade_no, 500)
    again = await gateway.refund(refund(no, trade_no, 500, key))  # fund_change N, read back
    assert (again.idempotency_key, again.amount) == (key, 500)
    found = await gateway.query_refund(key, trade_no)
    assert found is not None and found.amount == 500
    assert await gateway.query_refund(f"{key}-never", trade_no) is None
    with pytest.raises(GatewayRejected):  # ACQ.REASON_TRADE_REFUND_FEE_ERR: beyond what is left
        await gateway.refund(refund(no, trade_no, 1500, f"{key}-b"))
    ledger = (await local.http.get(f"/v1/ledger/{out_trade_no_of(no)}")).json()
    assert ledger["refunded"] == 500


async def test_an_unknown_outcome_is_asked_about_and_never_refunded_twice(
    local: Local, gateway: AlipayGateway
) -> None:
    no, trade_no = await paid(local, gateway)
    key = f"refund-{no}-{trade_no}"
    await local.arm(out_trade_no_of(no), fail_next_refunds=1)
    with pytest.raises(GatewayAmbiguous):  # 20000: nothing concluded
        await gateway.refund(refund(no, trade_no, 1999, key))
    assert await gateway.query_refund(key, trade_no) is None
    assert (await gateway.refund(refund(no, trade_no, 1999, key))).amount == 1999

    other, other_trade = await paid(local, gateway)
    other_key = f"refund-{other}-{other_trade}"
    await local.arm(out_trade_no_of(other), timeout_after_success_next=1)
    hasty = local.gateway(timeout=0.5)
    with pytest.raises(GatewayAmbiguous):  # our timeout: the refund was made regardless
        await hasty.refund(refund(other, other_trade, 1999, other_key))
    found = await gateway.query_refund(other_key, other_trade)
    assert found is not None and found.amount == 1999
    assert (await gateway.refund(refund(other, other_trade, 1999, other_key))).amount == 1999
    ledger = (await local.http.get(f"/v1/ledger/{out_trade_no_of(other)}")).json()
    assert ledger["refunded"] == 1999 and len(ledger["refunds"]) == 1


async def test_wrong_keys_move_no_money_and_are_never_a_refusal(
    local: Local, gateway: AlipayGateway
) -> None:
    not_ours = local.gateway(private=local.keys.other_private)
    with pytest.raises(GatewayUnavailable):  # isv.invalid-signature: retried, never a decline
        await not_ours.open_trade(trade(new_no()))
    no, trade_no = await paid(local, gateway)
    wrong_alipay_key = local.gateway(alipay_public=local.keys.app_public)
    with pytest.raises(GatewayAmbiguous):  # an answer that does not verify is not believed
        await wrong_alipay_key.refund(refund(no, trade_no, 100, f"refund-{no}-x"))
    # It was made (Alipay did it; we could not believe the answer): the key finds it.
    assert await gateway.query_refund(f"refund-{no}-x", trade_no) is not None


async def test_a_notification_verifies_and_names_the_pay_order(
    local: Local, gateway: AlipayGateway
) -> None:
    no, trade_no = await paid(local, gateway)
    [form] = await local.receiver.wait(out_trade_no_of(no), 1)
    event = alipay_webhook.read_notification(
        alipay_webhook.form_of(urlencode(form).encode()),
        verify=gateway.verify_notification,
        app_id=APP_ID,
        now=datetime.now(UTC),
        max_age_s=60,
    )
    assert isinstance(event, PaymentEvent)
    assert (event.pay_order_no, event.txn_id, event.amount) == (no, trade_no, 1999)
    assert gateway.verify_notification(form)
    assert not local.gateway(alipay_public=local.keys.app_public).verify_notification(form)


@dataclass
class Book:
    """Our records of the trades, as the statement reads them (``ReconcileStore`` in the
    product): which pay orders' trades to ask about, and their refunds not yet confirmed."""

    trades: list[str]
    in_flight: list[tuple[str, str, str]]
    asked: list[tuple[datetime, datetime, float]] = field(default_factory=list)

    async def trades_payable_in(
        self, gateway: str, start: datetime, end: datetime, *, grace_s: float
    ) -> list[str]:
        assert gateway == "alipay"
        self.asked.append((start, end, grace_s))
        return self.trades

    async def refunds_in_flight_of(self, pay_order_nos: list[str]) -> list[tuple[str, str, str]]:
        return [r for r in self.in_flight if r[1] in pay_order_nos]


async def test_the_statement_is_alipay_s_own_record_of_each_trade_we_opened(
    local: Local, gateway: AlipayGateway
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)
    paid_no, paid_trade = await paid(local, gateway)
    refunded_no, refunded_trade = await paid(local, gateway)
    unpaid_no = new_no()
    await gateway.open_trade(trade(unpaid_no))
    never_opened = new_no()
    # A refund Alipay made whose answer we never saw: still in flight here.
    lost_key = f"refund-{refunded_no}-{refunded_trade}"
    await local.arm(out_trade_no_of(refunded_no), timeout_after_success_next=1)
    with pytest.raises(GatewayAmbiguous):
        await local.gateway(timeout=0.5).refund(refund(refunded_no, refunded_trade, 1999, lost_key))
    book = Book(
        trades=[paid_no, refunded_no, unpaid_no, never_opened],
        in_flight=[(lost_key, refunded_no, refunded_trade), ("mrefund-none", paid_no, paid_trade)],
    )
    reading = local.gateway(book=book)
    after = datetime.now(UTC) + timedelta(seconds=2)

    stmt = await reading.statement(before, after)
    assert book.asked == [(before, after, 1.0)]
    assert {(c.pay_order_no, c.txn_id, c.amount) for c in stmt.captures} == {
        (paid_no, paid_trade, 1999),
        (refunded_no, refunded_trade, 1999),  # refunded in full: still a capture
    }
    assert [(r.idempotency_key, r.txn_id, r.amount) for r in stmt.refunds] == [
        (lost_key, refunded_trade, 1999)
    ]
    # A window the payments are not in: their trades are asked about, none is listed.
    earlier = await reading.statement(before - timedelta(hours=1), before)
    assert earlier.captures == []

    with pytest.raises(GatewayUnavailable):  # the API's adapter has no book
        await gateway.statement(before, after)

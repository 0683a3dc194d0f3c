"""The WeChat Pay adapter (``WechatPayGateway``) against the local WeChat Pay, on a real port
and a real PostgreSQL: every request signed by wechatpayv3, every answer verified by it and
every callback verified and decrypted by it ("WeChat Pay public key" mode). The port's
promises, with the trade states, refund statuses, codes and faults WeChat Pay answers with."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from payorders.core.domain import RefundStatus
from payorders.gateways.port import (
    GatewayAmbiguous,
    GatewayRefund,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
    TradeBook,
)
from payorders.gateways.wechatpay import (
    MAX_FEN,
    WechatPayCallbackRefused,
    WechatPayConfig,
    WechatPayGateway,
    out_trade_no_of,
)
from payorders.sandbox.wechatpay import wire
from payorders.service import wechatpay_webhook
from payorders.service.webhook import PaymentEvent, WebhookRejected

from .test_local_wechatpay import (
    APIV3_KEY,
    APPID,
    MCHID,
    PUBLIC_KEY_ID,
    SERIAL_NO,
    Keys,
    Receiver,
    new_keys,
    running,
)

SCHEMA = f"wxpay_gw_{uuid.uuid4().hex[:10]}"
NOWHERE = "http://127.0.0.1:9"
"""Nothing listens there: a call the adapter made would be ``GatewayUnavailable``."""


@dataclass
class Local:
    url: str
    http: httpx.AsyncClient
    receiver: Receiver
    keys: Keys
    notify_url: str
    made: list[WechatPayGateway] = field(default_factory=list)

    def gateway(
        self,
        *,
        private: str | None = None,
        platform_public: str | None = None,
        timeout: float = 5,
        book: TradeBook | None = None,
        url: str | None = None,
    ) -> WechatPayGateway:
        made = WechatPayGateway(
            WechatPayConfig(
                mchid=MCHID,
                appid=APPID,
                private_key_pem=private or self.keys.merchant_private,
                cert_serial_no=SERIAL_NO,
                apiv3_key=APIV3_KEY,
                public_key_pem=platform_public or self.keys.platform_public,
                public_key_id=PUBLIC_KEY_ID,
                notify_url=self.notify_url,
                gateway_url=url or self.url,
            ),
            client_timeout_s=timeout,
            book=book,
        )
        self.made.append(made)
        return made

    async def pay(self, out_trade_no: str, amount: int = 1999) -> httpx.Response:
        body = {"pay_order_no": out_trade_no, "amount": amount, "currency": "CNY"}
        return await self.http.post("/v1/payments", json=body)

    async def arm(self, out_trade_no: str, **faults: object) -> None:
        resp = await self.http.put(f"/v1/faults/{out_trade_no}", json=faults)
        assert resp.status_code == 200, resp.text

    async def arm_refunds(
        self, out_trade_no: str, *, abnormal_next: int = 0, closed_next: int = 0
    ) -> None:
        resp = await self.http.put(
            f"/v1/wechatpay/refund-outcomes/{out_trade_no}",
            json={"abnormal_next": abnormal_next, "closed_next": closed_next},
        )
        assert resp.status_code == 200, resp.text

    async def ledger(self, out_trade_no: str) -> dict[str, Any]:
        doc: dict[str, Any] = (await self.http.get(f"/v1/ledger/{out_trade_no}")).json()
        return doc


@pytest.fixture(scope="module")
def keys() -> Keys:
    return new_keys()


@pytest.fixture(scope="module")
async def local(db_url: str, keys: Keys) -> AsyncIterator[Local]:
    async with (
        running(db_url, keys, schema=SCHEMA) as (url, notify_url, receiver),
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        here = Local(url, http, receiver, keys, notify_url)
        try:
            yield here
        finally:
            for made in here.made:
                await made.aclose()


@pytest.fixture(scope="module")
def gateway(local: Local) -> WechatPayGateway:
    return local.gateway()


def new_no() -> str:
    """A pay order number WeChat Pay takes as its out_trade_no (6 to 32 characters)."""
    return f"po_{uuid.uuid4().hex[:16]}"


def long_no() -> str:
    """A pay order number too long for an out_trade_no: its trade is under a digest."""
    return f"po_order-{uuid.uuid4().hex}"


def trade(no: str, amount: int = 1999, *, within: timedelta = timedelta(minutes=30)) -> OpenTrade:
    return OpenTrade(
        pay_order_no=no,
        amount=amount,
        currency="CNY",
        expires_at=datetime.now(UTC) + within,
        idempotency_key=f"open-{no}",
    )


def refund(no: str, txn_id: str, amount: int, key: str, currency: str = "CNY") -> RefundRequest:
    return RefundRequest(
        idempotency_key=key, pay_order_no=no, txn_id=txn_id, amount=amount, currency=currency
    )


async def paid(
    local: Local, gateway: WechatPayGateway, amount: int = 1999, *, no: str | None = None
) -> tuple[str, str]:
    """A pay order whose trade was opened and paid: (pay_order_no, transaction_id)."""
    no = no or new_no()
    checkout = await gateway.open_trade(trade(no, amount))
    resp = await local.pay(checkout.trade_ref, amount)
    assert resp.status_code == 201, resp.text
    return no, resp.json()["txn_id"]


async def ended(
    gateway: WechatPayGateway, key: str, txn_id: str, within: float = 5
) -> GatewayRefund:
    """The refund under ``key`` once WeChat Pay no longer answers it PROCESSING."""
    deadline = time.monotonic() + within
    while True:
        found = await gateway.query_refund(key, txn_id)
        assert found is not None, key
        if found.status is not RefundStatus.PENDING:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{key} still PROCESSING")
        await asyncio.sleep(0.05)


# --- Native下单 -------------------------------------------------------------------------------


async def test_checkout_opens_one_native_trade_per_out_trade_no(
    local: Local, gateway: WechatPayGateway
) -> None:
    """A pay order opens one Native trade under its own number, with the code_url to show
    as a QR code; opening it again (the same pay order, the same expiry) answers the same
    trade and code_url. A number too long for WeChat Pay opens under its digest."""
    no = new_no()
    opening = trade(no)
    first = await gateway.open_trade(opening)
    assert first.gateway == "wechatpay"
    assert first.trade_ref == no == first.details["out_trade_no"]
    assert first.details["code_url"].startswith("weixin://wxpay/bizpayurl?pr=")
    again = await gateway.open_trade(opening, first_attempt=False)
    assert again == first

    long = long_no()
    digest = await gateway.open_trade(trade(long))
    assert digest.trade_ref == out_trade_no_of(long) != long
    assert digest.trade_ref.startswith("ph_") and len(digest.trade_ref) == 32
    assert digest.details["code_url"] != first.details["code_url"]


async def test_a_paid_trade_opened_again_hands_out_no_code_url(
    local: Local, gateway: WechatPayGateway
) -> None:
    """Opening a trade that is paid already (ORDERPAID) reads it back: the checkout carries
    its trade_state and no code_url, so nobody is asked to pay twice."""
    no = new_no()
    opening = trade(no)
    await gateway.open_trade(opening)
    assert (await local.pay(no)).status_code == 201
    again = await gateway.open_trade(opening, first_attempt=False)
    assert again.trade_ref == no
    assert again.details.get("trade_state") == "SUCCESS"
    assert "code_url" not in again.details


async def test_what_wechat_pay_cannot_take_is_refused_before_any_call(local: Local) -> None:
    """Another currency than CNY, an amount of no fen or beyond WeChat Pay's 32 bits, a
    number that is no pay order's: refused by the adapter itself. Its gateway points where
    nothing listens, so any call would have been ``GatewayUnavailable`` instead."""
    nowhere = local.gateway(url=NOWHERE, timeout=1)
    for bad in [
        OpenTrade("po_order42", 100, "USD", datetime.now(UTC), "open-po_order42"),
        trade("po_order42", 0),
        trade("po_order42", -5),
        trade("po_order42", MAX_FEN + 1),
        trade("order42"),
        trade("po_" + "a" * 65),
    ]:
        with pytest.raises(GatewayRejected):
            await nowhere.open_trade(bad)
    for bad_refund in [
        refund("po_order42", "4200000000000000000000000001", 100, "refund-x", "USD"),
        refund("po_order42", "4200000000000000000000000001", 0, "refund-x"),
        refund("po_order42", "4200000000000000000000000001", MAX_FEN + 1, "refund-x"),
        refund("po_order42", "not a transaction id", 100, "refund-x"),
    ]:
        with pytest.raises(GatewayRejected):
            await nowhere.refund(bad_refund)
    with pytest.raises(GatewayUnavailable):  # the control: a call there is unavailable
        await nowhere.open_trade(trade("po_order42"))


# --- 关闭订单 ---------------------------------------------------------------------------------


async def test_an_unpaid_trade_closes_and_then_takes_no_payment(
    local: Local, gateway: WechatPayGateway
) -> None:
    """An unpaid trade closes (204) and closes again; the buyer can no longer pay it, and
    WeChat Pay holds it CLOSED with no payment."""
    no = new_no()
    checkout = await gateway.open_trade(trade(no))
    closed = await gateway.close_trade(no, checkout.trade_ref)
    assert closed.closed and closed.capture is None
    assert (await gateway.close_trade(no)).closed
    late = await local.pay(checkout.trade_ref)
    assert late.status_code == 409, late.text
    ledger = await local.ledger(no)
    assert ledger["captures"] == [] and ledger["captured"] == 0


async def test_a_paid_trade_does_not_close_it_settles_with_its_payment(
    local: Local, gateway: WechatPayGateway
) -> None:
    """A paid trade refuses to close (ORDERPAID): the adapter reads it back and settles the
    order with its payment, named by its pay order (through attach for a digest), also when
    the buyer pays at the very instant of the close."""
    no, txn_id = await paid(local, gateway)
    result = await gateway.close_trade(no)
    assert not result.closed and result.capture is not None
    assert (result.capture.txn_id, result.capture.pay_order_no) == (txn_id, no)
    assert (result.capture.amount, result.capture.currency) == (1999, "CNY")

    long, long_txn = await paid(local, gateway, 500, no=long_no())
    on_digest = await gateway.close_trade(long)
    assert on_digest.capture is not None
    assert (on_digest.capture.pay_order_no, on_digest.capture.txn_id) == (long, long_txn)

    other = new_no()
    await gateway.open_trade(trade(other))
    await local.arm(other, paid_on_close_amount=1999, paid_on_close_currency="CNY")
    try:
        on_close = await gateway.close_trade(other)
    finally:
        await local.http.delete(f"/v1/faults/{other}")
    assert not on_close.closed and on_close.capture is not None
    assert on_close.capture.pay_order_no == other


async def test_a_trade_wechat_pay_does_not_know_is_closed_for_us(
    local: Local, gateway: WechatPayGateway
) -> None:
    """A close answered ORDER_NOT_EXIST (the open never reached WeChat Pay) is closed; so is
    a pay order number no trade can be under, without a call."""
    no = new_no()
    result = await gateway.close_trade(no)
    assert result.closed and result.capture is None
    assert (await local.ledger(no))["captures"] == []
    assert (await local.gateway(url=NOWHERE).close_trade("not-a-pay-order")).closed


# --- 退款 -------------------------------------------------------------------------------------


async def test_a_refund_is_made_once_under_its_key_processing_then_success(
    local: Local, gateway: WechatPayGateway
) -> None:
    """A refund is answered PROCESSING (pending), then ends SUCCESS; asking again under the
    same key answers the same refund, read back by its out_refund_no, and the local WeChat
    Pay made one refund. Beyond the transaction, or beyond what is left, is refused."""
    no, txn_id = await paid(local, gateway)
    key = f"refund-{no}-{txn_id}"
    first = await gateway.refund(refund(no, txn_id, 500, key))
    assert (first.idempotency_key, first.txn_id, first.amount) == (key, txn_id, 500)
    assert (first.status, first.currency) == (RefundStatus.PENDING, "CNY")
    assert await gateway.query_refund(f"{key}-never", txn_id) is None

    done = await ended(gateway, key, txn_id)
    assert (done.status, done.gateway_refund_id) == (
        RefundStatus.SUCCEEDED,
        first.gateway_refund_id,
    )
    again = await gateway.refund(refund(no, txn_id, 500, key))
    assert (again.status, again.gateway_refund_id) == (
        RefundStatus.SUCCEEDED,
        first.gateway_refund_id,
    )
    assert await gateway.query_refund(key, "4200000000000000000000000001") is None

    with pytest.raises(GatewayRejected):  # more than the transaction: before the call
        await gateway.refund(refund(no, txn_id, 2000, f"{key}-b"))
    with pytest.raises(GatewayRejected):  # INVALID_REQUEST: more than is left
        await gateway.refund(refund(no, txn_id, 1500, f"{key}-c"))
    ledger = await local.ledger(no)
    assert ledger["refunded"] == 500
    assert [r["idempotency_key"] for r in ledger["refunds"]] == [key]
    made = [c for c in ledger["refund_calls"] if c["idempotency_key"] == key]
    assert [c["outcome"] for c in made].count("ACCEPTED_PROCESSING") == 1
    assert "REPLAYED" not in [c["outcome"] for c in made]  # read back, never sent again


async def test_an_abnormal_refund_stays_in_flight_and_a_closed_one_is_refused(
    local: Local, gateway: WechatPayGateway
) -> None:
    """A refund that ends ABNORMAL is neither done nor final: unavailable (retried) each
    time it is asked about, never a refusal, and never made again. One that ends CLOSED is
    a final refusal that moved no money: the rest can then be refunded."""
    no, txn_id = await paid(local, gateway)
    await local.arm_refunds(no, abnormal_next=1, closed_next=1)
    abnormal, closed = f"refund-{no}-{txn_id}-a", f"refund-{no}-{txn_id}-c"
    assert (await gateway.refund(refund(no, txn_id, 100, abnormal))).status is RefundStatus.PENDING
    assert (await gateway.refund(refund(no, txn_id, 1899, closed))).status is RefundStatus.PENDING
    await asyncio.sleep(0.3)  # refund_processing_s is 0.2

    for _ in range(2):
        with pytest.raises(GatewayUnavailable, match="ABNORMAL"):
            await gateway.refund(refund(no, txn_id, 100, abnormal))
    found = await gateway.query_refund(abnormal, txn_id)
    assert found is not None and found.status is RefundStatus.PENDING
    with pytest.raises(GatewayRejected, match="CLOSED"):
        await gateway.refund(refund(no, txn_id, 1899, closed))
    found = await gateway.query_refund(closed, txn_id)
    assert found is not None and found.status is RefundStatus.REJECTED
    ledger = await local.ledger(no)
    assert ledger["refunded"] == 0 and ledger["refunds"] == []
    accepted = [c for c in ledger["refund_calls"] if c["outcome"] == "ACCEPTED_PROCESSING"]
    assert sorted(c["idempotency_key"] for c in accepted) == [abnormal, closed]

    rest = f"refund-{no}-{txn_id}-d"
    await gateway.refund(refund(no, txn_id, 1899, rest))
    assert (await ended(gateway, rest, txn_id)).status is RefundStatus.SUCCEEDED
    assert (await local.ledger(no))["refunded"] == 1899


async def test_an_unknown_outcome_is_read_back_and_never_refunded_twice(
    local: Local, gateway: WechatPayGateway
) -> None:
    """A SYSTEM_ERROR says nothing: ambiguous, and the key finds no refund, so the retry
    makes it. A refund made whose answer never came in time: ambiguous, the key finds it,
    and the retry answers it without sending a second one."""
    no, txn_id = await paid(local, gateway)
    key = f"refund-{no}-{txn_id}"
    await local.arm(no, fail_next_refunds=1)
    with pytest.raises(GatewayAmbiguous):  # 500 SYSTEM_ERROR
        await gateway.refund(refund(no, txn_id, 1999, key))
    assert await gateway.query_refund(key, txn_id) is None
    assert (await gateway.refund(refund(no, txn_id, 1999, key))).amount == 1999
    assert (await ended(gateway, key, txn_id)).status is RefundStatus.SUCCEEDED

    other, other_txn = await paid(local, gateway)
    other_key = f"refund-{other}-{other_txn}"
    await local.arm(other, timeout_after_success_next=1)
    hasty = local.gateway(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(GatewayAmbiguous):  # our timeout: WeChat Pay made it regardless
        await hasty.refund(refund(other, other_txn, 1999, other_key))
    assert time.monotonic() - started < 2.5  # the answer is held back for 3 s
    found = await gateway.query_refund(other_key, other_txn)
    assert found is not None and found.amount == 1999
    retried = await gateway.refund(refund(other, other_txn, 1999, other_key))
    assert retried.gateway_refund_id == found.gateway_refund_id
    assert (await ended(gateway, other_key, other_txn)).status is RefundStatus.SUCCEEDED
    ledger = await local.ledger(other)
    assert ledger["refunded"] == 1999 and len(ledger["refunds"]) == 1
    outcomes = [c["outcome"] for c in ledger["refund_calls"]]
    assert outcomes.count("ACCEPTED_PROCESSING") == 1 and "REPLAYED" not in outcomes


# --- keys -------------------------------------------------------------------------------------


async def test_wrong_keys_move_no_money_and_are_never_a_refusal(
    local: Local, gateway: WechatPayGateway
) -> None:
    """Requests signed with another merchant key are refused 401 SIGN_ERROR: unavailable
    (retried, logged as an error), never a refusal of the money. Answers signed for another
    platform key are not believed: ambiguous. Either way no refund is made."""
    not_ours = local.gateway(private=local.keys.other_private)
    with pytest.raises(GatewayUnavailable, match="SIGN_ERROR"):
        await not_ours.open_trade(trade(new_no()))
    no, txn_id = await paid(local, gateway)
    key = f"refund-{no}-{txn_id}"
    with pytest.raises(GatewayUnavailable, match="SIGN_ERROR"):
        await not_ours.refund(refund(no, txn_id, 100, key))
    with pytest.raises(GatewayUnavailable, match="SIGN_ERROR"):
        await not_ours.close_trade(no)

    wrong_platform = local.gateway(platform_public=local.keys.other_public)
    with pytest.raises(GatewayAmbiguous, match="does not verify"):
        await wrong_platform.refund(refund(no, txn_id, 100, key))
    with pytest.raises(GatewayAmbiguous, match="does not verify"):
        await wrong_platform.query_capture(txn_id)
    assert await gateway.query_refund(key, txn_id) is None
    ledger = await local.ledger(no)
    assert ledger["refunded"] == 0 and ledger["refund_calls"] == []
    capture = await gateway.query_capture(txn_id)
    assert capture is not None and capture.pay_order_no == no


# --- callbacks --------------------------------------------------------------------------------


async def test_a_payment_callback_verifies_decrypts_and_names_the_pay_order(
    local: Local, gateway: WechatPayGateway
) -> None:
    """The TRANSACTION.SUCCESS the local WeChat Pay sends verifies and decrypts through the
    adapter's reader and names the pay order (by attach: its out_trade_no is a digest). A
    ciphertext changed after signing does not verify; one changed and signed again does
    not decrypt; a reader with another platform key verifies nothing."""
    no, txn_id = await paid(local, gateway, no=long_no())
    [note] = await local.receiver.wait(out_trade_no_of(no), 1)
    headers, body = note["headers"], note["body"]

    def read(headers: dict[str, str], body: bytes, reader: WechatPayGateway = gateway) -> Any:
        return wechatpay_webhook.read_callback(
            headers,
            body,
            read=reader.read_callback,
            mchid=MCHID,
            appid=APPID,
            now=datetime.now(UTC),
            tolerance_s=300,
        )

    event = read(headers, body)
    assert isinstance(event, PaymentEvent)
    assert (event.pay_order_no, event.txn_id, event.amount, event.currency) == (
        no,
        txn_id,
        1999,
        "CNY",
    )
    assert event.event_id == f"wechatpay-{note['doc']['id']}"

    envelope = json.loads(body)
    sealed = envelope["resource"]["ciphertext"]
    envelope["resource"]["ciphertext"] = sealed[:-4] + ("AAAA" if sealed[-4:] != "AAAA" else "BBBB")
    tampered = wire.dumps(envelope)
    assert gateway.read_callback(headers, tampered) is None  # the signature is over the body
    with pytest.raises(WebhookRejected) as refused:
        read(headers, tampered)
    assert (refused.value.status, refused.value.code) == (401, "bad_signature")

    platform = wire.load_key(local.keys.platform_private, private=True)
    resigned = wire.signed_headers(platform, PUBLIC_KEY_ID, tampered)
    with pytest.raises(WechatPayCallbackRefused, match="does not decrypt"):
        gateway.read_callback(resigned, tampered)
    with pytest.raises(WebhookRejected) as refused:
        read(resigned, tampered)
    assert (refused.value.status, refused.value.code) == (401, "bad_signature")

    stranger = local.gateway(platform_public=local.keys.other_public)
    assert stranger.read_callback(headers, body) is None
    with pytest.raises(WebhookRejected):
        read(headers, body, stranger)


# --- the statement ----------------------------------------------------------------------------


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
        assert gateway == "wechatpay"
        self.asked.append((start, end, grace_s))
        return self.trades

    async def refunds_in_flight_of(self, pay_order_nos: list[str]) -> list[tuple[str, str, str]]:
        return [r for r in self.in_flight if r[1] in pay_order_nos]


async def test_the_statement_is_wechat_pay_s_own_record_of_each_trade_we_opened(
    local: Local, gateway: WechatPayGateway
) -> None:
    """Each trade of the book is read at WeChat Pay: the paid ones (a refunded one too, and
    one under a digest) are the captures of the window, the unpaid and the never opened are
    not; a refund WeChat Pay made whose answer we lost is among the refunds, one it never
    made is not. Outside the window no capture; without a book no statement."""
    before = datetime.now(UTC) - timedelta(seconds=2)
    paid_no, paid_txn = await paid(local, gateway)
    long, long_txn = await paid(local, gateway, 700, no=long_no())
    refunded_no, refunded_txn = await paid(local, gateway)
    unpaid_no = new_no()
    await gateway.open_trade(trade(unpaid_no))
    never_opened = new_no()
    lost_key = f"refund-{refunded_no}-{refunded_txn}"
    await local.arm(refunded_no, timeout_after_success_next=1)
    with pytest.raises(GatewayAmbiguous):
        await local.gateway(timeout=0.5).refund(refund(refunded_no, refunded_txn, 1999, lost_key))
    book = Book(
        trades=[paid_no, long, refunded_no, unpaid_no, never_opened],
        in_flight=[(lost_key, refunded_no, refunded_txn), ("mrefund-none", paid_no, paid_txn)],
    )
    reading = local.gateway(book=book)
    await asyncio.sleep(0.3)  # the lost refund ends SUCCESS: the trade is REFUND
    after = datetime.now(UTC) + timedelta(seconds=2)

    stmt = await reading.statement(before, after)
    assert book.asked == [(before, after, 1.0)]
    assert {(c.pay_order_no, c.txn_id, c.amount, c.currency) for c in stmt.captures} == {
        (paid_no, paid_txn, 1999, "CNY"),
        (long, long_txn, 700, "CNY"),
        (refunded_no, refunded_txn, 1999, "CNY"),  # refunded in full: still a capture
    }
    assert [(r.idempotency_key, r.txn_id, r.amount, r.status) for r in stmt.refunds] == [
        (lost_key, refunded_txn, 1999, RefundStatus.SUCCEEDED)
    ]
    earlier = await reading.statement(before - timedelta(hours=1), before)
    assert earlier.captures == []

    with pytest.raises(GatewayUnavailable):  # the API's adapter has no book
        await gateway.statement(before, after)

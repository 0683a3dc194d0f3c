"""The local WeChat Pay (``payorders.sandbox.wechatpay``) on a real port and a real
PostgreSQL, with ``wechatpayv3`` itself as the client ("WeChat Pay public key" mode): it
signs every request and verifies every answer, and verifies and decrypts every callback, so
what passes here is what the SDK accepts. The buyer's side is the sandbox's
``POST /v1/payments``; a small receiver takes the callbacks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import requests
from fastapi import FastAPI, Request, Response
from wechatpayv3 import WeChatPay, WeChatPayType
from wechatpayv3.type import RequestType
from wechatpayv3.utils import load_private_key, rsa_sign

from payorders.core.settings import Settings
from payorders.sandbox.wechatpay import (
    LocalWechatPayConfig,
    create_local_wechatpay_app,
    generate_key_pair,
)
from payorders.sandbox.wechatpay.wire import CHINA
from payorders.tools.http_clients import SandboxClient, ServiceError

from ..http_stack import serving

MCHID = "1900000109"
APPID = "wx0000000000000042"
APIV3_KEY = "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6"
SERIAL_NO = "3775B6A45ACD588826D15E583A95F5DD01234567"
PUBLIC_KEY_ID = "PUB_KEY_ID_0000000000000024101100397200000006"
SCHEMA = f"wxpay_{uuid.uuid4().hex[:12]}"
NATIVE = "/v3/pay/transactions/native"
SPEEDUP = 150.0
"""WeChat Pay's 15 s between the first two callbacks becomes 0.1 s."""
WITHHOLD_S = 3.0
PROCESSING_S = 0.2


@dataclass(frozen=True)
class Keys:
    merchant_private: str
    merchant_public: str
    platform_private: str
    platform_public: str
    other_private: str
    other_public: str


@dataclass
class Receiver:
    """The merchant's notify_url: each callback decrypted by the SDK and recorded; answers
    the statuses in ``answers[out_trade_no]`` first (one each), then 200."""

    sdk: WeChatPay
    hits: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[str, list[int]] = field(default_factory=dict)

    def app(self) -> FastAPI:
        api = FastAPI()

        @api.post("/notify")
        async def notify(request: Request) -> Response:
            body = await request.body()
            headers = dict(request.headers)
            doc = self.sdk.callback(headers, body)
            self.hits.append({"headers": headers, "body": body, "doc": doc})
            no = doc["resource"]["out_trade_no"] if doc else ""
            status = self.answers[no].pop(0) if self.answers.get(no) else 200
            return Response(status_code=status)

        return api

    def of(self, no: str) -> list[dict[str, Any]]:
        return [h for h in self.hits if h["doc"] and h["doc"]["resource"]["out_trade_no"] == no]

    async def wait(self, no: str, count: int, within: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while len(self.of(no)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{no}: {len(self.of(no))} callbacks: {self.of(no)}")
            await asyncio.sleep(0.02)
        return self.of(no)


@dataclass
class Wechat:
    url: str
    notify_url: str
    keys: Keys
    receiver: Receiver
    http: httpx.AsyncClient

    def sdk(
        self,
        *,
        mchid: str = MCHID,
        private: str | None = None,
        serial_no: str = SERIAL_NO,
        public: str | None = None,
        timeout: float = 10,
    ) -> WeChatPay:
        """The SDK as the product's adapter builds it, pointed at this server."""
        client = WeChatPay(
            wechatpay_type=WeChatPayType.NATIVE,
            mchid=mchid,
            private_key=private or self.keys.merchant_private,
            cert_serial_no=serial_no,
            appid=APPID,
            apiv3_key=APIV3_KEY,
            notify_url=self.notify_url,
            public_key=public or self.keys.platform_public,
            public_key_id=PUBLIC_KEY_ID,
            timeout=timeout,
        )
        client._core._gate_way = self.url
        return client

    async def call(self, name: str, *args: Any, sdk: WeChatPay | None = None, **kw: Any) -> Any:
        """One SDK call (synchronous requests) off the event loop the server runs on:
        ``(status, body)``, the body parsed when it is JSON."""
        client = sdk or self.sdk()
        fn = client._core.request if name == "request" else getattr(client, name)
        code, text = await asyncio.to_thread(fn, *args, **kw)
        return code, json.loads(text) if isinstance(text, str) and text else text

    async def post(self, path: str, body: dict[str, Any], **kw: Any) -> tuple[int, Any]:
        """A POST of any body, signed by the SDK."""
        sdk = kw.pop("sdk", None) or self.sdk()
        return await self.call("request", path, method=RequestType.POST, data=body, sdk=sdk)

    async def get(self, path: str, *, sdk: WeChatPay | None = None) -> tuple[int, Any]:
        return await self.call("request", path, sdk=sdk or self.sdk())

    async def prepay(
        self, no: str, total: int = 1999, *, expire_in: timedelta = timedelta(minutes=30)
    ) -> tuple[int, Any]:
        return await self.call(
            "pay",
            description=f"pay order {no}",
            out_trade_no=no,
            amount={"total": total, "currency": "CNY"},
            time_expire=rfc3339(datetime.now(UTC) + expire_in),
            attach="shop-42",
        )

    def order_body(self, no: str, **changes: Any) -> dict[str, Any]:
        """A Native下单 body, fixed (the SDK's pay() with our time_expire is another body
        each second)."""
        return {
            "appid": APPID,
            "mchid": MCHID,
            "description": f"pay order {no}",
            "out_trade_no": no,
            "time_expire": rfc3339(datetime.now(UTC) + timedelta(minutes=30)),
            "notify_url": self.notify_url,
            "amount": {"total": 1999, "currency": "CNY"},
            **changes,
        }

    async def query(self, no: str) -> tuple[int, Any]:
        return await self.call("query", out_trade_no=no)

    async def pay(self, no: str, amount: int = 1999, **extra: Any) -> httpx.Response:
        body = {"pay_order_no": no, "amount": amount, "currency": "CNY", **extra}
        return await self.http.post("/v1/payments", json=body)

    async def paid(self, no: str, amount: int = 1999) -> str:
        """A paid order: its ``transaction_id``."""
        code, _ = await self.prepay(no, amount)
        assert code == 200
        resp = await self.pay(no, amount)
        assert resp.status_code == 201, resp.text
        txn_id: str = resp.json()["txn_id"]
        return txn_id

    async def refund(
        self, out_refund_no: str, refund: int, *, total: int = 1999, **by: Any
    ) -> tuple[int, Any]:
        return await self.call(
            "refund",
            out_refund_no=out_refund_no,
            amount={"refund": refund, "total": total, "currency": "CNY"},
            reason="return",
            **by,
        )

    async def refund_ends(self, out_refund_no: str, within: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            code, found = await self.call("query_refund", out_refund_no=out_refund_no)
            assert code == 200, found
            if found["status"] != "PROCESSING":
                return dict(found)
            if time.monotonic() > deadline:
                raise AssertionError(f"{out_refund_no} still PROCESSING")
            await asyncio.sleep(0.05)

    async def ledger(self, no: str) -> dict[str, Any]:
        doc: dict[str, Any] = (await self.http.get(f"/v1/ledger/{no}")).json()
        return doc

    async def settled(self, no: str, within: float = 10) -> list[dict[str, Any]]:
        """The order's callback rows once each was delivered as often as owed."""
        deadline = time.monotonic() + within
        while True:
            rows: list[dict[str, Any]] = (await self.ledger(no))["webhooks"]
            if rows and all(r["deliveries"] == r["copies"] for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"{no}: callbacks not settled: {rows}")
            await asyncio.sleep(0.02)

    async def arm(self, scope: str, **faults: Any) -> None:
        resp = await self.http.put(f"/v1/faults/{scope}", json=faults)
        assert resp.status_code == 200, resp.text


def rfc3339(at: datetime) -> str:
    return at.astimezone(CHINA).replace(microsecond=0).isoformat()


def new_no() -> str:
    return f"po_{uuid.uuid4().hex[:16]}"


def new_keys() -> Keys:
    merchant_private, merchant_public = generate_key_pair()
    platform_private, platform_public = generate_key_pair()
    other_private, other_public = generate_key_pair()
    return Keys(
        merchant_private,
        merchant_public,
        platform_private,
        platform_public,
        other_private,
        other_public,
    )


def verifier(keys: Keys, public: str | None = None) -> WeChatPay:
    """An SDK that only verifies and decrypts (the receiver's, the tests')."""
    return WeChatPay(
        wechatpay_type=WeChatPayType.NATIVE,
        mchid=MCHID,
        private_key=keys.merchant_private,
        cert_serial_no=SERIAL_NO,
        appid=APPID,
        apiv3_key=APIV3_KEY,
        public_key=public or keys.platform_public,
        public_key_id=PUBLIC_KEY_ID,
    )


@asynccontextmanager
async def running(
    db_url: str, keys: Keys, *, schema: str, refund_processing_s: float = PROCESSING_S
) -> AsyncIterator[tuple[str, str, Receiver]]:
    """A local WeChat Pay on a free port, and the merchant's notify_url beside it:
    ``(its URL, the notify_url, the receiver)``; its schema dropped afterwards."""
    receiver = Receiver(verifier(keys))
    config = LocalWechatPayConfig(
        mchid=MCHID,
        appid=APPID,
        merchant_public_key_pem=keys.merchant_public,
        merchant_serial_no=SERIAL_NO,
        apiv3_key=APIV3_KEY,
        platform_private_key_pem=keys.platform_private,
        public_key_id=PUBLIC_KEY_ID,
        database_url=db_url,
        schema=schema,
        notify_speedup=SPEEDUP,
        server_timeout_s=0.5,
        withhold_answer_s=WITHHOLD_S,
        refund_processing_s=refund_processing_s,
    )
    try:
        async with (
            serving(receiver.app()) as receiver_url,
            serving(create_local_wechatpay_app(config)) as url,
        ):
            yield url, f"{receiver_url}/notify", receiver
    finally:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return new_keys()


@pytest.fixture(scope="module")
async def wechat(db_url: str, keys: Keys) -> AsyncIterator[Wechat]:
    async with (
        running(db_url, keys, schema=SCHEMA) as (url, notify_url, receiver),
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        yield Wechat(url, notify_url, keys, receiver, http)


# --- Native下单 -------------------------------------------------------------------------------


async def test_native_prepay_answers_one_code_url_per_out_trade_no(wechat: Wechat) -> None:
    no = new_no()
    code, first = await wechat.prepay(no)  # through the SDK's own pay()
    assert code == 200
    assert first["code_url"].startswith("weixin://wxpay/bizpayurl?pr=")

    body = wechat.order_body(new_no())
    code, made = await wechat.post(NATIVE, body)
    assert code == 200
    assert await wechat.post(NATIVE, body) == (200, made)  # the same request, the same answer
    assert await wechat.post(NATIVE, dict(reversed(body.items()))) == (200, made)
    for changes in (
        {"description": "another"},
        {"amount": {"total": 2000, "currency": "CNY"}},
        {"time_expire": rfc3339(datetime.now(UTC) + timedelta(hours=1))},
    ):
        code, other = await wechat.post(NATIVE, {**body, **changes})
        assert (code, other["code"]) == (403, "OUT_TRADE_NO_USED"), changes


async def test_native_prepay_refuses_what_wechat_pay_refuses(wechat: Wechat) -> None:
    def body(**changes: Any) -> dict[str, Any]:
        doc = {
            "appid": APPID,
            "mchid": MCHID,
            "description": "pay order",
            "out_trade_no": new_no(),
            "notify_url": wechat.notify_url,
            "amount": {"total": 1999, "currency": "CNY"},
        }
        return {**doc, **changes}

    path = NATIVE
    for bad in (
        {"out_trade_no": "po_1"},  # 6-32 characters
        {"out_trade_no": "po#" + "1" * 10},  # only A-Z, a-z, 0-9, _-|*
        {"amount": {"total": 0}},
        {"amount": {"total": 19.99}},
        {"amount": {"total": 1999, "currency": "USD"}},
        {"time_expire": "2030-01-01T10:00:00"},  # no time zone
        {"time_expire": "2030-01-01T10:00:00.123+08:00"},
        {"notify_url": f"{wechat.notify_url}?a=1"},  # no query
        {"description": "d" * 128},
        {"attach": "a" * 129},
    ):
        code, answer = await wechat.post(path, body(**bad))
        assert (code, answer["code"]) == (400, "PARAM_ERROR"), bad
    code, answer = await wechat.post(path, body(mchid="1900000999"))
    assert (code, answer["code"]) == (400, "MCH_NOT_EXISTS")
    code, answer = await wechat.post(path, body(appid="wx9999999999999999"))
    assert (code, answer["code"]) == (400, "APPID_MCHID_NOT_MATCH")
    code, answer = await wechat.post(path, body(time_expire="2030-01-01T10:00:00Z"))
    assert code == 200, answer


# --- the order: query, pay, close ------------------------------------------------------------


async def test_query_close_and_states_of_an_order(wechat: Wechat) -> None:
    no = new_no()
    body = wechat.order_body(no)
    await wechat.post(NATIVE, body)
    code, order = await wechat.query(no)
    assert code == 200
    assert (order["trade_state"], order["trade_state_desc"]) == ("NOTPAY", "订单未支付")
    assert (order["mchid"], order["appid"], order["trade_type"]) == (MCHID, APPID, "NATIVE")
    assert order["amount"] == {"total": 1999, "currency": "CNY", "payer_currency": "CNY"}
    assert "transaction_id" not in order and "success_time" not in order

    closed = await wechat.call("close", no)
    assert closed == (204, b"")  # the SDK verified the empty body's signature
    assert (await wechat.query(no))[1]["trade_state"] == "CLOSED"
    assert (await wechat.pay(no)).status_code == 409
    assert await wechat.call("close", no) == (204, b"")
    code, again = await wechat.post(NATIVE, body)
    assert (code, again["code"]) == (400, "ORDER_CLOSED")

    code, missing = await wechat.query(new_no())
    assert (code, missing["code"]) == (404, "ORDER_NOT_EXIST")
    code, missing = await wechat.call("close", new_no())
    assert (code, missing["code"]) == (404, "ORDER_NOT_EXIST")
    code, wrong = await wechat.get(f"/v3/pay/transactions/out-trade-no/{no}?mchid=1900000999")
    assert (code, wrong["code"]) == (400, "MCH_NOT_EXISTS")


async def test_a_paid_order_answers_both_queries_and_refuses_to_close(wechat: Wechat) -> None:
    no = new_no()
    body = wechat.order_body(no, attach="shop-42")
    await wechat.post(NATIVE, body)
    resp = await wechat.pay(no, txn_id="txn_cli_42")
    assert resp.status_code == 201, resp.text
    capture = resp.json()
    transaction_id = capture["txn_id"]
    assert len(transaction_id) == 28 and transaction_id.isdigit()
    assert (capture["pay_order_no"], capture["amount"], capture["currency"]) == (no, 1999, "CNY")

    code, order = await wechat.query(no)
    assert code == 200
    assert (order["trade_state"], order["transaction_id"]) == ("SUCCESS", transaction_id)
    assert order["amount"]["payer_total"] == 1999 and order["attach"] == "shop-42"
    assert order["success_time"].endswith("+08:00")
    assert order["payer"]["openid"].startswith("o")
    by_id = await wechat.call("query", transaction_id=transaction_id)
    assert by_id == (200, order)
    code, missing = await wechat.call("query", transaction_id="4200000000000000000000000001")
    assert (code, missing["code"]) == (404, "ORDER_NOT_EXIST")

    code, refused = await wechat.call("close", no)
    assert (code, refused["code"]) == (400, "ORDERPAID")
    code, again = await wechat.post(NATIVE, body)
    assert (code, again["code"]) == (400, "ORDERPAID")
    # The same payment resent (same txn_id): the same capture; any other payment: refused.
    assert (await wechat.pay(no, txn_id="txn_cli_42")).json() == capture
    second = await wechat.pay(no, txn_id="txn_cli_43")
    assert second.status_code == 409
    assert "one payment" in second.json()["error"]["message"]
    assert (await wechat.http.get(f"/v1/captures/{transaction_id}")).json() == capture
    assert (await wechat.ledger(no))["captured"] == 1999


async def test_payments_wechat_pay_refuses_and_time_expire(wechat: Wechat) -> None:
    no = new_no()
    assert (await wechat.pay(no)).status_code == 409  # no order
    await wechat.prepay(no)
    assert (await wechat.pay(no, 2000)).status_code == 409  # not the total
    usd = await wechat.http.post(
        "/v1/payments", json={"pay_order_no": no, "amount": 1999, "currency": "USD"}
    )
    assert usd.status_code == 409 and "CNY" in usd.json()["error"]["message"]
    scan = await wechat.http.post("/v1/scans", json={"pay_order_no": no})
    assert scan.status_code == 200 and scan.json()["trade_state"] == "NOTPAY"

    late = new_no()
    await wechat.prepay(late, expire_in=timedelta(seconds=-2))
    refused = await wechat.pay(late)
    assert refused.status_code == 409 and "time_expire" in refused.json()["error"]["message"]
    # Past time_expire an unpaid order is still NOTPAY until closed (Native下单's page).
    assert (await wechat.query(late))[1]["trade_state"] == "NOTPAY"
    assert (await wechat.call("close", late))[0] == 204

    edge = new_no()
    expire = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    await wechat.call(
        "pay",
        description="edge",
        out_trade_no=edge,
        amount={"total": 1999},
        time_expire=rfc3339(expire),
    )
    await asyncio.sleep(max(0.0, (expire - datetime.now(UTC)).total_seconds()) + 0.05)
    assert (await wechat.pay(edge)).status_code == 201  # within the second of time_expire


async def test_paid_on_close_fault_the_close_finds_the_order_paid(wechat: Wechat) -> None:
    no = new_no()
    await wechat.prepay(no)
    await wechat.arm(no, paid_on_close_amount=1999, paid_on_close_currency="CNY")
    try:
        code, answer = await wechat.call("close", no)
    finally:
        assert (await wechat.http.delete(f"/v1/faults/{no}")).status_code == 204
    assert (code, answer["code"]) == (400, "ORDERPAID")
    order = (await wechat.query(no))[1]
    assert order["trade_state"] == "SUCCESS"
    assert [c["txn_id"] for c in (await wechat.ledger(no))["captures"]] == [order["transaction_id"]]
    [note] = await wechat.receiver.wait(no, 1)
    assert note["doc"]["resource"]["transaction_id"] == order["transaction_id"]


async def test_a_delay_past_the_server_timeout_is_a_system_error_with_nothing_done(
    wechat: Wechat,
) -> None:
    no = new_no()
    await wechat.arm(no, delay_ms=500)
    try:
        code, answer = await wechat.prepay(no)
    finally:
        await wechat.http.delete(f"/v1/faults/{no}")
    assert (code, answer["code"]) == (500, "SYSTEM_ERROR")
    assert (await wechat.query(no))[1]["code"] == "ORDER_NOT_EXIST"


# --- refunds ---------------------------------------------------------------------------------


async def test_refunds_by_out_refund_no(wechat: Wechat) -> None:
    no = new_no()
    transaction_id = await wechat.paid(no)
    key = f"refund-{no}-{transaction_id}"

    code, first = await wechat.refund(key, 500, transaction_id=transaction_id)
    assert code == 200
    assert (first["status"], first["channel"], first["out_trade_no"]) == (
        "PROCESSING",
        "ORIGINAL",
        no,
    )
    assert first["amount"]["refund"] == 500 and first["amount"]["total"] == 1999
    assert "success_time" not in first
    code, again = await wechat.refund(key, 500, transaction_id=transaction_id)
    assert (code, again["refund_id"]) == (200, first["refund_id"])
    code, other = await wechat.refund(key, 600, transaction_id=transaction_id)
    assert (code, other["code"]) == (400, "INVALID_REQUEST")
    code, beyond = await wechat.refund(f"{key}-b", 1500, out_trade_no=no)
    assert (code, beyond["code"]) == (400, "INVALID_REQUEST")
    code, total = await wechat.refund(f"{key}-t", 100, total=2000, out_trade_no=no)
    assert (code, total["code"]) == (400, "INVALID_REQUEST")

    done = await wechat.refund_ends(key)
    assert (done["status"], done["refund_id"]) == ("SUCCESS", first["refund_id"])
    assert done["success_time"].endswith("+08:00")
    assert (await wechat.query(no))[1]["trade_state"] == "REFUND"
    assert (await wechat.ledger(no))["refunded"] == 500

    rest = await wechat.refund(f"{key}-c", 1499, out_trade_no=no)
    assert rest[0] == 200
    assert (await wechat.refund_ends(f"{key}-c"))["status"] == "SUCCESS"
    ledger = await wechat.ledger(no)
    assert ledger["refunded"] == 1999
    assert [r["idempotency_key"] for r in ledger["refunds"]] == [key, f"{key}-c"]
    code, none = await wechat.call("query_refund", out_refund_no=f"{key}-b")
    assert (code, none["code"]) == (404, "RESOURCE_NOT_EXISTS")
    code, empty = await wechat.refund("k-no-order", 1, out_trade_no=new_no())
    assert (code, empty["code"]) == (404, "RESOURCE_NOT_EXISTS")
    unpaid = new_no()
    await wechat.prepay(unpaid)
    code, refused = await wechat.refund("k-unpaid", 1, out_trade_no=unpaid)
    assert (code, refused["code"]) == (400, "INVALID_REQUEST")


async def test_refund_faults(wechat: Wechat) -> None:
    no = new_no()
    transaction_id = await wechat.paid(no)
    key = f"refund-{no}-{transaction_id}"
    await wechat.arm(no, fail_next_refunds=1)
    code, failed = await wechat.refund(key, 1999, transaction_id=transaction_id)
    assert (code, failed["code"]) == (500, "SYSTEM_ERROR")
    assert (await wechat.call("query_refund", out_refund_no=key))[0] == 404  # nothing done
    code, retried = await wechat.refund(key, 1999, transaction_id=transaction_id)
    assert code == 200 and retried["status"] == "PROCESSING"

    other = new_no()
    other_txn = await wechat.paid(other)
    await wechat.arm(other, timeout_after_success_next=1)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):  # the client's timeout
        await wechat.call(
            "refund",
            sdk=wechat.sdk(timeout=0.5),
            out_refund_no="held-back",
            amount={"refund": 1999, "total": 1999, "currency": "CNY"},
            transaction_id=other_txn,
        )
    assert time.monotonic() - started < WITHHOLD_S
    # Made, though never answered.
    assert (await wechat.refund_ends("held-back"))["status"] == "SUCCESS"
    assert (await wechat.ledger(other))["refunded"] == 1999


async def test_refunds_may_end_abnormal_or_closed(wechat: Wechat) -> None:
    no = new_no()
    transaction_id = await wechat.paid(no)
    armed = await wechat.http.put(
        f"/v1/wechatpay/refund-outcomes/{no}", json={"abnormal_next": 1, "closed_next": 1}
    )
    assert armed.status_code == 200, armed.text
    notify = {"notify_url": wechat.notify_url}
    await wechat.call(
        "refund",
        out_refund_no=f"{no}-a",
        amount={"refund": 100, "total": 1999, "currency": "CNY"},
        transaction_id=transaction_id,
        **notify,
    )
    await wechat.call(
        "refund",
        out_refund_no=f"{no}-c",
        amount={"refund": 1899, "total": 1999, "currency": "CNY"},
        transaction_id=transaction_id,
        **notify,
    )
    assert (await wechat.refund_ends(f"{no}-a"))["status"] == "ABNORMAL"
    assert (await wechat.refund_ends(f"{no}-c"))["status"] == "CLOSED"
    notes = await wechat.receiver.wait(no, 3)  # the payment, then the two refunds
    events = sorted(n["doc"]["event_type"] for n in notes)
    assert events == ["REFUND.ABNORMAL", "REFUND.CLOSED", "TRANSACTION.SUCCESS"]
    # A closed refund gives its money back to refund; an abnormal one holds it.
    code, left = await wechat.refund(f"{no}-d", 1899, transaction_id=transaction_id)
    assert code == 200, left
    assert (await wechat.refund_ends(f"{no}-d"))["status"] == "SUCCESS"
    assert (await wechat.ledger(no))["refunded"] == 1899
    assert (await wechat.http.get("/v1/wechatpay/refund-outcomes")).json() == []


async def test_a_refund_can_succeed_in_its_own_answer(db_url: str, keys: Keys) -> None:
    schema = f"{SCHEMA}_now"
    async with (
        running(db_url, keys, schema=schema, refund_processing_s=0) as (url, notify_url, rcv),
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        wechat = Wechat(url, notify_url, keys, rcv, http)
        no = new_no()
        transaction_id = await wechat.paid(no)
        code, made = await wechat.refund(
            "now-1", 1999, transaction_id=transaction_id, notify_url=notify_url
        )
        assert (code, made["status"]) == (200, "SUCCESS")
        assert made["success_time"].endswith("+08:00")
        assert (await wechat.ledger(no))["refunded"] == 1999
        [_, refunded] = await rcv.wait(no, 2)
        resource = refunded["doc"]["resource"]
        assert refunded["doc"]["event_type"] == "REFUND.SUCCESS"
        assert (resource["refund_status"], resource["out_refund_no"]) == ("SUCCESS", "now-1")
        assert resource["amount"] == {
            "total": 1999,
            "refund": 1999,
            "payer_total": 1999,
            "payer_refund": 1999,
        }


# --- the wire --------------------------------------------------------------------------------


async def test_requests_not_signed_by_the_merchant_or_stale_are_refused(
    wechat: Wechat, keys: Keys
) -> None:
    no = new_no()
    for sdk in (
        wechat.sdk(private=keys.other_private),
        wechat.sdk(serial_no="0" * 40),
        wechat.sdk(mchid="1900000999"),
    ):
        code, answer = await wechat.call("query", out_trade_no=no, sdk=sdk)
        assert (code, answer["code"]) == (401, "SIGN_ERROR")

    private = load_private_key(keys.merchant_private)
    path = f"/v3/pay/transactions/out-trade-no/{no}?mchid={MCHID}"

    def authorization(
        timestamp: int, *, method: str = "GET", target: str = path, body: str = ""
    ) -> str:
        nonce = uuid.uuid4().hex
        signature = rsa_sign(private, f"{method}\n{target}\n{timestamp}\n{nonce}\n{body}\n")
        return (
            f'WECHATPAY2-SHA256-RSA2048 mchid="{MCHID}",nonce_str="{nonce}",'
            f'signature="{signature}",timestamp="{timestamp}",serial_no="{SERIAL_NO}"'
        )

    async def status(headers: dict[str, str]) -> tuple[int, str | None]:
        resp = await wechat.http.get(path, headers=headers)
        # Every answer is signed, errors included.
        assert verifier(keys)._core._verify_signature(resp.headers, resp.text)
        return resp.status_code, resp.json().get("code")

    now = int(time.time())
    assert await status({"Authorization": authorization(now)}) == (404, "ORDER_NOT_EXIST")
    # Five minutes either way (a second of margin: ``now`` is whole seconds).
    assert await status({"Authorization": authorization(now - 295)}) == (404, "ORDER_NOT_EXIST")
    assert await status({"Authorization": authorization(now - 302)}) == (401, "SIGN_ERROR")
    assert await status({"Authorization": authorization(now + 302)}) == (401, "SIGN_ERROR")
    assert await status({}) == (401, "SIGN_ERROR")
    assert await status({"Authorization": "Bearer x"}) == (401, "SIGN_ERROR")
    tampered = authorization(now).replace('nonce_str="', 'nonce_str="x')
    assert await status({"Authorization": tampered}) == (401, "SIGN_ERROR")
    # A body other than the one signed; then the one signed.
    close = f"/v3/pay/transactions/out-trade-no/{no}/close"
    signed_for = json.dumps({"mchid": MCHID})
    auth = authorization(now, method="POST", target=close, body=signed_for)
    for sent, expected in (('{"mchid": "1900000108"}', 401), (signed_for, 404)):
        resp = await wechat.http.post(
            close,
            content=sent,
            headers={"Authorization": auth, "Content-Type": "application/json"},
        )
        assert resp.status_code == expected, resp.text


async def test_answers_verify_with_the_platform_key_only(wechat: Wechat, keys: Keys) -> None:
    no = new_no()
    await wechat.prepay(no)
    stranger = wechat.sdk(public=keys.other_public)
    with pytest.raises(Exception, match="failed to verify the signature"):
        await wechat.call("query", out_trade_no=no, sdk=stranger)
    resp = await wechat.http.get("/healthz")
    assert resp.json() == {"status": "ok"}


async def test_only_the_sandbox_control_routes_are_served(wechat: Wechat) -> None:
    assert (await wechat.http.get("/v1/faults")).status_code == 200
    assert (await wechat.http.post("/v1/trades", json={})).status_code == 404
    assert (await wechat.http.post("/v1/refunds", json={})).status_code == 404


async def test_the_sandbox_client_pays_through_it(wechat: Wechat) -> None:
    """What ``payorders pay`` does, unchanged, against this server."""
    no = new_no()
    await wechat.prepay(no)
    client = SandboxClient(Settings(gateway_url=wechat.url))
    try:
        capture = await client.pay(pay_order_no=no, amount=1999, currency="CNY")
        assert (capture["pay_order_no"], capture["amount"]) == (no, 1999)
        with pytest.raises(ServiceError) as refused:
            await client.pay(pay_order_no=no, amount=1999, currency="CNY")
        assert refused.value.status == 409
    finally:
        await client.aclose()


# --- callbacks -------------------------------------------------------------------------------


async def test_callbacks_verify_decrypt_and_are_retried_until_200_or_204(
    wechat: Wechat, keys: Keys
) -> None:
    no = new_no()
    wechat.receiver.answers[no] = [500, 202, 204]
    transaction_id = await wechat.paid(no)
    notes = await wechat.receiver.wait(no, 3)
    await asyncio.sleep(0.4)  # nothing more once answered 204
    assert len(wechat.receiver.of(no)) == 3
    assert len({n["doc"]["id"] for n in notes}) == 1  # one callback, notified 3 times
    assert len({n["headers"]["wechatpay-nonce"] for n in notes}) == 3  # each signed anew
    doc = notes[-1]["doc"]
    assert (doc["event_type"], doc["resource_type"], doc["summary"]) == (
        "TRANSACTION.SUCCESS",
        "encrypt-resource",
        "支付成功",
    )
    assert notes[-1]["headers"]["wechatpay-serial"] == PUBLIC_KEY_ID
    resource = doc["resource"]
    assert (resource["mchid"], resource["appid"], resource["out_trade_no"]) == (MCHID, APPID, no)
    assert (resource["transaction_id"], resource["trade_state"]) == (transaction_id, "SUCCESS")
    assert resource["amount"]["total"] == 1999 and resource["amount"]["payer_total"] == 1999
    [row] = await wechat.settled(no)
    assert (row["attempts"], row["deliveries"], row["last_status"]) == (3, 1, 204)

    headers, body = notes[-1]["headers"], notes[-1]["body"]
    assert verifier(keys, keys.other_public).callback(headers, body) is None  # another key
    envelope = json.loads(body)
    envelope["resource"]["ciphertext"] = envelope["resource"]["ciphertext"][::-1]
    assert verifier(keys).callback(headers, json.dumps(envelope)) is None  # changed body
    assert verifier(keys)._core._verify_signature(headers, body.decode())
    sealed = json.loads(body)["resource"]
    assert (sealed["algorithm"], sealed["original_type"]) == ("AEAD_AES_256_GCM", "transaction")


async def test_refund_callbacks_go_to_the_refunds_notify_url(wechat: Wechat) -> None:
    no = new_no()
    transaction_id = await wechat.paid(no)
    silent = {
        "transaction_id": transaction_id,
        "out_refund_no": "r-silent",
        "amount": {"refund": 100, "total": 1999, "currency": "CNY"},
    }  # no notify_url (the SDK's refund() adds its own)
    assert (await wechat.post("/v3/refund/domestic/refunds", silent))[0] == 200
    await wechat.refund("r-told", 200, transaction_id=transaction_id, notify_url=wechat.notify_url)
    assert (await wechat.refund_ends("r-told"))["status"] == "SUCCESS"
    assert (await wechat.refund_ends("r-silent"))["status"] == "SUCCESS"
    notes = await wechat.receiver.wait(no, 2)
    await asyncio.sleep(0.2)
    assert len(wechat.receiver.of(no)) == 2
    refunded = notes[-1]["doc"]
    assert (refunded["event_type"], refunded["resource"]["out_refund_no"]) == (
        "REFUND.SUCCESS",
        "r-told",
    )
    assert refunded["resource"]["success_time"].endswith("+08:00")


async def test_webhook_faults_apply_to_callbacks(wechat: Wechat) -> None:
    no = new_no()
    await wechat.arm(no, webhook_duplicate_next=1, webhook_drop_next=1)
    await wechat.paid(no)
    # The first attempt is lost, then it is delivered twice (same id).
    notes = await wechat.receiver.wait(no, 2)
    assert len({n["doc"]["id"] for n in notes}) == 1
    [row] = await wechat.settled(no)
    assert (row["copies"], row["attempts"]) == (2, 3)


def test_the_factory_refuses_to_start_without_its_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from payorders.sandbox.wechatpay import app, server

    monkeypatch.setattr(server.logs, "configure", lambda level: None)  # the process's logging
    for name in ("MCHID", "APPID", "MERCHANT_PUBLIC_KEY", "PRIVATE_KEY", "APIV3_KEY"):
        monkeypatch.delenv(f"PAYORDERS_LOCAL_WECHATPAY_{name}", raising=False)
    with pytest.raises(SystemExit) as stopped:
        app()
    assert stopped.value.code == 2
    assert "PAYORDERS_LOCAL_WECHATPAY_MCHID is not set" in capsys.readouterr().err

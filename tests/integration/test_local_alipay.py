"""The local Alipay (``payorders.sandbox.alipay``) on a real port and a real PostgreSQL, with
python-alipay-sdk itself as the client: it signs every request and verifies every answer
and notification, so what passes here is what the SDK accepts. The buyer's side is the
sandbox's ``POST /v1/payments``; a small receiver takes the notifications."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from alipay import AliPay
from alipay.exceptions import AliPayException
from alipay.utils import AliPayConfig
from fastapi import FastAPI, Request, Response

from payorders.core.settings import Settings
from payorders.sandbox.alipay import LocalAlipayConfig, create_local_alipay_app, generate_key_pair
from payorders.sandbox.alipay.wire import CHINA, TIME_FORMAT
from payorders.tools.http_clients import SandboxClient, ServiceError

from ..http_stack import serving

APP_ID = "2021000000000042"
SCHEMA = f"alipay_{uuid.uuid4().hex[:12]}"
SPEEDUP = 2400.0
"""Alipay's 4 min between the first two notifications becomes 0.1 s."""
WITHHOLD_S = 3.0


@dataclass(frozen=True)
class Keys:
    app_private: str
    app_public: str
    server_private: str
    server_public: str
    other_private: str


@dataclass
class Receiver:
    """The merchant's notify_url: records each notification; answers ``fail`` to the first
    ``fail_first[out_trade_no]`` of a trade, then the literal ``success``."""

    hits: list[dict[str, str]] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)

    def app(self) -> FastAPI:
        api = FastAPI()

        @api.post("/notify")
        async def notify(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
            self.hits.append(form)
            no = form.get("out_trade_no", "")
            if self.fail_first.get(no, 0) > 0:
                self.fail_first[no] -= 1
                return Response("fail", media_type="text/plain")
            return Response("success", media_type="text/plain")

        return api

    def of(self, no: str) -> list[dict[str, str]]:
        return [h for h in self.hits if h.get("out_trade_no") == no]

    async def wait(self, no: str, count: int, within: float = 10) -> list[dict[str, str]]:
        deadline = time.monotonic() + within
        while len(self.of(no)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{no}: {len(self.of(no))} notifications: {self.of(no)}")
            await asyncio.sleep(0.02)
        return self.of(no)


@dataclass
class Alipay:
    url: str
    notify_url: str
    keys: Keys
    receiver: Receiver
    http: httpx.AsyncClient

    def sdk(
        self, *, app_id: str = APP_ID, private: str | None = None, timeout: float = 10
    ) -> AliPay:
        """The SDK as the product's adapter builds it, pointed at this server."""
        client = AliPay(
            appid=app_id,
            app_notify_url=self.notify_url,
            app_private_key_string=private or self.keys.app_private,
            alipay_public_key_string=self.keys.server_public,
            sign_type="RSA2",
            config=AliPayConfig(timeout=timeout),
        )
        client._gateway = f"{self.url}/gateway.do"
        return client

    async def call(self, name: str, *args: Any, sdk: AliPay | None = None, **kw: Any) -> Any:
        """One SDK call (synchronous urllib) off the event loop the server runs on."""
        return await asyncio.to_thread(getattr(sdk or self.sdk(), name), *args, **kw)

    async def precreate(
        self, no: str, yuan: str = "19.99", *, expire_in: timedelta = timedelta(minutes=30)
    ) -> dict[str, Any]:
        answer: dict[str, Any] = await self.call(
            "api_alipay_trade_precreate",
            subject=f"pay order {no}",
            out_trade_no=no,
            total_amount=yuan,
            time_expire=china(datetime.now(UTC) + expire_in),
        )
        return answer

    async def pay(self, no: str, amount: int = 1999, **extra: Any) -> httpx.Response:
        body = {"pay_order_no": no, "amount": amount, "currency": "CNY", **extra}
        return await self.http.post("/v1/payments", json=body)

    async def paid(self, no: str, amount: int = 1999) -> dict[str, Any]:
        await self.precreate(no, f"{amount // 100}.{amount % 100:02d}")
        resp = await self.pay(no, amount)
        assert resp.status_code == 201, resp.text
        doc: dict[str, Any] = resp.json()
        return doc

    async def refund(self, trade_no: str, yuan: str, key: str | None) -> dict[str, Any]:
        extra = {} if key is None else {"out_request_no": key}
        answer: dict[str, Any] = await self.call(
            "api_alipay_trade_refund", refund_amount=yuan, trade_no=trade_no, **extra
        )
        return answer

    async def settled(self, no: str, within: float = 10) -> list[dict[str, Any]]:
        """The trade's notification rows once each was delivered as often as owed (the
        receiver sees one a moment before the server records it)."""
        deadline = time.monotonic() + within
        while True:
            rows: list[dict[str, Any]] = (await self.http.get(f"/v1/ledger/{no}")).json()[
                "webhooks"
            ]
            if rows and all(r["deliveries"] == r["copies"] for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"{no}: notifications not settled: {rows}")
            await asyncio.sleep(0.02)

    async def arm(self, scope: str, **faults: Any) -> None:
        resp = await self.http.put(f"/v1/faults/{scope}", json=faults)
        assert resp.status_code == 200, resp.text


def china(at: datetime) -> str:
    return at.astimezone(CHINA).strftime(TIME_FORMAT)


def new_no() -> str:
    return f"po_{uuid.uuid4().hex[:16]}"


def new_keys() -> Keys:
    """The app's key pair, the local Alipay's, and a stranger's private key."""
    app_private, app_public = generate_key_pair()
    server_private, server_public = generate_key_pair()
    other_private, _ = generate_key_pair()
    return Keys(app_private, app_public, server_private, server_public, other_private)


@asynccontextmanager
async def running(
    db_url: str, keys: Keys, *, app_id: str, schema: str
) -> AsyncIterator[tuple[str, str, Receiver]]:
    """A local Alipay on a free port, and the merchant's notify_url beside it:
    ``(its URL, the notify_url, the receiver)``."""
    receiver = Receiver()
    async with serving(receiver.app()) as receiver_url:
        config = LocalAlipayConfig(
            app_id=app_id,
            app_public_key_pem=keys.app_public,
            private_key_pem=keys.server_private,
            database_url=db_url,
            schema=schema,
            notify_speedup=SPEEDUP,
            server_timeout_s=1.0,
            withhold_answer_s=WITHHOLD_S,
        )
        async with serving(create_local_alipay_app(config)) as url:
            yield url, f"{receiver_url}/notify", receiver


@pytest.fixture(scope="module")
def keys() -> Keys:
    return new_keys()


@pytest.fixture(scope="module")
async def alipay(db_url: str, keys: Keys) -> AsyncIterator[Alipay]:
    async with (
        running(db_url, keys, app_id=APP_ID, schema=SCHEMA) as (url, notify_url, receiver),
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        yield Alipay(url, notify_url, keys, receiver, http)


# --- precreate, query, close -----------------------------------------------------------------


async def test_precreate_is_idempotent_and_a_pre_order_is_no_trade_until_scanned(
    alipay: Alipay,
) -> None:
    no = new_no()
    first = await alipay.precreate(no)
    assert first["code"] == "10000"
    assert first["out_trade_no"] == no
    assert first["qr_code"].startswith("https://qr.alipay.com/")
    again = await alipay.precreate(no)
    assert again["qr_code"] == first["qr_code"]
    other = await alipay.precreate(no, "20.00")
    assert (other["code"], other["sub_code"]) == ("40004", "ACQ.CONTEXT_INCONSISTENT")

    query = await alipay.call("api_alipay_trade_query", out_trade_no=no)
    assert (query["code"], query["sub_code"]) == ("40004", "ACQ.TRADE_NOT_EXIST")
    close = await alipay.call("api_alipay_trade_close", out_trade_no=no)
    assert (close["code"], close["sub_code"]) == ("40004", "ACQ.TRADE_NOT_EXIST")
    # That answer closed nothing: the buyer can still scan and pay until time_expire.
    assert (await alipay.pay(no)).status_code == 201
    paid = await alipay.call("api_alipay_trade_query", out_trade_no=no)
    assert paid["trade_status"] == "TRADE_SUCCESS"


async def test_precreate_refuses_what_alipay_refuses(alipay: Alipay) -> None:
    hyphen = await alipay.precreate("po_order-42")
    # out_trade_no takes letters, digits and '_' only (alipay.trade.precreate's page).
    assert (hyphen["code"], hyphen["sub_code"]) == ("40004", "ACQ.INVALID_PARAMETER")
    for bad in ("19.9", "19.999", "-1.00", "0.00", "1e3", "019.99"):
        answer = await alipay.precreate(new_no(), bad)
        assert (answer["code"], answer["sub_code"]) == ("40004", "ACQ.INVALID_PARAMETER"), bad
    too_much = await alipay.precreate(new_no(), "100000000.01")
    assert too_much["sub_code"] == "ACQ.TOTAL_FEE_EXCEED"
    whole = await alipay.precreate(new_no(), "20")
    assert whole["code"] == "10000"


async def test_a_payment_makes_the_trade_and_a_paid_trade_does_not_close(alipay: Alipay) -> None:
    no = new_no()
    await alipay.precreate(no)
    resp = await alipay.pay(no, txn_id="txn_cli_42")
    assert resp.status_code == 201, resp.text
    capture = resp.json()
    trade_no = capture["txn_id"]
    assert len(trade_no) == 28 and trade_no.isdigit()
    assert (capture["pay_order_no"], capture["amount"], capture["currency"]) == (no, 1999, "CNY")

    query = await alipay.call("api_alipay_trade_query", trade_no=trade_no)
    assert query["code"] == "10000"
    assert (query["trade_status"], query["out_trade_no"]) == ("TRADE_SUCCESS", no)
    assert (query["total_amount"], query["buyer_pay_amount"]) == ("19.99", "19.99")
    assert query["send_pay_date"]

    close = await alipay.call("api_alipay_trade_close", out_trade_no=no)
    assert (close["code"], close["sub_code"]) == ("40004", "ACQ.TRADE_STATUS_ERROR")

    # The same payment resent (same txn_id): the same capture; any other payment: refused.
    assert (await alipay.pay(no, txn_id="txn_cli_42")).json() == capture
    second = await alipay.pay(no, txn_id="txn_cli_43")
    assert second.status_code == 409
    assert "one payment" in second.json()["error"]["message"]
    # The sandbox's control routes, unchanged, over this server's ledger.
    assert (await alipay.http.get(f"/v1/captures/{trade_no}")).json() == capture
    ledger = (await alipay.http.get(f"/v1/ledger/{no}")).json()
    assert [c["txn_id"] for c in ledger["captures"]] == [trade_no]
    assert ledger["captured"] == 1999


async def test_payments_alipay_refuses(alipay: Alipay) -> None:
    no = new_no()
    assert (await alipay.pay(no)).status_code == 409  # no pre-order
    await alipay.precreate(no)
    assert (await alipay.pay(no, 2000)).status_code == 409  # not the total_amount
    usd = await alipay.http.post(
        "/v1/payments", json={"pay_order_no": no, "amount": 1999, "currency": "USD"}
    )
    assert usd.status_code == 409
    assert "CNY" in usd.json()["error"]["message"]
    late = new_no()
    await alipay.precreate(late, expire_in=timedelta(seconds=-2))
    refused = await alipay.pay(late)
    assert refused.status_code == 409
    assert "time_expire" in refused.json()["error"]["message"]
    bad = await alipay.http.post("/v1/payments", json={"pay_order_no": no, "amount": 1999})
    assert bad.status_code == 422


async def test_a_payment_at_time_expire_itself_is_taken(alipay: Alipay) -> None:
    no = new_no()
    expire = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    answer = await alipay.call(
        "api_alipay_trade_precreate",
        subject=f"pay order {no}",
        out_trade_no=no,
        total_amount="19.99",
        time_expire=china(expire),
    )
    assert answer["code"] == "10000"
    await asyncio.sleep(max(0.0, (expire - datetime.now(UTC)).total_seconds()) + 0.05)
    assert (await alipay.pay(no)).status_code == 201  # within the second of time_expire


async def test_a_scanned_trade_closes_once_and_then_takes_no_payment(alipay: Alipay) -> None:
    no = new_no()
    await alipay.precreate(no)
    scan = await alipay.http.post("/v1/scans", json={"pay_order_no": no})
    assert scan.status_code == 200, scan.text
    assert scan.json()["status"] == "WAIT_BUYER_PAY"
    waiting = await alipay.call("api_alipay_trade_query", out_trade_no=no)
    assert (waiting["trade_status"], waiting["trade_no"]) == (
        "WAIT_BUYER_PAY",
        scan.json()["trade_no"],
    )
    assert "send_pay_date" not in waiting
    close = await alipay.call("api_alipay_trade_close", out_trade_no=no)
    assert (close["code"], close["trade_no"]) == ("10000", scan.json()["trade_no"])
    closed = await alipay.call("api_alipay_trade_query", out_trade_no=no)
    assert closed["trade_status"] == "TRADE_CLOSED"
    assert (await alipay.pay(no)).status_code == 409
    again = await alipay.call("api_alipay_trade_close", out_trade_no=no)
    assert (again["code"], again["sub_code"]) == ("40004", "ACQ.TRADE_STATUS_ERROR")


async def test_paid_on_close_fault_the_close_finds_the_trade_paid(alipay: Alipay) -> None:
    no = new_no()
    await alipay.precreate(no)
    await alipay.arm(no, paid_on_close_amount=1999, paid_on_close_currency="CNY")
    try:
        close = await alipay.call("api_alipay_trade_close", out_trade_no=no)
    finally:
        assert (await alipay.http.delete(f"/v1/faults/{no}")).status_code == 204
    assert (close["code"], close["sub_code"]) == ("40004", "ACQ.TRADE_STATUS_ERROR")
    query = await alipay.call("api_alipay_trade_query", out_trade_no=no)
    assert query["trade_status"] == "TRADE_SUCCESS"
    ledger = (await alipay.http.get(f"/v1/ledger/{no}")).json()
    assert [c["txn_id"] for c in ledger["captures"]] == [query["trade_no"]]
    [note] = await alipay.receiver.wait(no, 1)
    assert note["trade_no"] == query["trade_no"]


# --- refunds ---------------------------------------------------------------------------------


async def test_refunds_by_out_request_no(alipay: Alipay) -> None:
    no = new_no()
    trade_no = (await alipay.paid(no, 1999))["txn_id"]
    key = f"refund-{no}-{trade_no}"

    first = await alipay.refund(trade_no, "5.00", key)
    assert (first["code"], first["fund_change"], first["refund_fee"]) == ("10000", "Y", "5.00")
    again = await alipay.refund(trade_no, "5.00", key)
    assert (again["code"], again["fund_change"], again["refund_fee"]) == ("10000", "N", "5.00")
    other_amount = await alipay.refund(trade_no, "6.00", key)
    assert (other_amount["code"], other_amount["sub_code"]) == (
        "40004",
        "ACQ.CONTEXT_INCONSISTENT",
    )
    beyond = await alipay.refund(trade_no, "15.00", f"{key}-b")
    assert (beyond["code"], beyond["sub_code"]) == ("40004", "ACQ.REASON_TRADE_REFUND_FEE_ERR")
    no_key = await alipay.refund(trade_no, "1.00", None)
    assert no_key["sub_code"] == "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"

    found = await alipay.call(
        "api_alipay_trade_fastpay_refund_query", out_request_no=key, trade_no=trade_no
    )
    assert found["code"] == "10000"
    assert (found["refund_status"], found["refund_amount"], found["total_amount"]) == (
        "REFUND_SUCCESS",
        "5.00",
        "19.99",
    )
    assert (found["out_request_no"], found["trade_no"]) == (key, trade_no)
    none = await alipay.call(
        "api_alipay_trade_fastpay_refund_query", out_request_no=f"{key}-b", out_trade_no=no
    )
    assert none["code"] == "10000"
    assert "refund_status" not in none

    rest = await alipay.refund(trade_no, "14.99", f"{key}-c")
    assert (rest["fund_change"], rest["refund_fee"]) == ("Y", "19.99")
    closed = await alipay.call("api_alipay_trade_query", trade_no=trade_no)
    assert (closed["trade_status"], closed["send_pay_date"] != "") == ("TRADE_CLOSED", True)
    ledger = (await alipay.http.get(f"/v1/ledger/{no}")).json()
    assert ledger["refunded"] == 1999
    assert [r["txn_id"] for r in ledger["refunds"]] == [trade_no, trade_no]


async def test_refunds_of_no_trade_or_an_unpaid_one_are_refused(alipay: Alipay) -> None:
    unknown = await alipay.refund("2099010100000000000000000001", "1.00", "k-1")
    assert (unknown["code"], unknown["sub_code"]) == ("40004", "ACQ.TRADE_NOT_EXIST")
    no = new_no()
    await alipay.precreate(no)
    scan = await alipay.http.post("/v1/scans", json={"pay_order_no": no})
    unpaid = await alipay.refund(scan.json()["trade_no"], "1.00", "k-2")
    assert (unpaid["code"], unpaid["sub_code"]) == ("40004", "ACQ.TRADE_STATUS_ERROR")


async def test_refund_faults(alipay: Alipay) -> None:
    no = new_no()
    trade_no = (await alipay.paid(no))["txn_id"]
    key = f"refund-{no}-{trade_no}"
    await alipay.arm(no, fail_next_refunds=1)
    failed = await alipay.refund(trade_no, "19.99", key)
    assert (failed["code"], failed["sub_code"]) == ("20000", "isp.unknow-error")
    assert (await alipay.http.get(f"/v1/ledger/{no}")).json()["refunded"] == 0
    retried = await alipay.refund(trade_no, "19.99", key)
    assert (retried["code"], retried["fund_change"]) == ("10000", "Y")

    other = new_no()
    other_trade = (await alipay.paid(other))["txn_id"]
    await alipay.arm(other, timeout_after_success_next=1)
    started = time.monotonic()
    with pytest.raises(OSError):  # the client's timeout: the answer is held back
        await alipay.call(
            "api_alipay_trade_refund",
            sdk=alipay.sdk(timeout=0.5),
            refund_amount="19.99",
            trade_no=other_trade,
            out_request_no="held-back",
        )
    assert time.monotonic() - started < WITHHOLD_S
    found = await alipay.call(
        "api_alipay_trade_fastpay_refund_query", out_request_no="held-back", trade_no=other_trade
    )
    assert found["refund_status"] == "REFUND_SUCCESS"  # made, though never answered


# --- the wire --------------------------------------------------------------------------------


async def test_requests_not_signed_by_the_app_or_for_another_app_are_refused(
    alipay: Alipay,
) -> None:
    no = new_no()
    forged = await alipay.call(
        "api_alipay_trade_query", out_trade_no=no, sdk=alipay.sdk(private=alipay.keys.other_private)
    )
    # Signed by this server, so the SDK verifies it and hands the error back.
    assert (forged["code"], forged["sub_code"]) == ("40002", "isv.invalid-signature")
    with pytest.raises(AliPayException, match=r"isv\.invalid-app-id"):
        await alipay.call("api_alipay_trade_query", out_trade_no=no, sdk=alipay.sdk(app_id="42"))
    with pytest.raises(AliPayException, match=r"isv\.invalid-method"):
        await alipay.call("server_api", "alipay.trade.pay.nothing", {"out_trade_no": no})


async def test_the_common_parameters_are_checked_get_and_post(alipay: Alipay) -> None:
    sdk = alipay.sdk()
    no = new_no()

    def signed(**changes: str | None) -> dict[str, str]:
        params = sdk.build_body("alipay.trade.query", {"out_trade_no": no})
        for k, v in changes.items():
            if v is None:
                params.pop(k)
            else:
                params[k] = v
        return dict(parse_qsl(sdk.sign_data(params), keep_blank_values=True))

    async def answer(params: dict[str, str], *, post: bool = False) -> dict[str, Any]:
        if post:
            resp = await alipay.http.post("/gateway.do", data=params)
        else:
            resp = await alipay.http.get("/gateway.do", params=params)
        assert resp.status_code == 200
        verified: dict[str, Any] = sdk._verify_and_return_sync_response(
            resp.text, "alipay_trade_query_response"
        )
        return verified

    assert (await answer(signed()))["sub_code"] == "ACQ.TRADE_NOT_EXIST"
    assert (await answer(signed(), post=True))["sub_code"] == "ACQ.TRADE_NOT_EXIST"
    unsigned = signed()
    del unsigned["sign"]
    assert (await answer(unsigned))["sub_code"] == "isv.missing-signature"
    tampered = signed()
    tampered["biz_content"] = tampered["biz_content"].replace(no, new_no())
    assert (await answer(tampered))["sub_code"] == "isv.invalid-signature"
    for changes, sub_code in (
        ({"timestamp": "2024-01-01T00:00:00"}, "isv.invalid-timestamp"),
        ({"sign_type": "RSA"}, "isv.invalid-signature-type"),
        ({"charset": "gbk"}, "isv.invalid-charset"),
        ({"version": None}, "isv.missing-version"),
        ({"version": "2.0"}, "isv.invalid-parameter"),
    ):
        got = await answer(signed(**changes))
        assert (got["code"][:3], got["sub_code"]) == ("400", sub_code), changes


async def test_only_the_sandbox_control_routes_are_served(alipay: Alipay) -> None:
    assert (await alipay.http.get("/healthz")).json() == {"status": "ok"}
    assert (await alipay.http.get("/v1/faults")).status_code == 200
    assert (await alipay.http.post("/v1/trades", json={})).status_code == 404
    assert (await alipay.http.post("/v1/refunds", json={})).status_code == 404
    assert (await alipay.http.get("/v1/refunds/some-key")).status_code == 404


async def test_the_sandbox_client_pays_through_it(alipay: Alipay) -> None:
    """What ``payorders pay`` does, unchanged, against this server."""
    no = new_no()
    await alipay.precreate(no)
    client = SandboxClient(Settings(gateway_url=alipay.url))
    try:
        capture = await client.pay(pay_order_no=no, amount=1999, currency="CNY")
        assert (capture["pay_order_no"], capture["amount"]) == (no, 1999)
        with pytest.raises(ServiceError) as refused:
            await client.pay(pay_order_no=no, amount=1999, currency="CNY")
        assert refused.value.status == 409
    finally:
        await client.aclose()


# --- notifications ---------------------------------------------------------------------------


async def test_notifications_verify_with_the_sdk_and_are_retried_until_success(
    alipay: Alipay,
) -> None:
    verifier = alipay.sdk()  # its alipay_public_key is this server's

    def verifies(note: dict[str, str]) -> bool:
        data = dict(note)
        sign = data.pop("sign")
        return bool(verifier.verify(data, sign))

    no = new_no()
    alipay.receiver.fail_first[no] = 2
    trade_no = (await alipay.paid(no))["txn_id"]
    notes = await alipay.receiver.wait(no, 3)
    await asyncio.sleep(0.4)  # nothing more once answered "success"
    assert len(alipay.receiver.of(no)) == 3
    assert all(verifies(n) for n in notes)
    assert len({n["notify_id"] for n in notes}) == 1  # one notification, notified 3 times
    note = notes[-1]
    assert (note["app_id"], note["notify_type"], note["sign_type"]) == (
        APP_ID,
        "trade_status_sync",
        "RSA2",
    )
    assert (note["trade_no"], note["trade_status"], note["total_amount"]) == (
        trade_no,
        "TRADE_SUCCESS",
        "19.99",
    )
    assert note["gmt_payment"] and note["notify_time"]
    forged = {**note, "total_amount": "0.01"}
    assert not verifies(forged)
    [row] = await alipay.settled(no)
    assert (row["attempts"], row["deliveries"], row["last_status"]) == (3, 1, 200)

    refund = await alipay.refund(trade_no, "19.99", f"refund-{no}-{trade_no}")
    assert refund["fund_change"] == "Y"
    refunded = (await alipay.receiver.wait(no, 4))[-1]
    assert verifies(refunded)
    assert (refunded["trade_status"], refunded["refund_fee"], refunded["out_biz_no"]) == (
        "TRADE_CLOSED",
        "19.99",
        f"refund-{no}-{trade_no}",
    )
    assert refunded["gmt_refund"]
    assert refunded["notify_id"] != note["notify_id"]


async def test_webhook_faults_apply_to_notifications(alipay: Alipay) -> None:
    no = new_no()
    await alipay.arm(no, webhook_duplicate_next=1, webhook_drop_next=1)
    await alipay.paid(no)
    # The first attempt is lost, then it is delivered twice (same notify_id).
    notes = await alipay.receiver.wait(no, 2)
    assert len({n["notify_id"] for n in notes}) == 1
    [row] = await alipay.settled(no)
    assert (row["copies"], row["attempts"]) == (2, 3)

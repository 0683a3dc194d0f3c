"""The WeChat Pay adapter's pure parts and its calls over a fake wire: pay order numbers as
``out_trade_no`` and back, RFC 3339 in China time, each status and code to one outcome,
each bad key refused in one line; every kind of callback (good payment, refund, unsigned,
another key, stale, ciphertext changed, another APIv3 key, another merchant or app, not
ours), signed and encrypted here as WeChat Pay does and checked by the SDK's own
verification and decryption; and open, close, refund and their answers through the SDK's
real signing and answer verification, with ``requests`` replaced by a wire that answers
as WeChat Pay would (no server)."""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import urllib3.exceptions
import wechatpayv3.core
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from requests.structures import CaseInsensitiveDict
from starlette.datastructures import Headers

from payorders.core.domain import RefundStatus
from payorders.gateways import wechatpay
from payorders.gateways.port import (
    GatewayAmbiguous,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
)
from payorders.gateways.wechatpay import (
    MAX_FEN,
    Outcome,
    WechatPayConfig,
    WechatPayGateway,
    WechatPayKeyRefused,
    china_time,
    from_rfc3339,
    out_refund_no_of,
    out_trade_no_of,
    outcome_of,
    pay_order_no_of,
)
from payorders.service import wechatpay_webhook
from payorders.service.webhook import PaymentEvent, RefundNotice, WebhookRejected

MCHID = "1900000109"
APPID = "wxd678efh567hg6787"
APIV3_KEY = "a12d3924fd499edac8a5efc0123456AB"  # 32 bytes
PUBLIC_KEY_ID = "PUB_KEY_ID_0114232134912410000000000000"
SERIAL_NO = "444F4864EA9B34415A1B2C3D4E5F60718293A4B5"
BASE = "http://127.0.0.1:1"
SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
NOW = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)  # 11:00 in China
TXN = "4200000000202612060000000001"
NOTIFICATION_ID = "EV-2026120611000000001"

Keys = tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey, rsa.RSAPrivateKey]


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def keys() -> Keys:
    """The merchant's key pair, WeChat Pay's, and a stranger's."""
    return tuple(  # type: ignore[return-value]
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)
    )


@pytest.fixture(scope="module")
def config(keys: Keys) -> WechatPayConfig:
    merchant, platform, _ = keys
    return WechatPayConfig(
        mchid=MCHID,
        appid=APPID,
        private_key_pem=private_pem(merchant),
        cert_serial_no=SERIAL_NO,
        apiv3_key=APIV3_KEY,
        public_key_pem=public_pem(platform),
        public_key_id=PUBLIC_KEY_ID,
        notify_url="https://shop.example.cn/v1/webhooks/wechatpay",
        gateway_url=BASE,
    )


@pytest.fixture(scope="module")
async def gateway(config: WechatPayConfig) -> AsyncIterator[WechatPayGateway]:
    gw = WechatPayGateway(config, client_timeout_s=1)
    yield gw
    await gw.aclose()


# --- out_trade_no and the pay order number ----------------------------------------------------


@pytest.mark.parametrize(
    "pay_order_no",
    ["po_abc", "po_order42", "po_order-42", "po_order_42", "po_" + "x" * 29],
)
def test_a_pay_order_number_that_fits_is_its_own_out_trade_no(pay_order_no: str) -> None:
    assert out_trade_no_of(pay_order_no) == pay_order_no
    assert pay_order_no_of({"out_trade_no": pay_order_no}) == pay_order_no
    assert pay_order_no_of({"out_trade_no": pay_order_no, "attach": pay_order_no}) == pay_order_no


@pytest.mark.parametrize(
    "pay_order_no",
    [
        "po_a",
        "po_ab",
        "po_" + "x" * 30,
        "po_" + "8f3c2a1e-5b4d-4c6e-9f70-1a2b3c4d5e6f",
        "po_" + "y" * 64,
    ],
)
def test_a_pay_order_number_that_does_not_fit_travels_as_a_digest_and_in_attach(
    pay_order_no: str,
) -> None:
    out_trade_no = out_trade_no_of(pay_order_no)
    assert re.fullmatch(r"ph_[0-9a-f]{29}", out_trade_no)
    assert re.fullmatch(r"[A-Za-z0-9_\-|*]{6,32}", out_trade_no)
    assert out_trade_no == out_trade_no_of(pay_order_no)  # deterministic
    assert pay_order_no_of({"out_trade_no": out_trade_no, "attach": pay_order_no}) == pay_order_no
    assert pay_order_no_of({"out_trade_no": out_trade_no}) is None
    assert pay_order_no_of({"out_trade_no": out_trade_no, "attach": "po_other"}) is None
    assert wechatpay.is_digest(out_trade_no)


def test_digests_of_neighbouring_numbers_differ_and_never_look_like_pay_order_numbers() -> None:
    digests = {out_trade_no_of("po_" + "z" * 29 + str(i)) for i in range(1000)}
    assert len(digests) == 1000
    assert not any(d.startswith("po_") for d in digests)


@pytest.mark.parametrize(
    "pay_order_no", ["order-42", "po_", "po_a b", "po_é", "po_a|b", "po_" + "x" * 65, "", "PO_abc"]
)
def test_what_is_no_pay_order_number_has_no_out_trade_no(pay_order_no: str) -> None:
    with pytest.raises(ValueError, match="not a pay order number"):
        out_trade_no_of(pay_order_no)


@pytest.mark.parametrize(
    "transaction",
    [
        {"out_trade_no": "T20261206000001"},
        {"out_trade_no": "po_ab"},  # written as a digest, never as it is
        {"out_trade_no": "po_ab", "attach": "po_ab"},
        {"out_trade_no": "po_" + "x" * 30, "attach": "po_" + "x" * 30},
        {"out_trade_no": "ph_" + "0" * 29, "attach": "po_order42"},
        {"attach": "po_order42"},
        {"out_trade_no": 42},
        {},
    ],
)
def test_a_trade_no_pay_order_of_ours_opened_is_none(transaction: dict[str, object]) -> None:
    assert pay_order_no_of(transaction) is None


def test_checkout_on_wechatpay_refuses_another_currency_and_a_bad_number() -> None:
    assert wechatpay.refusal("po_order-42", "CNY") is None
    assert wechatpay.refusal("po_" + "x" * 60, "CNY") is None  # a digest takes it
    assert "CNY only" in (wechatpay.refusal("po_order-42", "USD") or "")
    assert "not a pay order number" in (wechatpay.refusal("order-42", "CNY") or "")


def test_a_refund_key_is_its_own_out_refund_no_until_it_is_too_long() -> None:
    short = "refund-po_order42-" + TXN
    assert out_refund_no_of(short) == short
    long = "refund-po_" + "x" * 40 + "-" + TXN
    digest = out_refund_no_of(long)
    assert len(long) > 64 and len(digest) == 64 and digest.startswith("rh_")
    assert digest == out_refund_no_of(long) != out_refund_no_of(long + "1")
    assert out_refund_no_of("mrefund-r-1") == "mrefund-r-1"


def test_times_are_rfc3339_china_time_to_the_second() -> None:
    at = datetime(2026, 12, 6, 3, 0, 0, 900_000, tzinfo=UTC)
    assert china_time(at) == "2026-12-06T11:00:00+08:00"
    assert from_rfc3339("2026-12-06T11:00:00+08:00") == at.replace(microsecond=0)
    assert from_rfc3339("2026-12-06T03:00:00Z") == at.replace(microsecond=0)
    for bad in ["2026-12-06 11:00:00", "2026-12-06T11:00:00", "", None, 1]:
        with pytest.raises(ValueError):
            from_rfc3339(bad)


# --- outcomes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (200, None, Outcome.DONE),
        (204, None, Outcome.DONE),
        (500, "SYSTEM_ERROR", Outcome.UNKNOWN),
        (500, None, Outcome.UNKNOWN),
        (502, "ORDER_NOT_EXIST", Outcome.UNKNOWN),  # a 5xx proves nothing, whatever it says
        (503, None, Outcome.UNKNOWN),
        (400, "SYSTEM_ERROR", Outcome.UNKNOWN),
        (500, "BANK_ERROR", Outcome.UNKNOWN),
        (400, "SYSTEMERROR", Outcome.UNKNOWN),
        (429, "FREQUENCY_LIMITED", Outcome.RETRY_LATER),
        (429, None, Outcome.RETRY_LATER),
        (403, "NOT_ENOUGH", Outcome.RETRY_LATER),
        (401, "SIGN_ERROR", Outcome.MISCONFIGURED),
        (401, None, Outcome.MISCONFIGURED),
        (400, "PARAM_ERROR", Outcome.MISCONFIGURED),
        (403, "NO_AUTH", Outcome.MISCONFIGURED),
        (400, "MCH_NOT_EXISTS", Outcome.MISCONFIGURED),
        (400, "APPID_MCHID_NOT_MATCH", Outcome.MISCONFIGURED),
        (404, "ORDER_NOT_EXIST", Outcome.NOT_EXIST),
        (404, "RESOURCE_NOT_EXISTS", Outcome.NOT_EXIST),
        (400, "ORDERPAID", Outcome.STATUS),
        (403, "ORDER_PAID", Outcome.STATUS),
        (400, "ORDER_CLOSED", Outcome.STATUS),
        (403, "OUT_TRADE_NO_USED", Outcome.STATUS),
        (400, "INVALID_REQUEST", Outcome.REFUSED),
        (403, "RULE_LIMIT", Outcome.REFUSED),
        (403, "TRADE_ERROR", Outcome.REFUSED),
        (403, "USER_ACCOUNT_ABNORMAL", Outcome.REFUSED),
        (404, None, Outcome.UNKNOWN),  # a proxy's 404 is no "no such trade"
        (400, "SOMETHING_NEW", Outcome.UNKNOWN),
        (302, None, Outcome.UNKNOWN),
    ],
)
def test_each_status_and_code_has_one_outcome(
    status: int, code: str | None, outcome: Outcome
) -> None:
    body = {} if code is None else {"code": code, "message": "..."}
    assert outcome_of(status, body) is outcome


# --- the keys -------------------------------------------------------------------------------


def test_a_good_configuration_passes(config: WechatPayConfig) -> None:
    WechatPayGateway.check(config)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"private_key_pem": "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----"},
         "merchant private key is not a PKCS#8 PEM key"),
        ({"private_key_pem": "rsa1"}, "merchant private key is not a PKCS#8 PEM key"),
        ({"private_key_pem": "ec"}, "merchant private key is not an RSA key"),
        ({"private_key_pem": ""}, "are both needed"),
        ({"private_key_pem": "public"}, "merchant private key is not a PKCS#8 PEM key"),
        ({"public_key_pem": "nope"}, "public key is not a PEM public key"),
        ({"public_key_pem": "certificate-ish"}, "public key is not a PEM public key"),
        ({"public_key_pem": "  "}, "are both needed"),
        ({"apiv3_key": APIV3_KEY[:-1]}, "APIv3 key must be 32 bytes"),
        ({"apiv3_key": APIV3_KEY + "x"}, "APIv3 key must be 32 bytes"),
        ({"apiv3_key": APIV3_KEY[:-1] + "é"}, "not 33"),
        ({"public_key_id": "0114232134912410000000000000"}, "public_key_id must be PUB_KEY_ID_"),
        ({"cert_serial_no": "not-hex"}, "cert_serial_no must be"),
        ({"mchid": "mch-1"}, "mchid must be"),
        ({"appid": ""}, "appid must be"),
        ({"notify_url": "shop.example.cn/notify"}, "notify_url must be an http(s) URL"),
        ({"notify_url": "https://shop.example.cn/notify?x=1"}, "without a query"),
        ({"gateway_url": "ftp://api.mch.weixin.qq.com"}, "gateway_url must be"),
    ],
)  # fmt: skip
def test_each_bad_key_or_secret_is_refused_in_one_line_without_it(
    config: WechatPayConfig, keys: Keys, change: dict[str, str], says: str
) -> None:
    merchant = keys[0]
    stand_ins = {
        "rsa1": merchant.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode(),
        "ec": private_pem(ec.generate_private_key(ec.SECP256R1())),
        "public": public_pem(merchant),
        "certificate-ish": merchant.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        .decode(),
    }
    bad = replace(config, **{k: stand_ins.get(v, v) for k, v in change.items()})
    with pytest.raises(WechatPayKeyRefused) as refused:
        WechatPayGateway.check(bad)
    message = str(refused.value)
    assert says in message
    assert "\n" not in message and "-----" not in message and APIV3_KEY[:-1] not in message
    assert not any(len(v) > 8 and v in message for v in vars(bad).values() if isinstance(v, str))


# --- callbacks ------------------------------------------------------------------------------


def encrypted(
    resource: dict[str, Any], *, key: str = APIV3_KEY, kind: str = "transaction"
) -> dict[str, str]:
    """A resource as WeChat Pay encrypts it: AEAD_AES_256_GCM under the APIv3 key, a
    12-character nonce, the original type as associated data, base64."""
    nonce = secrets.token_hex(6)
    sealed = AESGCM(key.encode()).encrypt(
        nonce.encode(), json.dumps(resource).encode(), kind.encode()
    )
    return {
        "original_type": kind,
        "algorithm": "AEAD_AES_256_GCM",
        "ciphertext": base64.b64encode(sealed).decode(),
        "associated_data": kind,
        "nonce": nonce,
    }


def signed(
    body: bytes, key: rsa.RSAPrivateKey, *, at: datetime = NOW, serial: str = PUBLIC_KEY_ID
) -> dict[str, str]:
    """The headers WeChat Pay sends: SHA256withRSA over timestamp, nonce and body, one per
    line, base64."""
    timestamp, nonce = str(int(at.timestamp())), secrets.token_hex(16)
    message = f"{timestamp}\n{nonce}\n{body.decode()}\n".encode()
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return {
        "Wechatpay-Timestamp": timestamp,
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": base64.b64encode(signature).decode(),
        "Wechatpay-Serial": serial,
        "Wechatpay-Signature-Type": SIGNATURE_TYPE,
    }


def transaction(**changes: Any) -> dict[str, Any]:
    base = {
        "appid": APPID,
        "mchid": MCHID,
        "out_trade_no": "po_order-42",
        "transaction_id": TXN,
        "trade_type": "NATIVE",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "bank_type": "OTHERS",
        "attach": "po_order-42",
        "success_time": "2026-12-06T10:59:57+08:00",
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        "amount": {"total": 1999, "payer_total": 1999, "currency": "CNY", "payer_currency": "CNY"},
    }
    return {**base, **changes}


def refund_resource(**changes: Any) -> dict[str, Any]:
    base = {
        "mchid": MCHID,
        "out_trade_no": "po_order-42",
        "transaction_id": TXN,
        "out_refund_no": "refund-po_order-42-" + TXN,
        "refund_id": "50000000382019052709732678859",
        "refund_status": "SUCCESS",
        "success_time": "2026-12-06T11:30:00+08:00",
        "user_received_account": "支付用户零钱",
        "amount": {"total": 1999, "refund": 1999, "payer_total": 1999, "payer_refund": 1999},
    }
    return {**base, **changes}


def callback(
    resource: dict[str, Any] | dict[str, str],
    *,
    event_type: str = "TRANSACTION.SUCCESS",
    **changes: Any,
) -> bytes:
    sealed = (
        resource
        if "ciphertext" in resource
        else encrypted(
            resource, kind="refund" if event_type.startswith("REFUND.") else "transaction"
        )
    )
    doc = {
        "id": NOTIFICATION_ID,
        "create_time": "2026-12-06T10:59:58+08:00",
        "resource_type": "encrypt-resource",
        "event_type": event_type,
        "summary": "支付成功",
        "resource": sealed,
        **changes,
    }
    return json.dumps(doc, ensure_ascii=False).encode()


def read(gateway: WechatPayGateway, headers: dict[str, str] | Headers, body: bytes) -> object:
    return wechatpay_webhook.read_callback(
        headers,
        body,
        read=gateway.read_callback,
        mchid=MCHID,
        appid=APPID,
        now=NOW,
        tolerance_s=300,
    )


@pytest.fixture
def no_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a callback never calls WeChat Pay (the SDK would, for a serial it does not
    know): any call fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a callback made the SDK call WeChat Pay")

    monkeypatch.setattr(wechatpayv3.core, "requests", SimpleNamespace(get=refuse, post=refuse))


@pytest.mark.usefixtures("no_wire")
def test_a_payment_signed_and_encrypted_by_wechatpay_is_read(
    gateway: WechatPayGateway, keys: Keys
) -> None:
    body = callback(transaction())
    assert read(gateway, signed(body, keys[1]), body) == PaymentEvent(
        event_id=f"wechatpay-{NOTIFICATION_ID}",
        pay_order_no="po_order-42",
        txn_id=TXN,
        amount=1999,
        currency="CNY",
        paid_at=datetime(2026, 12, 6, 2, 59, 57, tzinfo=UTC),
    )


@pytest.mark.usefixtures("no_wire")
def test_headers_as_a_framework_lowers_them_are_read(gateway: WechatPayGateway, keys: Keys) -> None:
    body = callback(transaction())
    lowered = Headers(headers={k.lower(): v for k, v in signed(body, keys[1]).items()})
    assert isinstance(read(gateway, lowered, body), PaymentEvent)


@pytest.mark.usefixtures("no_wire")
def test_a_long_pay_order_numbers_payment_is_read_by_its_attach(
    gateway: WechatPayGateway, keys: Keys
) -> None:
    long_no = "po_" + "8f3c2a1e-5b4d-4c6e-9f70-1a2b3c4d5e6f"
    body = callback(transaction(out_trade_no=out_trade_no_of(long_no), attach=long_no))
    event = read(gateway, signed(body, keys[1]), body)
    assert isinstance(event, PaymentEvent) and event.pay_order_no == long_no


@pytest.mark.usefixtures("no_wire")
@pytest.mark.parametrize("event_type", ["REFUND.SUCCESS", "REFUND.ABNORMAL", "REFUND.CLOSED"])
def test_a_refund_callback_names_only_its_trade(
    gateway: WechatPayGateway, keys: Keys, event_type: str
) -> None:
    body = callback(refund_resource(), event_type=event_type)  # a refund carries no appid
    assert read(gateway, signed(body, keys[1]), body) == RefundNotice(
        event_id=f"wechatpay-{NOTIFICATION_ID}", pay_order_no="po_order-42", txn_id=TXN
    )


@pytest.mark.usefixtures("no_wire")
def test_a_refund_of_a_digest_trade_is_acknowledged_and_ignored(
    gateway: WechatPayGateway, keys: Keys
) -> None:
    digest = out_trade_no_of("po_" + "x" * 40)
    body = callback(refund_resource(out_trade_no=digest), event_type="REFUND.SUCCESS")
    event = read(gateway, signed(body, keys[1]), body)
    assert isinstance(event, wechatpay_webhook.IgnoredCallback) and digest in event.why


@pytest.mark.usefixtures("no_wire")
@pytest.mark.parametrize(
    ("event_type", "resource"),
    [
        ("TRANSACTION.SUCCESS", transaction(trade_state="NOTPAY")),
        ("TRANSACTION.CLOSED", transaction(trade_state="CLOSED")),
    ],
)
def test_a_callback_that_is_no_payment_moves_nothing(
    gateway: WechatPayGateway, keys: Keys, event_type: str, resource: dict[str, Any]
) -> None:
    body = callback(resource, event_type=event_type)
    event = read(gateway, signed(body, keys[1]), body)
    assert event == wechatpay_webhook.IgnoredCallback(
        f"wechatpay-{NOTIFICATION_ID}", event_type, "moves no money"
    )


@pytest.mark.usefixtures("no_wire")
@pytest.mark.parametrize(
    ("case", "status", "code", "says"),
    [
        ("unsigned", 401, "missing_signature", "no Wechatpay-Timestamp, Wechatpay-Nonce"),
        ("no serial", 401, "missing_signature", "no Wechatpay-Serial header"),
        ("signed by another key", 401, "bad_signature", "does not verify"),
        ("signed, then changed", 401, "bad_signature", "does not verify"),
        ("another serial", 401, "bad_signature", "is not WeChat Pay's public key id"),
        ("no signature type", 401, "bad_signature", "the SDK cannot read it"),
        ("stale", 401, "stale_timestamp", "outside 300 s"),
        ("from the future", 401, "stale_timestamp", "outside 300 s"),
        ("timestamp not a number", 401, "malformed_signature", "Unix seconds"),
        ("ciphertext changed", 401, "bad_signature", "does not decrypt"),
        ("another APIv3 key", 401, "bad_signature", "does not decrypt"),
        ("not encrypted", 401, "bad_signature", "does not decrypt"),
        ("not JSON", 401, "bad_signature", "the SDK cannot read it"),
        ("another mchid", 400, "invalid_event", "resource.mchid"),
        ("another appid", 400, "invalid_event", "resource.appid"),
        ("no appid", 400, "invalid_event", "resource.appid"),
        ("a refund for another mchid", 400, "invalid_event", "resource.mchid"),
        ("no id", 400, "invalid_event", "id is missing"),
        ("an id too long", 400, "invalid_event", "id must be"),
        ("not ours", 404, "unknown_pay_order", "is no pay order's"),
        ("a refund not ours", 404, "unknown_pay_order", "is no pay order's"),
        ("amount in yuan", 400, "invalid_event", "amount.total"),
        ("no success_time", 400, "invalid_event", "success_time"),
    ],
)
def test_a_bad_callback_is_refused_for_its_reason(
    gateway: WechatPayGateway, keys: Keys, case: str, status: int, code: str, says: str
) -> None:
    platform, stranger = keys[1], keys[2]
    good = callback(transaction())
    headers = signed(good, platform)
    sealed = encrypted(transaction())
    changed = bytearray(base64.b64decode(sealed["ciphertext"]))
    changed[3] ^= 0x01
    tampered = {**sealed, "ciphertext": base64.b64encode(bytes(changed)).decode()}

    def body_and_headers() -> tuple[bytes, dict[str, str]]:
        match case:
            case "unsigned":
                return good, {}
            case "no serial":
                return good, {k: v for k, v in headers.items() if k != "Wechatpay-Serial"}
            case "signed by another key":
                return good, signed(good, stranger)
            case "signed, then changed":
                return good.replace(b"EV-", b"EW-"), headers
            case "another serial":
                return good, signed(
                    good, stranger, serial="PUB_KEY_ID_0000000000000000000000000001"
                )
            case "no signature type":
                return good, {k: v for k, v in headers.items() if k != "Wechatpay-Signature-Type"}
            case "stale":
                return good, signed(good, platform, at=NOW - timedelta(seconds=301))
            case "from the future":
                return good, signed(good, platform, at=NOW + timedelta(seconds=301))
            case "timestamp not a number":
                return good, {**headers, "Wechatpay-Timestamp": "2026-12-06T11:00:00+08:00"}
            case "ciphertext changed":
                body = callback(tampered)  # re-signed: only the decryption can tell
                return body, signed(body, platform)
            case "another APIv3 key":
                body = callback(encrypted(transaction(), key="b" * 32))
                return body, signed(body, platform)
            case "not encrypted":
                body = callback(transaction(), resource_type="plain")
                return body, signed(body, platform)
            case "not JSON":
                body = b"id=1&event_type=TRANSACTION.SUCCESS"
                return body, signed(body, platform)
            case "another mchid":
                body = callback(transaction(mchid="1900000110"))
            case "another appid":
                body = callback(transaction(appid="wx0000000000000002"))
            case "no appid":
                body = callback({k: v for k, v in transaction().items() if k != "appid"})
            case "a refund for another mchid":
                body = callback(refund_resource(mchid="1900000110"), event_type="REFUND.SUCCESS")
            case "no id":
                body = callback(transaction(), id="")
            case "an id too long":
                body = callback(transaction(), id="x" * 55)
            case "not ours":
                body = callback(transaction(out_trade_no="T20261206000001", attach="po_order-42"))
            case "a refund not ours":
                body = callback(
                    refund_resource(out_trade_no="T2026120600"), event_type="REFUND.SUCCESS"
                )
            case "amount in yuan":
                body = callback(transaction(amount={"total": "19.99", "currency": "CNY"}))
            case "no success_time":
                body = callback({k: v for k, v in transaction().items() if k != "success_time"})
        return body, signed(body, platform)

    body, sent = body_and_headers()
    with pytest.raises(WebhookRejected) as refused:
        read(gateway, sent, body)
    assert (refused.value.status, refused.value.code) == (status, code), refused.value.reason
    assert says in refused.value.reason


def test_a_reader_that_raises_is_a_bad_signature() -> None:
    body = b"{}"

    def broken(headers: object, body: object) -> None:
        raise RuntimeError("boom")

    headers = {name: "1" for name in wechatpay.CALLBACK_HEADERS}
    headers["Wechatpay-Timestamp"] = str(int(NOW.timestamp()))
    with pytest.raises(WebhookRejected) as refused:
        wechatpay_webhook.read_callback(
            headers, body, read=broken, mchid=MCHID, appid=APPID, now=NOW, tolerance_s=300
        )
    assert (refused.value.status, refused.value.code) == (401, "bad_signature")


# --- calls, over a wire that answers as WeChat Pay ------------------------------------------


class Wire:
    """``requests`` as the SDK uses it, answering each (method, path) as WeChat Pay would:
    2xx signed with ``key`` (WeChat Pay's, or a stranger's), errors unsigned. What the SDK
    sent is kept, its ``Authorization`` checked against the merchant's key."""

    def __init__(self, platform: rsa.RSAPrivateKey, merchant: rsa.RSAPrivateKey) -> None:
        self.key = platform
        self.merchant = merchant
        self.answers: dict[tuple[str, str], tuple[int, dict[str, Any] | None] | Exception] = {}
        self.sent: list[tuple[str, str, dict[str, Any] | None]] = []

    def on(self, method: str, path: str, status: int, doc: dict[str, Any] | None = None) -> None:
        self.answers[(method, path)] = (status, doc)

    def fail(self, method: str, path: str, error: Exception) -> None:
        self.answers[(method, path)] = error

    def get(self, url: str, headers: dict[str, str], **_: object) -> SimpleNamespace:
        return self._answer("GET", url, None, headers)

    def post(
        self, url: str, json: dict[str, Any] | None = None, *, headers: dict[str, str], **_: object
    ) -> SimpleNamespace:
        return self._answer("POST", url, json, headers)

    def _answer(
        self, method: str, url: str, doc: dict[str, Any] | None, headers: dict[str, str]
    ) -> SimpleNamespace:
        path = url.removeprefix(BASE)
        self._check_authorization(method, path, doc, headers)
        self.sent.append((method, path, doc))
        answer = self.answers.get((method, path))
        if answer is None:
            raise AssertionError(f"unexpected {method} {path}")
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        text = "" if body is None else json.dumps(body)
        timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
        answer_headers = CaseInsensitiveDict({"Content-Type": "application/json"} if body else {})
        if 200 <= status < 300:
            signature = self.key.sign(
                f"{timestamp}\n{nonce}\n{text}\n".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            answer_headers.update(
                {
                    "Wechatpay-Timestamp": timestamp,
                    "Wechatpay-Nonce": nonce,
                    "Wechatpay-Signature": base64.b64encode(signature).decode(),
                    "Wechatpay-Serial": PUBLIC_KEY_ID,
                    "Wechatpay-Signature-Type": SIGNATURE_TYPE,
                }
            )
        return SimpleNamespace(
            status_code=status, text=text, content=text.encode(), headers=answer_headers
        )

    def _check_authorization(
        self, method: str, path: str, doc: dict[str, Any] | None, headers: dict[str, str]
    ) -> None:
        scheme, _, params = headers["Authorization"].partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        assert scheme == SIGNATURE_TYPE and fields["mchid"] == MCHID
        assert fields["serial_no"] == SERIAL_NO and headers["Wechatpay-Serial"] == PUBLIC_KEY_ID
        body = json.dumps(doc) if doc else ""
        message = f"{method}\n{path}\n{fields['timestamp']}\n{fields['nonce_str']}\n{body}\n"
        self.merchant.public_key().verify(
            base64.b64decode(fields["signature"]),
            message.encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> Wire:
    fake = Wire(keys[1], keys[0])
    monkeypatch.setattr(wechatpayv3.core, "requests", fake)
    return fake


NATIVE = "/v3/pay/transactions/native"
BY_NO = "/v3/pay/transactions/out-trade-no/po_order-42?mchid=" + MCHID
BY_ID = f"/v3/pay/transactions/id/{TXN}?mchid={MCHID}"
CLOSE = "/v3/pay/transactions/out-trade-no/po_order-42/close"
REFUNDS = "/v3/refund/domestic/refunds"
KEY = "refund-po_order-42-" + TXN
REFUND_BY_NO = f"{REFUNDS}/{KEY}"
CODE_URL = "weixin://wxpay/bizpayurl?pr=PR6u79czz"


def trade(**changes: Any) -> OpenTrade:
    base = OpenTrade(
        pay_order_no="po_order-42",
        amount=1999,
        currency="CNY",
        expires_at=datetime(2026, 12, 6, 4, 0, 0, 250_000, tzinfo=UTC),
        idempotency_key="open-po_order-42",
    )
    return replace(base, **changes)


def refund_request(**changes: Any) -> RefundRequest:
    base = RefundRequest(
        idempotency_key=KEY, pay_order_no="po_order-42", txn_id=TXN, amount=1999, currency="CNY"
    )
    return replace(base, **changes)


def refund_answer(status: str, **changes: Any) -> dict[str, Any]:
    return {
        "refund_id": "50000000382019052709732678859",
        "out_refund_no": KEY,
        "transaction_id": TXN,
        "out_trade_no": "po_order-42",
        "channel": "ORIGINAL",
        "user_received_account": "支付用户零钱",
        "create_time": "2026-12-06T11:30:00+08:00",
        "status": status,
        "amount": {"total": 1999, "refund": 1999, "payer_refund": 1999, "currency": "CNY"},
        **changes,
    }


NOT_FOUND = {"code": "RESOURCE_NOT_EXISTS", "message": "退款单不存在"}


async def test_opening_sends_a_native_order_in_fen_until_our_expiry_and_repeats_safely(
    gateway: WechatPayGateway, wire: Wire
) -> None:
    wire.on("POST", NATIVE, 200, {"code_url": CODE_URL})
    first = await gateway.open_trade(trade())
    again = await gateway.open_trade(trade(), first_attempt=False)
    assert first == again
    assert (first.gateway, first.trade_ref) == ("wechatpay", "po_order-42")
    assert first.details == {"out_trade_no": "po_order-42", "code_url": CODE_URL}
    _, _, sent = wire.sent[0]
    assert sent is not None and sent == {
        "notify_url": "https://shop.example.cn/v1/webhooks/wechatpay",
        "description": "pay order po_order-42",
        "out_trade_no": "po_order-42",
        "amount": {"total": 1999, "currency": "CNY"},
        "time_expire": "2026-12-06T12:00:00+08:00",
        "attach": "po_order-42",
        "appid": APPID,
        "mchid": MCHID,
    }


@pytest.mark.parametrize(
    ("opening", "refunding"),
    [
        ({"currency": "USD"}, {"currency": "USD"}),
        ({"amount": 0}, {"amount": 0}),
        ({"amount": MAX_FEN + 1}, {"amount": MAX_FEN + 1}),
        ({"amount": True}, {"amount": True}),
        ({"pay_order_no": "order-42"}, {"txn_id": "../a"}),
    ],
)
async def test_what_wechatpay_cannot_take_is_refused_before_any_call(
    gateway: WechatPayGateway, wire: Wire, opening: dict[str, Any], refunding: dict[str, Any]
) -> None:
    with pytest.raises(GatewayRejected):
        await gateway.open_trade(trade(**opening))
    with pytest.raises(GatewayRejected):
        await gateway.refund(refund_request(**refunding))
    assert wire.sent == []


async def test_an_open_answered_orderpaid_is_read_back(
    gateway: WechatPayGateway, wire: Wire
) -> None:
    wire.on("POST", NATIVE, 400, {"code": "ORDERPAID", "message": "订单已支付"})
    wire.on("GET", BY_NO, 200, transaction())
    paid = await gateway.open_trade(trade())
    assert paid.details == {"out_trade_no": "po_order-42", "trade_state": "SUCCESS"}
    wire.on("GET", BY_NO, 200, transaction(trade_state="NOTPAY"))
    with pytest.raises(GatewayRejected, match="ORDERPAID"):
        await gateway.open_trade(trade())


async def test_closing_is_204_or_a_trade_wechatpay_does_not_know(
    gateway: WechatPayGateway, wire: Wire
) -> None:
    wire.on("POST", CLOSE, 204)
    assert (await gateway.close_trade("po_order-42", "po_order-42")).closed
    assert wire.sent[-1] == ("POST", CLOSE, {"mchid": MCHID})
    wire.on("POST", CLOSE, 404, {"code": "ORDER_NOT_EXIST", "message": "订单不存在"})
    assert (await gateway.close_trade("po_order-42")).closed


async def test_a_paid_trade_refuses_to_close_and_its_payment_settles_the_order(
    gateway: WechatPayGateway, wire: Wire
) -> None:
    wire.on("POST", CLOSE, 400, {"code": "ORDERPAID", "message": "订单已支付"})
    for state in ("SUCCESS", "REFUND"):
        wire.on("GET", BY_NO, 200, transaction(trade_state=state))
        result = await gateway.close_trade("po_order-42")
        assert not result.closed and result.capture is not None
        assert (result.capture.txn_id, result.capture.pay_order_no) == (TXN, "po_order-42")
        assert (result.capture.amount, result.capture.currency) == (1999, "CNY")
        assert result.capture.captured_at == datetime(2026, 12, 6, 2, 59, 57, tzinfo=UTC)
    wire.on("GET", BY_NO, 200, transaction(trade_state="CLOSED"))
    assert (await gateway.close_trade("po_order-42")).closed
    wire.on("GET", BY_NO, 200, transaction(trade_state="NOTPAY"))
    with pytest.raises(GatewayAmbiguous, match="trade NOTPAY"):
        await gateway.close_trade("po_order-42")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (500, {"code": "SYSTEM_ERROR", "message": "系统错误"}, GatewayAmbiguous),
        (502, None, GatewayAmbiguous),
        (429, {"code": "FREQUENCY_LIMITED", "message": "频率超限"}, GatewayUnavailable),
        (401, {"code": "SIGN_ERROR", "message": "签名错误"}, GatewayUnavailable),
        (400, {"code": "PARAM_ERROR", "message": "参数错误"}, GatewayUnavailable),
        (400, {"code": "SOMETHING_NEW"}, GatewayAmbiguous),
    ],
)
async def test_an_answer_that_proves_nothing_is_never_the_refusal_of_the_money(
    gateway: WechatPayGateway,
    wire: Wire,
    status: int,
    body: dict[str, str] | None,
    error: type[Exception],
) -> None:
    wire.on("POST", CLOSE, status, body)
    with pytest.raises(error):
        await gateway.close_trade("po_order-42")
    wire.on("GET", REFUND_BY_NO, status, body)
    with pytest.raises(error):
        await gateway.refund(refund_request())


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (requests.ConnectTimeout("connect timed out"), GatewayUnavailable),
        (
            requests.ConnectionError(
                urllib3.exceptions.MaxRetryError(
                    None,  # type: ignore[arg-type]
                    "/",
                    urllib3.exceptions.NewConnectionError(None, "Connection refused"),  # type: ignore[arg-type]
                )
            ),
            GatewayUnavailable,
        ),
        (requests.ReadTimeout("read timed out"), GatewayAmbiguous),
        (requests.ConnectionError("Connection reset by peer"), GatewayAmbiguous),
    ],
)
async def test_a_failure_on_the_way_is_unavailable_only_before_anything_was_sent(
    gateway: WechatPayGateway, wire: Wire, failure: Exception, error: type[Exception]
) -> None:
    wire.fail("POST", CLOSE, failure)
    with pytest.raises(error):
        await gateway.close_trade("po_order-42")


async def test_an_answer_signed_by_another_key_is_not_believed(
    gateway: WechatPayGateway, wire: Wire, keys: Keys
) -> None:
    wire.key = keys[2]
    wire.on("POST", NATIVE, 200, {"code_url": "weixin://wxpay/bizpayurl?pr=forged"})
    with pytest.raises(GatewayAmbiguous, match="does not verify"):
        await gateway.open_trade(trade())
    wire.on("GET", REFUND_BY_NO, 200, refund_answer("SUCCESS"))
    with pytest.raises(GatewayAmbiguous, match="does not verify"):
        await gateway.refund(refund_request())


async def test_a_refund_is_sent_once_with_the_transactions_total_then_read_by_its_number(
    gateway: WechatPayGateway, wire: Wire
) -> None:
    wire.on("GET", REFUND_BY_NO, 404, NOT_FOUND)
    wire.on("GET", BY_ID, 200, transaction(amount={"total": 2500, "currency": "CNY"}))
    wire.on(
        "POST",
        REFUNDS,
        200,
        refund_answer("SUCCESS", amount={"refund": 1999, "total": 2500, "currency": "CNY"}),
    )
    refund = await gateway.refund(refund_request())
    assert refund.status is RefundStatus.SUCCEEDED
    assert (refund.idempotency_key, refund.txn_id, refund.amount) == (KEY, TXN, 1999)
    assert refund.gateway_refund_id == "50000000382019052709732678859"
    assert wire.sent[-1] == (
        "POST",
        REFUNDS,
        {
            "notify_url": "https://shop.example.cn/v1/webhooks/wechatpay",
            "out_refund_no": KEY,
            "amount": {"refund": 1999, "total": 2500, "currency": "CNY"},
            "transaction_id": TXN,
        },
    )
    wire.sent.clear()
    wire.on("GET", REFUND_BY_NO, 200, refund_answer("SUCCESS"))
    assert (await gateway.refund(refund_request())).status is RefundStatus.SUCCEEDED
    assert [(m, p) for m, p, _ in wire.sent] == [("GET", REFUND_BY_NO)]  # never sent twice


async def test_a_refund_beyond_the_capture_or_of_an_unpaid_trade_is_refused_unsent(
    gateway: WechatPayGateway, wire: Wire
) -> None:
    wire.on("GET", REFUND_BY_NO, 404, NOT_FOUND)
    wire.on("GET", BY_ID, 200, transaction())
    with pytest.raises(GatewayRejected, match="more than"):
        await gateway.refund(refund_request(amount=2000))
    wire.on("GET", BY_ID, 404, {"code": "ORDER_NOT_EXIST", "message": "订单不存在"})
    with pytest.raises(GatewayRejected, match="no paid transaction"):
        await gateway.refund(refund_request())
    assert ("POST", REFUNDS) not in [(m, p) for m, p, _ in wire.sent]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("PROCESSING", RefundStatus.PENDING),
        ("ABNORMAL", GatewayUnavailable),
        ("CLOSED", GatewayRejected),
        ("SOMETHING_NEW", GatewayAmbiguous),
    ],
)
async def test_each_refund_status_has_one_outcome(
    gateway: WechatPayGateway, wire: Wire, status: str, outcome: RefundStatus | type[Exception]
) -> None:
    wire.on("GET", REFUND_BY_NO, 404, NOT_FOUND)
    wire.on("GET", BY_ID, 200, transaction())
    wire.on("POST", REFUNDS, 200, refund_answer(status))
    if isinstance(outcome, RefundStatus):
        assert (await gateway.refund(refund_request())).status is outcome
    else:
        with pytest.raises(outcome, match=status):
            await gateway.refund(refund_request())


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("USER_ACCOUNT_ABNORMAL", GatewayRejected),
        ("INVALID_REQUEST", GatewayRejected),
        ("NOT_ENOUGH", GatewayUnavailable),
        ("SYSTEM_ERROR", GatewayAmbiguous),
    ],
)
async def test_a_refused_refund_says_why(
    gateway: WechatPayGateway, wire: Wire, code: str, error: type[Exception]
) -> None:
    wire.on("GET", REFUND_BY_NO, 404, NOT_FOUND)
    wire.on("GET", BY_ID, 200, transaction())
    wire.on(
        "POST", REFUNDS, 500 if code == "SYSTEM_ERROR" else 403, {"code": code, "message": "..."}
    )
    with pytest.raises(error, match=code):
        await gateway.refund(refund_request())


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("SUCCESS", RefundStatus.SUCCEEDED),
        ("PROCESSING", RefundStatus.PENDING),
        ("ABNORMAL", RefundStatus.PENDING),
        ("CLOSED", RefundStatus.REJECTED),
    ],
)
async def test_a_refund_is_read_by_its_out_refund_no(
    gateway: WechatPayGateway, wire: Wire, status: str, outcome: RefundStatus
) -> None:
    wire.on("GET", REFUND_BY_NO, 200, refund_answer(status))
    found = await gateway.query_refund(KEY, TXN)
    assert found is not None and found.status is outcome
    assert await gateway.query_refund(KEY, "4200000000202612060000000002") is None
    wire.on("GET", REFUND_BY_NO, 404, NOT_FOUND)
    assert await gateway.query_refund(KEY, TXN) is None


async def test_a_long_key_is_sent_as_its_digest(gateway: WechatPayGateway, wire: Wire) -> None:
    long_key = "refund-po_" + "x" * 40 + "-" + TXN
    path = f"{REFUNDS}/{out_refund_no_of(long_key)}"
    wire.on("GET", path, 200, refund_answer("SUCCESS", out_refund_no=out_refund_no_of(long_key)))
    found = await gateway.query_refund(long_key, TXN)
    assert found is not None and found.idempotency_key == long_key


async def test_a_capture_is_a_paid_transaction(gateway: WechatPayGateway, wire: Wire) -> None:
    for state, paid in [("SUCCESS", True), ("REFUND", True), ("NOTPAY", False), ("CLOSED", False)]:
        wire.on("GET", BY_ID, 200, transaction(trade_state=state))
        assert (await gateway.query_capture(TXN) is not None) is paid
    wire.on("GET", BY_ID, 404, {"code": "ORDER_NOT_EXIST", "message": "订单不存在"})
    assert await gateway.query_capture(TXN) is None
    assert await gateway.query_capture("../refund") is None
    assert await gateway.refunds_of(TXN) == []


class Book:
    def __init__(self, nos: list[str], in_flight: list[tuple[str, str, str]]) -> None:
        self.nos, self.in_flight = nos, in_flight
        self.asked: list[tuple[str, float]] = []

    async def trades_payable_in(
        self, gateway: str, start: datetime, end: datetime, *, grace_s: float
    ) -> list[str]:
        self.asked.append((gateway, grace_s))
        return self.nos

    async def refunds_in_flight_of(self, pay_order_nos: list[str]) -> list[tuple[str, str, str]]:
        return self.in_flight


async def test_the_statement_is_read_trade_by_trade_through_the_book(
    config: WechatPayConfig, wire: Wire
) -> None:
    book = Book(["po_order-42", "po_order-43"], [(KEY, "po_order-42", TXN)])
    gw = WechatPayGateway(config, client_timeout_s=1, book=book)
    wire.on("GET", BY_NO, 200, transaction())
    wire.on(
        "GET",
        f"/v3/pay/transactions/out-trade-no/po_order-43?mchid={MCHID}",
        404,
        {"code": "ORDER_NOT_EXIST"},
    )
    wire.on("GET", REFUND_BY_NO, 200, refund_answer("SUCCESS"))
    try:
        stmt = await gw.statement(NOW - timedelta(hours=1), NOW)
        later = await gw.statement(NOW, NOW + timedelta(hours=1))
    finally:
        await gw.aclose()
    assert [(c.txn_id, c.pay_order_no) for c in stmt.captures] == [(TXN, "po_order-42")]
    assert later.captures == []  # paid before that window
    assert [r.idempotency_key for r in stmt.refunds] == [KEY]
    assert book.asked[0] == ("wechatpay", wechatpay.TIME_GRAIN_S)


async def test_no_statement_without_a_book(gateway: WechatPayGateway) -> None:
    with pytest.raises(GatewayUnavailable, match="no trade book"):
        await gateway.statement(NOW - timedelta(hours=1), NOW)

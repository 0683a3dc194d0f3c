"""The Alipay adapter's pure parts: yuan on the wire, China time, every code's outcome, and
every kind of notification (good, unsigned, signed by another key, another app, stale, not
a form, a refund, a status that moves no money), signed as Alipay signs and checked by the
SDK's own verification."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
from Cryptodome.Hash import SHA256
from Cryptodome.PublicKey import RSA
from Cryptodome.Signature import pkcs1_15

from payorders.core.settings import Settings
from payorders.gateways import alipay
from payorders.gateways.alipay import (
    AlipayConfig,
    AlipayGateway,
    AlipayKeyRefused,
    Outcome,
    china_time,
    from_china_time,
    from_yuan,
    outcome_of,
    to_yuan,
)
from payorders.gateways.factory import GatewayNotConfigured, alipay_config
from payorders.service import alipay_webhook
from payorders.service.webhook import PaymentEvent, RefundNotice, WebhookRejected

APP_ID = "2021000000000001"
NOW = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)  # 11:00 in China


@pytest.mark.parametrize(
    ("fen", "yuan"),
    [(1, "0.01"), (10, "0.10"), (99, "0.99"), (100, "1.00"), (1999, "19.99"),
     (100_000_000 * 100, "100000000.00")],
)  # fmt: skip
def test_fen_and_yuan_convert_both_ways_at_every_boundary(fen: int, yuan: str) -> None:
    assert to_yuan(fen) == yuan
    assert from_yuan(yuan) == fen


@pytest.mark.parametrize("fen", [0, -1, 100_000_000 * 100 + 1, True, 1.5, "100"])
def test_what_alipay_cannot_take_is_refused(fen: object) -> None:
    with pytest.raises(ValueError, match="Alipay takes 1 to"):
        to_yuan(fen)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["1", "1.0", "1.000", "01.00", "-1.00", "1e2", " 1.00", "", None])
def test_only_alipays_yuan_shape_is_read(text: object) -> None:
    with pytest.raises(ValueError, match="two decimals"):
        from_yuan(text)


def test_times_are_china_time_to_the_second() -> None:
    at = datetime(2026, 12, 6, 3, 0, 0, 900_000, tzinfo=UTC)
    assert china_time(at) == "2026-12-06 11:00:00"
    assert from_china_time("2026-12-06 11:00:00") == at.replace(microsecond=0)
    with pytest.raises(ValueError):
        from_china_time("2026-12-06T11:00:00")


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ({"code": "10000"}, Outcome.DONE),
        ({"code": "20000", "sub_code": "isp.unknow-error"}, Outcome.UNKNOWN),
        ({"code": "40004", "sub_code": "ACQ.SYSTEM_ERROR"}, Outcome.UNKNOWN),
        ({"code": "40004", "sub_code": "ACQ.TRADE_NOT_EXIST"}, Outcome.NOT_EXIST),
        ({"code": "40004", "sub_code": "ACQ.TRADE_STATUS_ERROR"}, Outcome.STATUS),
        ({"code": "40004", "sub_code": "ACQ.REASON_TRADE_STATUS_INVALID"}, Outcome.STATUS),
        ({"code": "40004", "sub_code": "ACQ.REASON_ILLEGAL_STATUS"}, Outcome.STATUS),
        ({"code": "40004", "sub_code": "ACQ.TRADE_HAS_CLOSE"}, Outcome.STATUS),
        ({"code": "40004", "sub_code": "ACQ.SELLER_BALANCE_NOT_ENOUGH"}, Outcome.RETRY_LATER),
        ({"code": "40004", "sub_code": "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"}, Outcome.REFUSED),
        ({"code": "40004", "sub_code": "ACQ.TRADE_HAS_FINISHED"}, Outcome.REFUSED),
        ({"code": "40002", "sub_code": "isv.invalid-signature"}, Outcome.MISCONFIGURED),
        ({"code": "40001", "sub_code": "isv.missing-signature"}, Outcome.MISCONFIGURED),
        ({"code": "40006"}, Outcome.MISCONFIGURED),
        ({"code": "99999"}, Outcome.UNKNOWN),
        ({}, Outcome.UNKNOWN),
    ],
)
def test_each_code_has_one_outcome(answer: dict[str, str], outcome: Outcome) -> None:
    assert outcome_of(answer) is outcome


# --- notifications --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> Iterator[tuple[RSA.RsaKey, RSA.RsaKey, RSA.RsaKey]]:
    """The app's key pair, Alipay's, and a stranger's."""
    yield RSA.generate(2048), RSA.generate(2048), RSA.generate(2048)


@pytest.fixture(scope="module")
def gateway(keys: tuple[RSA.RsaKey, RSA.RsaKey, RSA.RsaKey]) -> AlipayGateway:
    app, alipay, _ = keys
    return AlipayGateway(
        AlipayConfig(
            app_id=APP_ID,
            private_key_pem=app.export_key().decode(),
            alipay_public_key_pem=alipay.publickey().export_key().decode(),
            notify_url="http://127.0.0.1:8000/v1/webhooks/alipay",
            gateway_url="http://127.0.0.1:1/gateway.do",
        ),
        client_timeout_s=1,
    )


def signed(params: dict[str, str], key: RSA.RsaKey) -> dict[str, str]:
    """Sign as Alipay signs a notification: every parameter but sign and sign_type, sorted,
    ``k=v`` joined by ``&``, SHA256withRSA, base64."""
    text = "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in ("sign_type",))
    sign = pkcs1_15.new(key).sign(SHA256.new(text.encode()))
    return {**params, "sign_type": "RSA2", "sign": base64.b64encode(sign).decode()}


def notification(**changes: str) -> dict[str, str]:
    base = {
        "notify_time": "2026-12-06 10:59:58",
        "notify_type": "trade_status_sync",
        "notify_id": "ac05099524730693a8b330c5ecf72da9786",
        "app_id": APP_ID,
        "charset": "utf-8",
        "version": "1.0",
        "trade_no": "2026120622001404000000000001",
        "out_trade_no": "pd_order_d42",  # po_order-42's (out_trade_no_of)
        "trade_status": "TRADE_SUCCESS",
        "total_amount": "19.99",
        "receipt_amount": "19.99",
        "gmt_create": "2026-12-06 10:58:00",
        "gmt_payment": "2026-12-06 10:59:57",
    }
    return {**base, **changes}


def read(gateway: AlipayGateway, form: dict[str, str]) -> object:
    return alipay_webhook.read_notification(
        alipay_webhook.form_of(urlencode(form).encode()),
        verify=gateway.verify_notification,
        app_id=APP_ID,
        now=NOW,
        max_age_s=2 * 86400,
    )


def test_a_payment_signed_by_alipay_is_read(
    gateway: AlipayGateway, keys: tuple[RSA.RsaKey, RSA.RsaKey, RSA.RsaKey]
) -> None:
    event = read(gateway, signed(notification(), keys[1]))
    assert event == PaymentEvent(
        event_id="alipay-ac05099524730693a8b330c5ecf72da9786",
        pay_order_no="po_order-42",
        txn_id="2026120622001404000000000001",
        amount=1999,
        currency="CNY",
        paid_at=datetime(2026, 12, 6, 2, 59, 57, tzinfo=UTC),
    )


def test_a_refund_notification_names_only_its_trade(
    gateway: AlipayGateway, keys: tuple[RSA.RsaKey, RSA.RsaKey, RSA.RsaKey]
) -> None:
    form = notification(
        trade_status="TRADE_CLOSED", refund_fee="19.99", gmt_refund="2026-12-06 10:59:59",
        out_biz_no="mrefund-r-1",
    )  # fmt: skip
    event = read(gateway, signed(form, keys[1]))
    assert isinstance(event, RefundNotice) and event.txn_id == form["trade_no"]


@pytest.mark.parametrize("status", ["WAIT_BUYER_PAY", "TRADE_CLOSED", "TRADE_FINISHED"])
def test_a_status_that_is_no_payment_moves_nothing(
    gateway: AlipayGateway, keys: tuple[RSA.RsaKey, RSA.RsaKey, RSA.RsaKey], status: str
) -> None:
    event = read(gateway, signed(notification(trade_status=status), keys[1]))
    assert event == alipay_webhook.IgnoredNotification(
        event_id="alipay-ac05099524730693a8b330c5ecf72da9786", trade_status=status
    )


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("unsigned", 401, "missing_signature"),
        ("signed by another key", 401, "bad_signature"),
        ("signed, then changed", 401, "bad_signature"),
        ("another app_id", 400, "invalid_event"),
        ("stale", 401, "stale_timestamp"),
        ("from the future", 401, "stale_timestamp"),
        ("no notify_id", 400, "invalid_event"),
        ("no out_trade_no", 400, "invalid_event"),
        ("amount not in yuan", 400, "invalid_event"),
        ("out_trade_no no pay order's", 404, "unknown_pay_order"),
        ("sign_type RSA", 401, "bad_signature"),
    ],
)
def test_a_bad_notification_is_refused_for_its_reason(
    gateway: AlipayGateway,
    keys: tuple[RSA.RsaKey, RSA.RsaKey, RSA.RsaKey],
    case: str,
    status: int,
    code: str,
) -> None:
    alipay, stranger = keys[1], keys[2]
    good = notification()
    form = {
        "unsigned": good,
        "signed by another key": signed(good, stranger),
        "signed, then changed": {**signed(good, alipay), "total_amount": "0.01"},
        "another app_id": signed(notification(app_id="2021000000000002"), alipay),
        "stale": signed(notification(notify_time="2026-12-04 10:59:59"), alipay),
        "from the future": signed(notification(notify_time="2026-12-06 11:06:00"), alipay),
        "no notify_id": signed({k: v for k, v in good.items() if k != "notify_id"}, alipay),
        "no out_trade_no": signed({k: v for k, v in good.items() if k != "out_trade_no"}, alipay),
        "amount not in yuan": signed(notification(total_amount="1999"), alipay),
        "sign_type RSA": {**signed(good, alipay), "sign_type": "RSA"},
        "out_trade_no no pay order's": signed(notification(out_trade_no="T2026"), alipay),
    }[case]
    with pytest.raises(WebhookRejected) as refused:
        read(gateway, form)
    assert (refused.value.status, refused.value.code) == (status, code), refused.value.reason


@pytest.mark.parametrize(
    "body", [b'{"trade_status": "TRADE_SUCCESS"}', b"\xff\xfe", b"a=1&a=2", b"=x"]
)
def test_what_is_not_a_form_is_refused(body: bytes) -> None:
    with pytest.raises(WebhookRejected) as refused:
        alipay_webhook.form_of(body)
    assert (refused.value.status, refused.value.code) == (400, "malformed_body")


def test_a_key_that_is_no_key_is_refused_in_one_line() -> None:
    with pytest.raises(AlipayKeyRefused, match="not an RSA key in PEM"):
        AlipayGateway(
            AlipayConfig(
                app_id=APP_ID,
                private_key_pem="-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----",
                alipay_public_key_pem="nope",
                notify_url="http://127.0.0.1:8000/v1/webhooks/alipay",
            ),
            client_timeout_s=1,
        )


def test_notify_time_window_is_now_minus_the_max_age() -> None:
    assert NOW - timedelta(days=2) < from_china_time("2026-12-04 11:00:01")


def test_each_missing_or_malformed_part_of_the_configuration_is_named(tmp_path: Path) -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----"
    good = {
        "gateway": "alipay",
        "alipay_app_id": APP_ID,
        "alipay_private_key": pem.replace("PUBLIC", "PRIVATE"),
        "alipay_public_key": pem,
        "alipay_notify_url": "https://shop.example.cn/v1/webhooks/alipay",
    }
    assert alipay_config(Settings(**good)).app_id == APP_ID  # type: ignore[arg-type]
    missing_file = tmp_path / "absent.pem"
    for change, says in [
        ({"alipay_app_id": None}, "set PAYORDERS_ALIPAY_APP_ID"),
        ({"alipay_notify_url": None}, "set PAYORDERS_ALIPAY_NOTIFY_URL"),
        ({"alipay_private_key": None}, "set PAYORDERS_ALIPAY_PRIVATE_KEY (or"),
        ({"alipay_public_key": "not a key"}, "PAYORDERS_ALIPAY_PUBLIC_KEY (or"),
        ({"alipay_public_key_file": missing_file}, "not both"),
        ({"alipay_public_key": None, "alipay_public_key_file": missing_file}, "cannot read"),
    ]:
        with pytest.raises(GatewayNotConfigured, match=re.escape(says)):
            alipay_config(Settings(**{**good, **change}))  # type: ignore[arg-type]


def test_a_process_refuses_to_start_on_a_key_the_sdk_cannot_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from payorders import runtime

    pem = "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----"
    for name, value in {
        "PAYORDERS_GATEWAY": "alipay",
        "PAYORDERS_ALIPAY_APP_ID": APP_ID,
        "PAYORDERS_ALIPAY_PRIVATE_KEY": pem,
        "PAYORDERS_ALIPAY_PUBLIC_KEY": pem.replace("PRIVATE", "PUBLIC"),
        "PAYORDERS_ALIPAY_NOTIFY_URL": "https://shop.example.cn/v1/webhooks/alipay",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        runtime.settings_or_exit("worker")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("payorders worker: cannot start: gateway alipay: an Alipay key is not")
    assert "broken" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("pay_order_no", "out_trade_no"),
    [
        ("po_order42", "po_order42"),
        ("po_order_42", "po_order_42"),
        ("po_order-42", "pd_order_d42"),
        ("po_a_b-c", "pd_a__b_dc"),
        ("po_-", "pd__d"),
        ("po_" + "x" * 61, "po_" + "x" * 61),
        ("po_" + "x" * 59 + "-", "pd_" + "x" * 59 + "_d"),
    ],
)
def test_a_pay_order_number_becomes_an_out_trade_no_alipay_takes_and_back(
    pay_order_no: str, out_trade_no: str
) -> None:
    assert alipay.out_trade_no_of(pay_order_no) == out_trade_no
    assert re.fullmatch(r"[A-Za-z0-9_]{1,64}", out_trade_no)
    assert alipay.pay_order_no_of(out_trade_no) == pay_order_no


@pytest.mark.parametrize(
    "pay_order_no",
    [
        "po_" + "x" * 62,
        "po_" + "x" * 60 + "-",
        "po_" + "-" * 31,
        "order-42",
        "po_",
        "po_a b",
        "po_é",
    ],
)
def test_a_pay_order_number_alipay_cannot_take_is_refused(pay_order_no: str) -> None:
    with pytest.raises(ValueError):
        alipay.out_trade_no_of(pay_order_no)


@pytest.mark.parametrize(
    "out_trade_no",
    ["T2026", "pd_order__42", "pd_order_x42", "pd_order_", "pd_", "po_", "po-1", "pd_a-b", ""],
)
def test_an_out_trade_no_no_pay_order_of_ours_has_is_none(out_trade_no: str) -> None:
    """Only the images of out_trade_no_of read back: pd_order__42 would be po_order_42,
    which is written as it is."""
    assert alipay.pay_order_no_of(out_trade_no) is None


def test_checkout_on_alipay_refuses_another_currency_and_a_number_too_long() -> None:
    assert alipay.refusal("po_order-42", "CNY") is None
    assert "CNY only" in (alipay.refusal("po_order-42", "USD") or "")
    assert "64 characters" in (alipay.refusal("po_" + "a-" * 31, "CNY") or "")

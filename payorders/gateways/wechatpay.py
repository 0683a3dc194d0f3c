"""The WeChat Pay adapter: the gateway port over WeChat Pay's API v3, signed, verified and
decrypted by the ``wechatpayv3`` package in "WeChat Pay public key" mode; this module never
computes a signature nor decrypts anything itself.

A pay order is one Native trade (``POST /v3/pay/transactions/native``, a ``code_url`` for
the QR code): ``out_trade_no`` is the pay order number where WeChat Pay takes it as it is
(6 to 32 characters), else a digest of it (``out_trade_no_of``); the pay order number
always travels in ``attach`` too, so every answer and callback reads back to its pay order
(``pay_order_no_of``). ``time_expire`` is our expiry, so WeChat Pay itself refuses a payment
after it. WeChat Pay's ``transaction_id`` is our ``txn_id``. Money is fen on the wire as it
is here (``amount.total``, an int); WeChat Pay takes CNY only.

The SDK is synchronous (requests): its calls run in a small thread pool of this adapter's
own, so they never block the event loop nor take the threads others need. WeChat Pay's
HTTP statuses and ``code`` values become the port's outcomes in ``outcome_of`` and nowhere
else:
- 2xx done (the SDK verified its signature: an answer that fails is never believed);
- 5xx, ``SYSTEM_ERROR`` and ``BANK_ERROR`` say nothing about whether the work was done
  (``GatewayAmbiguous``: read the trade or refund back, then retry with the same numbers);
- 429 ``FREQUENCY_LIMITED`` is a refusal before any work (``GatewayUnavailable``);
- 401 ``SIGN_ERROR``, ``PARAM_ERROR``, ``NO_AUTH``, ``MCH_NOT_EXISTS`` and
  ``APPID_MCHID_NOT_MATCH`` mean our request or keys are wrong: retried and logged as
  errors, never taken for WeChat Pay's refusal of the money;
- ``ORDER_NOT_EXIST``/``RESOURCE_NOT_EXISTS`` name no such trade or refund;
- ``ORDERPAID``, ``ORDER_CLOSED``, ``OUT_TRADE_NO_USED`` say the trade is not in a state
  that allows the call: it is read back (``trade_state``) and that decides;
- ``INVALID_REQUEST``, ``RULE_LIMIT``, ``TRADE_ERROR``, ``USER_ACCOUNT_ABNORMAL`` are
  documented, final business refusals; ``NOT_ENOUGH`` (the merchant's balance) is retried.

A timeout, a connection lost after sending, or an answer whose signature does not verify
(``GatewayAmbiguous``, logged as an error) proves nothing. Only 2xx answers carry a
signature the SDK checks; an error answer is taken as the TLS connection delivered it. A
close refused for the trade's state is read back from a verified answer; a close answered
``ORDER_NOT_EXIST`` is closed without one (a query would answer the same, unsigned too).

Refunds (``/v3/refund/domestic/refunds``, ``out_refund_no`` = our key, or a digest of it
where it is too long: ``out_refund_no_of``) are read back by that number before any
request, so a retry never sends a second one: ``SUCCESS`` is done, ``PROCESSING`` is
pending (the port's ``PENDING``: retried), ``CLOSED`` is a final refusal, and ``ABNORMAL``
(the money could not reach the buyer's account; the merchant finishes it at WeChat Pay,
under the same refund) is neither done nor final: it stays in flight and is asked about
again until WeChat Pay says ``SUCCESS`` or ``CLOSED``, logged as an error each time
(REFUND.ABNORMAL: the merchant "手动处理此笔退款" at its platform's 交易中心, or by 发起异常退款,
``/v3/refund/domestic/refunds/{refund_id}/apply-abnormal-refund``, which keeps the refund's
``out_refund_no``: https://wechatpay.im/webhook/v3/REFUND.ABNORMAL, a mirror of the page).

Pages (WeChat Pay's merchant docs, API v3; each lists its error codes at its foot):
Native 下单 https://pay.weixin.qq.com/doc/v3/merchant/4012791877, 微信支付订单号查询订单
.../4012791879, 商户订单号查询订单 .../4012791880, 关闭订单 .../4012791881, 退款申请
.../4012791883, 查询单笔退款 .../4012791884, 通用参数说明 (``out_trade_no``'s characters)
.../4012068676, 签名认证 .../4012365342.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from urllib3.exceptions import NewConnectionError
from wechatpayv3 import WeChatPay, WeChatPayType
from wechatpayv3.utils import load_private_key, load_public_key, rsa_verify

from payorders.core.domain import RefundStatus
from payorders.core.models import Checkout
from payorders.gateways.port import (
    Capture,
    CloseResult,
    GatewayAmbiguous,
    GatewayError,
    GatewayRefund,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
    Statement,
    TradeBook,
)
from payorders.gateways.telemetry import CALLS, OBSERVED

log = logging.getLogger(__name__)

PRODUCTION_GATEWAY = "https://api.mch.weixin.qq.com"
CURRENCY = "CNY"
CHINA = timezone(timedelta(hours=8))
MAX_FEN = 2**31 - 1
"""``amount.total`` and ``amount.refund`` are ints (32 bits in WeChat Pay's own SDKs)."""
SDK_THREADS = 8
"""Calls in flight at WeChat Pay at once from one process (each holds a thread)."""
TIME_GRAIN_S = 1.0
"""``time_expire`` is written to the second (truncated): WeChat Pay may take a payment up to
this long after our expiry."""

PAY_ORDER_PREFIX = "po_"
"""Every pay order number starts with it (``domain.pay_order_no_for``)."""
DIGEST_PREFIX = "ph_"
"""An ``out_trade_no`` that is a digest of its pay order number (``out_trade_no_of``)."""
REFUND_DIGEST_PREFIX = "rh_"
"""An ``out_refund_no`` that is a digest of our refund key (``out_refund_no_of``)."""
_PAY_ORDER_NO = re.compile(r"po_[A-Za-z0-9_-]{1,64}")
# 商户订单号: "6-32个字符内" and "只能是数字、大小写字母_-|*" (Native 下单, 通用参数说明).
_OUT_TRADE_NO = re.compile(r"[A-Za-z0-9_\-|*]{6,32}")
# 商户退款单号: "只能是数字、大小写字母_-|*@", at most 64 (退款申请).
_OUT_REFUND_NO = re.compile(r"[A-Za-z0-9_\-|*@]{1,64}")
_TRANSACTION_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_DIGEST_HEX = 29  # 3 + 29 = 32 characters, 116 bits


def out_trade_no_of(pay_order_no: str) -> str:
    """The WeChat Pay ``out_trade_no`` of a pay order: its number where WeChat Pay takes it
    as it is (6 to 32 characters: ``po_order42``); else ``ph_`` and the first 29 hex digits
    of its SHA-256 (``po_a``, or an order number longer than 29 characters). A digest never
    starts ``po_``, so it cannot be another pay order's number; the pay order number rides
    in ``attach`` beside it, which ``pay_order_no_of`` checks against this digest.

    Raises:
        ValueError: not a pay order number (``po_`` and 1-64 of ``A-Z a-z 0-9 _ -``).
    """
    if not isinstance(pay_order_no, str) or not _PAY_ORDER_NO.fullmatch(pay_order_no):
        raise ValueError(f"not a pay order number: {pay_order_no!r}")
    if _OUT_TRADE_NO.fullmatch(pay_order_no):
        return pay_order_no
    return DIGEST_PREFIX + hashlib.sha256(pay_order_no.encode()).hexdigest()[:_DIGEST_HEX]


def pay_order_no_of(transaction: Mapping[str, Any]) -> str | None:
    """The pay order of a trade, from a transaction (an answer or a callback's resource):
    its ``out_trade_no`` when that is a pay order number as ``out_trade_no_of`` writes it,
    else its ``attach`` when ``out_trade_no_of(attach)`` is its ``out_trade_no``; None for
    a trade no pay order of ours opened (or a digest without its ``attach``)."""
    out_trade_no = transaction.get("out_trade_no")
    if not isinstance(out_trade_no, str):
        return None
    if _PAY_ORDER_NO.fullmatch(out_trade_no) and out_trade_no_of(out_trade_no) == out_trade_no:
        return out_trade_no
    attach = transaction.get("attach")
    if (
        isinstance(attach, str)
        and _PAY_ORDER_NO.fullmatch(attach)
        and out_trade_no_of(attach) == out_trade_no
    ):
        return attach
    return None


def is_digest(out_trade_no: object) -> bool:
    """Whether an ``out_trade_no`` has the shape of ``out_trade_no_of``'s digests (a refund
    callback names the trade by it without the ``attach`` that reads it back)."""
    return (
        isinstance(out_trade_no, str)
        and len(out_trade_no) == len(DIGEST_PREFIX) + _DIGEST_HEX
        and out_trade_no.startswith(DIGEST_PREFIX)
        and all(c in "0123456789abcdef" for c in out_trade_no[len(DIGEST_PREFIX) :])
    )


def out_refund_no_of(key: str) -> str:
    """The ``out_refund_no`` of one of our refund keys: the key where WeChat Pay takes it
    (at most 64 of its characters); else ``rh_`` and 61 hex digits of its SHA-256 (a
    ``refund-{pay_order_no}-{txn_id}`` of a long order number). Keys start ``refund-`` or
    ``mrefund-``: a digest is never a key.

    Raises:
        ValueError: no key.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"not a refund key: {key!r}")
    if _OUT_REFUND_NO.fullmatch(key):
        return key
    return REFUND_DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:61]


def refusal(pay_order_no: str, currency: str) -> str | None:
    """Why WeChat Pay cannot take this pay order's trade (for checkout to answer before
    anything is written), or None."""
    if currency != CURRENCY:
        return f"currency: WeChat Pay takes {CURRENCY} only, not {currency}"
    try:
        out_trade_no_of(pay_order_no)
    except ValueError as e:
        return f"order_no: {e}"
    return None


def china_time(at: datetime) -> str:
    """An instant as WeChat Pay's ``time_expire`` takes it: RFC 3339 in China time, to the
    second (truncated): ``2026-12-06T11:00:00+08:00``."""
    return at.astimezone(CHINA).replace(microsecond=0).isoformat()


def from_rfc3339(text: object) -> datetime:
    """WeChat Pay's RFC 3339 times (``success_time``, ``create_time``) as aware UTC.

    Raises:
        ValueError: not an RFC 3339 time with its offset.
    """
    if not isinstance(text, str) or "T" not in text:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:
        raise ValueError(f"an RFC 3339 time needs its offset: {text!r}")
    return at.astimezone(UTC)


def _fen(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FEN:
        raise ValueError(f"WeChat Pay takes 1 to {MAX_FEN} fen, not {value!r}")
    return value


class Outcome(Enum):
    """What a WeChat Pay answer means for the call that got it."""

    DONE = "done"
    UNKNOWN = "unknown"
    """Nothing can be concluded: read it back, or retry with the same numbers."""
    NOT_EXIST = "not_exist"
    """No such trade (``ORDER_NOT_EXIST``) or refund (``RESOURCE_NOT_EXISTS``)."""
    STATUS = "status"
    """The trade is not in a state that allows the call (paid, closed, opened otherwise)."""
    RETRY_LATER = "retry_later"
    """Refused before any work, for now (rate limit, the merchant's balance)."""
    MISCONFIGURED = "misconfigured"
    """Our request or keys are wrong: no answer about the money."""
    REFUSED = "refused"
    """A documented, final business refusal."""


# The codes of the pages named in the module's text, and the API v2 spellings some answers
# still carry (``ORDERPAID``, ``SYSTEMERROR``, ...).
_UNKNOWN_CODES = frozenset({"SYSTEM_ERROR", "SYSTEMERROR", "BANK_ERROR", "BIZERR_NEED_RETRY"})
_LATER_CODES = frozenset({"FREQUENCY_LIMITED", "NOT_ENOUGH", "NOTENOUGH", "ORDER_NOT_READY"})
_MISCONFIGURED_CODES = frozenset(
    {
        "SIGN_ERROR",
        "PARAM_ERROR",
        "NO_AUTH",
        "NOAUTH",
        "MCH_NOT_EXISTS",
        "APPID_MCHID_NOT_MATCH",
    }
)
_NOT_EXIST_CODES = frozenset({"ORDER_NOT_EXIST", "ORDERNOTEXIST", "RESOURCE_NOT_EXISTS"})
_STATUS_CODES = frozenset(
    {"ORDERPAID", "ORDER_PAID", "ORDER_CLOSED", "ORDERCLOSED", "OUT_TRADE_NO_USED"}
)
_REFUSED_CODES = frozenset(
    {"INVALID_REQUEST", "RULE_LIMIT", "TRADE_ERROR", "USER_ACCOUNT_ABNORMAL"}
)


def outcome_of(status: int, body: Mapping[str, Any]) -> Outcome:
    """The one place WeChat Pay's HTTP status and ``code`` become our outcomes (the codes
    of the pages named in the module's text). A 5xx is unknown whatever its code; a code we
    do not know proves nothing."""
    code = str(body.get("code") or "")
    if 200 <= status < 300:
        return Outcome.DONE
    if status >= 500 or code in _UNKNOWN_CODES:
        return Outcome.UNKNOWN
    if status == 429 or code in _LATER_CODES:
        return Outcome.RETRY_LATER
    if status == 401 or code in _MISCONFIGURED_CODES:
        return Outcome.MISCONFIGURED
    if code in _NOT_EXIST_CODES:
        return Outcome.NOT_EXIST
    if code in _STATUS_CODES:
        return Outcome.STATUS
    if code in _REFUSED_CODES:
        return Outcome.REFUSED
    return Outcome.UNKNOWN


def _said(status: int, body: Mapping[str, Any]) -> str:
    parts = [f"HTTP {status}", *(str(body[k]) for k in ("code", "message") if body.get(k))]
    return " ".join(parts)[:300]


def _paid(trade: Mapping[str, Any]) -> bool:
    """Paid: ``SUCCESS``, or ``REFUND`` (paid, then refunded in part or in full)."""
    return trade.get("trade_state") in ("SUCCESS", "REFUND")


@dataclass(frozen=True)
class WechatPayConfig:
    mchid: str
    appid: str
    private_key_pem: str
    """The merchant's API private key: signs every request."""
    cert_serial_no: str
    """The merchant API certificate's serial number (hex)."""
    apiv3_key: str
    """32 bytes: decrypts callbacks."""
    public_key_pem: str
    """WeChat Pay's public key: verifies answers and callbacks."""
    public_key_id: str
    """Its id, ``PUB_KEY_ID_...``."""
    notify_url: str
    """Where WeChat Pay sends callbacks (our ``/v1/webhooks/wechatpay``)."""
    gateway_url: str = PRODUCTION_GATEWAY


class WechatPayKeyRefused(ValueError):
    """A key the SDK cannot load, an APIv3 key that is not 32 bytes, an id of the wrong
    shape: the one reason, never the key itself."""


class WechatPayCallbackRefused(ValueError):
    """Why a callback cannot be read (safe to log: no key, no body)."""


_MCHID = re.compile(r"[0-9]{1,32}")
_APPID = re.compile(r"[A-Za-z0-9_]{1,32}")
_SERIAL = re.compile(r"[0-9A-Fa-f]{1,64}")
_PUBLIC_KEY_ID = re.compile(r"PUB_KEY_ID_[0-9A-Za-z]{1,64}")
APIV3_KEY_BYTES = 32
SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
CALLBACK_HEADERS = (
    "Wechatpay-Timestamp",
    "Wechatpay-Nonce",
    "Wechatpay-Signature",
    "Wechatpay-Serial",
)
SIGNATURE_TYPE_HEADER = "Wechatpay-Signature-Type"


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by its name in any case (a framework's mapping may lower it)."""
    value = headers.get(name)
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    return value


def _keys_of(config: WechatPayConfig) -> tuple[RSAPrivateKey, RSAPublicKey]:
    """The two RSA keys, loaded as the SDK loads them, or the one reason it cannot.

    Raises:
        WechatPayKeyRefused: what is wrong, never the key.
    """
    for name, value, pattern, shape in [
        ("mchid", config.mchid, _MCHID, "WeChat Pay's merchant number (digits)"),
        ("appid", config.appid, _APPID, "1-32 letters and digits"),
        ("cert_serial_no", config.cert_serial_no, _SERIAL, "the certificate's hex digits"),
        ("public_key_id", config.public_key_id, _PUBLIC_KEY_ID, "PUB_KEY_ID_ and its digits"),
    ]:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise WechatPayKeyRefused(f"the {name} must be {shape}")
    if len(config.apiv3_key.encode()) != APIV3_KEY_BYTES:
        raise WechatPayKeyRefused(
            f"the APIv3 key must be {APIV3_KEY_BYTES} bytes (AEAD_AES_256_GCM), not"
            f" {len(config.apiv3_key.encode())}"
        )
    for name, url in [("notify_url", config.notify_url), ("gateway_url", config.gateway_url)]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise WechatPayKeyRefused(f"the {name} must be an http(s) URL without a query")
    if not config.private_key_pem.strip() or not config.public_key_pem.strip():
        # The SDK would take an empty public key for "platform certificates" mode and fetch
        # them from WeChat Pay while it is built.
        raise WechatPayKeyRefused(
            "the merchant private key and WeChat Pay's public key are both needed"
        )
    try:
        private = load_private_key(config.private_key_pem)
    except Exception:  # the SDK raises a bare Exception
        raise WechatPayKeyRefused(
            "the merchant private key is not a PKCS#8 PEM key (BEGIN PRIVATE KEY, as"
            " apiclient_key.pem)"
        ) from None
    try:
        public = load_public_key(config.public_key_pem)
    except Exception:
        raise WechatPayKeyRefused(
            "WeChat Pay's public key is not a PEM public key (BEGIN PUBLIC KEY, as pub_key.pem)"
        ) from None
    if not isinstance(private, RSAPrivateKey):
        raise WechatPayKeyRefused("the merchant private key is not an RSA key")
    if not isinstance(public, RSAPublicKey):
        raise WechatPayKeyRefused("WeChat Pay's public key is not an RSA key")
    return private, public


class _Client(WeChatPay):  # type: ignore[misc]  # the SDK ships no type hints
    """The SDK's client, sending to ``gateway_url`` (the SDK itself knows only WeChat Pay's
    production host)."""

    def __init__(self, *, gateway_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._core._gate_way = gateway_url.rstrip("/")


_Answer = tuple[int, dict[str, Any]]


class WechatPayGateway:
    """The port over WeChat Pay (see the module's text)."""

    name = "wechatpay"

    def __init__(
        self, config: WechatPayConfig, *, client_timeout_s: float, book: TradeBook | None = None
    ) -> None:
        _, self._public_key = _keys_of(config)
        self._config = config
        self._book = book
        self._timeout = client_timeout_s
        try:
            self._sdk = _Client(
                gateway_url=config.gateway_url,
                wechatpay_type=WeChatPayType.NATIVE,
                mchid=config.mchid,
                private_key=config.private_key_pem,
                cert_serial_no=config.cert_serial_no,
                appid=config.appid,
                apiv3_key=config.apiv3_key,
                notify_url=config.notify_url,
                public_key=config.public_key_pem,
                public_key_id=config.public_key_id,
                timeout=(client_timeout_s, client_timeout_s),
            )
        except Exception as e:  # the SDK raises a bare Exception
            raise WechatPayKeyRefused(f"the SDK refused the keys ({str(e)[:100]})") from None
        self._threads = ThreadPoolExecutor(SDK_THREADS, thread_name_prefix="wechatpay-sdk")

    @staticmethod
    def check(config: WechatPayConfig) -> None:
        """Raise ``WechatPayKeyRefused`` (one reason) when ``config`` cannot work: a key the
        SDK cannot load, an APIv3 key not 32 bytes, an id or URL of the wrong shape."""
        WechatPayGateway(config, client_timeout_s=1)._threads.shutdown(wait=False)

    async def aclose(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    @property
    def mchid(self) -> str:
        return self._config.mchid

    @property
    def appid(self) -> str:
        return self._config.appid

    def read_callback(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any] | None:
        """A callback verified (``Wechatpay-Signature`` under WeChat Pay's public key) and
        its resource decrypted (AEAD_AES_256_GCM under the APIv3 key) by the SDK's
        ``callback``: the callback with ``resource`` in clear, or None when the signature
        does not verify. Neither the timestamp's age nor the fields are checked here
        (``service.wechatpay_webhook`` does).

        Raises:
            WechatPayCallbackRefused: signed with a key that is not our WeChat Pay public
                key's, or signed but its resource does not decrypt (changed, or encrypted
                under another APIv3 key), or not UTF-8 JSON.
        """
        canonical = {
            name: header(headers, name) or "" for name in (*CALLBACK_HEADERS, SIGNATURE_TYPE_HEADER)
        }
        serial = canonical["Wechatpay-Serial"]
        if serial != self._config.public_key_id:
            # Checked first: the SDK would look another serial up among platform
            # certificates, fetching them from WeChat Pay on this thread.
            raise WechatPayCallbackRefused(
                f"Wechatpay-Serial {serial[:80]!r} is not WeChat Pay's public key id"
                f" {self._config.public_key_id}"
            )
        try:
            text = body.decode("utf-8")
            callback = self._sdk.callback(canonical, text)
        except Exception as e:  # the SDK raises bare Exceptions (and JSON's, and UTF-8's)
            raise WechatPayCallbackRefused(
                f"the SDK cannot read it: {type(e).__name__} {str(e)[:120]}"
            ) from None
        if callback is not None:
            return dict(callback)
        if self._signed(canonical, text):
            # The SDK says None for both; its own check of the signature tells which.
            raise WechatPayCallbackRefused(
                "signed with WeChat Pay's key, but its resource does not decrypt with our"
                " APIv3 key (changed after encryption, encrypted under another key, or"
                " missing)"
            )
        return None

    def _signed(self, headers: Mapping[str, str], text: str) -> bool:
        return bool(
            headers[SIGNATURE_TYPE_HEADER] == SIGNATURE_TYPE
            and rsa_verify(
                headers["Wechatpay-Timestamp"],
                headers["Wechatpay-Nonce"],
                text,
                headers["Wechatpay-Signature"],
                self._public_key,
            )
        )

    # --- the port ---------------------------------------------------------------------------

    async def open_trade(self, trade: OpenTrade, *, first_attempt: bool = True) -> Checkout:
        """``POST /v3/pay/transactions/native``: the same body again answers the same
        ``code_url``, so a retry after a lost answer needs no look-up first. A refusal
        saying the trade is paid, closed or opened otherwise is read back: a paid trade is
        handed out without a ``code_url`` (its payment settles the order); anything else
        is refused."""
        if trade.currency != CURRENCY:
            raise GatewayRejected(f"open_trade: WeChat Pay takes CNY only, not {trade.currency}")
        try:
            amount = _fen(trade.amount)
            out_trade_no = out_trade_no_of(trade.pay_order_no)
        except ValueError as e:
            raise GatewayRejected(f"open_trade: {e}") from None
        status, body = await self._call(
            "open_trade",
            lambda: self._sdk.pay(
                description=f"pay order {trade.pay_order_no}",
                out_trade_no=out_trade_no,
                amount={"total": amount, "currency": CURRENCY},
                time_expire=china_time(trade.expires_at),
                attach=trade.pay_order_no,
                pay_type=WeChatPayType.NATIVE,
            ),
        )
        match outcome_of(status, body):
            case Outcome.DONE if isinstance(body.get("code_url"), str) and body["code_url"]:
                return self._checkout(out_trade_no, code_url=body["code_url"])
            case Outcome.STATUS as outcome:
                found = await self._query(out_trade_no=out_trade_no)
                if found is not None and _paid(found):
                    return self._checkout(out_trade_no, trade_state=str(found["trade_state"]))
                raise self._error("open_trade", outcome, status, body)
            case outcome:
                raise self._error("open_trade", outcome, status, body)

    async def close_trade(self, pay_order_no: str, trade_ref: str | None = None) -> CloseResult:
        """``POST .../out-trade-no/{out_trade_no}/close``: 204 is closed, and so is a trade
        WeChat Pay does not know (``ORDER_NOT_EXIST``: the open never reached it). Any
        other refusal is read back (``trade_state``): paid is the success path, with that
        payment; closed is closed; still payable is retried."""
        out_trade_no = self._out_trade_no(pay_order_no, trade_ref)
        if out_trade_no is None:
            return CloseResult(closed=True)
        status, body = await self._call(
            "close_trade", lambda: self._sdk.close(out_trade_no=out_trade_no)
        )
        match outcome_of(status, body):
            case Outcome.DONE | Outcome.NOT_EXIST:
                return CloseResult(closed=True)
            case Outcome.STATUS | Outcome.REFUSED:
                found = await self._query(out_trade_no=out_trade_no)
                state = None if found is None else found.get("trade_state")
                if found is not None and _paid(found):
                    # Paid before our close (perhaps refunded since: still paid).
                    return CloseResult(closed=False, capture=self._capture(found))
                if found is None or state == "CLOSED":
                    return CloseResult(closed=True)
                raise GatewayAmbiguous(
                    f"close_trade: WeChat Pay said {_said(status, body)}, trade {state}"
                )
            case outcome:
                raise self._error("close_trade", outcome, status, body)

    async def refund(self, request: RefundRequest) -> GatewayRefund:
        """``POST /v3/refund/domestic/refunds`` by ``transaction_id``, ``out_refund_no`` our
        key: WeChat Pay refunds one ``out_refund_no`` once. The refund is read back by that
        number first, so a retry never sends it again; a new one is sent only when WeChat
        Pay has none, with the transaction's own ``amount.total`` (read from WeChat Pay)
        and never beyond it.

        Returns:
            ``SUCCESS`` a ``SUCCEEDED`` refund; ``PROCESSING`` a ``PENDING`` one (the
            caller asks again later, under the same key).

        Raises:
            GatewayRejected: another currency, an amount out of bounds or beyond the
                capture, no such paid transaction, or WeChat Pay's final refusal
                (``CLOSED``, ``USER_ACCOUNT_ABNORMAL``, ...), with its reason.
            GatewayUnavailable: ``ABNORMAL`` (the merchant must act at WeChat Pay; asked
                about again until it ends), or a refusal before any work.
            GatewayAmbiguous: no answer to believe: query, then retry with the same key.
        """
        if request.currency != CURRENCY:
            raise GatewayRejected(f"refund: WeChat Pay takes CNY only, not {request.currency}")
        try:
            amount = _fen(request.amount)
            out_refund_no = out_refund_no_of(request.idempotency_key)
        except ValueError as e:
            raise GatewayRejected(f"refund: {e}") from None
        if not _TRANSACTION_ID.fullmatch(request.txn_id):
            raise GatewayRejected(f"refund: {request.txn_id!r} is no WeChat Pay transaction_id")
        found = await self._refund_at_wechatpay(out_refund_no)
        if found is None:
            trade = await self._query(transaction_id=request.txn_id)
            if trade is None or not _paid(trade):
                state = None if trade is None else trade.get("trade_state")
                raise GatewayRejected(
                    f"refund: WeChat Pay holds no paid transaction {request.txn_id} ({state})"
                )
            total = self._amount_of(trade, "total")
            if amount > total:
                raise GatewayRejected(
                    f"refund: {amount} fen is more than transaction {request.txn_id}'s {total}"
                )
            status, body = await self._call(
                "refund",
                lambda: self._sdk.refund(
                    out_refund_no=out_refund_no,
                    amount={"refund": amount, "total": total, "currency": CURRENCY},
                    transaction_id=request.txn_id,
                ),
            )
            outcome = outcome_of(status, body)
            if outcome is not Outcome.DONE:
                raise self._error("refund", outcome, status, body)
            found = body
        refund = self._refund_of(request.idempotency_key, found)
        if refund.txn_id != request.txn_id:
            raise GatewayRejected(
                f"refund: out_refund_no {out_refund_no} is a refund of {refund.txn_id}, not of"
                f" {request.txn_id}"
            )
        if refund.amount != amount:
            # WeChat Pay's record is the truth; reconciliation reports the difference.
            log.error(
                "refund %s at WeChat Pay is %d fen, we asked for %d",
                out_refund_no,
                refund.amount,
                amount,
            )
        match found.get("status"):
            case "SUCCESS" | "PROCESSING":
                return refund
            case "CLOSED":
                raise GatewayRejected(
                    f"refund {out_refund_no}: WeChat Pay closed it (CLOSED): no money moved"
                )
            case "ABNORMAL":
                log.error(
                    "refund %s of %s is ABNORMAL at WeChat Pay: the buyer's account could not"
                    " take it; finish it at the merchant platform (异常退款)",
                    out_refund_no,
                    request.txn_id,
                )
                raise GatewayUnavailable(
                    f"refund {out_refund_no}: ABNORMAL at WeChat Pay: the money could not reach"
                    " the buyer's account; the merchant must finish it there (异常退款), then"
                    " it ends SUCCESS or CLOSED"
                )
            case other:
                raise GatewayAmbiguous(f"refund {out_refund_no}: status {other!r} is not known")

    async def query_refund(self, idempotency_key: str, txn_id: str) -> GatewayRefund | None:
        """``GET /v3/refund/domestic/refunds/{out_refund_no}``: ``SUCCESS`` succeeded,
        ``PROCESSING`` and ``ABNORMAL`` pending (not done, not final), ``CLOSED`` rejected;
        ``RESOURCE_NOT_EXISTS`` (or a refund of another transaction) is none."""
        try:
            out_refund_no = out_refund_no_of(idempotency_key)
        except ValueError:
            return None
        found = await self._refund_at_wechatpay(out_refund_no)
        if found is None:
            return None
        refund = self._refund_of(idempotency_key, found)
        if refund.txn_id != txn_id:
            log.error(
                "out_refund_no %s is a refund of %s at WeChat Pay, not of %s",
                out_refund_no,
                refund.txn_id,
                txn_id,
            )
            return None
        return refund

    async def query_capture(self, txn_id: str) -> Capture | None:
        """``GET /v3/pay/transactions/id/{transaction_id}?mchid=``: a capture once it was
        paid (``trade_state`` ``SUCCESS``, or ``REFUND``: paid, then refunded)."""
        if not _TRANSACTION_ID.fullmatch(txn_id):
            return None
        trade = await self._query(transaction_id=txn_id)
        return self._capture(trade) if trade is not None and _paid(trade) else None

    async def refunds_of(self, txn_id: str) -> list[GatewayRefund]:
        """WeChat Pay's API v3 lists no refunds of a transaction: each is read by its
        ``out_refund_no``. A refund made at the merchant platform is found by the bill."""
        return []

    async def statement(self, start: datetime, end: datetime) -> Statement:
        """WeChat Pay's own records of the trades we opened that could be paid in ``[start,
        end)``, read trade by trade (query by ``out_trade_no``): the captures made in the
        window (a paid trade whose callback never came among them), and the refunds WeChat
        Pay holds under our keys that we have not confirmed yet. A refund made at the
        merchant platform under a number of its own is not among them (only the bill,
        ``/v3/bill/tradebill``, shows it).

        Raises:
            GatewayUnavailable: this process has no trade book (only the worker's
                reconciliation reads statements), or WeChat Pay did not answer.
        """
        if self._book is None:
            raise GatewayUnavailable(
                "statement: WeChat Pay lists no trades, and no trade book given"
            )
        nos = await self._book.trades_payable_in(self.name, start, end, grace_s=TIME_GRAIN_S)
        slots = asyncio.Semaphore(SDK_THREADS)

        async def trade_of(no: str) -> dict[str, Any] | None:
            out_trade_no = self._out_trade_no(no)
            if out_trade_no is None:
                return None
            async with slots:
                return await self._query(out_trade_no=out_trade_no)

        async def refund_of(key: str, txn_id: str) -> GatewayRefund | None:
            async with slots:
                return await self.query_refund(key, txn_id)

        trades = await asyncio.gather(*(trade_of(no) for no in nos))
        captures = [self._capture(t) for t in trades if t is not None and _paid(t)]
        in_flight = await self._book.refunds_in_flight_of(nos)
        refunds = await asyncio.gather(*(refund_of(key, txn) for key, _, txn in in_flight))
        return Statement(
            captures=[c for c in captures if start <= c.captured_at < end],
            refunds=[r for r in refunds if r is not None],
        )

    # --- helpers ----------------------------------------------------------------------------

    def _checkout(self, out_trade_no: str, **details: str) -> Checkout:
        return Checkout(
            gateway=self.name,
            trade_ref=out_trade_no,
            details={"out_trade_no": out_trade_no, **details},
        )

    async def _query(
        self, *, out_trade_no: str | None = None, transaction_id: str | None = None
    ) -> dict[str, Any] | None:
        """The trade as WeChat Pay holds it (a verified answer), or None if it knows none."""
        status, body = await self._call(
            "query_trade",
            lambda: self._sdk.query(transaction_id=transaction_id, out_trade_no=out_trade_no),
        )
        outcome = outcome_of(status, body)
        if outcome is Outcome.NOT_EXIST:
            return None
        if outcome is not Outcome.DONE:
            raise self._error("query_trade", outcome, status, body)
        return body

    async def _refund_at_wechatpay(self, out_refund_no: str) -> dict[str, Any] | None:
        status, body = await self._call(
            "query_refund", lambda: self._sdk.query_refund(out_refund_no=out_refund_no)
        )
        outcome = outcome_of(status, body)
        if outcome is Outcome.NOT_EXIST:
            return None
        if outcome is not Outcome.DONE:
            raise self._error("query_refund", outcome, status, body)
        return body

    @staticmethod
    def _out_trade_no(pay_order_no: str, trade_ref: str | None = None) -> str | None:
        """None: no trade can be under this pay order (open_trade refuses to open one)."""
        if trade_ref is not None and _OUT_TRADE_NO.fullmatch(trade_ref):
            return trade_ref
        try:
            return out_trade_no_of(pay_order_no)
        except ValueError:
            return None

    @staticmethod
    def _amount_of(doc: Mapping[str, Any], field: str) -> int:
        amount = doc.get("amount")
        try:
            return _fen(amount.get(field) if isinstance(amount, dict) else None)
        except ValueError as e:
            raise GatewayAmbiguous(f"an answer we cannot read: amount.{field}: {e}") from None

    def _capture(self, trade: Mapping[str, Any]) -> Capture:
        pay_order_no = pay_order_no_of(trade)
        if pay_order_no is None:
            raise GatewayAmbiguous(
                f"query_trade: out_trade_no {trade.get('out_trade_no')!r} is no pay order's"
            )
        amount = trade.get("amount")
        currency = amount.get("currency", CURRENCY) if isinstance(amount, dict) else CURRENCY
        try:
            return Capture(
                txn_id=str(trade["transaction_id"]),
                pay_order_no=pay_order_no,
                amount=self._amount_of(trade, "total"),
                currency=str(currency),
                captured_at=from_rfc3339(trade.get("success_time")),
            )
        except (KeyError, ValueError) as e:
            raise GatewayAmbiguous(f"query_trade: an answer we cannot read ({e})") from None

    def _refund_of(self, key: str, doc: Mapping[str, Any]) -> GatewayRefund:
        """A refund answer (of the request or the query) in our words; a status we do not
        know is pending, never a success."""
        match doc.get("status"):
            case "SUCCESS":
                status = RefundStatus.SUCCEEDED
            case "CLOSED":
                status = RefundStatus.REJECTED
            case _:  # PROCESSING, ABNORMAL (not done, not final), or newer than this code
                status = RefundStatus.PENDING
        amount = doc.get("amount")
        try:
            created = doc.get("create_time")
            return GatewayRefund(
                idempotency_key=key,
                gateway_refund_id=str(doc["refund_id"]),
                txn_id=str(doc["transaction_id"]),
                amount=self._amount_of(doc, "refund"),
                currency=str(
                    amount.get("currency", CURRENCY) if isinstance(amount, dict) else CURRENCY
                ),
                status=status,
                created_at=datetime.now(UTC) if created is None else from_rfc3339(created),
            )
        except (KeyError, ValueError) as e:
            raise GatewayAmbiguous(f"refund: an answer we cannot read ({e})") from None

    def _error(
        self, op: str, outcome: Outcome, status: int, body: Mapping[str, Any]
    ) -> GatewayError:
        said = _said(status, body)
        match outcome:
            case Outcome.UNKNOWN | Outcome.DONE:
                return GatewayAmbiguous(f"{op}: WeChat Pay answered {said}; outcome unknown")
            case Outcome.RETRY_LATER | Outcome.MISCONFIGURED:
                return GatewayUnavailable(f"{op}: WeChat Pay answered {said}; retry later")
            case _:
                return GatewayRejected(f"{op}: WeChat Pay refused it: {said}")

    async def _call(self, op: str, sdk_call: Callable[[], tuple[int, Any]]) -> _Answer:
        """One SDK call in this adapter's threads: counted, logged in one line, and its
        failures turned into the port's errors. Returns the status and the JSON body (any
        status; a 2xx verified by the SDK)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()

        def ambiguous(outcome: str, why: str, *, level: int = 0) -> GatewayAmbiguous:
            observed = self._count(op, outcome, started, level=level)
            return GatewayAmbiguous(f"{op}: {why}; outcome unknown", observed_ms=observed)

        try:
            status, raw = await asyncio.wait_for(
                loop.run_in_executor(self._threads, sdk_call), self._timeout + 1
            )
        except (TimeoutError, requests.Timeout) as e:
            if isinstance(e, requests.ConnectTimeout):
                self._count(op, "unavailable", started)
                raise GatewayUnavailable(f"{op}: cannot connect to WeChat Pay") from None
            raise ambiguous(
                "ambiguous_timeout", f"no answer from WeChat Pay within {self._timeout:.1f}s"
            ) from None
        except requests.ConnectionError as e:
            if _never_connected(e):
                self._count(op, "unavailable", started)
                raise GatewayUnavailable(f"{op}: cannot connect to WeChat Pay") from None
            raise ambiguous("ambiguous_transport", type(e).__name__) from None
        except requests.RequestException as e:
            raise ambiguous("ambiguous_transport", type(e).__name__) from None
        except Exception as e:
            # The SDK's own refusals are bare Exceptions: above all "failed to verify the
            # signature" (someone else answered, or the keys are wrong).
            raise ambiguous(
                "bad_signature",
                f"an answer the SDK does not verify with WeChat Pay's public key"
                f" ({str(e)[:120]}); not believed",
                level=logging.ERROR,
            ) from None
        try:
            body = _json_of(raw)
        except ValueError:
            if 200 <= status < 300:
                raise ambiguous(
                    "unreadable", f"HTTP {status} with a body that is not JSON"
                ) from None
            body = {}
        outcome = outcome_of(status, body)
        self._count(
            op,
            outcome.value,
            started,
            level=logging.ERROR if outcome is Outcome.MISCONFIGURED else 0,
        )
        return status, body

    def _count(self, op: str, outcome: str, started: float, *, level: int = 0) -> float:
        observed_ms = (time.perf_counter() - started) * 1000
        CALLS.labels(op, outcome).inc()
        OBSERVED.labels(op).observe(observed_ms / 1000)
        ok = outcome in (Outcome.DONE.value, Outcome.NOT_EXIST.value)
        log.log(
            level or (logging.INFO if ok else logging.WARNING),
            "gateway wechatpay %s %s: observed %.1f ms",
            op,
            outcome,
            observed_ms,
        )
        return observed_ms


def _json_of(raw: object) -> dict[str, Any]:
    """An answer's body: ``{}`` when empty (204), else a JSON object.

    Raises:
        ValueError: not one.
    """
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise ValueError("not text")
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _never_connected(e: BaseException) -> bool:
    """Whether a connection error happened before anything was sent (refused, no route,
    no such host): then WeChat Pay cannot have done anything."""
    seen: object = e
    for _ in range(8):  # requests wraps urllib3's MaxRetryError, which holds the reason
        if isinstance(seen, (NewConnectionError, ConnectionRefusedError)):
            return True
        if not isinstance(seen, BaseException):
            return False
        reason = getattr(seen, "reason", None)
        if isinstance(reason, BaseException):
            seen = reason
        elif seen.args and isinstance(seen.args[0], BaseException):
            seen = seen.args[0]
        else:
            seen = seen.__cause__ or seen.__context__
    return False

"""WeChat Pay's API v3 wire, from WeChat Pay's side: the request's ``Authorization``, the
signed answers and callbacks, the callbacks' encrypted resources, times, amounts and the
shape of an error. Written against WeChat Pay's pages; the SDK the product uses
(``wechatpayv3``) is the check on it.

- A request carries ``Authorization: WECHATPAY2-SHA256-RSA2048 mchid="..",nonce_str="..",
  signature="..",timestamp="..",serial_no=".."``: SHA256withRSA by the merchant's private
  key over ``METHOD\\nURL\\ntimestamp\\nnonce\\nbody\\n``, the URL being the path with its
  query string, the body empty for a GET; a signature that does not verify is refused
  ``401`` (https://pay.wechatpay.cn/docs/partner/development/interface-rules/signature-generation.html,
  "如果签名验证不通过, 微信支付API v3将会拒绝处理请求, 并返回401 Unauthorized"; "微信支付会拒绝
  处理很久之前发起的请求": five minutes here).
- Every answer and callback is signed by WeChat Pay's key over ``timestamp\\nnonce\\nbody\\n``
  (``Wechatpay-Timestamp``, ``-Nonce``, ``-Signature``), the key named by
  ``Wechatpay-Serial`` (the public key's id, ``PUB_KEY_ID_...``); an empty body (204) is
  signed as an empty last line
  (https://pay.weixin.qq.com/docs/merchant/development/interface-rules/build-verify-sign-src.html,
  "若应答报文主体为空 (如 HTTP 状态码为 204 No Content), 最后一行仅为一个 \\n 换行符").
- A callback's ``resource`` is AEAD_AES_256_GCM under the merchant's APIv3 key (32
  bytes), a 12-character nonce, the tag after the ciphertext, base64
  (https://pay.weixin.qq.com/doc/v3/merchant/4013070388, refund notification, and the
  payment notification, https://wechatpay.im/webhook/v3/TRANSACTION.SUCCESS).
- An error is ``{"code": ..., "message": ...}`` with its HTTP status (each API page's
  error codes: ``401 SIGN_ERROR``, ``400 PARAM_ERROR``, ``400 INVALID_REQUEST`` for a
  request well formed that a business rule refuses, ``500 SYSTEM_ERROR`` "请使用相同参数稍后
  重新调用").
- Times are RFC 3339 ``yyyy-MM-DDTHH:mm:ss+TIMEZONE`` (Native下单's ``time_expire``,
  https://pay.weixin.qq.com/doc/v3/merchant/4012791877); amounts are fen, integers.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from Cryptodome.Cipher import AES
from Cryptodome.PublicKey import RSA

from payorders.sandbox.local import generate_key_pair as generate_key_pair
from payorders.sandbox.local import load_key as load_key
from payorders.sandbox.local import sign, verify

SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
CLOCK_TOLERANCE_S = 300
"""How old (or how far ahead) a request's timestamp may be: five minutes."""
CHINA = timezone(timedelta(hours=8))
APIV3_KEY_BYTES = 32
ALGORITHM = "AEAD_AES_256_GCM"
_ALNUM = string.ascii_letters + string.digits
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_AUTH_PARAMS = frozenset({"mchid", "nonce_str", "signature", "timestamp", "serial_no"})
_AUTH_PARAM = re.compile(r'\s*([a-z_]+)="([^"]*)"\s*')


# --- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WechatPayError(Exception):
    """An answer other than 2xx: its HTTP status, ``code`` and ``message``."""

    status: int
    code: str
    message: str

    def payload(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def sign_error(why: str) -> WechatPayError:
    return WechatPayError(401, "SIGN_ERROR", f"签名错误: {why}")


def param_error(why: str) -> WechatPayError:
    return WechatPayError(400, "PARAM_ERROR", f"参数错误: {why}")


def invalid_request(why: str) -> WechatPayError:
    return WechatPayError(400, "INVALID_REQUEST", why)


def system_error(why: str) -> WechatPayError:
    return WechatPayError(500, "SYSTEM_ERROR", f"系统错误: {why}")


# --- the merchant's request ------------------------------------------------------------------


@dataclass(frozen=True)
class Authorization:
    mchid: str
    nonce_str: str
    signature: str
    timestamp: str
    serial_no: str


def parse_authorization(header: str | None) -> Authorization:
    """The ``Authorization`` header's parts.

    Raises:
        WechatPayError: ``SIGN_ERROR``: missing, another scheme, or a part missing or twice.
    """
    if not header:
        raise sign_error("Authorization is missing")
    scheme, _, rest = header.strip().partition(" ")
    if scheme != SIGNATURE_TYPE:
        raise sign_error(f"the authorization type must be {SIGNATURE_TYPE}")
    parts: dict[str, str] = {}
    for item in rest.split(","):
        m = _AUTH_PARAM.fullmatch(item)
        if m is None or m[1] in parts:
            raise sign_error('Authorization must be name="value" pairs, each once')
        parts[m[1]] = m[2]
    if set(parts) != _AUTH_PARAMS:
        raise sign_error(f"Authorization needs {', '.join(sorted(_AUTH_PARAMS))}")
    return Authorization(**parts)


def request_message(method: str, target: str, timestamp: str, nonce: str, body: str) -> str:
    """What a request is signed over (five lines, each ending in ``\\n``)."""
    return f"{method}\n{target}\n{timestamp}\n{nonce}\n{body}\n"


def check_request(
    auth: Authorization,
    *,
    method: str,
    target: str,
    body: str,
    merchant_key: RSA.RsaKey,
    now: float,
) -> None:
    """The request's signature by the merchant's key, and its age.

    Raises:
        WechatPayError: ``SIGN_ERROR``.
    """
    if not auth.timestamp.isdigit() or abs(now - int(auth.timestamp)) > CLOCK_TOLERANCE_S:
        raise sign_error("the timestamp is more than 5 minutes away from now")
    text = request_message(method, target, auth.timestamp, auth.nonce_str, body)
    if not verify(merchant_key, text, auth.signature):
        raise sign_error("the signature does not verify with the merchant's certificate")


# --- WeChat Pay's answers and callbacks ------------------------------------------------------


def answer_message(timestamp: str, nonce: str, body: str) -> str:
    """What an answer or callback is signed over (three lines, each ending in ``\\n``)."""
    return f"{timestamp}\n{nonce}\n{body}\n"


def signed_headers(key: RSA.RsaKey, public_key_id: str, body: bytes) -> dict[str, str]:
    """The headers that sign ``body`` (empty for a 204) now."""
    timestamp, nonce = str(int(time.time())), secrets.token_hex(16).upper()
    return {
        "Wechatpay-Timestamp": timestamp,
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": sign(key, answer_message(timestamp, nonce, body.decode())),
        "Wechatpay-Serial": public_key_id,
        "Wechatpay-Signature-Type": SIGNATURE_TYPE,
    }


def dumps(doc: Any) -> bytes:
    """A JSON body as WeChat Pay writes one: UTF-8, compact."""
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def check_apiv3_key(key: str) -> str:
    """
    Raises:
        ValueError: not 32 bytes (AEAD_AES_256_GCM's key).
    """
    if len(key.encode()) != APIV3_KEY_BYTES:
        raise ValueError(f"the APIv3 key must be {APIV3_KEY_BYTES} bytes")
    return key


def encrypt_resource(
    apiv3_key: str, plaintext: str, *, original_type: str, associated_data: str
) -> dict[str, str]:
    """A callback's ``resource``: ``plaintext`` sealed with the APIv3 key."""
    nonce = "".join(secrets.choice(_ALNUM) for _ in range(12))
    cipher = AES.new(apiv3_key.encode(), AES.MODE_GCM, nonce=nonce.encode())
    cipher.update(associated_data.encode())
    sealed, tag = cipher.encrypt_and_digest(plaintext.encode())
    return {
        "original_type": original_type,
        "algorithm": ALGORITHM,
        "ciphertext": base64.b64encode(sealed + tag).decode(),
        "associated_data": associated_data,
        "nonce": nonce,
    }


# --- bodies, times, amounts ------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request's JSON object; numbers with a fraction stay ``Decimal`` (never a float).

    Raises:
        WechatPayError: ``PARAM_ERROR``: not UTF-8 JSON, or not an object.
    """

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        doc = json.loads(raw.decode(), parse_float=Decimal, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError):
        raise param_error("the body is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise param_error("the body must be a JSON object")
    return doc


def canonical(doc: Any) -> str:
    """One text per JSON value, whatever its keys' order (to compare two requests)."""
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def rfc3339(at: datetime) -> str:
    """``yyyy-MM-DDTHH:mm:ss+08:00``, as WeChat Pay writes its times."""
    return at.astimezone(CHINA).replace(microsecond=0).isoformat()


def parse_rfc3339(text: object) -> datetime:
    """``yyyy-MM-DDTHH:mm:ss+TIMEZONE`` (or ``Z``), to the second, as an aware instant.

    Raises:
        ValueError: not that shape, or no such time.
    """
    if not isinstance(text, str) or not _RFC3339.fullmatch(text):
        raise ValueError(f"not yyyy-MM-DDTHH:mm:ss+TIMEZONE: {text!r}")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def fen(value: object, name: str) -> int:
    """A positive whole number of fen.

    Raises:
        WechatPayError: ``PARAM_ERROR``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise param_error(f"{name} must be a whole number of fen greater than zero")
    if value >= 2**31:
        raise param_error(f"{name} is too large (int32 fen)")
    return value


def random_text(length: int, alphabet: str = _ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))

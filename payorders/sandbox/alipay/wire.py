"""Alipay's API v2 wire, from Alipay's side: RSA2 keys, signatures, amounts, times and the
shape of an answer. Written against Alipay's pages, not against the SDK: the SDK the product
uses (python-alipay-sdk) is the check on it.

- RSA2 is SHA256withRSA, PKCS#1 v1.5, the signature in base64. A request is signed over its
  parameters but ``sign``, sorted by name, ``name=value`` joined by ``&``, values not
  URL-encoded (empty ones left out); a notification over its parameters but ``sign`` and
  ``sign_type`` (https://opendocs.alipay.com/open/194/103296, notification page of
  face-to-face payment).
- An answer is ``{"<method with underscores>_response": {...}, "sign": "..."}``, the sign
  over exactly the serialised ``{...}`` (the page the SDK's check names,
  https://docs.open.alipay.com/200/106120).
- Errors: ``code`` and ``sub_code`` from Alipay's public error codes (mirrored at
  https://open.alitrip.com/docs/doc.htm?articleId=105806&docType=1&treeId=262):
  ``20000``/``isp.unknow-error`` service unavailable, ``40001``/``isv.missing-*`` a
  required parameter missing, ``40002``/``isv.invalid-*`` an invalid one, ``40004`` a
  business failure whose ``sub_code`` the method's page lists.
- Amounts are yuan with at most two decimals (``Price``); times ``yyyy-MM-dd HH:mm:ss`` in
  China time (https://docs.open.alipay.com/api_1/alipay.trade.precreate, common
  parameters and ``total_amount``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from Cryptodome.PublicKey import RSA

from payorders.sandbox.local import generate_key_pair as generate_key_pair
from payorders.sandbox.local import load_key as load_key
from payorders.sandbox.local import sign as sign
from payorders.sandbox.local import verify as verify

CHINA = timezone(timedelta(hours=8))
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
MAX_FEN = 100_000_000 * 100
"""``total_amount`` takes [0.01, 100000000] yuan (alipay.trade.precreate's page)."""

# Price: "0 or 2 digits after the decimal point" (the English page of alipay.trade.precreate,
# https://open.alitrip.com/docs/doc.htm?articleId=104628&docType=1&treeId=140), "精确到小数点
# 后两位" (the Chinese one). No leading zeros, never through a float.
_PRICE = re.compile(r"(0|[1-9][0-9]{0,8})(?:\.([0-9]{2}))?")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")

# The answer's "msg" for each "code" (public error codes page, above; the English words are
# those of the SDK's examples).
MESSAGES = {
    "10000": "Success",
    "20000": "Service Currently Unavailable",
    "20001": "Insufficient Token Permissions",
    "40001": "Missing Required Arguments",
    "40002": "Invalid Arguments",
    "40004": "Business Failed",
    "40006": "Insufficient Permissions",
}


# --- signatures ------------------------------------------------------------------------------
# RSA2 is SHA256withRSA, the signature every local gateway shares: its keys and its sign and
# verify are ``sandbox.local``'s (``load_key``, ``sign``, ``verify`` imported above).


def signing_string(params: Mapping[str, str], *, leave_out: frozenset[str]) -> str:
    """The text a request or notification is signed over: every parameter with a value but
    those in ``leave_out``, sorted by name, ``name=value`` joined by ``&``."""
    return "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in leave_out and v)


REQUEST_UNSIGNED = frozenset({"sign"})
NOTIFICATION_UNSIGNED = frozenset({"sign", "sign_type"})


# --- amounts and times -----------------------------------------------------------------------


def fen_of(text: object) -> int:
    """A ``Price`` (yuan, ``"19.99"`` or ``"20"``) in fen. Never through a float.

    Raises:
        ValueError: not that shape.
    """
    if not isinstance(text, str) or not (m := _PRICE.fullmatch(text)):
        raise ValueError(f"not a yuan amount with 0 or 2 decimals: {text!r}")
    return int(m[1]) * 100 + int(m[2] or 0)


def yuan(fen: int) -> str:
    """Fen as the wire's yuan, always with two decimals."""
    return f"{fen // 100}.{fen % 100:02d}"


def china_time(at: datetime) -> str:
    return at.astimezone(CHINA).strftime(TIME_FORMAT)


def china_time_ms(at: datetime) -> str:
    """``yyyy-MM-dd HH:mm:ss.SSS``, as ``gmt_refund`` is written (notification page)."""
    at = at.astimezone(CHINA)
    return f"{at.strftime(TIME_FORMAT)}.{at.microsecond // 1000:03d}"


def parse_china_time(text: object) -> datetime:
    """``yyyy-MM-dd HH:mm:ss`` in China time, as an aware UTC instant.

    Raises:
        ValueError: not that shape, or no such time.
    """
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise ValueError(f"not yyyy-MM-dd HH:mm:ss: {text!r}")
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=CHINA).astimezone(UTC)


def whole_second(at: datetime) -> datetime:
    """Alipay's times are to the second: an instant inside a second counts as that second."""
    return at.replace(microsecond=0)


# --- answers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlipayError(Exception):
    """An answer other than ``10000``: its ``code``, ``sub_code`` and ``sub_msg``, and the
    business fields Alipay puts beside them (``extra``)."""

    code: str
    sub_code: str
    sub_msg: str
    extra: Mapping[str, str] | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "msg": MESSAGES.get(self.code, "Business Failed"),
            "sub_code": self.sub_code,
            "sub_msg": self.sub_msg,
            **(self.extra or {}),
        }


def missing(name: str) -> AlipayError:
    return AlipayError("40001", f"isv.missing-{name}", f"missing {name}")


def invalid(name: str, why: str) -> AlipayError:
    return AlipayError("40002", f"isv.invalid-{name}", why)


def business(sub_code: str, sub_msg: str, **extra: str) -> AlipayError:
    return AlipayError("40004", sub_code, sub_msg, extra or None)


def unavailable(why: str) -> AlipayError:
    # 20000 isp.unknow-error "服务暂不可用", "稍后重试" (public error codes page).
    return AlipayError("20000", "isp.unknow-error", why)


def success(**fields: str) -> dict[str, Any]:
    return {"code": "10000", "msg": MESSAGES["10000"], **fields}


def answer_body(response_key: str, payload: Mapping[str, Any], key: RSA.RsaKey | None) -> bytes:
    """The answer's bytes: ``{"<key>": payload, "sign": ...}``, the sign over exactly the
    serialised payload; no sign when ``key`` is None (an app Alipay does not know has no key
    pair to answer with: the SDK's own example of an ``isv.invalid-app-id`` answer carries
    none)."""
    inner = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    if key is None:
        return f'{{"{response_key}":{inner}}}'.encode()
    signed = json.dumps(sign(key, inner))
    return f'{{"{response_key}":{inner},"sign":{signed}}}'.encode()


def notification_form(params: Mapping[str, str], key: RSA.RsaKey) -> bytes:
    """A notification's form body: ``params`` with ``sign_type`` and ``sign`` (over all but
    those two, notification page)."""
    fields = {k: v for k, v in params.items() if k not in NOTIFICATION_UNSIGNED}
    fields["sign_type"] = "RSA2"
    fields["sign"] = sign(key, signing_string(fields, leave_out=NOTIFICATION_UNSIGNED))
    return urlencode(fields).encode()

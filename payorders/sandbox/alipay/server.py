"""The local Alipay as an HTTP service: ``gateway.do`` (API v2), the buyer's side
(``/v1/payments``, ``/v1/scans``), the sandbox's control routes, and the notifications.

``gateway.do`` takes GET or a POST form, checks the common parameters and the app's RSA2
signature, then runs the method; every answer is signed with this server's key, as the SDK
expects, but the answer to an app it does not know. A caller that hangs up while its answer
is held back (the ``timeout_after_success_next`` fault) leaves the work done and gets no
answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import httpx
from Cryptodome.PublicKey import RSA
from fastapi import APIRouter, FastAPI, Request, Response

from payorders import logs
from payorders.gateways.port import GatewayUnavailable
from payorders.sandbox import local
from payorders.sandbox.alipay import wire
from payorders.sandbox.alipay.trades import AlipayTrades
from payorders.sandbox.alipay.wire import AlipayError
from payorders.sandbox.local import LocalServer, NotificationSchedule, unless_client_leaves

log = logging.getLogger(__name__)

RETRY_SCHEDULE_S = (4 * 60, 10 * 60, 10 * 60, 3600, 2 * 3600, 6 * 3600, 15 * 3600)
"""The waits between notifications until one is acknowledged: 8 notifications within about
25 h, at 4m, 10m, 10m, 1h, 2h, 6h, 15h (https://opendocs.alipay.com/open/270/105902,
asynchronous notifications)."""
NOTIFICATIONS = len(RETRY_SCHEDULE_S) + 1
ACKNOWLEDGEMENT = b"success"
"""The only answer that ends the notifications: exactly these 7 characters; any other answer
is notified again (same page)."""
LABEL = "local alipay"

ENV_APP_ID = "PAYORDERS_LOCAL_ALIPAY_APP_ID"
ENV_APP_PUBLIC_KEY = "PAYORDERS_LOCAL_ALIPAY_APP_PUBLIC_KEY"
ENV_PRIVATE_KEY = "PAYORDERS_LOCAL_ALIPAY_PRIVATE_KEY"
ENV_DATABASE_URL = "PAYORDERS_DATABASE_URL"
ENV_NOTIFY_SPEEDUP = "PAYORDERS_LOCAL_ALIPAY_NOTIFY_SPEEDUP"

PRECREATE = "alipay.trade.precreate"
METHODS = (
    PRECREATE,
    "alipay.trade.query",
    "alipay.trade.close",
    "alipay.trade.refund",
    "alipay.trade.fastpay.refund.query",
)


@dataclass(frozen=True)
class LocalAlipayConfig:
    app_id: str
    app_public_key_pem: str
    """The app's public key: verifies every request (the product signs with the private)."""
    private_key_pem: str
    """This server's ("Alipay's") private key: signs answers and notifications; the product
    holds its public key."""
    database_url: str
    schema: str = "alipay_gateway"
    notify_speedup: float = 1.0
    """Alipay's notification schedule (4 min ... 15 h) divided by this (tests: thousands)."""
    server_timeout_s: float = 5.0
    """Alipay's own limit: a call delayed past it (``delay_ms``) answers 20000, nothing done."""
    withhold_answer_s: float = 120.0
    """How long the ``timeout_after_success_next`` fault holds a refund's answer back."""
    seller_id: str = "2088000000000001"
    db_pool_max: int = 10


class _Server(LocalServer[AlipayTrades]):
    """What the routes share: the trades, the keys and the configuration; the frame's
    ``LocalGateway`` (``sandbox.local``)."""

    def __init__(self, config: LocalAlipayConfig, trades: AlipayTrades) -> None:
        super().__init__(trades, NotificationSchedule(RETRY_SCHEDULE_S, config.notify_speedup))
        self.config = config
        self.app_key = wire.load_key(config.app_public_key_pem, private=False)
        self.key = wire.load_key(config.private_key_pem, private=True)
        self._methods: dict[str, Callable[[dict[str, Any], str | None], Awaitable[Any]]] = {
            PRECREATE: trades.trade_precreate,
            "alipay.trade.query": lambda biz, _: trades.trade_query(biz),
            "alipay.trade.close": lambda biz, _: trades.trade_close(biz),
            "alipay.trade.refund": lambda biz, _: trades.trade_refund(biz),
            "alipay.trade.fastpay.refund.query": lambda biz, _: trades.trade_fastpay_refund_query(
                biz
            ),
        }

    async def answer(self, pairs: list[tuple[str, str]]) -> bytes:
        """The signed answer to one ``gateway.do`` request."""
        params = dict(pairs)
        method = params.get("method", "")
        # The SDK looks for "<method>_response"; a method we do not serve is error_response.
        response_key = (
            f"{method.replace('.', '_')}_response" if method in METHODS else ("error_response")
        )
        signer: RSA.RsaKey | None = self.key
        try:
            if len(params) != len(pairs):
                raise wire.invalid("parameter", "a parameter is given twice")
            self._check(params)
            biz = _biz_content(params)
            payload = await self._methods[method](biz, params.get("notify_url") or None)
        except AlipayError as e:
            payload = e.payload()
            if e.sub_code in ("isv.missing-app-id", "isv.invalid-app-id"):
                signer = None
        except GatewayUnavailable as e:
            payload = wire.unavailable(str(e)).payload()
        except Exception:
            # Whatever failed, the caller cannot know whether it was done: 20000.
            log.exception("local alipay: %s failed", method)
            payload = wire.unavailable("internal error in the local Alipay").payload()
        return wire.answer_body(response_key, payload, signer)

    def _check(self, params: dict[str, str]) -> None:
        """The common parameters (each method's page, "公共请求参数") and the signature."""
        app_id = params.get("app_id")
        if not app_id:
            raise wire.missing("app-id")
        if app_id != self.config.app_id:
            raise wire.invalid("app-id", "无效的AppID参数")
        method = params.get("method")
        if not method:
            raise wire.missing("method")
        if method not in METHODS:
            raise wire.invalid("method", f"不存在的方法名: {method}")
        sign_type = params.get("sign_type")
        if not sign_type:
            raise wire.missing("signature-type")
        if sign_type != "RSA2":
            raise wire.invalid("signature-type", "sign_type must be RSA2 (RSA is not taken)")
        sign = params.get("sign")
        if not sign:
            raise wire.missing("signature")
        text = wire.signing_string(params, leave_out=wire.REQUEST_UNSIGNED)
        if not wire.verify(self.app_key, text, sign):
            raise wire.invalid("signature", "验签出错: not signed by the app's private key")
        timestamp = params.get("timestamp")
        if not timestamp:
            raise wire.missing("timestamp")
        try:
            wire.parse_china_time(timestamp)
        except ValueError:
            raise wire.invalid("timestamp", "timestamp must be yyyy-MM-dd HH:mm:ss") from None
        version = params.get("version")
        if not version:
            raise wire.missing("version")
        if version != "1.0":
            raise wire.invalid("parameter", "version must be 1.0")
        if params.get("charset", "").lower() != "utf-8":
            raise wire.invalid("charset", "charset must be utf-8")
        if params.get("format", "JSON").upper() != "JSON":
            raise wire.invalid("format", "format must be JSON")

    # --- the frame's LocalGateway ------------------------------------------------------------

    def render(self, stored: bytes) -> tuple[str, dict[str, str], bytes]:
        """A stored notification as this attempt sends it: ``notify_time`` now, signed."""
        doc = json.loads(stored)
        params = {**doc["params"], "notify_time": wire.china_time(datetime.now(UTC))}
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        return doc["url"], headers, wire.notification_form(params, self.key)

    def refusal(self, answer: httpx.Response) -> str | None:
        if answer.content == ACKNOWLEDGEMENT:
            return None
        return f"HTTP {answer.status_code} {answer.content[:40]!r}, not the literal 'success'"


def _biz_content(params: dict[str, str]) -> dict[str, Any]:
    text = params.get("biz_content")
    if not text:
        raise wire.business("ACQ.INVALID_PARAMETER", "biz_content is required")
    try:
        # Numbers as their text: an amount never passes through a float.
        biz = json.loads(text, parse_float=str, parse_int=str)
    except ValueError:
        raise wire.invalid("parameter", "biz_content is not JSON") from None
    if not isinstance(biz, dict):
        raise wire.invalid("parameter", "biz_content must be a JSON object")
    return biz


# --- the app ---------------------------------------------------------------------------------


def create_local_alipay_app(config: LocalAlipayConfig) -> FastAPI:
    """The local Alipay's ASGI app; it connects to PostgreSQL when it starts serving.

    Raises:
        ValueError: a key that is not an RSA key of the right kind, or a bad speedup.
    """
    wire.load_key(config.app_public_key_pem, private=False)
    wire.load_key(config.private_key_pem, private=True)
    NotificationSchedule(RETRY_SCHEDULE_S, config.notify_speedup)  # refuses a bad speedup

    def open_book(pool: asyncpg.Pool) -> AlipayTrades:
        return AlipayTrades(
            pool,
            schema=config.schema,
            app_id=config.app_id,
            seller_id=config.seller_id,
            server_timeout_s=config.server_timeout_s,
            withhold_answer_s=config.withhold_answer_s,
        )

    return local.local_gateway_app(
        title="payorders local Alipay",
        database_url=config.database_url,
        db_pool_max=config.db_pool_max,
        open_book=open_book,
        serve=lambda trades: _Server(config, trades),
        vendor_router=router,
        max_trade_no_len=64,
    )


def app() -> FastAPI:
    """For ``uvicorn --factory payorders.sandbox.alipay:app``: the configuration from
    ``PAYORDERS_LOCAL_ALIPAY_*`` and ``PAYORDERS_DATABASE_URL``; one line and exit 2 when
    one is missing or not what it should be."""
    logs.configure(logging.WARNING)
    values = local.vendor_env(
        LABEL,
        ENV_APP_ID,
        ENV_APP_PUBLIC_KEY,
        ENV_PRIVATE_KEY,
        ENV_DATABASE_URL,
        public_key=ENV_APP_PUBLIC_KEY,
        private_key=ENV_PRIVATE_KEY,
    )
    speedup = local.number_env(LABEL, ENV_NOTIFY_SPEEDUP, "1", positive=True)
    return create_local_alipay_app(
        LocalAlipayConfig(
            app_id=values[ENV_APP_ID],
            app_public_key_pem=values[ENV_APP_PUBLIC_KEY],
            private_key_pem=values[ENV_PRIVATE_KEY],
            database_url=values[ENV_DATABASE_URL],
            notify_speedup=speedup,
        )
    )


# --- routes ----------------------------------------------------------------------------------

router = APIRouter()
"""``gateway.do``; the frame adds the buyer's side and the control routes."""


@router.api_route("/gateway.do", methods=["GET", "POST"])
async def gateway_do(request: Request) -> Response:
    """Alipay's API v2 endpoint: the parameters in the query, or a form, or both."""
    pairs = list(request.query_params.multi_items())
    if request.method == "POST":
        body = await request.body()
        try:
            pairs += parse_qsl(body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            pairs.append(("charset", "not utf-8"))  # answered isv.invalid-charset
    answer = await unless_client_leaves(request, _Server.of(request).answer(pairs))
    return Response(answer, media_type="application/json;charset=utf-8")

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
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn
from urllib.parse import parse_qsl

import httpx
from Cryptodome.PublicKey import RSA
from fastapi import APIRouter, Body, FastAPI, Request, Response

from payorders import logs
from payorders.core import domain, store
from payorders.gateways.http_sandbox import POOL_LIMITS
from payorders.gateways.port import GatewayUnavailable
from payorders.sandbox.alipay import wire
from payorders.sandbox.alipay.trades import AlipayTrades, PaymentRefused
from payorders.sandbox.alipay.wire import AlipayError
from payorders.sandbox.app import (
    ProcessingTime,
    add_error_handlers,
    capture_json,
    control_router,
    in_background,
    only_fields,
    unless_client_leaves,
)
from payorders.sandbox.ledger import NotAcknowledged
from payorders.service.errors import ApiError

log = logging.getLogger(__name__)

RETRY_SCHEDULE_S = (4 * 60, 10 * 60, 10 * 60, 3600, 2 * 3600, 6 * 3600, 15 * 3600)
"""The waits between notifications until one is acknowledged: 8 notifications within about
25 h, at 4m, 10m, 10m, 1h, 2h, 6h, 15h (https://opendocs.alipay.com/open/270/105902,
asynchronous notifications)."""
NOTIFICATIONS = len(RETRY_SCHEDULE_S) + 1
ACKNOWLEDGEMENT = b"success"
"""The only answer that ends the notifications: exactly these 7 characters; any other answer
is notified again (same page)."""
DELIVERY_INTERVAL_S = 0.1
NOTIFY_CLIENT_TIMEOUT_S = 5.0

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


class _Server:
    """What the routes share: the trades, the keys and the configuration."""

    def __init__(self, config: LocalAlipayConfig, trades: AlipayTrades) -> None:
        self.config = config
        self.trades = trades
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

    def render(self, stored: bytes) -> tuple[str, dict[str, str], bytes]:
        """A stored notification as this attempt sends it: ``notify_time`` now, signed."""
        doc = json.loads(stored)
        params = {**doc["params"], "notify_time": wire.china_time(datetime.now(UTC))}
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        return doc["url"], headers, wire.notification_form(params, self.key)

    def retry_after_ms(self, attempt: int) -> float:
        wait_s = RETRY_SCHEDULE_S[min(attempt, len(RETRY_SCHEDULE_S)) - 1]
        return wait_s * 1000 / self.config.notify_speedup


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
    if not config.notify_speedup > 0:
        raise ValueError("notify_speedup must be greater than zero")

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        pool = await store.create_pool(config.database_url, min_size=1, max_size=config.db_pool_max)
        try:
            trades = AlipayTrades(
                pool,
                schema=config.schema,
                app_id=config.app_id,
                seller_id=config.seller_id,
                server_timeout_s=config.server_timeout_s,
                withhold_answer_s=config.withhold_answer_s,
            )
            await trades.install()
            server = _Server(config, trades)
            api.state.sandbox = trades.ledger  # the control routes' ledger
            api.state.alipay = server
            async with (
                httpx.AsyncClient(timeout=NOTIFY_CLIENT_TIMEOUT_S, limits=POOL_LIMITS) as http,
                in_background(_deliver_forever(server, http), name="alipay-notifications"),
            ):
                yield
        finally:
            await pool.close()

    api = FastAPI(title="payorders local Alipay", lifespan=lifespan)
    api.add_middleware(ProcessingTime)
    api.include_router(router)
    api.include_router(control_router)
    add_error_handlers(api)
    return api


def app() -> FastAPI:
    """For ``uvicorn --factory payorders.sandbox.alipay:app``: the configuration from
    ``PAYORDERS_LOCAL_ALIPAY_*`` and ``PAYORDERS_DATABASE_URL``; one line and exit 2 when
    one is missing or not what it should be."""
    logs.configure(logging.WARNING)
    values = {}
    for name in (ENV_APP_ID, ENV_APP_PUBLIC_KEY, ENV_PRIVATE_KEY, ENV_DATABASE_URL):
        values[name] = os.environ.get(name, "").strip()
        if not values[name]:
            _refuse(f"{name} is not set")
    for name, private in ((ENV_APP_PUBLIC_KEY, False), (ENV_PRIVATE_KEY, True)):
        try:
            wire.load_key(values[name], private=private)
        except ValueError as e:
            _refuse(f"{name}: {e}")
    speedup_text = os.environ.get(ENV_NOTIFY_SPEEDUP, "1")
    try:
        speedup = float(speedup_text)
    except ValueError:
        speedup = 0.0
    if not 0 < speedup < float("inf"):
        _refuse(f"{ENV_NOTIFY_SPEEDUP}: a number greater than zero, not {speedup_text!r}")
    return create_local_alipay_app(
        LocalAlipayConfig(
            app_id=values[ENV_APP_ID],
            app_public_key_pem=values[ENV_APP_PUBLIC_KEY],
            private_key_pem=values[ENV_PRIVATE_KEY],
            database_url=values[ENV_DATABASE_URL],
            notify_speedup=speedup,
        )
    )


def _refuse(why: str) -> NoReturn:
    print(f"payorders local alipay: cannot start: {why}", file=sys.stderr, flush=True)
    raise SystemExit(2)


async def _deliver_forever(server: _Server, http: httpx.AsyncClient) -> None:
    async def send(url: str, headers: dict[str, str], body: bytes) -> int:
        resp = await http.post(url, headers=headers, content=body)
        if resp.content != ACKNOWLEDGEMENT:
            raise NotAcknowledged(
                resp.status_code,
                f"HTTP {resp.status_code} {resp.content[:40]!r}, not the literal 'success'",
            )
        return resp.status_code

    ledger = server.trades.ledger
    while True:
        try:
            await ledger.deliver_due(
                send,
                max_attempts=NOTIFICATIONS,
                render=server.render,
                retry_after_ms=server.retry_after_ms,
            )
        except Exception:
            # A database hiccup must not end delivery for good: the rows wait, try again.
            log.exception("local alipay: notification round failed")
        await ledger.webhook_queued(DELIVERY_INTERVAL_S)


# --- routes ----------------------------------------------------------------------------------

router = APIRouter()
JsonObject = Annotated[dict[str, Any], Body()]


def _server(request: Request) -> _Server:
    server = request.app.state.alipay
    assert isinstance(server, _Server)
    return server


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
    answer = await unless_client_leaves(request, _server(request).answer(pairs))
    return Response(answer, media_type="application/json;charset=utf-8")


@router.post("/v1/payments", status_code=201)
async def create_payment(request: Request, body: JsonObject) -> dict[str, Any]:
    """The buyer scans and pays (the sandbox's route and answer, so ``payorders pay`` works):
    409 when Alipay would refuse the payment."""
    only_fields(
        body,
        required=frozenset({"pay_order_no", "amount", "currency"}),
        optional=frozenset({"txn_id"}),
    )
    no = _out_trade_no(body["pay_order_no"])
    amount = domain.check_amount(body["amount"])
    currency = domain.check_currency(body["currency"])
    txn_id = body.get("txn_id")
    if txn_id is not None:
        domain.check_identifier(txn_id, "txn_id")
    try:
        capture = await _server(request).trades.pay(
            out_trade_no=no, amount=amount, currency=currency, pay_key=txn_id
        )
    except PaymentRefused as e:
        raise ApiError(409, "payment_refused", str(e)) from None
    return capture_json(capture)


@router.post("/v1/scans")
async def scan(request: Request, body: JsonObject) -> dict[str, Any]:
    """The buyer scans the QR code without paying yet: the trade exists (``WAIT_BUYER_PAY``)."""
    only_fields(body, required=frozenset({"pay_order_no"}))
    no = _out_trade_no(body["pay_order_no"])
    try:
        trade = await _server(request).trades.scan(no)
    except PaymentRefused as e:
        raise ApiError(409, "scan_refused", str(e)) from None
    return {"out_trade_no": trade.out_trade_no, "trade_no": trade.trade_no, "status": trade.status}


def _out_trade_no(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise domain.InvalidInput("pay_order_no must be the trade's out_trade_no (1-64 characters)")
    return value

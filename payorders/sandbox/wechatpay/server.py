"""The local WeChat Pay as an HTTP service: API v3 (Native下单, the order queries, close,
refund, refund query), the buyer's side (``/v1/scans``, ``/v1/payments``), the sandbox's
control routes, the callbacks, and the local WeChat Pay's own control of refund outcomes
(``/v1/wechatpay/refund-outcomes``).

Every ``/v3`` request's ``Authorization`` is checked first (the merchant's key, its
``mchid`` and certificate serial, a timestamp within five minutes); every answer, errors
and 204s included, is signed with this server's key under its public key id, as the SDK
expects. A caller that hangs up while its answer is held back (the
``timeout_after_success_next`` fault) leaves the work done and gets no answer.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
import httpx
from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from payorders import logs
from payorders.core import domain
from payorders.gateways.port import GatewayUnavailable
from payorders.sandbox import local
from payorders.sandbox.local import LocalServer, NotificationSchedule, unless_client_leaves
from payorders.sandbox.wechatpay import wire
from payorders.sandbox.wechatpay.trades import WechatPayTrades
from payorders.sandbox.wechatpay.wire import WechatPayError

log = logging.getLogger(__name__)

RETRY_SCHEDULE_S = (
    15, 15, 30, 3 * 60, 10 * 60, 20 * 60, 30 * 60, 30 * 60, 30 * 60, 60 * 60,
    3 * 3600, 3 * 3600, 3 * 3600, 6 * 3600, 6 * 3600,
)  # fmt: skip
"""The waits between callbacks until one is acknowledged: the first at once, then again
after 15s/15s/30s/3m/10m/20m/30m/30m/30m/60m/3h/3h/3h/6h/6h, "总计 24h4m" (the payment and
refund callback pages, https://pay.weixin.qq.com/doc/v3/merchant/4012082022 and
https://wechatpay.im/webhook/v3/TRANSACTION.SUCCESS)."""
ACKNOWLEDGED = frozenset({200, 204})
""""接收成功: HTTP应答状态码需返回200或204, 无需返回应答报文" (the callback's answer,
https://pay.weixin.qq.com/wiki/doc/apiv3/apis/chapter3_3_5.shtml): any other answer, or none
within 5 s ("商户系统收到支付结果通知, 需要在5秒内返回应答报文", the callback notes,
https://pay.weixin.qq.com/doc/v3/merchant/4012075420), is notified again."""
LABEL = "local wechatpay"

_ENV = "PAYORDERS_LOCAL_WECHATPAY_"
ENV_MCHID = f"{_ENV}MCHID"
ENV_APPID = f"{_ENV}APPID"
ENV_MERCHANT_PUBLIC_KEY = f"{_ENV}MERCHANT_PUBLIC_KEY"
ENV_MERCHANT_SERIAL_NO = f"{_ENV}MERCHANT_SERIAL_NO"
ENV_APIV3_KEY = f"{_ENV}APIV3_KEY"
ENV_PRIVATE_KEY = f"{_ENV}PRIVATE_KEY"
ENV_PUBLIC_KEY_ID = f"{_ENV}PUBLIC_KEY_ID"
ENV_NOTIFY_SPEEDUP = f"{_ENV}NOTIFY_SPEEDUP"
ENV_REFUND_PROCESSING_S = f"{_ENV}REFUND_PROCESSING_S"
ENV_DATABASE_URL = "PAYORDERS_DATABASE_URL"


@dataclass(frozen=True)
class LocalWechatPayConfig:
    mchid: str
    appid: str
    merchant_public_key_pem: str
    """The merchant's public key: verifies every request (the product signs with the
    private half)."""
    merchant_serial_no: str
    """The serial number of the merchant's API certificate (hex), named by each request."""
    apiv3_key: str
    """The merchant's APIv3 key (32 bytes): seals the callbacks' resources."""
    platform_private_key_pem: str
    """This server's ("WeChat Pay's") private key: signs answers and callbacks; the product
    holds its public half ("WeChat Pay public key" mode)."""
    public_key_id: str
    """The id of that public key (``PUB_KEY_ID_...``), in ``Wechatpay-Serial``."""
    database_url: str
    schema: str = "wechatpay_gateway"
    notify_speedup: float = 1.0
    """WeChat Pay's callback schedule (15 s ... 6 h) divided by this (tests: hundreds)."""
    server_timeout_s: float = 5.0
    """WeChat Pay's own limit: a call delayed past it (``delay_ms``) answers 500
    ``SYSTEM_ERROR``, nothing done."""
    withhold_answer_s: float = 120.0
    """How long the ``timeout_after_success_next`` fault holds a refund's answer back."""
    refund_processing_s: float = 1.0
    """How long a refund stays ``PROCESSING`` before it ends (``0``: ``SUCCESS`` in the
    refund's own answer)."""
    db_pool_max: int = 10


class _Server(LocalServer[WechatPayTrades]):
    """What the routes share: the trades, the keys and the configuration; the frame's
    ``LocalGateway`` (``sandbox.local``)."""

    def __init__(self, config: LocalWechatPayConfig, trades: WechatPayTrades) -> None:
        super().__init__(trades, NotificationSchedule(RETRY_SCHEDULE_S, config.notify_speedup))
        self.config = config
        self.merchant_key = wire.load_key(config.merchant_public_key_pem, private=False)
        self.key = wire.load_key(config.platform_private_key_pem, private=True)

    async def serve(
        self,
        request: Request,
        op: Callable[[dict[str, Any] | None], Awaitable[dict[str, Any] | None]],
    ) -> Response:
        """One ``/v3`` request: authenticated, its JSON body (a POST's) handed to ``op``,
        and ``op``'s answer signed (``None``: 204)."""
        raw = await request.body()
        return await unless_client_leaves(request, self._answer(request, raw, op))

    async def _answer(
        self,
        request: Request,
        raw: bytes,
        op: Callable[[dict[str, Any] | None], Awaitable[dict[str, Any] | None]],
    ) -> Response:
        try:
            self._authenticate(request, raw)
            body = wire.parse_body(raw) if request.method == "POST" else None
            result = await op(body)
        except WechatPayError as e:
            return self.signed(e.status, e.payload())
        except GatewayUnavailable as e:
            return self.signed(500, wire.system_error(str(e)).payload())
        except Exception:
            # Whatever failed, the caller cannot know whether it was done: SYSTEM_ERROR.
            log.exception("local wechatpay: %s %s failed", request.method, request.url.path)
            return self.signed(500, wire.system_error("internal error").payload())
        return self.signed(200 if result is not None else 204, result)

    def _authenticate(self, request: Request, raw: bytes) -> None:
        """The ``Authorization`` of the signature-generation page: a merchant and a
        certificate this server knows, a fresh timestamp, a signature that verifies."""
        auth = wire.parse_authorization(request.headers.get("authorization"))
        if auth.mchid != self.config.mchid:
            raise wire.sign_error(f"no merchant {auth.mchid} here")
        if auth.serial_no.upper() != self.config.merchant_serial_no.upper():
            raise wire.sign_error("serial_no is not the merchant certificate's")
        target = request.scope["raw_path"].decode("latin-1")
        if query := request.scope["query_string"].decode("latin-1"):
            target = f"{target}?{query}"
        wire.check_request(
            auth,
            method=request.method,
            target=target,
            body=raw.decode("utf-8", "replace"),
            merchant_key=self.merchant_key,
            now=time.time(),
        )

    def signed(self, status: int, payload: dict[str, Any] | None) -> Response:
        body = b"" if payload is None else wire.dumps(payload)
        headers = {
            "Request-ID": str(uuid.uuid4()),
            **wire.signed_headers(self.key, self.config.public_key_id, body),
        }
        if payload is None:
            return Response(status_code=status, headers=headers)
        return Response(
            body, status_code=status, headers=headers, media_type="application/json; charset=utf-8"
        )

    # --- the frame's LocalGateway ------------------------------------------------------------

    def render(self, stored: bytes) -> tuple[str, dict[str, str], bytes]:
        """A stored callback as this attempt sends it: the same body, signed now."""
        doc = json.loads(stored)
        body = doc["body"].encode()
        headers = {
            "Content-Type": "application/json",
            "Request-ID": str(uuid.uuid4()),
            **wire.signed_headers(self.key, self.config.public_key_id, body),
        }
        return doc["url"], headers, body

    def refusal(self, answer: httpx.Response) -> str | None:
        if answer.status_code in ACKNOWLEDGED:
            return None
        return f"HTTP {answer.status_code}: only 200 or 204 acknowledges a callback"


# --- the app ---------------------------------------------------------------------------------


def create_local_wechatpay_app(config: LocalWechatPayConfig) -> FastAPI:
    """The local WeChat Pay's ASGI app; it connects to PostgreSQL when it starts serving.

    Raises:
        ValueError: a key that is not an RSA key of the right kind, an APIv3 key that is
            not 32 bytes, an id missing, or a bad speedup or refund time.
    """
    wire.load_key(config.merchant_public_key_pem, private=False)
    wire.load_key(config.platform_private_key_pem, private=True)
    wire.check_apiv3_key(config.apiv3_key)
    for name in ("mchid", "appid", "merchant_serial_no", "public_key_id"):
        if not getattr(config, name):
            raise ValueError(f"{name} must not be empty")
    NotificationSchedule(RETRY_SCHEDULE_S, config.notify_speedup)  # refuses a bad speedup
    if not 0 <= config.refund_processing_s < float("inf"):
        raise ValueError("refund_processing_s must be zero or more")

    def open_book(pool: asyncpg.Pool) -> WechatPayTrades:
        return WechatPayTrades(
            pool,
            schema=config.schema,
            mchid=config.mchid,
            apiv3_key=config.apiv3_key,
            server_timeout_s=config.server_timeout_s,
            withhold_answer_s=config.withhold_answer_s,
            refund_processing_s=config.refund_processing_s,
        )

    return local.local_gateway_app(
        title="payorders local WeChat Pay",
        database_url=config.database_url,
        db_pool_max=config.db_pool_max,
        open_book=open_book,
        serve=lambda trades: _Server(config, trades),
        vendor_router=router,
        max_trade_no_len=32,
    )


def app() -> FastAPI:
    """For ``uvicorn --factory payorders.sandbox.wechatpay:app``: the configuration from
    ``PAYORDERS_LOCAL_WECHATPAY_*`` and ``PAYORDERS_DATABASE_URL``; one line and exit 2 when
    one is missing or not what it should be."""
    logs.configure(logging.WARNING)
    values = local.vendor_env(
        LABEL,
        ENV_MCHID,
        ENV_APPID,
        ENV_MERCHANT_PUBLIC_KEY,
        ENV_MERCHANT_SERIAL_NO,
        ENV_APIV3_KEY,
        ENV_PRIVATE_KEY,
        ENV_PUBLIC_KEY_ID,
        ENV_DATABASE_URL,
        public_key=ENV_MERCHANT_PUBLIC_KEY,
        private_key=ENV_PRIVATE_KEY,
    )
    try:
        wire.check_apiv3_key(values[ENV_APIV3_KEY])
    except ValueError as e:
        local.refuse_to_start(LABEL, f"{ENV_APIV3_KEY}: {e}")
    speedup = local.number_env(LABEL, ENV_NOTIFY_SPEEDUP, "1", positive=True)
    processing_s = local.number_env(LABEL, ENV_REFUND_PROCESSING_S, "1", positive=False)
    return create_local_wechatpay_app(
        LocalWechatPayConfig(
            mchid=values[ENV_MCHID],
            appid=values[ENV_APPID],
            merchant_public_key_pem=values[ENV_MERCHANT_PUBLIC_KEY],
            merchant_serial_no=values[ENV_MERCHANT_SERIAL_NO],
            apiv3_key=values[ENV_APIV3_KEY],
            platform_private_key_pem=values[ENV_PRIVATE_KEY],
            public_key_id=values[ENV_PUBLIC_KEY_ID],
            database_url=values[ENV_DATABASE_URL],
            notify_speedup=speedup,
            refund_processing_s=processing_s,
        )
    )


# --- routes ----------------------------------------------------------------------------------

router = APIRouter()
"""WeChat Pay's API v3 and the refund outcomes; the frame adds the buyer's side and the
control routes."""


@router.post("/v3/pay/transactions/native")
async def native_prepay(request: Request) -> Response:
    """Native下单 (https://pay.weixin.qq.com/doc/v3/merchant/4012791877)."""
    server = _Server.of(request)

    async def op(body: dict[str, Any] | None) -> dict[str, Any]:
        assert body is not None
        return await server.trades.native_prepay(body, appid=server.config.appid)

    return await server.serve(request, op)


@router.get("/v3/pay/transactions/out-trade-no/{out_trade_no}")
async def query_by_out_trade_no(request: Request, out_trade_no: str) -> Response:
    """商户订单号查询订单 (https://pay.weixin.qq.com/doc/v3/merchant/4013070356)."""
    server = _Server.of(request)

    async def op(_: dict[str, Any] | None) -> dict[str, Any]:
        return await server.trades.query(
            mchid=request.query_params.get("mchid"), out_trade_no=out_trade_no
        )

    return await server.serve(request, op)


@router.get("/v3/pay/transactions/id/{transaction_id}")
async def query_by_transaction_id(request: Request, transaction_id: str) -> Response:
    """微信支付订单号查询订单 (https://pay.weixin.qq.com/doc/v3/merchant/4013070354)."""
    server = _Server.of(request)

    async def op(_: dict[str, Any] | None) -> dict[str, Any]:
        return await server.trades.query(
            mchid=request.query_params.get("mchid"), transaction_id=transaction_id
        )

    return await server.serve(request, op)


@router.post("/v3/pay/transactions/out-trade-no/{out_trade_no}/close")
async def close(request: Request, out_trade_no: str) -> Response:
    """关闭订单 (https://pay.weixin.qq.com/doc/v3/merchant/4013070360): 204, no body."""
    server = _Server.of(request)

    async def op(body: dict[str, Any] | None) -> None:
        assert body is not None
        await server.trades.close(out_trade_no, body)

    return await server.serve(request, op)


@router.post("/v3/refund/domestic/refunds")
async def create_refund(request: Request) -> Response:
    """退款申请 (``POST /v3/refund/domestic/refunds``)."""
    server = _Server.of(request)

    async def op(body: dict[str, Any] | None) -> dict[str, Any]:
        assert body is not None
        return await server.trades.create_refund(body)

    return await server.serve(request, op)


@router.get("/v3/refund/domestic/refunds/{out_refund_no}")
async def query_refund(request: Request, out_refund_no: str) -> Response:
    """查询单笔退款 (https://pay.wechatpay.cn/doc/v3/partner/4012760530)."""
    server = _Server.of(request)

    async def op(_: dict[str, Any] | None) -> dict[str, Any]:
        return await server.trades.query_refund(out_refund_no)

    return await server.serve(request, op)


# --- the local WeChat Pay's own control (no signature; the sandbox's JSON) -------------------

Count = Annotated[int, Field(ge=0, le=2**31 - 1)]


class RefundOutcomes(BaseModel):
    """How the next refunds of a scope end instead of ``SUCCESS``: ``ABNORMAL`` first
    ("退款异常", the buyer's card refused the money,
    https://wechatpay.im/webhook/v3/REFUND.ABNORMAL), then ``CLOSED`` ("退款关闭",
    https://pay.weixin.qq.com/doc/v3/partner/4013080629)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    abnormal_next: Count = 0
    closed_next: Count = 0


@router.put("/v1/wechatpay/refund-outcomes/{scope}")
async def arm_refund_outcomes(
    request: Request, scope: str, outcomes: RefundOutcomes
) -> dict[str, Any]:
    """Arm refund outcomes for an ``out_trade_no``, or for every order with scope ``*``."""
    if scope != "*" and not 1 <= len(scope) <= 32:
        raise domain.InvalidInput("scope must be * or an out_trade_no")
    await _Server.of(request).trades.arm_refund_outcomes(scope, **outcomes.model_dump())
    return {"scope": scope, **outcomes.model_dump()}


@router.get("/v1/wechatpay/refund-outcomes")
async def refund_outcomes(request: Request) -> list[dict[str, Any]]:
    return await _Server.of(request).trades.refund_outcomes()


@router.delete("/v1/wechatpay/refund-outcomes", status_code=204)
async def clear_refund_outcomes(request: Request) -> None:
    await _Server.of(request).trades.clear_refund_outcomes()

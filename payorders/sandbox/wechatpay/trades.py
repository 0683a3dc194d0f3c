"""The local WeChat Pay's orders and refunds, and what each API does with them.

State is PostgreSQL: the money rows (capture, refund, refund_call, fault, webhook_delivery)
are the sandbox's ledger (``SandboxGateway``) in this server's own schema, so the tools
that read a sandbox ledger and the faults API work unchanged; WeChat Pay's orders and
refunds are ``wechatpay_trade`` and ``wechatpay_refund`` beside them. A capture's
``txn_id`` is the order's ``transaction_id``; a ledger refund row is written when a refund
ends ``SUCCESS`` (the money is back with the buyer), under its ``out_refund_no``.

A Native order exists from ``/v3/pay/transactions/native`` on (``NOTPAY``), unlike an
Alipay pre-order; ``time_expire`` is only the last moment the buyer can pay: the order
stays ``NOTPAY`` until closed ("支付结束时间是指用户能够完成该笔订单支付的最后时限, 并非订单关闭
的时间。超过此时间后, 用户将无法对该笔订单进行支付。如需关闭订单, 请调用关闭订单API接口",
https://pay.weixin.qq.com/doc/v3/merchant/4012791877).

A refund is answered ``PROCESSING`` and ends ``SUCCESS`` ``refund_processing_s`` later
(``0``: ``SUCCESS`` in the answer itself), or ``ABNORMAL`` / ``CLOSED`` when armed so
(``wechatpay_refund_fault``); "申请退款接口的返回仅代表业务的受理情况"
(https://pay.weixin.qq.com/wiki/doc/api_external/en/apis/chapter3_4_3.shtml, "The return
of the refund application interface only represents the acceptance status"), "若超过5分钟
仍是退款处理中状态" (https://pay.wechatpay.cn/doc/v3/partner/4012760530, query refund).

Every method raises ``WechatPayError`` for an answer other than 2xx; a
``GatewayUnavailable`` from the ledger (an injected fault, a delay past the server's own
timeout) is the caller's ``500 SYSTEM_ERROR``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from payorders.core.store import Conn
from payorders.gateways.port import Capture, RefundRequest
from payorders.sandbox.local import LocalTradeBook
from payorders.sandbox.wechatpay import wire
from payorders.sandbox.wechatpay.wire import WechatPayError, invalid_request, param_error

CURRENCY = "CNY"
NOTPAY, SUCCESS, CLOSED, REFUND = "NOTPAY", "SUCCESS", "CLOSED", "REFUND"
TRADE_STATE_DESC = {
    NOTPAY: "订单未支付",
    SUCCESS: "支付成功",
    CLOSED: "订单已关闭",
    REFUND: "订单发生过退款",
}
PROCESSING, ABNORMAL = "PROCESSING", "ABNORMAL"
REFUND_EVENTS = {
    SUCCESS: ("REFUND.SUCCESS", "退款成功"),
    ABNORMAL: ("REFUND.ABNORMAL", "退款异常"),
    CLOSED: ("REFUND.CLOSED", "退款关闭"),
}
"""A refund's final status, its callback's ``event_type`` and ``summary`` (refund
notification page, https://pay.weixin.qq.com/doc/v3/merchant/4013070388)."""
HOLDING = (PROCESSING, SUCCESS, ABNORMAL)
"""Refund statuses whose money is no longer refundable: a closed refund gives it back
(https://pay.weixin.qq.com/doc/v3/partner/4013080629, "退款关闭" when the refund could not
be paid out)."""
DEFAULT_EXPIRY = timedelta(hours=2)
"""An order's payable time when the merchant gives no ``time_expire`` (our choice: a Native
``code_url`` is valid for two hours)."""
USER_RECEIVED_ACCOUNT = "支付用户零钱"

_LOCK_ID = 0x776563686174  # "wechat"
_DDL = """
CREATE SEQUENCE IF NOT EXISTS {s}.wechatpay_seq;
CREATE TABLE IF NOT EXISTS {s}.wechatpay_trade (
    out_trade_no   text PRIMARY KEY,
    transaction_id text UNIQUE CHECK (transaction_id ~ '^[0-9]{{28}}$'),
    appid          text NOT NULL,
    description    text NOT NULL,
    total          bigint NOT NULL CHECK (total > 0),
    attach         text,
    notify_url     text NOT NULL,
    time_expire    timestamptz NOT NULL,
    request        text NOT NULL,
    code_url       text NOT NULL,
    state          text NOT NULL CHECK (state IN ('NOTPAY', 'SUCCESS', 'CLOSED')),
    openid         text,
    pay_key        text UNIQUE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    paid_at        timestamptz,
    closed_at      timestamptz,
    CHECK ((state = 'SUCCESS') = (paid_at IS NOT NULL)),
    CHECK ((state = 'SUCCESS') = (transaction_id IS NOT NULL))
);
CREATE TABLE IF NOT EXISTS {s}.wechatpay_refund (
    out_refund_no  text PRIMARY KEY,
    refund_id      text NOT NULL UNIQUE,
    out_trade_no   text NOT NULL REFERENCES {s}.wechatpay_trade,
    transaction_id text NOT NULL,
    total          bigint NOT NULL CHECK (total > 0),
    amount         bigint NOT NULL CHECK (amount > 0 AND amount <= total),
    reason         text,
    notify_url     text,
    status         text NOT NULL CHECK (status IN ('PROCESSING', 'SUCCESS', 'ABNORMAL',
                                                   'CLOSED')),
    ends_as        text NOT NULL CHECK (ends_as IN ('SUCCESS', 'ABNORMAL', 'CLOSED')),
    settle_at      timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    success_time   timestamptz,
    CHECK ((status = 'SUCCESS') = (success_time IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS wechatpay_refund_due ON {s}.wechatpay_refund (settle_at)
    WHERE status = 'PROCESSING';
CREATE INDEX IF NOT EXISTS wechatpay_refund_trade ON {s}.wechatpay_refund (out_trade_no);
CREATE TABLE IF NOT EXISTS {s}.wechatpay_refund_fault (
    scope         text PRIMARY KEY,
    abnormal_next integer NOT NULL DEFAULT 0 CHECK (abnormal_next >= 0),
    closed_next   integer NOT NULL DEFAULT 0 CHECK (closed_next >= 0)
);
"""
# "要求6-32个字符内, 只能是数字、大小写字母_-|* 且在同一个商户号下唯一" (Native下单,
# https://pay.weixin.qq.com/doc/v3/merchant/4012791877, out_trade_no).
OUT_TRADE_NO = re.compile(r"[A-Za-z0-9_\-|*]{6,32}")
# "商户系统内部的退款单号, 商户系统内部唯一, 只能是数字、大小写字母_-|*@, 同一退款单号多次请求
# 只退一笔" (申请退款, out_refund_no string(64)).
OUT_REFUND_NO = re.compile(r"[A-Za-z0-9_\-|*@]{1,64}")
_NOTIFY_URL = re.compile(r"https?://[^\s?#]{1,247}")
_SELECT_TRADE = (
    "SELECT t.*, COALESCE((SELECT sum(r.amount) FROM {s}.wechatpay_refund r"
    " WHERE r.out_trade_no = t.out_trade_no"
    " AND r.status IN ('PROCESSING', 'SUCCESS', 'ABNORMAL')), 0)::bigint AS refunding"
    " FROM {s}.wechatpay_trade t"
)


@dataclass(frozen=True)
class Trade:
    out_trade_no: str
    transaction_id: str | None
    appid: str
    description: str
    total: int
    attach: str | None
    notify_url: str
    time_expire: datetime
    request: str
    code_url: str
    state: str
    openid: str | None
    pay_key: str | None
    created_at: datetime
    paid_at: datetime | None
    closed_at: datetime | None
    refunding: int
    """What its refunds hold, but those closed."""

    def expired(self, now: datetime) -> bool:
        # A payment at time_expire itself is taken; WeChat Pay's times are to the second.
        return now.replace(microsecond=0) > self.time_expire

    @property
    def trade_state(self) -> str:
        """``trade_state``: ``REFUND`` ("转入退款") once a refund is made of a paid order."""
        return REFUND if self.state == SUCCESS and self.refunding else self.state


@dataclass(frozen=True)
class Refund:
    out_refund_no: str
    refund_id: str
    out_trade_no: str
    transaction_id: str
    total: int
    """The order's total."""
    amount: int
    reason: str | None
    notify_url: str | None
    status: str
    ends_as: str
    settle_at: datetime
    created_at: datetime
    success_time: datetime | None


class WechatPayTrades(LocalTradeBook[Trade]):
    """WeChat Pay's APIs over the orders, refunds and the sandbox's ledger
    (``self.ledger``, which sends this class's callbacks)."""

    vendor = "WeChat Pay"
    table = "wechatpay_trade"
    select = _SELECT_TRADE
    txn_column = "transaction_id"
    lock_id = _LOCK_ID
    ddl = _DDL
    currency = CURRENCY
    # The buyer's side (``LocalTradeBook.pay``): one payment per order, of exactly its
    # total in CNY, until ``time_expire`` (a payment at that very second is taken).
    no_trade = "no order {no} (Native下单 first)"
    one_payment = "{no} is paid already: one payment per order"
    not_the_total = (
        "amount {amount} is not the order's total {total} (WeChat Pay takes exactly the total)"
    )

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        schema: str,
        mchid: str,
        apiv3_key: str,
        server_timeout_s: float,
        withhold_answer_s: float,
        refund_processing_s: float,
    ) -> None:
        super().__init__(
            pool,
            schema=schema,
            server_timeout_s=server_timeout_s,
            withhold_answer_s=withhold_answer_s,
            bodies=_Callbacks(self),
        )
        self._mchid = mchid
        self._apiv3_key = wire.check_apiv3_key(apiv3_key)
        self._refund_processing = timedelta(seconds=refund_processing_s)

    # --- Native下单, 查询订单, 关闭订单 ------------------------------------------------------

    async def native_prepay(self, body: dict[str, Any], *, appid: str) -> dict[str, Any]:
        """https://pay.weixin.qq.com/doc/v3/merchant/4012791877: an order and its
        ``code_url``. The same ``out_trade_no`` with the same body again answers the same
        ``code_url``; another body is ``403 OUT_TRADE_NO_USED`` ("商户订单号重复"), a paid
        order ``400 ORDERPAID``, a closed one ``400 ORDER_CLOSED`` (its error codes)."""
        self._check_mchid(body.get("mchid"))
        if body.get("appid") != appid:
            raise WechatPayError(400, "APPID_MCHID_NOT_MATCH", "appid和mchid不匹配")
        no = _out_trade_no(body.get("out_trade_no"))
        description = _text(body, "description", max_len=127)
        attach = _optional_text(body, "attach", max_len=128)
        notify_url = _notify_url(body.get("notify_url"), required=True)
        assert notify_url is not None
        amount = body.get("amount")
        if not isinstance(amount, dict):
            raise param_error("amount is required: {total, currency}")
        total = wire.fen(amount.get("total"), "amount.total")
        if amount.get("currency", CURRENCY) != CURRENCY:
            raise param_error("amount.currency: 境内商户号仅支持人民币 (CNY)")
        expire_text = body.get("time_expire")
        try:
            time_expire = (
                datetime.now(UTC).replace(microsecond=0) + DEFAULT_EXPIRY
                if expire_text is None
                else wire.parse_rfc3339(expire_text)
            )
        except ValueError:
            raise param_error("time_expire must be yyyy-MM-DDTHH:mm:ss+TIMEZONE") from None
        await self.ledger.apply_delay(no)
        request = wire.canonical(body)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {self._s}.wechatpay_trade (out_trade_no, appid, description,"
                " total, attach, notify_url, time_expire, request, code_url, state)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'NOTPAY')"
                " ON CONFLICT (out_trade_no) DO NOTHING",
                no,
                appid,
                description,
                total,
                attach,
                notify_url,
                time_expire,
                request,
                f"weixin://wxpay/bizpayurl?pr={wire.random_text(7)}",
            )
            trade = await self._find(conn, out_trade_no=no)
        assert trade is not None
        if trade.request != request:
            raise WechatPayError(403, "OUT_TRADE_NO_USED", "商户订单号重复")
        if trade.paid_at is not None:
            raise WechatPayError(400, "ORDERPAID", "该订单已支付")
        if trade.state == CLOSED:
            raise WechatPayError(400, "ORDER_CLOSED", "订单已关闭")
        return {"code_url": trade.code_url}

    async def query(
        self,
        *,
        mchid: str | None,
        out_trade_no: str | None = None,
        transaction_id: str | None = None,
    ) -> dict[str, Any]:
        """https://pay.weixin.qq.com/doc/v3/merchant/4013070356 (by ``out_trade_no``) and
        https://pay.weixin.qq.com/doc/v3/merchant/4013070354 (by ``transaction_id``, only a
        paid order has one): the order, or ``404 ORDER_NOT_EXIST``."""
        self._check_mchid(mchid)
        trade = await self._named(txn_id=transaction_id, out_trade_no=out_trade_no)
        if trade is None:
            raise _order_not_exist()
        await self.ledger.apply_delay(trade.out_trade_no)
        return self.transaction_json(trade)

    async def close(self, out_trade_no: str, body: dict[str, Any]) -> None:
        """https://pay.weixin.qq.com/doc/v3/merchant/4013070360: an unpaid order closes
        (204, also once ``time_expire`` has passed: that is when to close it); a paid one
        refuses, ``400 ORDERPAID`` (the field notes: read the order back when a close is
        refused); no such order, ``404 ORDER_NOT_EXIST``. A closed order closes again
        without complaint (our choice; "订单已关闭, 无需继续调用", the v2 close's advice).

        The ``paid_on_close_amount`` fault: the buyer pays at the very instant of the close,
        which then finds the order paid. WeChat Pay takes only the order's own total in
        CNY, so the fault's amount and currency only arm it."""
        self._check_mchid(body.get("mchid"))
        faults = await self.ledger.apply_delay(out_trade_no)
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await self._find(conn, out_trade_no=out_trade_no, lock=True)
            if locked is None:
                raise _order_not_exist()
            trade = await self._paid_on_close(conn, locked, faults)
            if trade.state == NOTPAY:
                await conn.execute(
                    f"UPDATE {self._s}.wechatpay_trade SET state = 'CLOSED', closed_at = now()"
                    " WHERE out_trade_no = $1",
                    out_trade_no,
                )
        if trade.paid_at is not None:
            self.ledger.wake_delivery()
            raise WechatPayError(400, "ORDERPAID", "订单已支付, 不能关闭")

    def transaction_json(self, trade: Trade) -> dict[str, Any]:
        """An order as the query answers it and the payment callback carries it."""
        doc: dict[str, Any] = {
            "appid": trade.appid,
            "mchid": self._mchid,
            "out_trade_no": trade.out_trade_no,
            "trade_type": "NATIVE",
            "trade_state": trade.trade_state,
            "trade_state_desc": TRADE_STATE_DESC[trade.trade_state],
            "amount": {"total": trade.total, "currency": CURRENCY, "payer_currency": CURRENCY},
        }
        if trade.attach is not None:
            doc["attach"] = trade.attach
        if trade.paid_at is not None:
            doc["transaction_id"] = trade.transaction_id
            doc["bank_type"] = "OTHERS"
            doc["success_time"] = wire.rfc3339(trade.paid_at)
            doc["payer"] = {"openid": trade.openid}
            doc["amount"]["payer_total"] = trade.total
        return doc

    # --- 退款申请, 查询单笔退款 --------------------------------------------------------------

    async def create_refund(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v3/refund/domestic/refunds`` through the ledger's refund faults
        (``fail_next_refunds`` and a delay past the server's timeout are a 500 before
        anything is done; ``timeout_after_success_next`` makes the refund, then holds the
        answer back).

        The order by ``transaction_id``, else ``out_trade_no`` (no such order: ``404
        RESOURCE_NOT_EXISTS``); ``amount.total`` must be the order's, ``amount.refund``
        at most what is left (else ``400 INVALID_REQUEST``). "同一退款单号多次请求只退一笔": the
        same ``out_refund_no`` again answers that refund and moves nothing; with another
        order or amount it is ``400 INVALID_REQUEST`` "订单金额或退款金额与之前请求不一致"."""
        out_refund_no = _text(body, "out_refund_no", max_len=64)
        if not OUT_REFUND_NO.fullmatch(out_refund_no):
            raise param_error("out_refund_no: 1-64 characters of A-Z, a-z, 0-9, _-|*@")
        reason = _optional_text(body, "reason", max_len=80)
        notify_url = _notify_url(body.get("notify_url"), required=False)
        amount = body.get("amount")
        if not isinstance(amount, dict):
            raise param_error("amount is required: {refund, total, currency}")
        refund = wire.fen(amount.get("refund"), "amount.refund")
        total = wire.fen(amount.get("total"), "amount.total")
        if amount.get("currency") != CURRENCY:
            raise param_error("amount.currency must be CNY")
        trade = await self._trade_of(body)
        if trade.paid_at is None or trade.transaction_id is None:
            raise invalid_request("订单未支付, 不能退款")
        if total != trade.total:
            raise invalid_request(f"amount.total {total} is not the order's total {trade.total}")
        if refund > total:
            raise invalid_request("退款金额不能大于订单金额")
        request = RefundRequest(
            idempotency_key=out_refund_no,
            pay_order_no=trade.out_trade_no,
            txn_id=trade.transaction_id,
            amount=refund,
            currency=CURRENCY,
        )
        await self.ledger.refund_faults_before(request)
        async with self._pool.acquire() as conn, conn.transaction():
            made, created = await self._refund_locked(conn, request, reason, notify_url)
        if not created:
            return self.refund_json(made)
        self.ledger.wake_delivery()
        await self.ledger.refund_faults_after(request)
        return self.refund_json(made)

    async def _refund_locked(
        self, conn: Conn, request: RefundRequest, reason: str | None, notify_url: str | None
    ) -> tuple[Refund, bool]:
        key = request.idempotency_key
        trade = await self._find(conn, out_trade_no=request.pay_order_no, lock=True)
        assert trade is not None
        existing = await self._find_refund(conn, key)
        if existing is not None:
            if (existing.out_trade_no, existing.amount) != (trade.out_trade_no, request.amount):
                await self.ledger.log_refund_call(key, "REJECTED_KEY_REUSE", conn)
                raise invalid_request("订单金额或退款金额与之前请求不一致, 请核实后再试")
            await self.ledger.log_refund_call(key, "REPLAYED", conn)
            return existing, False
        if trade.refunding + request.amount > trade.total:
            await self.ledger.log_refund_call(key, "REJECTED_EXCEEDS", conn)
            left = trade.total - trade.refunding
            raise invalid_request(f"申请退款金额超过订单可退金额 ({left} fen left)")
        ends_as = await self._armed_outcome(conn, trade.out_trade_no)
        now_final = ends_as == SUCCESS and not self._refund_processing
        seq = await conn.fetchval(f"SELECT nextval('{self._s}.wechatpay_seq')")
        await conn.execute(
            f"INSERT INTO {self._s}.wechatpay_refund (out_refund_no, refund_id, out_trade_no,"
            " transaction_id, total, amount, reason, notify_url, status, ends_as, settle_at,"
            " success_time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
            " now() + make_interval(secs => $11), CASE WHEN $9 = 'SUCCESS' THEN now() END)",
            key,
            _refund_id(seq),
            trade.out_trade_no,
            request.txn_id,
            trade.total,
            request.amount,
            reason,
            notify_url,
            SUCCESS if now_final else PROCESSING,
            ends_as,
            self._refund_processing.total_seconds(),
        )
        if now_final:
            await self.ledger.refund_in(conn, request, notify=True)
        else:
            await self.ledger.log_refund_call(key, "ACCEPTED_PROCESSING", conn)
        made = await self._find_refund(conn, key)
        assert made is not None
        return made, True

    async def query_refund(self, out_refund_no: str) -> dict[str, Any]:
        """https://pay.wechatpay.cn/doc/v3/partner/4012760530 (the direct merchant's is the
        same path without ``sub_mchid``): the refund, or ``404 RESOURCE_NOT_EXISTS``."""
        await self.settle_due(out_refund_no)
        async with self._pool.acquire() as conn:
            found = await self._find_refund(conn, out_refund_no)
        if found is None:
            raise WechatPayError(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
        await self.ledger.apply_delay(found.out_trade_no)
        return self.refund_json(found)

    async def tick(self) -> None:
        """Before each delivery round: the refunds due settle."""
        await self.settle_due()

    async def settle_due(self, out_refund_no: str | None = None) -> None:
        """Refunds ``PROCESSING`` past their time end as armed: ``SUCCESS`` (the ledger's
        refund row, the money back with the buyer), ``ABNORMAL`` or ``CLOSED``; each
        queues its callback. Only ``out_refund_no`` when given."""
        sql = (
            f"SELECT out_refund_no, out_trade_no FROM {self._s}.wechatpay_refund"
            " WHERE status = 'PROCESSING' AND settle_at <= now()"
        )
        async with self._pool.acquire() as conn:
            if out_refund_no is None:
                due = await conn.fetch(sql + " ORDER BY settle_at LIMIT 100")
            else:
                due = await conn.fetch(sql + " AND out_refund_no = $1", out_refund_no)
            for row in due:
                async with conn.transaction():
                    await self._find(conn, out_trade_no=row["out_trade_no"], lock=True)
                    refund = await self._find_refund(conn, row["out_refund_no"], lock=True)
                    if refund is None or refund.status != PROCESSING:
                        continue  # settled meanwhile
                    await self._settle_locked(conn, refund)
        if due:
            self.ledger.wake_delivery()

    async def _settle_locked(self, conn: Conn, refund: Refund) -> None:
        await conn.execute(
            f"UPDATE {self._s}.wechatpay_refund SET status = $2,"
            " success_time = CASE WHEN $2 = 'SUCCESS' THEN now() END WHERE out_refund_no = $1",
            refund.out_refund_no,
            refund.ends_as,
        )
        if refund.ends_as == SUCCESS:
            request = RefundRequest(
                idempotency_key=refund.out_refund_no,
                pay_order_no=refund.out_trade_no,
                txn_id=refund.transaction_id,
                amount=refund.amount,
                currency=CURRENCY,
            )
            # In bounds: the refund held its money from its request on.
            await self.ledger.refund_in(conn, request, notify=True)
            return
        await self.ledger.log_refund_call(refund.out_refund_no, refund.ends_as, conn)
        settled = await self._find_refund(conn, refund.out_refund_no)
        assert settled is not None
        event = self._refund_callback(settled)
        if event is not None:
            await self.ledger.queue_notification_in(
                conn,
                event[0],
                pay_order_no=settled.out_trade_no,
                txn_id=settled.transaction_id,
                body=event[1],
            )

    def refund_json(self, refund: Refund) -> dict[str, Any]:
        """A refund as the refund APIs answer it (申请退款, 查询单笔退款)."""
        doc: dict[str, Any] = {
            "refund_id": refund.refund_id,
            "out_refund_no": refund.out_refund_no,
            "transaction_id": refund.transaction_id,
            "out_trade_no": refund.out_trade_no,
            "channel": "ORIGINAL",
            "user_received_account": USER_RECEIVED_ACCOUNT,
            "create_time": wire.rfc3339(refund.created_at),
            "status": refund.status,
            "funds_account": "AVAILABLE",
            "amount": {
                "total": refund.total,
                "refund": refund.amount,
                "payer_total": refund.total,
                "payer_refund": refund.amount,
                "settlement_total": refund.total,
                "settlement_refund": refund.amount,
                "discount_refund": 0,
                "currency": CURRENCY,
            },
            "promotion_detail": [],
        }
        if refund.success_time is not None:
            doc["success_time"] = wire.rfc3339(refund.success_time)
        return doc

    # --- refund outcomes (the local WeChat Pay's own control) --------------------------------

    async def arm_refund_outcomes(
        self, scope: str, *, abnormal_next: int, closed_next: int
    ) -> None:
        """The next refunds of ``scope`` (an ``out_trade_no``, or ``*``) end ``ABNORMAL``
        (the buyer's card refused it), then ``CLOSED``, instead of ``SUCCESS``."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                f"INSERT INTO {self._s}.wechatpay_refund_fault (scope, abnormal_next,"
                " closed_next) VALUES ($1, $2, $3) ON CONFLICT (scope) DO UPDATE SET"
                " abnormal_next = EXCLUDED.abnormal_next, closed_next = EXCLUDED.closed_next",
                scope,
                abnormal_next,
                closed_next,
            )

    async def refund_outcomes(self) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT * FROM {self._s}.wechatpay_refund_fault"
                " WHERE abnormal_next > 0 OR closed_next > 0 ORDER BY scope"
            )
        return [dict(r) for r in rows]

    async def clear_refund_outcomes(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(f"DELETE FROM {self._s}.wechatpay_refund_fault")

    async def _armed_outcome(self, conn: Conn, out_trade_no: str) -> str:
        for column, outcome in (("abnormal_next", ABNORMAL), ("closed_next", CLOSED)):
            for scope in (out_trade_no, "*"):
                taken = await conn.fetchval(
                    f"UPDATE {self._s}.wechatpay_refund_fault SET {column} = {column} - 1"
                    f" WHERE scope = $1 AND {column} > 0 RETURNING scope",
                    scope,
                )
                if taken is not None:
                    return outcome
        return SUCCESS

    # --- the buyer's side --------------------------------------------------------------------

    async def _shown(self, conn: Conn, trade: Trade) -> dict[str, Any]:
        """The buyer scans the ``code_url``: the order is shown, still ``NOTPAY``."""
        return {
            "out_trade_no": trade.out_trade_no,
            "code_url": trade.code_url,
            "trade_state": trade.trade_state,
        }

    def _expired_refusal(self, trade: Trade) -> str:
        return (
            f"{trade.out_trade_no} could be paid until {wire.rfc3339(trade.time_expire)}"
            " (time_expire)"
        )

    async def _mark_paid(self, conn: Conn, trade: Trade, *, pay_key: str | None) -> str:
        """Paid: ``SUCCESS`` with a ``transaction_id`` and the payer's ``openid``; the
        ``transaction_id``."""
        seq = await conn.fetchval(f"SELECT nextval('{self._s}.wechatpay_seq')")
        transaction_id = _transaction_id(seq)
        await conn.execute(
            f"UPDATE {self._s}.wechatpay_trade SET state = 'SUCCESS', paid_at = now(),"
            " transaction_id = $2, openid = $3, pay_key = $4 WHERE out_trade_no = $1",
            trade.out_trade_no,
            transaction_id,
            f"o{wire.random_text(27)}",
            pay_key,
        )
        return transaction_id

    # --- callbacks ---------------------------------------------------------------------------

    async def payment_callback(self, conn: Conn, capture: Capture) -> tuple[str, bytes] | None:
        """``TRANSACTION.SUCCESS`` to the order's ``notify_url``, the order as the query
        answers it (https://wechatpay.im/webhook/v3/TRANSACTION.SUCCESS)."""
        trade = await self._find(conn, txn_id=capture.txn_id)
        if trade is None:
            return None
        return self._callback(
            trade.notify_url,
            event_type="TRANSACTION.SUCCESS",
            summary="支付成功",
            original_type="transaction",
            resource=self.transaction_json(trade),
        )

    async def refund_callback(
        self, conn: Conn, pay_order_no: str, refund: asyncpg.Record
    ) -> tuple[str, bytes] | None:
        """``REFUND.SUCCESS`` once the ledger holds the refund (its key is the
        ``out_refund_no``), to the refund's own ``notify_url``, if it gave one."""
        found = await self._find_refund(conn, refund["idempotency_key"])
        return None if found is None else self._refund_callback(found)

    def _refund_callback(self, refund: Refund) -> tuple[str, bytes] | None:
        """The refund's callback: the fields of the refund notification page
        (https://pay.weixin.qq.com/doc/v3/merchant/4013070388)."""
        if refund.notify_url is None:
            return None
        event_type, summary = REFUND_EVENTS[refund.status]
        resource: dict[str, Any] = {
            "mchid": self._mchid,
            "out_trade_no": refund.out_trade_no,
            "transaction_id": refund.transaction_id,
            "out_refund_no": refund.out_refund_no,
            "refund_id": refund.refund_id,
            "refund_status": refund.status,
            "user_received_account": USER_RECEIVED_ACCOUNT,
            "amount": {
                "total": refund.total,
                "refund": refund.amount,
                "payer_total": refund.total,
                "payer_refund": refund.amount,
            },
        }
        if refund.success_time is not None:
            resource["success_time"] = wire.rfc3339(refund.success_time)
        return self._callback(
            refund.notify_url,
            event_type=event_type,
            summary=summary,
            original_type="refund",
            resource=resource,
        )

    def _callback(
        self,
        url: str,
        *,
        event_type: str,
        summary: str,
        original_type: str,
        resource: dict[str, Any],
    ) -> tuple[str, bytes]:
        """A stored callback: where it goes and its body, sealed once (each attempt signs it
        anew: ``server.render``)."""
        notification_id = str(uuid.uuid4())
        body = {
            "id": notification_id,
            "create_time": wire.rfc3339(datetime.now(UTC)),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": summary,
            "resource": wire.encrypt_resource(
                self._apiv3_key,
                wire.dumps(resource).decode(),
                original_type=original_type,
                associated_data=original_type,
            ),
        }
        stored = json.dumps({"url": url, "body": wire.dumps(body).decode()}).encode()
        return notification_id, stored

    # --- reads -------------------------------------------------------------------------------

    def _check_mchid(self, mchid: object) -> None:
        if mchid is None or mchid == "":
            raise param_error("mchid is required")
        if mchid != self._mchid:
            raise WechatPayError(400, "MCH_NOT_EXISTS", "商户号不存在")

    async def _trade_of(self, body: dict[str, Any]) -> Trade:
        """The order a refund names: by ``transaction_id`` when given, else
        ``out_trade_no`` ("二选一", ``transaction_id`` first)."""
        transaction_id = _optional_text(body, "transaction_id", max_len=32)
        out_trade_no = _optional_text(body, "out_trade_no", max_len=32)
        if transaction_id is None and out_trade_no is None:
            raise param_error("transaction_id or out_trade_no is required")
        trade = await self._named(txn_id=transaction_id, out_trade_no=out_trade_no)
        if trade is None:
            raise WechatPayError(404, "RESOURCE_NOT_EXISTS", "订单不存在")
        return trade

    def _trade(self, rec: asyncpg.Record) -> Trade:
        return Trade(**dict(rec))

    def _total(self, trade: Trade) -> int:
        return trade.total

    def _txn_id(self, trade: Trade) -> str | None:
        return trade.transaction_id

    def _closed(self, trade: Trade) -> bool:
        return trade.state == CLOSED

    async def _find_refund(
        self, conn: Conn, out_refund_no: str, *, lock: bool = False
    ) -> Refund | None:
        rec = await conn.fetchrow(
            f"SELECT * FROM {self._s}.wechatpay_refund WHERE out_refund_no = $1"
            + (" FOR UPDATE" if lock else ""),
            out_refund_no,
        )
        return None if rec is None else Refund(**dict(rec))


class _Callbacks:
    """The ledger's ``WebhookBodies``: what a new capture's or refund's callback says."""

    def __init__(self, trades: WechatPayTrades) -> None:
        self._trades = trades

    async def payment(self, conn: Conn, capture: Capture) -> tuple[str, bytes] | None:
        return await self._trades.payment_callback(conn, capture)

    async def refund(
        self, conn: Conn, pay_order_no: str, refund: asyncpg.Record
    ) -> tuple[str, bytes] | None:
        return await self._trades.refund_callback(conn, pay_order_no, refund)


# --- request fields --------------------------------------------------------------------------


def _order_not_exist() -> WechatPayError:
    return WechatPayError(404, "ORDER_NOT_EXIST", "订单不存在")


def _optional_text(body: dict[str, Any], name: str, *, max_len: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise param_error(f"{name} must be text of 1 to {max_len} characters")
    return value


def _text(body: dict[str, Any], name: str, *, max_len: int) -> str:
    value = _optional_text(body, name, max_len=max_len)
    if value is None:
        raise param_error(f"{name} is required")
    return value


def _out_trade_no(value: object) -> str:
    if not isinstance(value, str) or not OUT_TRADE_NO.fullmatch(value):
        raise param_error("out_trade_no: 6-32 characters of A-Z, a-z, 0-9, _-|*")
    return value


def _notify_url(value: object, *, required: bool) -> str | None:
    """ "通知URL必须为外网可访问的URL, 不能携带参数" (Native下单, string(255); the callback notes,
    https://pay.weixin.qq.com/doc/v3/merchant/4012075420): an http(s) URL without a query
    (a loopback one is taken: this is the local WeChat Pay)."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _NOTIFY_URL.fullmatch(value):
        raise param_error("notify_url must be an http(s) URL of 255 at most, no query")
    return value


def _transaction_id(seq: int) -> str:
    # 28 digits as WeChat Pay's are: "42", a number, the (China) date, random digits.
    day = datetime.now(wire.CHINA).strftime("%Y%m%d")
    return f"42{seq % 10**8:08d}{day}{wire.random_text(10, '0123456789')}"


def _refund_id(seq: int) -> str:
    # 29 digits as WeChat Pay's refund ids are.
    day = datetime.now(wire.CHINA).strftime("%Y%m%d")
    return f"503{seq % 10**8:08d}{day}{wire.random_text(10, '0123456789')}"

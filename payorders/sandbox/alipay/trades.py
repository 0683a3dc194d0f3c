"""The local Alipay's trades, and what each method does with them.

State is PostgreSQL: the money rows (capture, refund, refund_call, fault, webhook_delivery)
are the sandbox's ledger (``SandboxGateway``) in this server's own schema, so the tools that
read a sandbox ledger and the faults API work unchanged; Alipay's trades are
``alipay_trade`` beside them. A capture's ``txn_id`` is the trade's ``trade_no``.

A pre-order (``alipay.trade.precreate``) is not a trade yet: it becomes one when the buyer
scans its QR code (``trade_no`` assigned, ``WAIT_BUYER_PAY``), and is paid at once or
later (``TRADE_SUCCESS``). Until scanned, query and close answer ``ACQ.TRADE_NOT_EXIST``
and the pre-order stays payable until its ``time_expire``
(https://docs.open.alipay.com/api_1/alipay.trade.close, "用于交易创建后"; the field notes).

Every method raises ``AlipayError`` for an answer other than ``10000``; a
``GatewayUnavailable`` from the ledger (an injected fault, a delay past the server's own
timeout) is the caller's ``20000``.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from payorders.core.store import Conn
from payorders.gateways.port import Capture, GatewayRejected, RefundRequest
from payorders.sandbox.alipay import wire
from payorders.sandbox.alipay.wire import business, success, yuan
from payorders.sandbox.local import LocalTradeBook

CURRENCY = "CNY"
WAIT, SUCCESS, CLOSED = "WAIT_BUYER_PAY", "TRADE_SUCCESS", "TRADE_CLOSED"
DEFAULT_EXPIRY = timedelta(hours=2)
"""A pre-order's life when the caller gives no ``time_expire`` (our choice)."""

_LOCK_ID = 0x616C69706179  # "alipay"
_DDL = """
CREATE SEQUENCE IF NOT EXISTS {s}.alipay_trade_no_seq;
CREATE TABLE IF NOT EXISTS {s}.alipay_trade (
    out_trade_no text PRIMARY KEY,
    trade_no     text UNIQUE CHECK (trade_no ~ '^[0-9]{{28}}$'),
    total_amount bigint NOT NULL CHECK (total_amount > 0),
    subject      text NOT NULL,
    time_expire  timestamptz NOT NULL,
    notify_url   text,
    qr_code      text NOT NULL,
    status       text NOT NULL CHECK (status IN ('WAIT_BUYER_PAY', 'TRADE_SUCCESS',
                                                 'TRADE_CLOSED')),
    buyer_id     text,
    pay_key      text UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    scanned_at   timestamptz,
    paid_at      timestamptz,
    closed_at    timestamptz,
    CHECK ((status = 'TRADE_SUCCESS') = (paid_at IS NOT NULL)),
    CHECK (paid_at IS NULL OR trade_no IS NOT NULL)
);
"""
# "64个字符以内、只能包含字母、数字、下划线" (alipay.trade.precreate's page, out_trade_no).
_OUT_TRADE_NO = re.compile(r"[A-Za-z0-9_]{1,64}")
_SELECT = (
    "SELECT t.*, COALESCE((SELECT sum(r.amount) FROM {s}.refund r"
    " WHERE r.txn_id = t.trade_no), 0)::bigint AS refunded FROM {s}.alipay_trade t"
)


@dataclass(frozen=True)
class Trade:
    out_trade_no: str
    trade_no: str | None
    total_amount: int
    subject: str
    time_expire: datetime
    notify_url: str | None
    qr_code: str
    status: str
    buyer_id: str | None
    pay_key: str | None
    created_at: datetime
    scanned_at: datetime | None
    paid_at: datetime | None
    closed_at: datetime | None
    refunded: int

    @property
    def scanned(self) -> bool:
        """Whether the trade exists at Alipay (a pre-order exists once scanned)."""
        return self.trade_no is not None

    def expired(self, now: datetime) -> bool:
        # A payment at time_expire itself is taken; Alipay's times are to the second.
        return wire.whole_second(now) > self.time_expire

    def status_at(self, now: datetime) -> str:
        """``trade_status`` as Alipay reports it: an unpaid trade is closed at its
        ``time_expire``, a paid one once refunded in full: both are ``TRADE_CLOSED``, told
        apart by ``refund_fee``/``gmt_refund`` (http://39.107.221.112/ask/285129, Alipay's
        developer Q&A)."""
        if self.status == SUCCESS and self.refunded >= self.total_amount:
            return CLOSED
        if self.status == WAIT and self.expired(now):
            return CLOSED
        return self.status

    def buyer_logon_id(self) -> str:
        return "" if self.buyer_id is None else f"{self.buyer_id[4:7]}****{self.buyer_id[-4:]}"


class AlipayTrades(LocalTradeBook[Trade]):
    """Alipay's methods over the trades and the sandbox's ledger (``self.ledger``, which
    sends this class's notifications: it is the ledger's ``WebhookBodies``)."""

    vendor = "Alipay"
    table = "alipay_trade"
    select = _SELECT
    txn_column = "trade_no"
    lock_id = _LOCK_ID
    ddl = _DDL
    currency = CURRENCY
    # The buyer's side (``LocalTradeBook.pay``): Alipay takes one payment per trade, of
    # exactly ``total_amount`` in CNY, until ``time_expire`` (a payment at that very second
    # is taken).
    no_trade = "no pre-order {no} (alipay.trade.precreate first)"
    one_payment = "{no} is paid already: one payment per trade"
    not_the_total = (
        "amount {amount} is not the trade's total_amount {total} (Alipay takes exactly the total)"
    )

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        schema: str,
        app_id: str,
        seller_id: str,
        server_timeout_s: float,
        withhold_answer_s: float,
    ) -> None:
        super().__init__(
            pool,
            schema=schema,
            server_timeout_s=server_timeout_s,
            withhold_answer_s=withhold_answer_s,
            bodies=self,
        )
        self._app_id = app_id
        self._seller_id = seller_id

    # --- alipay.trade.* ----------------------------------------------------------------------

    async def trade_precreate(self, biz: dict[str, Any], notify_url: str | None) -> dict[str, Any]:
        """https://docs.open.alipay.com/api_1/alipay.trade.precreate: a pre-order and its QR
        code. The same ``out_trade_no`` again answers the same QR code; another amount or
        subject is ``ACQ.CONTEXT_INCONSISTENT`` ("交易信息被篡改"), a paid trade
        ``ACQ.TRADE_HAS_SUCCESS``, a closed one ``ACQ.TRADE_HAS_CLOSE`` (its error codes)."""
        no = _out_trade_no(biz)
        total = _price(biz, "total_amount")
        if total > wire.MAX_FEN:
            raise business("ACQ.TOTAL_FEE_EXCEED", "订单金额超过限额: [0.01, 100000000]")
        subject = _text(biz, "subject", max_len=256)
        expire_text = _optional_text(biz, "time_expire", max_len=19)
        try:
            time_expire = (
                wire.whole_second(datetime.now(UTC)) + DEFAULT_EXPIRY
                if expire_text is None
                else wire.parse_china_time(expire_text)
            )
        except ValueError:
            raise _bad("time_expire must be yyyy-MM-dd HH:mm:ss") from None
        if notify_url is not None and not re.fullmatch(r"https?://\S{1,248}", notify_url):
            raise wire.invalid("parameter", "notify_url must be an http(s) URL of 256 at most")
        await self.ledger.apply_delay(no)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {self._s}.alipay_trade (out_trade_no, total_amount, subject,"
                " time_expire, notify_url, qr_code, status)"
                " VALUES ($1, $2, $3, $4, $5, $6, 'WAIT_BUYER_PAY')"
                " ON CONFLICT (out_trade_no) DO NOTHING",
                no,
                total,
                subject,
                time_expire,
                notify_url,
                f"https://qr.alipay.com/bax{secrets.token_hex(10)}",
            )
            trade = await self._find(conn, out_trade_no=no)
        assert trade is not None
        if (trade.total_amount, trade.subject) != (total, subject):
            raise business(
                "ACQ.CONTEXT_INCONSISTENT",
                f"out_trade_no {no} exists with total_amount {yuan(trade.total_amount)}"
                " and another subject or amount",
            )
        if trade.paid_at is not None:
            raise business("ACQ.TRADE_HAS_SUCCESS", "交易已被支付")
        if trade.status == CLOSED:
            raise business("ACQ.TRADE_HAS_CLOSE", "交易已经关闭")
        return success(out_trade_no=no, qr_code=trade.qr_code)

    async def trade_query(self, biz: dict[str, Any]) -> dict[str, Any]:
        """https://docs.open.alipay.com/api_1/alipay.trade.query (``trade_no`` before
        ``out_trade_no``; ``ACQ.TRADE_NOT_EXIST`` for no trade)."""
        trade = await self._trade_of(biz)
        now = datetime.now(UTC)
        paid = trade.paid_at is not None
        fields = {
            "trade_no": trade.trade_no or "",
            "out_trade_no": trade.out_trade_no,
            "buyer_logon_id": trade.buyer_logon_id(),
            "buyer_user_id": trade.buyer_id or "",
            "trade_status": trade.status_at(now),
            "total_amount": yuan(trade.total_amount),
            "buyer_pay_amount": yuan(trade.total_amount if paid else 0),
            "receipt_amount": yuan(trade.total_amount if paid else 0),
            "invoice_amount": yuan(trade.total_amount if paid else 0),
            "point_amount": "0.00",
        }
        if trade.paid_at is not None:
            fields["send_pay_date"] = wire.china_time(trade.paid_at)
        return success(**fields)

    async def trade_close(self, biz: dict[str, Any]) -> dict[str, Any]:
        """https://docs.open.alipay.com/api_1/alipay.trade.close: only a trade waiting for
        the buyer closes. Not scanned: ``ACQ.TRADE_NOT_EXIST``, and the pre-order stays
        payable until ``time_expire``. Not waiting any more (paid, closed, expired):
        ``ACQ.TRADE_STATUS_ERROR``, "只有等待买家付款状态下才能发起交易关闭" (its error codes,
        http://zhifubao.apifox.cn/api-126371943): a second close of a closed trade is that
        too (our choice, from those words), not 10000 again.

        The ``paid_on_close_amount`` fault: the buyer scans and pays at the very instant of
        the close, which then finds the trade paid. Alipay takes only the trade's own
        ``total_amount`` in CNY, so the fault's amount and currency only arm it."""
        found = await self._trade_of(biz, scanned_only=False)
        faults = await self.ledger.apply_delay(found.out_trade_no)
        now = datetime.now(UTC)
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await self._find(conn, out_trade_no=found.out_trade_no, lock=True)
            assert locked is not None
            trade = await self._paid_on_close(conn, locked, faults)
            outcome = self._close_outcome(trade, now)
            if outcome is None:
                await conn.execute(
                    f"UPDATE {self._s}.alipay_trade SET status = 'TRADE_CLOSED',"
                    " closed_at = now() WHERE out_trade_no = $1",
                    trade.out_trade_no,
                )
        if trade.paid_at is not None:
            self.ledger.wake_delivery()
        if outcome is not None:
            raise outcome
        return success(trade_no=trade.trade_no or "", out_trade_no=trade.out_trade_no)

    @staticmethod
    def _close_outcome(trade: Trade, now: datetime) -> wire.AlipayError | None:
        if not trade.scanned:
            return business("ACQ.TRADE_NOT_EXIST", "交易不存在")
        if trade.status_at(now) != WAIT:
            return business("ACQ.TRADE_STATUS_ERROR", f"交易状态不合法: {trade.status_at(now)}")
        return None

    async def trade_refund(self, biz: dict[str, Any]) -> dict[str, Any]:
        """https://docs.open.alipay.com/api_1/alipay.trade.refund, through the ledger's
        refund (its faults: ``fail_next_refunds`` and a delay past the server's timeout are
        a 20000 before anything is done; ``timeout_after_success_next`` refunds, then holds
        the answer back).

        ``out_request_no`` refunds once: the same one again answers ``fund_change`` ``N``
        and moves nothing; more than is left is ``ACQ.REASON_TRADE_REFUND_FEE_ERR``; none
        given means the whole ``total_amount`` (else ``ACQ.REFUND_AMT_NOT_EQUAL_TOTAL``,
        and the request number is then the ``out_trade_no``)
        (https://developer.aliyun.com/article/707486, Alipay's note on ``out_request_no``;
        alipay.trade.fastpay.refund.query's page for the default number). The same
        ``out_request_no`` with another amount: ``ACQ.CONTEXT_INCONSISTENT`` (our choice;
        Alipay asks for the same number and amount on a retry and documents no code)."""
        amount = _price(biz, "refund_amount")
        given_no = _optional_text(biz, "out_request_no", max_len=64)
        _optional_text(biz, "refund_reason", max_len=256)
        trade = await self._trade_of(biz)
        assert trade.trade_no is not None
        if trade.paid_at is None:
            raise business("ACQ.TRADE_STATUS_ERROR", f"交易状态不合法: {trade.status}")
        if given_no is None and amount != trade.total_amount:
            raise business("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "撤销或退款金额与订单金额不一致")
        key = given_no or trade.out_trade_no
        before = await self.ledger.query_refund_detailed(key)
        request = RefundRequest(
            idempotency_key=key,
            pay_order_no=trade.out_trade_no,
            txn_id=trade.trade_no,
            amount=amount,
            currency=CURRENCY,
        )
        try:
            made = await self.ledger.refund_detailed(request, notify=True)
        except GatewayRejected:
            after = await self.ledger.query_refund_detailed(key)
            if after is not None and (after.txn_id, after.amount) != (trade.trade_no, amount):
                raise business(
                    "ACQ.CONTEXT_INCONSISTENT",
                    f"out_request_no {key} refunded {yuan(after.amount)} already",
                ) from None
            left = trade.total_amount - await self._refunded(trade.trade_no)
            raise business(
                "ACQ.REASON_TRADE_REFUND_FEE_ERR", f"退款金额无效: {yuan(left)} left to refund"
            ) from None
        return success(
            trade_no=trade.trade_no,
            out_trade_no=trade.out_trade_no,
            buyer_logon_id=trade.buyer_logon_id(),
            buyer_user_id=trade.buyer_id or "",
            fund_change="N" if before is not None else "Y",
            refund_fee=yuan(await self._refunded(trade.trade_no)),
            gmt_refund_pay=wire.china_time(made.created_at),
        )

    async def trade_fastpay_refund_query(self, biz: dict[str, Any]) -> dict[str, Any]:
        """https://docs.open.alipay.com/api_1/alipay.trade.fastpay.refund.query: ``10000``
        only says the query ran; a refund is there when the answer has its data
        (``refund_status`` ``REFUND_SUCCESS``), none when it has not."""
        key = _text(biz, "out_request_no", max_len=64)
        trade = await self._trade_of(biz)
        found = await self.ledger.query_refund_detailed(key)
        if found is None or found.txn_id != trade.trade_no:
            return success()
        return success(
            trade_no=found.txn_id,
            out_trade_no=trade.out_trade_no,
            out_request_no=key,
            total_amount=yuan(trade.total_amount),
            refund_amount=yuan(found.amount),
            refund_status="REFUND_SUCCESS",
            gmt_refund_pay=wire.china_time(found.created_at),
        )

    # --- the buyer's side --------------------------------------------------------------------

    async def _shown(self, conn: Conn, trade: Trade) -> dict[str, Any]:
        """The buyer scans the QR code: the trade exists from now (``WAIT_BUYER_PAY``, a
        ``trade_no``). Scanning again changes nothing."""
        if not trade.scanned:
            await self._scan_locked(conn, trade)
        found = await self._find(conn, out_trade_no=trade.out_trade_no)
        assert found is not None
        return {
            "out_trade_no": found.out_trade_no,
            "trade_no": found.trade_no,
            "status": found.status,
        }

    def _expired_refusal(self, trade: Trade) -> str:
        return f"{trade.out_trade_no} expired at {wire.china_time(trade.time_expire)} (time_expire)"

    async def _scan_locked(self, conn: Conn, trade: Trade) -> str:
        seq = await conn.fetchval(f"SELECT nextval('{self._s}.alipay_trade_no_seq')")
        # 28 digits as Alipay's are: the (China) date, then a number of the day's.
        trade_no = f"{datetime.now(wire.CHINA):%Y%m%d}{seq:020d}"
        await conn.execute(
            f"UPDATE {self._s}.alipay_trade SET trade_no = $2, scanned_at = now(),"
            " buyer_id = $3 WHERE out_trade_no = $1",
            trade.out_trade_no,
            trade_no,
            f"2088{secrets.randbelow(10**12):012d}",
        )
        return trade_no

    async def _mark_paid(self, conn: Conn, trade: Trade, *, pay_key: str | None) -> str:
        """Paid (scanned first if not yet): ``TRADE_SUCCESS``; its ``trade_no``."""
        trade_no = trade.trade_no or await self._scan_locked(conn, trade)
        await conn.execute(
            f"UPDATE {self._s}.alipay_trade SET status = 'TRADE_SUCCESS', paid_at = now(),"
            " pay_key = $2 WHERE out_trade_no = $1",
            trade.out_trade_no,
            pay_key,
        )
        return trade_no

    # --- notifications (the ledger's WebhookBodies) ------------------------------------------

    async def payment(self, conn: Conn, capture: Capture) -> tuple[str, bytes] | None:
        """``trade_status_sync`` with ``TRADE_SUCCESS``, to the trade's ``notify_url``."""
        trade = await self._find(conn, txn_id=capture.txn_id)
        if trade is None or trade.notify_url is None:
            return None
        return self._notification(trade, trade_status=SUCCESS)

    async def refund(
        self, conn: Conn, pay_order_no: str, refund: asyncpg.Record
    ) -> tuple[str, bytes] | None:
        """After a refund: ``TRADE_SUCCESS`` while money is left, ``TRADE_CLOSED`` once all is
        refunded, with ``refund_fee`` (all refunded so far), ``gmt_refund`` and
        ``out_biz_no`` (the refund's ``out_request_no``) (notification page)."""
        trade = await self._find(conn, txn_id=refund["txn_id"])
        if trade is None or trade.notify_url is None:
            return None
        closed = trade.refunded >= trade.total_amount
        extra = {
            "refund_fee": yuan(trade.refunded),
            "gmt_refund": wire.china_time_ms(refund["created_at"]),
            "out_biz_no": refund["idempotency_key"],
        }
        if closed:
            extra["gmt_close"] = wire.china_time(refund["created_at"])
        return self._notification(trade, trade_status=CLOSED if closed else SUCCESS, **extra)

    def _notification(self, trade: Trade, *, trade_status: str, **extra: str) -> tuple[str, bytes]:
        """A stored notification: where it goes and its parameters but ``notify_time``,
        ``sign_type`` and ``sign``, which each attempt adds (``server.render``). The
        parameters of https://opendocs.alipay.com/open/194/103296."""
        assert trade.trade_no is not None and trade.paid_at is not None
        assert trade.scanned_at is not None
        notify_id = uuid.uuid4().hex
        amount = yuan(trade.total_amount)
        params = {
            "notify_type": "trade_status_sync",
            "notify_id": notify_id,
            "app_id": self._app_id,
            "charset": "utf-8",
            "version": "1.0",
            "trade_no": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "trade_status": trade_status,
            "total_amount": amount,
            "receipt_amount": amount,
            "invoice_amount": amount,
            "buyer_pay_amount": amount,
            "point_amount": "0.00",
            "subject": trade.subject,
            "buyer_id": trade.buyer_id or "",
            "buyer_logon_id": trade.buyer_logon_id(),
            "seller_id": self._seller_id,
            "gmt_create": wire.china_time(trade.scanned_at),
            "gmt_payment": wire.china_time(trade.paid_at),
            **extra,
        }
        body = json.dumps({"url": trade.notify_url, "params": params}).encode()
        return notify_id, body

    # --- reads -------------------------------------------------------------------------------

    async def _trade_of(self, biz: dict[str, Any], *, scanned_only: bool = True) -> Trade:
        """The trade a request names: by ``trade_no`` when given, else ``out_trade_no``
        (each method's page: "如果同时存在优先取trade_no")."""
        trade_no = _optional_text(biz, "trade_no", max_len=64)
        out_trade_no = _optional_text(biz, "out_trade_no", max_len=64)
        if trade_no is None and out_trade_no is None:
            raise _bad("trade_no or out_trade_no is required")
        trade = await self._named(txn_id=trade_no, out_trade_no=out_trade_no)
        if trade is None or (scanned_only and not trade.scanned):
            raise business("ACQ.TRADE_NOT_EXIST", "交易不存在")
        return trade

    def _trade(self, rec: asyncpg.Record) -> Trade:
        return Trade(**dict(rec))

    def _total(self, trade: Trade) -> int:
        return trade.total_amount

    def _txn_id(self, trade: Trade) -> str | None:
        return trade.trade_no

    def _closed(self, trade: Trade) -> bool:
        return trade.status == CLOSED

    async def _refunded(self, trade_no: str) -> int:
        return sum(r.amount for r in await self.ledger.refunds_of(trade_no))


# --- biz_content -----------------------------------------------------------------------------


def _bad(why: str) -> wire.AlipayError:
    # "ACQ.INVALID_PARAMETER 参数无效: 检查请求参数" (each method's error codes).
    return business("ACQ.INVALID_PARAMETER", why)


def _optional_text(biz: dict[str, Any], name: str, *, max_len: int) -> str | None:
    value = biz.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise _bad(f"{name} must be text of at most {max_len} characters")
    return value


def _text(biz: dict[str, Any], name: str, *, max_len: int) -> str:
    value = _optional_text(biz, name, max_len=max_len)
    if value is None:
        raise _bad(f"{name} is required")
    return value


def _price(biz: dict[str, Any], name: str) -> int:
    """A required ``Price`` greater than zero, in fen (JSON numbers arrive as their text)."""
    try:
        fen = wire.fen_of(biz.get(name))
    except ValueError as e:
        raise _bad(f"{name}: {e}") from None
    if fen <= 0:
        raise _bad(f"{name} must be at least 0.01")
    return fen


def _out_trade_no(biz: dict[str, Any]) -> str:
    no = _text(biz, "out_trade_no", max_len=64)
    if not _OUT_TRADE_NO.fullmatch(no):
        raise _bad("out_trade_no: 64 characters at most, only letters, digits and '_'")
    return no

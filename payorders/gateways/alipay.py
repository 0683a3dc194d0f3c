"""The Alipay adapter: the gateway port over Alipay's API v2, signed and verified by the
``python-alipay-sdk`` package (RSA2); this module never computes a signature itself.

A pay order is one Alipay trade: ``out_trade_no`` is the pay order number (escaped where
it holds a ``-``, which Alipay does not take: ``out_trade_no_of``), opened at
checkout with ``alipay.trade.precreate`` (a QR code) with ``time_expire`` at our expiry, so
Alipay itself refuses a payment after it. Alipay's ``trade_no`` is our ``txn_id``. Money is
fen (CNY's minor unit) here and yuan strings with two decimals on the wire, converted by
``to_yuan``/``from_yuan`` and nowhere else; Alipay takes CNY only.

The SDK is synchronous (urllib): its calls run in a small thread pool of this adapter's
own, so they never block the event loop nor take the threads others need. Alipay's codes
become the port's outcomes in ``outcome_of`` and nowhere else:
- ``10000`` done;
- ``20000`` and ``ACQ.SYSTEM_ERROR`` say nothing about whether the work was done
  (``GatewayAmbiguous``: query, then retry with the same ``out_request_no``);
- ``40004`` is a business answer whose ``sub_code`` says which;
- ``40001``/``40002``/``40003``/``40006`` mean our request or keys are wrong: retried,
  never taken for the gateway's refusal of the money.

A timeout, a connection lost after sending or a 5xx proves nothing (``GatewayAmbiguous``);
an answer whose signature does not verify is not believed (``GatewayAmbiguous`` too, and
logged as an error: someone else answered, or the keys are wrong).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import Any, TypeVar

from alipay import AliPay
from alipay.exceptions import AliPayException, AliPayValidationError
from alipay.utils import AliPayConfig

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

T = TypeVar("T")

PRODUCTION_GATEWAY = "https://openapi.alipay.com/gateway.do"
CURRENCY = "CNY"
CHINA = timezone(timedelta(hours=8))
"""Alipay's times (``timestamp``, ``time_expire``, ``gmt_payment``) are China time."""
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
MAX_YUAN_FEN = 100_000_000 * 100
"""``total_amount`` takes [0.01, 100000000] yuan (alipay.trade.precreate's docs page)."""
SDK_THREADS = 8
"""Calls in flight at Alipay at once from one process (each holds a thread)."""

_YUAN = re.compile(r"(0|[1-9][0-9]*)\.([0-9]{2})")
_ORDER_NO_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def to_yuan(fen: int) -> str:
    """``1999`` -> ``"19.99"``: CNY minor units to the wire's yuan string (two decimals).

    Raises:
        ValueError: not a whole number of fen inside what Alipay takes (0.01 to 100000000
            yuan).
    """
    if isinstance(fen, bool) or not isinstance(fen, int) or not 1 <= fen <= MAX_YUAN_FEN:
        raise ValueError(f"Alipay takes 1 to {MAX_YUAN_FEN} fen, not {fen!r}")
    return f"{fen // 100}.{fen % 100:02d}"


def from_yuan(text: object) -> int:
    """``"19.99"`` -> ``1999``. Only Alipay's shape (digits, a point, two decimals); never
    through a float.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(text, str) or not (m := _YUAN.fullmatch(text)):
        raise ValueError(f"not a yuan amount with two decimals: {text!r}")
    return int(m[1]) * 100 + int(m[2])


def china_time(at: datetime) -> str:
    """An instant as Alipay writes it: China time, to the second (truncated)."""
    return at.astimezone(CHINA).strftime(TIME_FORMAT)


def from_china_time(text: object) -> datetime:
    """Alipay's ``yyyy-MM-dd HH:mm:ss`` (China time) as an aware UTC instant.

    Raises:
        ValueError: not that shape.
    """
    if not isinstance(text, str):
        raise ValueError(f"not an Alipay time: {text!r}")
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=CHINA).astimezone(UTC)


OUT_TRADE_NO_MAX = 64
# "64个字符以内、只能包含字母、数字、下划线" (out_trade_no, alipay.trade.precreate's page:
# https://opendocs.alipay.com/open/02ekfg): letters, digits and "_" only, at most 64.
_OUT_TRADE_NO = re.compile(r"[A-Za-z0-9_]{1,64}")
PAY_ORDER_PREFIX = "po_"
"""Every pay order number starts with it (``domain.pay_order_no_for``)."""
ESCAPED_PREFIX = "pd_"
"""An ``out_trade_no`` for a pay order number with ``-`` in it (``out_trade_no_of``)."""


def out_trade_no_of(pay_order_no: str) -> str:
    """The Alipay ``out_trade_no`` of a pay order: its number where Alipay takes it as it is
    (``po_order42``); else, for a number with ``-`` (allowed in our order numbers, not in
    Alipay's), ``pd_`` and the order number with ``_`` written ``__`` and ``-`` written
    ``_d`` (``po_order-42`` -> ``pd_order_d42``). One to one, so that ``pay_order_no_of``
    reads every notification and query answer back without a look-up.

    Raises:
        ValueError: no pay order number, or one whose ``out_trade_no`` would be longer than
            Alipay's 64 characters (``refusal`` says so before the pay order exists).
    """
    if pay_order_no_of(pay_order_no) == pay_order_no:
        return pay_order_no
    rest = pay_order_no.removeprefix(PAY_ORDER_PREFIX)
    if rest == pay_order_no or not rest or set(rest) - _ORDER_NO_CHARS:
        raise ValueError(f"not a pay order number: {pay_order_no!r}")
    escaped = ESCAPED_PREFIX + rest.replace("_", "__").replace("-", "_d")
    if len(escaped) > OUT_TRADE_NO_MAX:
        raise ValueError(
            f"pay order {pay_order_no}: its Alipay out_trade_no {escaped} is longer than"
            f" {OUT_TRADE_NO_MAX} characters (each - or _ of the order number counts twice)"
        )
    return escaped


def pay_order_no_of(out_trade_no: str) -> str | None:
    """The pay order whose ``out_trade_no`` this is (``out_trade_no_of`` read back), or
    None for a trade no pay order of ours opened."""
    if not _OUT_TRADE_NO.fullmatch(out_trade_no):
        return None
    if out_trade_no.startswith(PAY_ORDER_PREFIX) and len(out_trade_no) > len(PAY_ORDER_PREFIX):
        return out_trade_no
    if not out_trade_no.startswith(ESCAPED_PREFIX):
        return None
    rest, out, i = out_trade_no[len(ESCAPED_PREFIX) :], [], 0
    while i < len(rest):
        if rest[i] != "_":
            out.append(rest[i])
            i += 1
        elif rest[i + 1 : i + 2] in ("_", "d"):
            out.append("_" if rest[i + 1] == "_" else "-")
            i += 2
        else:
            return None
    if not out or "-" not in out:
        return None  # out_trade_no_of writes a number without "-" as it is
    return PAY_ORDER_PREFIX + "".join(out)


def refusal(pay_order_no: str, currency: str) -> str | None:
    """Why Alipay cannot take this pay order's trade (for checkout to answer before anything
    is written), or None."""
    if currency != CURRENCY:
        return f"currency: Alipay takes {CURRENCY} only, not {currency}"
    try:
        out_trade_no_of(pay_order_no)
    except ValueError as e:
        return f"order_no: {e}"
    return None


def _paid(trade: dict[str, Any]) -> bool:
    """A trade that was paid: ``TRADE_SUCCESS``, ``TRADE_FINISHED``, or ``TRADE_CLOSED``
    after a full refund (told apart from an unpaid close by its ``send_pay_date``)."""
    status = trade.get("trade_status")
    return status in ("TRADE_SUCCESS", "TRADE_FINISHED") or (
        status == "TRADE_CLOSED" and bool(trade.get("send_pay_date"))
    )


class Outcome(Enum):
    """What an Alipay answer means for the call that got it."""

    DONE = "done"
    UNKNOWN = "unknown"
    """Nothing can be concluded: query, or retry with the same parameters."""
    NOT_EXIST = "not_exist"
    """``ACQ.TRADE_NOT_EXIST``: no trade (a precreated one exists only once scanned)."""
    STATUS = "status"
    """The trade is not in a state that allows the call (paid, closed, finished)."""
    RETRY_LATER = "retry_later"
    """Alipay will do it later (the seller's balance is short, the trade is busy)."""
    MISCONFIGURED = "misconfigured"
    """Our request or keys are wrong: no answer about the money."""
    REFUSED = "refused"
    """A documented, final business refusal."""


_UNKNOWN_SUB_CODES = frozenset({"ACQ.SYSTEM_ERROR", "AQC.SYSTEM_ERROR", "isp.unknow-error"})
_STATUS_SUB_CODES = frozenset(
    {
        "ACQ.TRADE_STATUS_ERROR",
        "ACQ.REASON_TRADE_STATUS_INVALID",
        "ACQ.REASON_ILLEGAL_STATUS",
        "ACQ.TRADE_HAS_CLOSE",
        "ACQ.TRADE_HAS_SUCCESS",
    }
)
_LATER_SUB_CODES = frozenset({"ACQ.SELLER_BALANCE_NOT_ENOUGH", "ACQ.REFUND_FEE_ERROR_BUSY"})


def outcome_of(answer: dict[str, Any]) -> Outcome:
    """The one place Alipay's ``code``/``sub_code`` become our outcomes (codes from
    Alipay's public error-code page, https://opendocs.alipay.com/common/02km9f, and the
    pages of each method)."""
    code = str(answer.get("code", ""))
    sub_code = str(answer.get("sub_code", ""))
    if code == "10000":
        return Outcome.DONE
    if code == "20000" or sub_code in _UNKNOWN_SUB_CODES:
        return Outcome.UNKNOWN
    if code in ("40001", "40002", "40003", "40006"):
        return Outcome.MISCONFIGURED
    if code == "40004":
        if sub_code == "ACQ.TRADE_NOT_EXIST":
            return Outcome.NOT_EXIST
        if sub_code in _STATUS_SUB_CODES:
            return Outcome.STATUS
        if sub_code in _LATER_SUB_CODES:
            return Outcome.RETRY_LATER
        return Outcome.REFUSED
    return Outcome.UNKNOWN  # a code we do not know proves nothing


def _said(answer: dict[str, Any]) -> str:
    parts = [str(answer.get(k)) for k in ("code", "sub_code", "sub_msg", "msg") if answer.get(k)]
    return " ".join(parts) or "no code"


class _Client(AliPay):  # type: ignore[misc]  # the SDK ships no type hints
    """The SDK's client, sending to ``gateway_url`` (the SDK itself knows only Alipay's
    production and sandbox hosts)."""

    def __init__(self, *, gateway_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gateway = gateway_url


@dataclass(frozen=True)
class AlipayConfig:
    app_id: str
    private_key_pem: str
    """The app's private key: signs every request."""
    alipay_public_key_pem: str
    """Alipay's public key: verifies every answer and notification."""
    notify_url: str
    """Where Alipay sends a trade's notifications (our ``/v1/webhooks/alipay``)."""
    gateway_url: str = PRODUCTION_GATEWAY


TIME_GRAIN_S = 1.0
"""Alipay's times are whole seconds: it takes a payment until the end of ``time_expire``'s
second, up to this long after our expiry."""


class AlipayKeyRefused(ValueError):
    """A key that the SDK cannot load."""


class AlipayGateway:
    """The port over Alipay (see the module's text)."""

    name = "alipay"

    def __init__(
        self, config: AlipayConfig, *, client_timeout_s: float, book: TradeBook | None = None
    ) -> None:
        self._config = config
        self._book = book
        self._timeout = client_timeout_s
        try:
            self._sdk = _Client(
                gateway_url=config.gateway_url,
                appid=config.app_id,
                app_notify_url=config.notify_url,
                app_private_key_string=config.private_key_pem,
                alipay_public_key_string=config.alipay_public_key_pem,
                sign_type="RSA2",
                config=AliPayConfig(timeout=client_timeout_s),
            )
        except (ValueError, IndexError, TypeError) as e:
            raise AlipayKeyRefused(f"an Alipay key is not an RSA key in PEM ({e})") from None
        self._threads = ThreadPoolExecutor(SDK_THREADS, thread_name_prefix="alipay-sdk")

    @staticmethod
    def check(config: AlipayConfig) -> None:
        """Raise ``AlipayKeyRefused`` when the SDK cannot load a key of ``config``."""
        AlipayGateway(config, client_timeout_s=1)._threads.shutdown(wait=False)

    async def aclose(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def verify_notification(self, params: dict[str, str]) -> bool:
        """Whether a notification's ``sign`` holds under Alipay's public key (the SDK's
        check: every parameter but ``sign`` and ``sign_type``, sorted)."""
        fields = dict(params)
        sign = fields.pop("sign", None)
        if not sign or fields.get("sign_type", "RSA2") != "RSA2":
            return False
        try:
            return bool(self._sdk.verify(fields, sign))
        except (ValueError, TypeError, AliPayException):
            return False

    @property
    def app_id(self) -> str:
        return self._config.app_id

    # --- the port ---------------------------------------------------------------------------

    async def open_trade(self, trade: OpenTrade, *, first_attempt: bool = True) -> Checkout:
        """``alipay.trade.precreate``: the same ``out_trade_no`` again answers the same QR
        code, so a retry after a lost answer needs no look-up first."""
        if trade.currency != CURRENCY:
            raise GatewayRejected(f"open_trade: Alipay takes CNY only, not {trade.currency}")
        try:
            amount = to_yuan(trade.amount)
            out_trade_no = out_trade_no_of(trade.pay_order_no)
        except ValueError as e:
            raise GatewayRejected(f"open_trade: {e}") from None
        answer = await self._call(
            "open_trade",
            lambda: self._sdk.api_alipay_trade_precreate(
                subject=f"pay order {trade.pay_order_no}",
                out_trade_no=out_trade_no,
                total_amount=amount,
                time_expire=china_time(trade.expires_at),
            ),
        )
        match outcome_of(answer):
            case Outcome.DONE if answer.get("qr_code"):
                return Checkout(
                    gateway=self.name,
                    trade_ref=out_trade_no,
                    details={"out_trade_no": out_trade_no, "qr_code": answer["qr_code"]},
                )
            case outcome:
                raise self._error("open_trade", outcome, answer)

    async def close_trade(self, pay_order_no: str, trade_ref: str | None = None) -> CloseResult:
        """``alipay.trade.close``. A trade the buyer never scanned does not exist at Alipay
        yet (``ACQ.TRADE_NOT_EXIST``): closed as far as we can close it; a scan before its
        ``time_expire`` can still pay it, and that late money is refunded like any other.
        A trade no longer waiting for the buyer is read back: paid is the success path."""
        out_trade_no = self._out_trade_no(pay_order_no)
        if out_trade_no is None:
            return CloseResult(closed=True)
        answer = await self._call(
            "close_trade", lambda: self._sdk.api_alipay_trade_close(out_trade_no=out_trade_no)
        )
        match outcome_of(answer):
            case Outcome.DONE | Outcome.NOT_EXIST:
                return CloseResult(closed=True)
            case Outcome.STATUS:
                trade = await self._query(pay_order_no=pay_order_no)
                status = None if trade is None else trade.get("trade_status")
                if trade is not None and _paid(trade):
                    # Paid before our close (perhaps refunded in full since: still paid).
                    return CloseResult(closed=False, capture=self._capture(trade))
                if status == "TRADE_CLOSED":
                    return CloseResult(closed=True)
                raise GatewayAmbiguous(f"close_trade: Alipay says {_said(answer)}, trade {status}")
            case outcome:
                raise self._error("close_trade", outcome, answer)

    async def refund(self, request: RefundRequest) -> GatewayRefund:
        """``alipay.trade.refund`` with ``out_request_no`` = our key: Alipay refunds one
        ``out_request_no`` once. ``fund_change`` ``N`` (a repeat, or not yet moved) is no
        failure: the refund is then read back by its key."""
        try:
            amount = to_yuan(request.amount)
        except ValueError as e:
            raise GatewayRejected(f"refund: {e}") from None
        if request.currency != CURRENCY:
            raise GatewayRejected(f"refund: Alipay takes CNY only, not {request.currency}")
        answer = await self._call(
            "refund",
            lambda: self._sdk.api_alipay_trade_refund(
                refund_amount=amount,
                trade_no=request.txn_id,
                out_request_no=request.idempotency_key,
            ),
        )
        outcome = outcome_of(answer)
        if outcome is not Outcome.DONE:
            raise self._error("refund", outcome, answer)
        if answer.get("fund_change") == "Y":
            return self._refund(request.idempotency_key, request.txn_id, request.amount)
        found = await self.query_refund(request.idempotency_key, request.txn_id)
        if found is None:
            raise GatewayAmbiguous(
                f"refund {request.idempotency_key}: Alipay accepted it (fund_change"
                f" {answer.get('fund_change')}) and does not show it refunded yet"
            )
        return found

    async def query_refund(self, idempotency_key: str, txn_id: str) -> GatewayRefund | None:
        """``alipay.trade.fastpay.refund.query``: ``refund_status`` ``REFUND_SUCCESS`` is a
        refund; no such field is no refund (yet) under this ``out_request_no``."""
        answer = await self._call(
            "query_refund",
            lambda: self._sdk.api_alipay_trade_fastpay_refund_query(
                out_request_no=idempotency_key, trade_no=txn_id
            ),
        )
        outcome = outcome_of(answer)
        if outcome is Outcome.NOT_EXIST:
            return None
        if outcome is not Outcome.DONE:
            raise self._error("query_refund", outcome, answer)
        if answer.get("refund_status") != "REFUND_SUCCESS":
            return None
        try:
            amount = from_yuan(answer.get("refund_amount"))
        except ValueError as e:
            raise GatewayAmbiguous(f"query_refund: {e}") from None
        return self._refund(idempotency_key, txn_id, amount)

    async def query_capture(self, txn_id: str) -> Capture | None:
        """``alipay.trade.query`` by ``trade_no``: a capture once it was paid
        (``TRADE_SUCCESS``, ``TRADE_FINISHED``, or ``TRADE_CLOSED`` after a full refund)."""
        trade = await self._query(trade_no=txn_id)
        return self._capture(trade) if trade is not None and _paid(trade) else None

    async def refunds_of(self, txn_id: str) -> list[GatewayRefund]:
        """Alipay's API v2 lists no refunds of a trade: each is read by its
        ``out_request_no``. A refund made at Alipay's console is found by the statement."""
        return []

    async def statement(self, start: datetime, end: datetime) -> Statement:
        """Alipay's own records of the trades we opened that could be paid in ``[start,
        end)``, read trade by trade (``alipay.trade.query``): the captures made in the
        window (a paid trade whose notification never came among them), and the refunds
        Alipay made under our keys that we have not confirmed yet
        (``alipay.trade.fastpay.refund.query``). A refund made at Alipay's console under a
        key of its own is not among them: only the bill shows it (see the README).

        Raises:
            GatewayUnavailable: this process has no trade book (only the worker's
                reconciliation reads statements), or Alipay did not answer.
        """
        if self._book is None:
            raise GatewayUnavailable("statement: Alipay lists no trades, and no trade book given")
        nos = await self._book.trades_payable_in(self.name, start, end, grace_s=TIME_GRAIN_S)
        slots = asyncio.Semaphore(SDK_THREADS)

        async def trade_of(no: str) -> dict[str, Any] | None:
            async with slots:
                return await self._query(pay_order_no=no)

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

    async def _query(
        self, *, pay_order_no: str | None = None, trade_no: str | None = None
    ) -> dict[str, Any] | None:
        out_trade_no = None if pay_order_no is None else self._out_trade_no(pay_order_no)
        if out_trade_no is None and trade_no is None:
            return None
        answer = await self._call(
            "query_trade",
            lambda: self._sdk.api_alipay_trade_query(out_trade_no=out_trade_no, trade_no=trade_no),
        )
        outcome = outcome_of(answer)
        if outcome is Outcome.NOT_EXIST:
            return None
        if outcome is not Outcome.DONE:
            raise self._error("query_trade", outcome, answer)
        return answer

    @staticmethod
    def _out_trade_no(pay_order_no: str) -> str | None:
        """None: no trade can be under this pay order (open_trade refuses to open one)."""
        try:
            return out_trade_no_of(pay_order_no)
        except ValueError:
            return None

    def _capture(self, trade: dict[str, Any]) -> Capture:
        pay_order_no = pay_order_no_of(str(trade.get("out_trade_no")))
        if pay_order_no is None:
            raise GatewayAmbiguous(
                f"query_trade: out_trade_no {trade.get('out_trade_no')!r} is no pay order's"
            )
        try:
            return Capture(
                txn_id=str(trade["trade_no"]),
                pay_order_no=pay_order_no,
                amount=from_yuan(trade.get("total_amount")),
                currency=CURRENCY,
                captured_at=from_china_time(trade.get("send_pay_date")),
            )
        except (KeyError, ValueError) as e:
            raise GatewayAmbiguous(f"query_trade: an answer we cannot read ({e})") from None

    def _refund(self, key: str, txn_id: str, amount: int) -> GatewayRefund:
        return GatewayRefund(
            idempotency_key=key,
            # Alipay gives a refund no id of its own: the trade and our request number are.
            gateway_refund_id=f"{txn_id}-{key}",
            txn_id=txn_id,
            amount=amount,
            currency=CURRENCY,
            status=RefundStatus.SUCCEEDED,
            created_at=datetime.now(UTC),
        )

    def _error(self, op: str, outcome: Outcome, answer: dict[str, Any]) -> GatewayError:
        said = _said(answer)
        match outcome:
            case Outcome.UNKNOWN | Outcome.DONE:
                return GatewayAmbiguous(f"{op}: Alipay answered {said}; outcome unknown")
            case Outcome.RETRY_LATER | Outcome.MISCONFIGURED:
                return GatewayUnavailable(f"{op}: Alipay answered {said}; retry later")
            case _:
                return GatewayRejected(f"{op}: Alipay refused it: {said}")

    async def _call(self, op: str, sdk_call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """One SDK call in this adapter's threads: counted, logged in one line, and its
        failures turned into the port's errors. Returns the verified answer (any code)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            answer = await asyncio.wait_for(
                loop.run_in_executor(self._threads, sdk_call), self._timeout + 1
            )
        except AliPayValidationError:
            self._count(op, "bad_signature", started, level=logging.ERROR)
            raise GatewayAmbiguous(
                f"{op}: an answer whose signature does not verify with Alipay's public key;"
                " not believed, outcome unknown"
            ) from None
        except AliPayException as e:
            # No answer the SDK could verify (unsigned, an error_response): proves nothing.
            self._count(op, "unsigned_answer", started)
            raise GatewayAmbiguous(f"{op}: {str(e)[:300]}; outcome unknown") from None
        except TimeoutError:
            self._count(op, "ambiguous_timeout", started)
            raise GatewayAmbiguous(
                f"{op}: no answer from Alipay within {self._timeout:.1f}s; outcome unknown"
            ) from None
        except urllib.error.HTTPError as e:
            self._count(op, f"http_{e.code}", started)
            raise GatewayAmbiguous(f"{op}: HTTP {e.code} from Alipay; outcome unknown") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ConnectionRefusedError):
                self._count(op, "unavailable", started)
                raise GatewayUnavailable(f"{op}: cannot connect to Alipay") from None
            if isinstance(reason, TimeoutError):
                self._count(op, "ambiguous_timeout", started)
                raise GatewayAmbiguous(
                    f"{op}: no answer from Alipay within {self._timeout:.1f}s; outcome unknown"
                ) from None
            self._count(op, "ambiguous_transport", started)
            raise GatewayAmbiguous(f"{op}: {type(reason).__name__}; outcome unknown") from None
        self._count(op, outcome_of(answer).value, started)
        return answer

    def _count(self, op: str, outcome: str, started: float, *, level: int = 0) -> None:
        observed_ms = (time.perf_counter() - started) * 1000
        CALLS.labels(op, outcome).inc()
        OBSERVED.labels(op).observe(observed_ms / 1000)
        ok = outcome in (Outcome.DONE.value, Outcome.NOT_EXIST.value)
        log.log(
            level or (logging.INFO if ok else logging.WARNING),
            "gateway alipay %s %s: observed %.1f ms",
            op,
            outcome,
            observed_ms,
        )

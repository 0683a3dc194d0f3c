"""The Stripe adapter: the gateway port over the official ``stripe`` SDK's async calls.

One PaymentIntent per pay order (``metadata.pay_order_no``); its id is our ``txn_id`` and
the trade's ``trade_ref``. The adapter keeps the money right on its own, also against a
server that ignores ``Idempotency-Key`` (localstripe does, and a retried request can reach
any server after its answer was lost):

- opening again after a lost answer first looks for the pay order's PaymentIntent;
- a refund first looks for the refund made under its key (refund ``metadata``), and is
  refused when it would take back more than the PaymentIntent received;
- a refused cancel is read back: ``succeeded`` is "already paid", with its capture.

A timeout, a connection lost after sending, or a 5xx proves nothing: ``GatewayAmbiguous``.
Stripe's refund statuses become ours in ``_refund_status`` and nowhere else; no Stripe
type leaves this module. Every call is counted in the shared metrics and logged in one
line, without the key or a client secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import stripe

from payorders.core.domain import RefundStatus
from payorders.core.models import Checkout
from payorders.gateways.port import (
    PROCESSING_HEADER,
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
)
from payorders.gateways.telemetry import CALLS, OBSERVED, PROCESSING

log = logging.getLogger(__name__)

T = TypeVar("T")

PAGE = 100
"""Objects per list page (Stripe's maximum)."""

PAY_ORDER_KEY = "pay_order_no"
REFUND_KEY = "idempotency_key"
REFUND_NO_KEY = "refund_no"
"""A merchant refund's ``refund_no``, for whoever reads the refund at Stripe's dashboard."""


class StripeKeyRefused(Exception):
    """Stripe refused the API key (unknown, revoked, or without the permissions we need)."""


def _refund_status(vendor: str | None) -> RefundStatus:
    """Stripe's refund status in our words; an unknown word is not a success."""
    match vendor:
        case "succeeded":
            return RefundStatus.SUCCEEDED
        case "failed" | "canceled":
            return RefundStatus.REJECTED
        case _:  # pending, requires_action, or a status newer than this code
            return RefundStatus.PENDING


def _field(obj: Any, key: str) -> Any:
    """``obj[key]``, or None when the server left the field out (SDK objects are not dicts)."""
    return obj[key] if obj is not None and key in obj else None


def _meta(obj: Any, key: str) -> str | None:
    value = _field(_field(obj, "metadata"), key)
    return str(value) if value else None


def _at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def _checkout(pi: stripe.PaymentIntent) -> Checkout:
    return Checkout(
        gateway="stripe",
        trade_ref=pi.id,
        details={"payment_intent": pi.id, "client_secret": pi.client_secret or ""},
    )


def _refund_of(refund: stripe.Refund, txn_id: str) -> GatewayRefund:
    return GatewayRefund(
        # A refund made outside payorders (the dashboard, another system) carries no key of
        # ours; its own id stands in, so that reconciliation still sees the money leave.
        idempotency_key=_meta(refund, REFUND_KEY) or refund.id,
        gateway_refund_id=refund.id,
        txn_id=txn_id,
        amount=refund.amount,
        currency=refund.currency.upper(),
        status=_refund_status(refund.status),
        created_at=_at(refund.created),
    )


def _charge_amount(charge: stripe.Charge) -> int:
    # localstripe's charges have no amount_captured; a captured charge took all its amount.
    captured = _field(charge, "amount_captured")
    return int(captured) if captured is not None else charge.amount


def _is_refusal(e: stripe.StripeError) -> bool:
    """A definite "no" to this request (4xx), as opposed to a key, rate or server problem."""
    status = e.http_status or 0
    return 400 <= status < 500 and status not in (401, 403, 409, 429)


def _is_missing(e: stripe.StripeError) -> bool:
    # Real Stripe adds the code resource_missing; localstripe answers a bare 404.
    return e.http_status == 404 or e.code == "resource_missing"


def _quiet_sdk_logger() -> None:
    """Keep the SDK's own logger at WARNING unless someone chose its level.

    It logs every request at INFO and every request and response body at DEBUG: client
    secrets and metadata included. Our one line per call says what matters without them.
    """
    sdk = logging.getLogger("stripe")
    if sdk.level == logging.NOTSET:
        sdk.setLevel(logging.WARNING)


class _Calls:
    """The HTTP requests of one port call: each bounded by the client timeout, and the
    processing time the server reported (header ``Gateway-Processing-Ms``) summed."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout = timeout_s
        self.processing_ms: float | None = None

    async def __call__(self, request: Awaitable[T]) -> T:
        async with asyncio.timeout(self._timeout):
            result = await request
        self._note(_field_headers(result))
        return result

    def note_error(self, e: stripe.StripeError) -> None:
        self._note(e.headers)

    def _note(self, headers: Mapping[str, str] | None) -> None:
        try:
            ms = float((headers or {})[PROCESSING_HEADER])
        except (KeyError, ValueError):
            return
        self.processing_ms = (self.processing_ms or 0.0) + ms


def _field_headers(result: object) -> Mapping[str, str] | None:
    response = getattr(result, "last_response", None)
    return getattr(response, "headers", None)


class StripeGateway:
    """Implements ``payorders.gateways.port.Gateway`` against Stripe (or localstripe).

    Args:
        api_key: a secret or restricted key (never logged).
        api_base: Stripe's API address (``https://api.stripe.com``, or a local server).
        client_timeout_s: the bound on each HTTP request, longer than Stripe's own.
    """

    name = "stripe"

    def __init__(self, api_key: str, *, api_base: str, client_timeout_s: float) -> None:
        _quiet_sdk_logger()
        self._key = api_key
        self._api_base = api_base
        self._timeout = client_timeout_s
        self._http = stripe.HTTPXClient(timeout=client_timeout_s)
        # Retries are the workflow's, under our idempotency keys: none inside the SDK.
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            max_network_retries=0,
            http_client=self._http,
        )

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]  # the SDK's own

    async def check_key(self) -> None:
        """Fail at start with a clear error when Stripe refuses the key.

        Raises:
            StripeKeyRefused: Stripe answered AuthenticationError or PermissionError.

        When Stripe cannot be reached this logs one warning and returns: the calls that
        need it will fail (and be retried) on their own.
        """
        started = time.perf_counter()
        calls = _Calls(self._timeout)
        try:
            await calls(self._client.v1.payment_intents.list_async({"limit": 1}))
        except (stripe.AuthenticationError, stripe.PermissionError) as e:
            self._count("check_key", f"http_{e.http_status}", started, calls)
            what = "refused" if isinstance(e, stripe.AuthenticationError) else "lacks permission"
            raise StripeKeyRefused(
                f"Stripe at {self._api_base} {what} the API key"
                f" (HTTP {e.http_status}: {self._redact(e.user_message or str(e))});"
                " check PAYORDERS_STRIPE_API_KEY"
            ) from None
        except (stripe.StripeError, TimeoutError) as e:
            outcome, error = self._translate("check_key", e)
            self._count("check_key", outcome, started, calls, say=False)  # one line, below
            log.warning("cannot check the Stripe API key now (%s); carrying on", error)
            return
        self._count("check_key", "ok", started, calls)

    # --- the port --------------------------------------------------------------------------

    async def open_trade(self, trade: OpenTrade, *, first_attempt: bool = True) -> Checkout:
        async def work(calls: _Calls) -> Checkout:
            if not first_attempt:
                # Our earlier attempt may have created it and lost the answer; a server that
                # ignores Idempotency-Key would create a second one.
                found = await self._intents_of(calls, trade.pay_order_no)
                if found:
                    return _checkout(min(found, key=lambda pi: pi.created))
            pi = await calls(
                self._client.v1.payment_intents.create_async(
                    {
                        "amount": trade.amount,
                        "currency": trade.currency.lower(),
                        "metadata": {PAY_ORDER_KEY: trade.pay_order_no},
                    },
                    {"idempotency_key": trade.idempotency_key},
                )
            )
            return _checkout(pi)

        return await self._run("open_trade", work)

    async def close_trade(self, pay_order_no: str, trade_ref: str | None = None) -> CloseResult:
        async def work(calls: _Calls) -> CloseResult:
            if trade_ref is not None:
                return await self._close(calls, trade_ref)
            # A pay order opened before trades were: cancel whatever exists for it.
            paid: CloseResult | None = None
            for pi in await self._intents_of(calls, pay_order_no):
                result = await self._close(calls, pi.id)
                paid = paid or (result if not result.closed else None)
            return paid or CloseResult(closed=True)

        return await self._run("close_trade", work)

    async def refund(self, request: RefundRequest) -> GatewayRefund:
        async def work(calls: _Calls) -> GatewayRefund:
            pi = await self._intent(calls, request.txn_id)
            if pi is None:
                raise GatewayRejected(f"refund: no PaymentIntent {request.txn_id} at Stripe")
            if pi.status != "succeeded":
                raise GatewayRejected(
                    f"refund: PaymentIntent {pi.id} is {pi.status}, nothing was captured"
                )
            refunds = await self._refunds_of(calls, pi.id)
            for r in refunds:
                if _meta(r, REFUND_KEY) == request.idempotency_key:
                    # Made by an earlier attempt (its answer lost, or a server that replays
                    # nothing): that refund is the answer, never a second one.
                    log.info("refund %s exists at Stripe as %s", request.idempotency_key, r.id)
                    return _refund_of(r, pi.id)
            self._check_refundable(request, pi, refunds)
            created = await calls(
                self._client.v1.refunds.create_async(
                    {
                        "payment_intent": pi.id,
                        "amount": request.amount,
                        "metadata": {
                            REFUND_KEY: request.idempotency_key,
                            PAY_ORDER_KEY: request.pay_order_no,
                            **({REFUND_NO_KEY: request.refund_no} if request.refund_no else {}),
                        },
                    },
                    {"idempotency_key": request.idempotency_key},
                )
            )
            return _refund_of(created, pi.id)

        return await self._run("refund", work)

    async def query_refund(self, idempotency_key: str, txn_id: str) -> GatewayRefund | None:
        async def work(calls: _Calls) -> GatewayRefund | None:
            pi = await self._intent(calls, txn_id)
            # Only a succeeded PaymentIntent has a charge to refund (localstripe answers 500
            # when asked for the refunds of one without a charge).
            if pi is None or pi.status != "succeeded":
                return None
            for r in await self._refunds_of(calls, pi.id):
                # A refund made at the dashboard has no key of ours: its id is its key.
                if (_meta(r, REFUND_KEY) or r.id) == idempotency_key:
                    return _refund_of(r, pi.id)
            return None

        return await self._run("query_refund", work)

    async def query_capture(self, txn_id: str) -> Capture | None:
        async def work(calls: _Calls) -> Capture | None:
            pi = await self._intent(calls, txn_id)
            if pi is None or pi.status != "succeeded":
                return None
            return await self._capture(calls, pi)

        return await self._run("query_capture", work)

    async def refunds_of(self, txn_id: str) -> list[GatewayRefund]:
        async def work(calls: _Calls) -> list[GatewayRefund]:
            pi = await self._intent(calls, txn_id)
            if pi is None or pi.status != "succeeded":
                return []
            return [_refund_of(r, pi.id) for r in await self._refunds_of(calls, pi.id)]

        return await self._run("refunds_of", work)

    async def statement(self, start: datetime, end: datetime) -> Statement:
        async def work(calls: _Calls) -> Statement:
            return await _StatementReader(self, calls).read(start, end)

        return await self._run("statement", work)

    # --- PaymentIntents, refunds, charges ----------------------------------------------------

    async def _intent(self, calls: _Calls, txn_id: str) -> stripe.PaymentIntent | None:
        """The PaymentIntent with its latest charge expanded (Stripe gives only its id
        unless asked; localstripe always embeds it), or None when there is no such one."""
        if not txn_id.startswith("pi_"):
            return None  # not a PaymentIntent id (another gateway's txn_id, a typo)
        try:
            return await calls(
                self._client.v1.payment_intents.retrieve_async(
                    txn_id, {"expand": ["latest_charge"]}
                )
            )
        except stripe.InvalidRequestError as e:
            if _is_missing(e):
                calls.note_error(e)
                return None
            raise

    async def _intents_of(self, calls: _Calls, pay_order_no: str) -> list[stripe.PaymentIntent]:
        """Every PaymentIntent whose metadata names the pay order.

        Paged through the whole list: localstripe has no search (and Stripe's search lags
        behind writes, useless right after a lost answer), and its list takes no filter.
        """
        return [
            pi
            async for pi in self._pages(calls, self._client.v1.payment_intents.list_async, {})
            if _meta(pi, PAY_ORDER_KEY) == pay_order_no
        ]

    async def _refunds_of(self, calls: _Calls, pi_id: str) -> list[stripe.Refund]:
        return [
            r
            async for r in self._pages(
                calls, self._client.v1.refunds.list_async, {"payment_intent": pi_id}
            )
        ]

    async def _pages(
        self,
        calls: _Calls,
        list_call: Callable[[Any], Awaitable[stripe.ListObject[Any]]],
        params: dict[str, Any],
    ) -> AsyncGenerator[Any, None]:
        after: str | None = None
        while True:
            page = await calls(
                list_call({**params, "limit": PAGE, **({"starting_after": after} if after else {})})
            )
            for item in page.data:
                yield item
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id

    async def _charge(self, calls: _Calls, ref: Any) -> stripe.Charge | None:
        if ref is None or isinstance(ref, stripe.Charge):
            return ref
        return await calls(self._client.v1.charges.retrieve_async(str(ref)))

    async def _capture(self, calls: _Calls, pi: stripe.PaymentIntent) -> Capture:
        """The capture of a succeeded PaymentIntent."""
        charge = await self._charge(calls, pi.latest_charge)
        if charge is None:
            raise GatewayAmbiguous(f"PaymentIntent {pi.id} succeeded with no charge yet")
        received = _field(pi, "amount_received")  # absent at localstripe
        return Capture(
            txn_id=pi.id,
            pay_order_no=_meta(pi, PAY_ORDER_KEY) or "",
            amount=int(received) if received is not None else _charge_amount(charge),
            currency=pi.currency.upper(),
            captured_at=_at(charge.created),
        )

    async def _close(self, calls: _Calls, pi_id: str) -> CloseResult:
        try:
            await calls(self._client.v1.payment_intents.cancel_async(pi_id))
            return CloseResult(closed=True)
        except stripe.StripeError as e:
            if not _is_refusal(e):
                raise
            calls.note_error(e)
            # Stripe says payment_intent_unexpected_state; localstripe a bare 400 with no
            # code. Either way only the PaymentIntent itself tells why.
            refusal = f"HTTP {e.http_status} {e.code or 'with no code'}"
        pi = await self._intent(calls, pi_id)
        if pi is None:
            log.warning("close_trade: no PaymentIntent %s at Stripe: nothing to pay", pi_id)
            return CloseResult(closed=True)
        if pi.status == "succeeded":
            return CloseResult(closed=False, capture=await self._capture(calls, pi))
        if pi.status == "canceled":
            return CloseResult(closed=True)
        raise GatewayAmbiguous(
            f"close_trade: cancel of {pi_id} refused ({refusal}) while it is {pi.status}"
        )

    @staticmethod
    def _check_refundable(
        request: RefundRequest, pi: stripe.PaymentIntent, refunds: list[stripe.Refund]
    ) -> None:
        """Refuse what Stripe should refuse and localstripe does not: no over-refund."""
        if request.currency.lower() != pi.currency.lower():
            raise GatewayRejected(
                f"refund: {request.currency} asked, PaymentIntent {pi.id} is in"
                f" {pi.currency.upper()}"
            )
        received = _field(pi, "amount_received")
        if received is None:
            charge = pi.latest_charge
            received = _charge_amount(charge) if isinstance(charge, stripe.Charge) else 0
        committed = sum(
            r.amount for r in refunds if _refund_status(r.status) is not RefundStatus.REJECTED
        )
        if committed + request.amount > int(received):
            raise GatewayRejected(
                f"refund: {request.amount} more would refund {committed + request.amount}"
                f" {request.currency} of PaymentIntent {pi.id}, which received {received}"
            )

    # --- calls, errors, metrics --------------------------------------------------------------

    async def _run(self, op: str, work: Callable[[_Calls], Awaitable[T]]) -> T:
        """Run one port call: count it, log it, and turn SDK errors into the port's."""
        started = time.perf_counter()
        calls = _Calls(self._timeout)
        try:
            result = await work(calls)
        except (stripe.StripeError, TimeoutError) as e:
            if isinstance(e, stripe.StripeError):
                calls.note_error(e)
            outcome, error = self._translate(op, e)
            self._count(op, outcome, started, calls, detail=str(error))
            raise error from None
        except GatewayError as e:
            outcome = "rejected" if isinstance(e, GatewayRejected) else "ambiguous_state"
            self._count(op, outcome, started, calls, detail=str(e))
            raise
        self._count(op, "ok" if result is not None else "not_found", started, calls)
        return result

    def _translate(self, op: str, e: stripe.StripeError | TimeoutError) -> tuple[str, GatewayError]:
        """The port's error for an SDK error, and the outcome label it is counted under."""
        if isinstance(e, TimeoutError):
            return "ambiguous_timeout", GatewayAmbiguous(
                f"{op}: no answer from Stripe within {self._timeout:.1f}s; outcome unknown"
            )
        if isinstance(e, stripe.APIConnectionError):
            cause = e.__cause__
            if isinstance(cause, httpx.ConnectError):
                # Refused before anything was sent: nothing happened at Stripe.
                return "unavailable", GatewayUnavailable(f"{op}: cannot connect to Stripe")
            if isinstance(cause, httpx.TimeoutException):
                return "ambiguous_timeout", GatewayAmbiguous(
                    f"{op}: no answer from Stripe within {self._timeout:.1f}s; outcome unknown"
                )
            name = type(cause).__name__ if cause else "connection error"
            return "ambiguous_transport", GatewayAmbiguous(f"{op}: {name}; outcome unknown")
        status = e.http_status
        message = self._redact(e.user_message or str(e) or "no message")
        if isinstance(e, stripe.RateLimitError):
            return "http_429", GatewayUnavailable(f"{op}: Stripe rate limit: {message}")
        if isinstance(e, stripe.AuthenticationError | stripe.PermissionError):
            # A key problem is no refusal of this refund: retry once the key is fixed.
            return f"http_{status}", GatewayUnavailable(
                f"{op}: Stripe refused the API key (HTTP {status}): {message}"
            )
        if status is None or status >= 500 or status == 409:
            # 409: a request with the same idempotency key is still running at Stripe.
            return f"http_{status or 'unknown'}", GatewayAmbiguous(
                f"{op}: HTTP {status or 'error'} from Stripe ({message}); outcome unknown"
            )
        return f"http_{status}", GatewayRejected(
            f"{op}: Stripe refused it (HTTP {status} {e.code or 'with no code'}): {message}"
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _count(
        self,
        op: str,
        outcome: str,
        started: float,
        calls: _Calls,
        *,
        detail: str = "",
        say: bool = True,
    ) -> None:
        observed_ms = (time.perf_counter() - started) * 1000
        CALLS.labels(op, outcome).inc()
        OBSERVED.labels(op).observe(observed_ms / 1000)
        if calls.processing_ms is not None:
            PROCESSING.labels(op).observe(calls.processing_ms / 1000)
        if not say:
            return
        level = logging.INFO if outcome in ("ok", "not_found") else logging.WARNING
        log.log(
            level,
            "gateway stripe %s %s: observed %.1f ms, gateway %s%s",
            op,
            outcome,
            observed_ms,
            "reported no time" if calls.processing_ms is None else f"{calls.processing_ms:.1f} ms",
            f" ({detail})" if detail else "",
        )


class _StatementReader:
    """One statement: balance transactions in a window, mapped to pay orders, with the
    PaymentIntents and charges it looks up cached for the length of the call."""

    def __init__(self, gateway: StripeGateway, calls: _Calls) -> None:
        self._gw = gateway
        self._calls = calls
        self._client = gateway._client
        self._intents: dict[str, stripe.PaymentIntent | None] = {}

    async def read(self, start: datetime, end: datetime) -> Statement:
        captures: list[Capture] = []
        refunds: list[GatewayRefund] = []
        since, until = start.timestamp(), end.timestamp()
        # Newest first. localstripe takes no filter here (Stripe would take created[gte]
        # and created[lt]); paging from the newest and stopping at the first older than the
        # window works against both.
        pages = self._gw._pages(
            self._calls,
            self._client.v1.balance_transactions.list_async,
            {"expand": ["data.source.payment_intent"]},
        )
        async with contextlib.aclosing(pages):
            async for bt in pages:
                if bt.created >= until:
                    continue
                if bt.created < since:
                    break
                source = bt.source
                if isinstance(source, stripe.Charge):
                    capture = await self._capture(source)
                    if capture is not None:
                        captures.append(capture)
                elif isinstance(source, stripe.Refund):
                    refund = await self._refund(source)
                    if refund is not None:
                        refunds.append(refund)
                # Anything else (payouts, fees, adjustments) is no payment of a pay order.
        return Statement(captures=captures, refunds=refunds)

    async def _capture(self, charge: stripe.Charge) -> Capture | None:
        pi = await self._pi(charge.payment_intent)
        if pi is None:
            log.warning("statement: charge %s has no PaymentIntent: not ours, left out", charge.id)
            return None
        return Capture(
            txn_id=pi.id,
            pay_order_no=_meta(pi, PAY_ORDER_KEY) or "",
            amount=_charge_amount(charge),
            currency=charge.currency.upper(),
            captured_at=_at(charge.created),
        )

    async def _refund(self, refund: stripe.Refund) -> GatewayRefund | None:
        pi_ref: Any = refund.payment_intent
        if pi_ref is None and refund.charge is not None:
            # A refund made on the charge (localstripe records no PaymentIntent then).
            charge = await self._gw._charge(self._calls, refund.charge)
            pi_ref = charge.payment_intent if charge is not None else None
        pi = await self._pi(pi_ref)
        if pi is None:
            log.warning("statement: refund %s has no PaymentIntent: not ours, left out", refund.id)
            return None
        return _refund_of(refund, pi.id)

    async def _pi(self, ref: Any) -> stripe.PaymentIntent | None:
        if ref is None or isinstance(ref, stripe.PaymentIntent):
            return ref
        pi_id = str(ref)
        if pi_id not in self._intents:
            self._intents[pi_id] = await self._gw._intent(self._calls, pi_id)
        return self._intents[pi_id]

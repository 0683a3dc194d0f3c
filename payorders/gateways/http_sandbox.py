"""The gateway Protocol over HTTP (aiohttp), against the sandbox gateway's API or any gateway
that speaks it.

A client timeout, a connection reset or a 5xx never proves the gateway failed: each is
reported as ``GatewayAmbiguous`` and resolved by the caller by querying and retrying under
the same idempotency key. Vendor statuses are mapped to ours in ``_refund_status``, the
one place that knows them. Every call is counted with the time we observed beside the
time the gateway says it spent (header ``Gateway-Processing-Ms``), so "the client timed
out but the gateway did not" shows up in data.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import httpx

from payorders.core.domain import RefundStatus
from payorders.core.models import Checkout
from payorders.gateways.port import (
    PROCESSING_HEADER,
    Capture,
    CloseResult,
    GatewayAmbiguous,
    GatewayRefund,
    GatewayRejected,
    GatewayUnavailable,
    OpenTrade,
    RefundRequest,
    Statement,
)
from payorders.gateways.telemetry import CALLS, OBSERVED, PROCESSING

# A server closes a keep-alive connection once it has been idle for a while (uvicorn: 5 s).
# A client that sends on such a connection at that instant sees it drop with no answer.
# Our HTTP clients (this adapter, the tools', the sandbox's webhook sender) therefore give up
# idle connections sooner than the server does.
KEEPALIVE_EXPIRY_S = 2.0
POOL_LIMITS = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
"""For the httpx clients (the tools', the local gateways' notification senders)."""


def aiohttp_session(
    timeout_s: float, *, limit: int = 100, headers: Mapping[str, str] | None = None
) -> aiohttp.ClientSession:
    """An aiohttp session for our own HTTP calls (this adapter, the order-events relay, the
    sandbox's webhook sender): idle connections given up after ``KEEPALIVE_EXPIRY_S``,
    ``timeout_s`` for a whole request. Make it inside the event loop that uses it."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=KEEPALIVE_EXPIRY_S),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers=headers,
    )


log = logging.getLogger(__name__)


def _refund_status(vendor: str) -> RefundStatus:
    """The gateway's refund status in our words; unknown words are not a success."""
    match vendor:
        case "succeeded" | "success" | "REFUND_SUCCESS" | "SUCCESS":
            return RefundStatus.SUCCEEDED
        case "failed" | "canceled" | "REFUND_FAIL" | "CLOSED" | "ABNORMAL":
            return RefundStatus.REJECTED
        case _:
            return RefundStatus.PENDING


def _capture(doc: dict[str, Any]) -> Capture:
    return Capture(
        txn_id=doc["txn_id"],
        pay_order_no=doc["pay_order_no"],
        amount=int(doc["amount"]),
        currency=doc["currency"],
        captured_at=datetime.fromisoformat(doc["captured_at"]),
    )


def _refund(doc: dict[str, Any]) -> GatewayRefund:
    return GatewayRefund(
        idempotency_key=doc["idempotency_key"],
        gateway_refund_id=doc["id"],
        txn_id=doc["txn_id"],
        amount=int(doc["amount"]),
        currency=doc["currency"],
        status=_refund_status(doc["status"]),
        created_at=datetime.fromisoformat(doc["created_at"]),
    )


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, read whole."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class HttpGateway:
    """Implements ``payorders.gateways.port.Gateway`` over HTTP."""

    def __init__(self, base_url: str, *, client_timeout_s: float) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = client_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Made at the first call: an aiohttp session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp_session(self._timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(
        self, op: str, method: str, path: str, *, ok_404: bool = False, **kwargs: Any
    ) -> Answer | None:
        started = time.perf_counter()
        try:
            async with self._http().request(method, self._base_url + path, **kwargs) as r:
                resp = Answer(r.status, r.headers, await r.read())
        except TimeoutError:
            observed = (time.perf_counter() - started) * 1000
            self._count(op, "ambiguous_timeout", observed, None)
            raise GatewayAmbiguous(
                f"{op}: no answer within {self._timeout:.1f}s; outcome unknown",
                observed_ms=observed,
            ) from None
        except aiohttp.ClientConnectorError as e:
            # A refused connection never reached the gateway; anything later might have.
            observed = (time.perf_counter() - started) * 1000
            self._count(op, "unavailable", observed, None)
            raise GatewayUnavailable(f"{op}: cannot connect ({e})") from None
        except aiohttp.ClientError as e:
            observed = (time.perf_counter() - started) * 1000
            self._count(op, "ambiguous_transport", observed, None)
            raise GatewayAmbiguous(f"{op}: {type(e).__name__}", observed_ms=observed) from None
        observed = (time.perf_counter() - started) * 1000
        gateway_ms = _processing_ms(resp)
        if resp.status_code == 404 and ok_404:
            self._count(op, "not_found", observed, gateway_ms)
            return None
        if resp.status_code >= 500:
            self._count(op, f"http_{resp.status_code}", observed, gateway_ms)
            if resp.status_code == 503 and _error_code(resp) == "unavailable":
                raise GatewayUnavailable(f"{op}: {_error_message(resp)}")
            raise GatewayAmbiguous(f"{op}: HTTP {resp.status_code}", observed_ms=observed)
        if resp.status_code >= 400:
            self._count(op, f"http_{resp.status_code}", observed, gateway_ms)
            raise GatewayRejected(f"{op}: {_error_message(resp)}")
        self._count(op, "ok", observed, gateway_ms)
        return resp

    def _count(self, op: str, outcome: str, observed_ms: float, gateway_ms: float | None) -> None:
        CALLS.labels(op, outcome).inc()
        OBSERVED.labels(op).observe(observed_ms / 1000)
        if gateway_ms is not None:
            PROCESSING.labels(op).observe(gateway_ms / 1000)
        level = logging.INFO if outcome in ("ok", "not_found") else logging.WARNING
        log.log(
            level,
            "gateway %s %s: observed %.1f ms, gateway %s",
            op,
            outcome,
            observed_ms,
            "did not answer" if gateway_ms is None else f"{gateway_ms:.1f} ms",
        )

    name = "sandbox"

    async def open_trade(self, trade: OpenTrade, *, first_attempt: bool = True) -> Checkout:
        # The sandbox's trade number is the pay order number: a repeat finds the same trade.
        resp = await self._call(
            "open_trade",
            "POST",
            "/v1/trades",
            json={
                "pay_order_no": trade.pay_order_no,
                "amount": trade.amount,
                "currency": trade.currency,
                "expires_at": trade.expires_at.isoformat(),
            },
        )
        assert resp is not None
        return Checkout.model_validate(resp.json())

    async def close_trade(self, pay_order_no: str, trade_ref: str | None = None) -> CloseResult:
        resp = await self._call("close_trade", "POST", f"/v1/trades/{pay_order_no}/close")
        assert resp is not None
        doc = resp.json()
        if doc["status"] == "already_paid":
            return CloseResult(closed=False, capture=_capture(doc["capture"]))
        return CloseResult(closed=True)

    async def refund(self, request: RefundRequest) -> GatewayRefund:
        resp = await self._call(
            "refund",
            "POST",
            "/v1/refunds",
            headers={"Idempotency-Key": request.idempotency_key},
            json={
                "pay_order_no": request.pay_order_no,
                "txn_id": request.txn_id,
                "amount": request.amount,
                "currency": request.currency,
            },
        )
        assert resp is not None
        return _refund(resp.json())

    async def query_refund(self, idempotency_key: str, txn_id: str) -> GatewayRefund | None:
        resp = await self._call(
            "query_refund", "GET", f"/v1/refunds/{idempotency_key}", ok_404=True
        )
        if resp is None:
            return None
        doc = resp.json()
        if doc.get("txn_id") != txn_id:
            # A key is ours for one transaction only: another's refund is not this one.
            return None
        if doc.get("processing_ms") is not None:
            # The data behind an ambiguous outcome: how long the gateway really took.
            log.warning(
                "refund %s exists at the gateway, which spent %.1f ms creating it",
                idempotency_key,
                float(doc["processing_ms"]),
            )
        return _refund(doc)

    async def query_capture(self, txn_id: str) -> Capture | None:
        resp = await self._call("query_capture", "GET", f"/v1/captures/{txn_id}", ok_404=True)
        return None if resp is None else _capture(resp.json())

    async def refunds_of(self, txn_id: str) -> list[GatewayRefund]:
        resp = await self._call("refunds_of", "GET", f"/v1/captures/{txn_id}/refunds", ok_404=True)
        return [] if resp is None else [_refund(r) for r in resp.json()["refunds"]]

    async def statement(self, start: datetime, end: datetime) -> Statement:
        resp = await self._call(
            "statement",
            "GET",
            "/v1/statement",
            params={"start": start.isoformat(), "end": end.isoformat()},
        )
        assert resp is not None
        doc = resp.json()
        return Statement(
            captures=[_capture(c) for c in doc["captures"]],
            refunds=[_refund(r) for r in doc["refunds"]],
        )


def _processing_ms(resp: Answer) -> float | None:
    try:
        return float(resp.headers[PROCESSING_HEADER])
    except (KeyError, ValueError):
        return None


def _error_code(resp: Answer) -> str | None:
    try:
        return str(resp.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def _error_message(resp: Answer) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}"

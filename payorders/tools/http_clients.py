"""HTTP clients of the two services, for the CLI, the demo and the tests: the service API
(as checkout and operators call it) and the sandbox gateway (as a customer and a test
harness call it)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime
from typing import Any

import httpx

from payorders.core.settings import Settings
from payorders.gateways.http_sandbox import POOL_LIMITS
from payorders.service import webhook


class ServiceError(Exception):
    """A non-2xx answer, with the service's own error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """The service did not answer at all."""


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        err = resp.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", resp.text[:200] or resp.reason_phrase
    raise ServiceError(resp.status_code, code, message)


# A dropped connection is sent again, with the same body. That is safe only because every
# call below is idempotent: a pay order by its order_no, a webhook by its event_id and
# txn_id, a capture by its txn_id (``SandboxClient.pay`` always sends one), faults by PUT
# and DELETE, an operator refund by its txn_id. A timeout is not retried: the caller chose
# how long to wait.
RESEND_ATTEMPTS = 3
RESEND_ON = (httpx.NetworkError, httpx.RemoteProtocolError)


class _Base:
    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=30, headers=headers or {}, limits=POOL_LIMITS
        )
        self.base_url = base_url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 1
        while True:
            try:
                resp = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if isinstance(e, RESEND_ON) and attempt < RESEND_ATTEMPTS:
                    await asyncio.sleep(0.05 * 2**attempt)
                    attempt += 1
                    continue
                raise Unreachable(f"{self.base_url} did not answer ({type(e).__name__})") from None
            _raise_for(resp)
            return resp.json() if resp.content else None


class ServiceClient(_Base):
    """The payorders service API."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings.api_url,
            headers={"Authorization": f"Bearer {settings.api_token.get_secret_value()}"},
        )
        self._secrets = [s.get_secret_value() for s in settings.webhook_secrets]

    async def create(
        self,
        *,
        order_no: str,
        amount: int,
        currency: str,
        expires_in_s: int | None = None,
        expires_at: datetime | None = None,
    ) -> dict[str, Any]:
        """Checkout. The service refuses both ``expires_in_s`` and ``expires_at`` at once."""
        body: dict[str, Any] = {"order_no": order_no, "amount": amount, "currency": currency}
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        if expires_at is not None:
            body["expires_at"] = expires_at.isoformat()
        doc: dict[str, Any] = await self._request("POST", "/v1/pay-orders", json=body)
        return doc

    async def get(self, pay_order_no: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._request("GET", f"/v1/pay-orders/{pay_order_no}")
        return doc

    async def send_webhook(
        self,
        *,
        pay_order_no: str,
        txn_id: str,
        amount: int,
        currency: str,
        paid_at: datetime,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """Deliver a signed ``payment.succeeded`` webhook, as the gateway would."""
        body = webhook.payment_event_body(
            webhook.PaymentEvent(
                event_id=event_id or f"evt_{uuid.uuid4().hex}",
                pay_order_no=pay_order_no,
                txn_id=txn_id,
                amount=amount,
                currency=currency,
                paid_at=paid_at,
            )
        )
        header = webhook.sign_header(self._secrets[:1], int(time.time()), body)
        doc: dict[str, Any] = await self._request(
            "POST",
            "/v1/webhooks/gateway",
            content=body,
            headers={webhook.HEADER: header, "Content-Type": "application/json"},
        )
        return doc

    async def operator_refund(self, txn_id: str) -> dict[str, Any]:
        """Refund a payment the gateway captured for a pay order we never had. Idempotent
        by ``txn_id`` (asked again: the same refund, nothing moved), so safe to resend."""
        doc: dict[str, Any] = await self._request(
            "POST", "/v1/operator-refunds", json={"txn_id": txn_id}
        )
        return doc

    async def get_operator_refund(self, txn_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._request("GET", f"/v1/operator-refunds/{txn_id}")
        return doc


class SandboxClient(_Base):
    """The sandbox gateway's HTTP API: payments, ledger, faults."""

    def __init__(self, settings: Settings) -> None:
        if not settings.gateway_url:
            raise Unreachable("no gateway URL: set PAYORDERS_GATEWAY_URL or start the stack")
        super().__init__(settings.gateway_url)

    async def pay(
        self, *, pay_order_no: str, amount: int, currency: str, txn_id: str | None = None
    ) -> dict[str, Any]:
        """A customer pays: the gateway captures, then sends its webhook. The txn_id is
        chosen here when not given, so that a resent request captures once."""
        body: dict[str, Any] = {
            "pay_order_no": pay_order_no,
            "amount": amount,
            "currency": currency,
            "txn_id": txn_id or f"txn_{uuid.uuid4().hex[:24]}",
        }
        doc: dict[str, Any] = await self._request("POST", "/v1/payments", json=body)
        return doc

    async def ledger(self, pay_order_no: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._request("GET", f"/v1/ledger/{pay_order_no}")
        return doc

    async def faults(self) -> list[dict[str, Any]]:
        doc: list[dict[str, Any]] = await self._request("GET", "/v1/faults")
        return doc

    async def set_faults(self, scope: str, **faults: Any) -> None:
        await self._request(
            "PUT",
            f"/v1/faults/{scope}",
            content=json.dumps(faults),
            headers={"Content-Type": "application/json"},
        )

    async def clear_faults(self, scope: str | None = None) -> None:
        await self._request("DELETE", "/v1/faults" if scope is None else f"/v1/faults/{scope}")

"""Clients for the CLI, the demo, the torture and the tests: the service API (as checkout
and operators call it), and the configured gateway as a customer and a test harness use it
(pay, read its own records, arm faults). ``gateway_client`` picks the gateway's client from
the settings: the tools call only the ``GatewayClient`` protocol and name no vendor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg
import httpx
import stripe
from stripe.params import PaymentIntentUpdateParams

from payorders.core import domain
from payorders.core.settings import Settings
from payorders.gateways import alipay, wechatpay
from payorders.gateways.http_sandbox import POOL_LIMITS
from payorders.gateways.stripe import PAY_ORDER_KEY, REFUND_KEY
from payorders.localstack.localstripe import money_by_pay_order
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
# and DELETE, an operator refund by its txn_id, a merchant refund by its refund_no. A
# timeout is not retried: the caller chose how long to wait.
LOCAL_ALIPAY_SCHEMA = "alipay_gateway"
LOCAL_WECHATPAY_SCHEMA = "wechatpay_gateway"
"""Where the local Alipay keeps its ledger (``payorders.sandbox.alipay``)."""
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
        resp = await self._send(method, path, **kwargs)
        return resp.json() if resp.content else None

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
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
            return resp


class ServiceClient(_Base):
    """The payorders service API."""

    def __init__(self, settings: Settings) -> None:
        # PAYORDERS_API_TOKEN; unset, the API answers 401 and the caller says so.
        token = settings.api_token
        super().__init__(
            settings.api_url,
            headers={}
            if token is None
            else {"Authorization": f"Bearer {token.get_secret_value()}"},
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

    async def cancel(self, pay_order_no: str) -> dict[str, Any]:
        """Checkout cancels the pay order; answered once the outcome is durable. Idempotent
        (a repeat answers the same status with ``closed`` false), so safe to resend."""
        doc: dict[str, Any] = await self._request("POST", f"/v1/pay-orders/{pay_order_no}/cancel")
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

    async def merchant_refund(
        self, pay_order_no: str, *, refund_no: str, amount: int, reason: str | None = None
    ) -> dict[str, Any]:
        """The shop refunds part or all of a paid pay order. Idempotent by ``refund_no``
        (the same body again: the same refund, ``created`` false, nothing moved), so safe
        to resend."""
        body: dict[str, Any] = {"refund_no": refund_no, "amount": amount}
        if reason is not None:
            body["reason"] = reason
        resp = await self._send("POST", f"/v1/pay-orders/{pay_order_no}/refunds", json=body)
        doc: dict[str, Any] = resp.json()
        doc["created"] = resp.status_code == 201
        return doc

    async def get_merchant_refund(self, pay_order_no: str, refund_no: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._request(
            "GET", f"/v1/pay-orders/{pay_order_no}/refunds/{refund_no}"
        )
        return doc

    async def merchant_refunds(self, pay_order_no: str) -> dict[str, Any]:
        """The pay order's merchant refunds and what they add up to."""
        doc: dict[str, Any] = await self._request("GET", f"/v1/pay-orders/{pay_order_no}/refunds")
        return doc


# --- the gateway, as a customer and a test harness use it -----------------------------------


@dataclass
class GatewayMoney:
    """One pay order's money in the gateway's own records."""

    captured: int = 0
    refunded: int = 0
    """Every refund: the saga's compensations and the shop's merchant refunds."""
    merchant_refunded: int = 0
    """The part of ``refunded`` made under a merchant refund's key (``mrefund-...``)."""


@dataclass
class GatewayAudit:
    """What the gateway's own records say about a set of pay orders: the torture's verdict
    compares these with our rows, never with our rows' account of the gateway."""

    money: dict[str, GatewayMoney] = field(default_factory=dict)
    refund_keys: list[str] = field(default_factory=list)
    """The idempotency key of every refund made there (one entry per refund; a refund that
    carries no key of ours stands there under its own id)."""
    keys_executed_twice: int = 0
    """Refund keys under which the gateway refunded more than once."""
    over_refunded: list[str] = field(default_factory=list)
    """Transactions refunded beyond what they captured."""


class GatewayClient(Protocol):
    """What the tools do at the configured gateway; ``gateway_client`` builds one."""

    label: str
    """The gateway's part of the stack as messages name it (``sandbox gateway``, ...)."""
    redelivers_webhooks: bool
    """Whether the gateway sends a webhook again until it is acknowledged. If not, a lost
    one is repaired only by reconciliation, from the gateway's statement."""
    takes_payments_after_expiry: bool
    """Whether a trade can still be paid after the pay order's expiry, and paid twice (the
    sandbox, Stripe); Alipay refuses both (``time_expire``, one payment per trade)."""

    async def pay(
        self,
        *,
        pay_order_no: str,
        amount: int,
        currency: str,
        txn_id: str | None = None,
        first_attempt: bool = False,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """A customer pays; the gateway then notifies the service. The same ``txn_id``
        (the caller's key of this payment) pays once. Answers the capture: its ``txn_id``
        is the gateway's transaction, the one the service records.

        ``first_attempt`` True: the caller never sent this ``txn_id`` before, so there is
        no earlier attempt to look for (a gateway that cannot find a payment by the
        caller's key cheaply skips the search). ``at``: the instant the money is to move;
        what can be done before (reading the trade, attaching the card) is done first.
        """
        ...

    async def ledger(self, pay_order_no: str) -> dict[str, Any]:
        """What the gateway holds for one pay order: ``trade_state``, ``captured``,
        ``refunded``, ``captures`` and ``refunds``."""
        ...

    async def ledgers(self, pay_order_nos: Collection[str]) -> dict[str, dict[str, Any]]:
        """``ledger`` of each pay order, read together."""
        ...

    async def captured_txns(self, pay_order_nos: Collection[str]) -> set[str]:
        """The transactions the gateway captured for these pay orders."""
        ...

    async def audit(self, pay_order_nos: Collection[str]) -> GatewayAudit:
        """The gateway's own records of these pay orders' money and refunds."""
        ...

    async def faults(self) -> list[dict[str, Any]]:
        """The faults armed now, one row per scope (a pay order or ``*``)."""
        ...

    async def set_faults(self, scope: str, **faults: Any) -> None:
        """Arm faults for a scope; fields not given keep their values."""
        ...

    async def clear_faults(self, scope: str | None = None) -> None:
        """Disarm a scope's faults, or every fault."""
        ...

    async def aclose(self) -> None: ...


async def _sleep_until(when: datetime | None) -> None:
    if when is not None:
        await asyncio.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()))


def currency_of(settings: Settings) -> str:
    """The currency the tools' pay orders are in: Alipay and WeChat Pay take CNY only."""
    return "CNY" if settings.gateway in ("alipay", "wechatpay") else "USD"


def gateway_client(
    settings: Settings, service: ServiceClient, *, pool: asyncpg.Pool | None = None
) -> GatewayClient:
    """The client of the gateway ``settings.gateway`` names: the one place that chooses.

    ``service`` answers which trade a pay order has; ``pool`` (the stack's database) is
    where the sandbox keeps its ledger, for ``captured_txns`` and ``audit``.

    Raises:
        Unreachable: the settings say where no gateway is (no URL, no key).
    """
    if settings.gateway == "stripe":
        return StripeToolClient(settings, service)
    if settings.gateway == "wechatpay":
        return LocalWechatPayClient(settings, pool=pool)
    if settings.gateway == "alipay":
        # The local Alipay keeps its money in a ledger of the sandbox's shape, in a schema
        # of its own, and serves the same payments, ledger and faults API.
        return LocalAlipayClient(settings, pool=pool)
    return SandboxClient(settings, pool=pool)


class _FaultsApi(_Base):
    """The faults control API, the same at the sandbox gateway and at the local stack's
    Stripe wire (``GET /v1/faults``, ``PUT /v1/faults/{scope}``, ``DELETE``)."""

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


class SandboxClient(_FaultsApi):
    """The sandbox gateway's HTTP API (payments, ledger, faults), and its tables for the
    audits (the sandbox keeps its ledger in the stack's PostgreSQL)."""

    label = "sandbox gateway"
    redelivers_webhooks = True
    takes_payments_after_expiry = True

    def __init__(
        self,
        settings: Settings,
        *,
        pool: asyncpg.Pool | None = None,
        schema: str | None = None,
        label: str | None = None,
    ) -> None:
        if not settings.gateway_url:
            raise Unreachable("no gateway URL: set PAYORDERS_GATEWAY_URL or start the stack")
        super().__init__(settings.gateway_url)
        self._pool = pool
        self._schema = schema or settings.sandbox_schema
        if label is not None:
            self.label = label

    def _at_gateway(self, pay_order_no: str) -> str:
        """The gateway's name of a pay order's trade (the sandbox's is its number)."""
        return pay_order_no

    def _ours(self, at_gateway: str) -> str:
        """``_at_gateway`` read back."""
        return at_gateway

    # A fault's scope is the trade's name at the gateway (or ``*``).
    async def faults(self) -> list[dict[str, Any]]:
        return [
            {**f, "scope": self._ours(f["scope"])} if f.get("scope") != "*" else f
            for f in await super().faults()
        ]

    async def set_faults(self, scope: str, **faults: Any) -> None:
        await super().set_faults(scope if scope == "*" else self._at_gateway(scope), **faults)

    async def clear_faults(self, scope: str | None = None) -> None:
        await super().clear_faults(None if scope is None else self._at_gateway(scope))

    def _named_ours(self, doc: dict[str, Any]) -> dict[str, Any]:
        if isinstance(doc.get("pay_order_no"), str):
            doc["pay_order_no"] = self._ours(doc["pay_order_no"])
        return doc

    async def pay(
        self,
        *,
        pay_order_no: str,
        amount: int,
        currency: str,
        txn_id: str | None = None,
        first_attempt: bool = False,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """A customer pays: the gateway captures, then sends its webhook. The txn_id is
        chosen here when not given, so that a resent request captures once (the gateway
        dedupes by txn_id itself: ``first_attempt`` changes nothing)."""
        await _sleep_until(at)  # one request: nothing to prepare before the instant
        body: dict[str, Any] = {
            "pay_order_no": self._at_gateway(pay_order_no),
            "amount": amount,
            "currency": currency,
            "txn_id": txn_id or f"txn_{uuid.uuid4().hex[:24]}",
        }
        doc: dict[str, Any] = await self._request("POST", "/v1/payments", json=body)
        return self._named_ours(doc)

    async def ledger(self, pay_order_no: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._request(
            "GET", f"/v1/ledger/{self._at_gateway(pay_order_no)}"
        )
        return self._named_ours(doc)

    async def ledgers(self, pay_order_nos: Collection[str]) -> dict[str, dict[str, Any]]:
        nos = list(pay_order_nos)
        found = await asyncio.gather(*(self.ledger(no) for no in nos))
        return dict(zip(nos, found, strict=True))

    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Unreachable("the sandbox's ledger is read from its database: no pool given")
        return self._pool

    async def captured_txns(self, pay_order_nos: Collection[str]) -> set[str]:
        async with self._db().acquire() as conn:
            rows = await conn.fetch(
                f"SELECT txn_id FROM {self._schema}.capture WHERE pay_order_no = ANY($1)",
                [self._at_gateway(no) for no in pay_order_nos],
            )
        return {r["txn_id"] for r in rows}

    async def audit(self, pay_order_nos: Collection[str]) -> GatewayAudit:
        s, nos = self._schema, [self._at_gateway(no) for no in pay_order_nos]
        async with self._db().acquire() as conn, conn.transaction(isolation="repeatable_read"):
            captures = await conn.fetch(
                f"SELECT c.pay_order_no, c.txn_id, c.amount,"
                f" coalesce((SELECT sum(r.amount) FROM {s}.refund r WHERE r.txn_id = c.txn_id),"
                " 0) AS refunded,"
                f" coalesce((SELECT sum(r.amount) FROM {s}.refund r WHERE r.txn_id = c.txn_id"
                "  AND starts_with(r.idempotency_key, $2)), 0) AS merchant_refunded"
                f" FROM {s}.capture c WHERE c.pay_order_no = ANY($1)",
                nos,
                domain.MERCHANT_REFUND_KEY_PREFIX,
            )
            keys = await conn.fetch(
                f"SELECT g.idempotency_key FROM {s}.refund g JOIN {s}.capture c USING (txn_id)"
                " WHERE c.pay_order_no = ANY($1)",
                nos,
            )
            twice = await conn.fetchval(
                f"SELECT count(*) FROM (SELECT idempotency_key FROM {s}.refund_call"
                " WHERE outcome = 'SUCCEEDED' GROUP BY 1 HAVING count(*) > 1) x"
            )
        audit = GatewayAudit(
            refund_keys=[k["idempotency_key"] for k in keys], keys_executed_twice=twice
        )
        for c in captures:
            money = audit.money.setdefault(self._ours(c["pay_order_no"]), GatewayMoney())
            money.captured += c["amount"]
            money.refunded += c["refunded"]
            money.merchant_refunded += c["merchant_refunded"]
            if c["refunded"] > c["amount"]:
                audit.over_refunded.append(c["txn_id"])
        return audit


class LocalAlipayClient(SandboxClient):
    """The local Alipay: a ledger of the sandbox's shape in a schema of its own, the same
    payments, ledger and faults API, its trades named by ``out_trade_no``."""

    takes_payments_after_expiry = False

    def __init__(self, settings: Settings, *, pool: asyncpg.Pool | None = None) -> None:
        super().__init__(settings, pool=pool, schema=LOCAL_ALIPAY_SCHEMA, label="local Alipay")

    def _at_gateway(self, pay_order_no: str) -> str:
        try:
            return alipay.out_trade_no_of(pay_order_no)
        except ValueError:
            return pay_order_no  # no trade can be under it: the gateway says so

    def _ours(self, at_gateway: str) -> str:
        return alipay.pay_order_no_of(at_gateway) or at_gateway


class LocalWechatPayClient(SandboxClient):
    """The local WeChat Pay: a ledger of the sandbox's shape in a schema of its own, the
    same payments, ledger and faults API, its orders named by ``out_trade_no`` (the pay
    order number where it fits WeChat Pay's 32 characters, a digest of it otherwise)."""

    takes_payments_after_expiry = False

    def __init__(self, settings: Settings, *, pool: asyncpg.Pool | None = None) -> None:
        super().__init__(
            settings, pool=pool, schema=LOCAL_WECHATPAY_SCHEMA, label="local WeChat Pay"
        )
        self._named: dict[str, str] = {}

    def _at_gateway(self, pay_order_no: str) -> str:
        name = wechatpay.out_trade_no_of(pay_order_no)
        self._named[name] = pay_order_no  # a digest reads back only from what we asked
        return name

    def _ours(self, at_gateway: str) -> str:
        return self._named.get(at_gateway, at_gateway)


# --- Stripe -------------------------------------------------------------------------------

CUSTOMER_KEY = "payorders_customer_key"
"""PaymentIntent metadata: the caller's key of the payment that paid it (``txn_id`` given
to ``pay``), so that a resend finds what an earlier attempt did and pays once."""
_PAYABLE = frozenset({"requires_payment_method", "requires_confirmation"})
_LIVE_REFUND = frozenset({"succeeded", "pending", "requires_action"})
"""Refund statuses that took money back or will: a second one under a key is a violation."""
TEST_CARD = "pm_card_visa"
"""Stripe's test card that pays (localstripe and Stripe's test mode know it)."""
CHECKOUT_ROUTE = "checkout"
OTHER_ROUTE = "another PaymentIntent"


def _field(obj: Any, key: str) -> Any:
    """``obj[key]``, or None where the server left it out (SDK objects are not dicts)."""
    return obj[key] if obj is not None and key in obj else None


def _meta(obj: Any, key: str) -> str | None:
    value = _field(_field(obj, "metadata"), key)
    return str(value) if value else None


def _id(ref: Any) -> str | None:
    if ref is None:
        return None
    return ref if isinstance(ref, str) else str(ref.id)


def _received(pi: stripe.PaymentIntent) -> int:
    if pi.status != "succeeded":
        return 0
    received = _field(pi, "amount_received")  # absent at localstripe
    if received is not None:
        return int(received)
    charge = _field(pi, "latest_charge")
    return int(charge.amount) if isinstance(charge, stripe.Charge) else int(pi.amount)


def _at(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def _trade_state(pi: stripe.PaymentIntent | None) -> str | None:
    """The sandbox's words for a trade's state (``OPEN``, ``PAID``, ``CLOSED``)."""
    if pi is None:
        return None
    return {"succeeded": "PAID", "canceled": "CLOSED"}.get(pi.status, "OPEN")


def _capture_json(pi: stripe.PaymentIntent) -> dict[str, Any]:
    charge = _field(pi, "latest_charge")
    return {
        "txn_id": pi.id,
        "pay_order_no": _meta(pi, PAY_ORDER_KEY),
        "amount": _received(pi),
        "currency": pi.currency.upper(),
        "captured_at": _at(charge.created if isinstance(charge, stripe.Charge) else pi.created),
    }


def _refund_json(refund: stripe.Refund, pi_id: str) -> dict[str, Any]:
    return {
        "id": refund.id,
        "idempotency_key": _meta(refund, REFUND_KEY),
        "txn_id": pi_id,
        "amount": refund.amount,
        "currency": refund.currency.upper(),
        "status": refund.status,
        "created_at": _at(refund.created),
    }


@dataclass
class _Books:
    """Stripe's records of some pay orders: their PaymentIntents (oldest first; the first
    is the one checkout opened) and the refunds of each PaymentIntent."""

    intents: dict[str, list[stripe.PaymentIntent]] = field(default_factory=dict)
    refunds: dict[str, list[stripe.Refund]] = field(default_factory=dict)

    def ledger(self, pay_order_no: str) -> dict[str, Any]:
        intents = self.intents.get(pay_order_no, [])
        refunds = [(r, pi.id) for pi in intents for r in self.refunds.get(pi.id, [])]
        captures = [_capture_json(pi) for pi in intents if pi.status == "succeeded"]
        return {
            "pay_order_no": pay_order_no,
            "trade_state": _trade_state(intents[0] if intents else None),
            "captured": sum(c["amount"] for c in captures),
            "refunded": sum(r.amount for r, _ in refunds if r.status == "succeeded"),
            "captures": captures,
            "refunds": [_refund_json(r, pi_id) for r, pi_id in refunds],
            "payment_intents": [
                {
                    "id": pi.id,
                    "status": pi.status,
                    "amount": pi.amount,
                    "currency": pi.currency.upper(),
                    "customer_key": _meta(pi, CUSTOMER_KEY),
                }
                for pi in intents
            ],
        }


class StripeToolClient:
    """Stripe as a customer and a test harness use it, through the official SDK at
    ``PAYORDERS_STRIPE_API_BASE`` (the local stack: its Stripe wire before localstripe,
    whose faults API is the sandbox's, at the same base).

    ``pay`` pays the pay order's checkout PaymentIntent (its ``trade_ref``) with a test card
    while that is payable for the amount and currency; any other payment (a second one,
    another amount, a trade already canceled) is another PaymentIntent of the pay order,
    paid: money by another route, which the service must record and refund. The caller's
    ``txn_id`` travels in the PaymentIntent's metadata (``CUSTOMER_KEY``), so a resend finds
    what an earlier attempt did, also across processes and against a server that ignores
    ``Idempotency-Key``. The records read (``ledger``, ``audit``) are Stripe's own.
    """

    label = "Stripe wire (fault proxy)"
    redelivers_webhooks = False  # localstripe sends each webhook once
    takes_payments_after_expiry = True

    def __init__(self, settings: Settings, service: ServiceClient) -> None:
        if settings.stripe_api_key is None:
            raise Unreachable("no Stripe API key: set PAYORDERS_STRIPE_API_KEY or start the stack")
        self._service = service
        self.base_url = settings.stripe_api_base
        self._http = stripe.HTTPXClient(timeout=30)
        # Retries are the caller's, under its txn_id: none inside the SDK.
        self._stripe = stripe.StripeClient(
            settings.stripe_api_key.get_secret_value(),
            base_addresses={"api": self.base_url},
            max_network_retries=0,
            http_client=self._http,
        )
        self._control = _FaultsApi(self.base_url)
        self._paid: dict[str, dict[str, Any]] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def aclose(self) -> None:
        await self._control.aclose()
        await self._http.close_async()  # type: ignore[no-untyped-call]  # the SDK's own

    # --- the customer -----------------------------------------------------------------------

    async def pay(
        self,
        *,
        pay_order_no: str,
        amount: int,
        currency: str,
        txn_id: str | None = None,
        first_attempt: bool = False,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        key = txn_id or f"txn_{uuid.uuid4().hex[:24]}"
        if (done := self._paid.get(key)) is not None:
            return done
        # One payment of a pay order at a time here: two would race for its checkout one.
        async with self._locks[pay_order_no]:
            with self._errors():
                pi, route = await self._pay(
                    pay_order_no,
                    amount,
                    currency.upper(),
                    key,
                    fresh=first_attempt or not txn_id,
                    at=at,
                )
        if pi.status != "succeeded":
            raise ServiceError(
                402, "payment_failed", f"PaymentIntent {pi.id} is {pi.status}, not paid"
            )
        doc = {**_capture_json(pi), "route": route, "customer_key": key}
        self._paid[key] = doc
        return doc

    async def _pay(
        self, no: str, amount: int, currency: str, key: str, *, fresh: bool, at: datetime | None
    ) -> tuple[stripe.PaymentIntent, str]:
        trade = await self._trade(no)
        if trade is not None:
            tag = _meta(trade, CUSTOMER_KEY)
            if tag == key and trade.status == "succeeded":
                return trade, CHECKOUT_ROUTE  # an earlier attempt paid it, its answer lost
            fits = trade.amount == amount and trade.currency.upper() == currency
            if trade.status in _PAYABLE and (tag == key or (tag is None and fits)):
                paid = await self._pay_checkout(trade, key, at=at)
                if paid is not None:
                    return paid, CHECKOUT_ROUTE
                at = None  # the workflow closed it at that instant: the money goes at once
        # A fresh key has no earlier attempt to find.
        pi = None if fresh else await self._find(no, key, besides=trade)
        if pi is None:
            pi = await self._stripe.v1.payment_intents.create_async(
                {
                    "amount": amount,
                    "currency": currency.lower(),
                    "payment_method": TEST_CARD,
                    "metadata": {PAY_ORDER_KEY: no, CUSTOMER_KEY: key},
                },
                {"idempotency_key": f"customer-{key}"},
            )
        if pi.status in _PAYABLE:
            await self._attach(pi, key)
            await _sleep_until(at)
            pi = await self._confirm(pi.id)
        return pi, OTHER_ROUTE

    async def _trade(self, no: str) -> stripe.PaymentIntent | None:
        """The pay order's checkout PaymentIntent, as the service names it; None when the
        service has no such pay order (money for an order we never had) or no trade."""
        try:
            order = await self._service.get(no)
        except ServiceError as e:
            if e.status == 404:
                return None
            raise
        ref = order.get("trade_ref")
        if not ref:
            if order.get("status") == "PAYING":
                # Paying by another route now would settle it around its checkout.
                raise ServiceError(
                    503, "trade_not_open", f"{no} has no trade at the gateway yet; try again"
                )
            return None
        return await self._intent(str(ref))

    async def _intent(self, pi_id: str) -> stripe.PaymentIntent | None:
        if not pi_id.startswith("pi_"):
            return None  # a trade another gateway opened
        try:
            return await self._stripe.v1.payment_intents.retrieve_async(
                pi_id, {"expand": ["latest_charge"]}
            )
        except stripe.InvalidRequestError as e:
            if e.http_status == 404:
                return None
            raise

    async def _pay_checkout(
        self, trade: stripe.PaymentIntent, key: str, *, at: datetime | None
    ) -> stripe.PaymentIntent | None:
        """Pay the checkout PaymentIntent at ``at``; None when the workflow closed it first
        (the payment window ended as the customer paid: the money takes another route)."""
        try:
            await self._attach(trade, key)
            await _sleep_until(at)
            return await self._confirm(trade.id)
        except stripe.InvalidRequestError as e:
            if e.http_status != 400:
                raise
            refusal = e
        # Stripe says payment_intent_unexpected_state; localstripe a bare 400. Only the
        # PaymentIntent itself tells why.
        now = await self._intent(trade.id)
        if now is not None and now.status == "succeeded" and _meta(now, CUSTOMER_KEY) == key:
            return now
        if now is None or now.status not in _PAYABLE:
            return None
        raise refusal

    async def _attach(self, pi: stripe.PaymentIntent, key: str) -> None:
        """Attach the test card and the caller's key, so that confirming is all that is
        left: the customer has typed the card in and is about to press "pay"."""
        params: PaymentIntentUpdateParams = {}
        if not _field(pi, "payment_method"):
            params["payment_method"] = TEST_CARD
        if _meta(pi, CUSTOMER_KEY) != key:
            params["metadata"] = {CUSTOMER_KEY: key}
        if params:
            await self._stripe.v1.payment_intents.update_async(pi.id, params)

    async def _confirm(self, pi_id: str) -> stripe.PaymentIntent:
        # Without parameters: localstripe answers confirm(payment_method=...) with a 500.
        return await self._stripe.v1.payment_intents.confirm_async(pi_id)

    async def _find(
        self, no: str, key: str, *, besides: stripe.PaymentIntent | None
    ) -> stripe.PaymentIntent | None:
        """The PaymentIntent an earlier attempt under ``key`` created, other than the
        checkout one (which an attempt tags before paying it, and the workflow may cancel
        next). Every one is read: localstripe has no search, and Stripe's lags behind
        writes."""
        skip = besides.id if besides is not None else None
        async for pi in self._every_intent():
            if pi.id != skip and _meta(pi, PAY_ORDER_KEY) == no and _meta(pi, CUSTOMER_KEY) == key:
                return pi
        return None

    # --- Stripe's records -------------------------------------------------------------------

    async def ledger(self, pay_order_no: str) -> dict[str, Any]:
        return (await self.ledgers([pay_order_no]))[pay_order_no]

    async def ledgers(self, pay_order_nos: Collection[str]) -> dict[str, dict[str, Any]]:
        with self._errors():
            books = await self._books(pay_order_nos, refunds=True)
        return {no: books.ledger(no) for no in pay_order_nos}

    async def captured_txns(self, pay_order_nos: Collection[str]) -> set[str]:
        with self._errors():
            books = await self._books(pay_order_nos, refunds=False)
        return {pi.id for pis in books.intents.values() for pi in pis if pi.status == "succeeded"}

    async def audit(self, pay_order_nos: Collection[str]) -> GatewayAudit:
        wanted = set(pay_order_nos)
        with self._errors():
            money = await money_by_pay_order(self._stripe)
            books = await self._books(wanted, refunds=True)
        live = [
            _meta(r, REFUND_KEY) or r.id
            for refunds in books.refunds.values()
            for r in refunds
            if r.status in _LIVE_REFUND
        ]
        per_key = Counter(live)
        merchant: Counter[str] = Counter()
        for no, intents in books.intents.items():
            for pi in intents:
                for r in books.refunds.get(pi.id, []):
                    key = _meta(r, REFUND_KEY) or ""
                    if r.status == "succeeded" and key.startswith(
                        domain.MERCHANT_REFUND_KEY_PREFIX
                    ):
                        merchant[no] += r.amount
        return GatewayAudit(
            money={
                no: GatewayMoney(
                    captured=m.captured, refunded=m.refunded, merchant_refunded=merchant[no]
                )
                for no, m in money.items()
                if no in wanted
            },
            refund_keys=live,
            keys_executed_twice=sum(1 for n in per_key.values() if n > 1),
            over_refunded=[pi for no, m in money.items() if no in wanted for pi in m.over_refunded],
        )

    async def _books(self, pay_order_nos: Collection[str], *, refunds: bool) -> _Books:
        wanted = set(pay_order_nos)
        books = _Books()
        pi_of_charge: dict[str, str] = {}
        async for pi in self._every_intent():
            no = _meta(pi, PAY_ORDER_KEY)
            if no in wanted:
                books.intents.setdefault(no, []).append(pi)
                if (charge := _id(_field(pi, "latest_charge"))) is not None:
                    pi_of_charge[charge] = pi.id
        for intents in books.intents.values():
            intents.sort(key=lambda pi: pi.created)  # stable: localstripe lists oldest first
        if refunds:
            mine = set(pi_of_charge.values()) | {
                pi.id for pis in books.intents.values() for pi in pis
            }
            async for r in self._every(self._stripe.v1.refunds.list_async, {}):
                # localstripe names the PaymentIntent only on refunds made with it.
                pi_id = _id(_field(r, "payment_intent")) or pi_of_charge.get(
                    _id(_field(r, "charge")) or ""
                )
                if pi_id in mine:
                    books.refunds.setdefault(pi_id, []).append(r)
        return books

    def _every_intent(self) -> AsyncIterator[stripe.PaymentIntent]:
        return self._every(
            self._stripe.v1.payment_intents.list_async, {"expand": ["data.latest_charge"]}
        )

    async def _every(self, list_call: Any, params: dict[str, Any]) -> AsyncIterator[Any]:
        after: str | None = None
        while True:
            page = await list_call(
                {**params, "limit": 100, **({"starting_after": after} if after else {})}
            )
            for item in page.data:
                yield item
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id

    # --- faults, at the Stripe wire ---------------------------------------------------------

    async def faults(self) -> list[dict[str, Any]]:
        return await self._control.faults()

    async def set_faults(self, scope: str, **faults: Any) -> None:
        await self._control.set_faults(scope, **faults)

    async def clear_faults(self, scope: str | None = None) -> None:
        await self._control.clear_faults(scope)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SDK errors as the tools' own: a connection that failed is ``Unreachable`` (the
        caller may resend: every call here is safe to), an answer is a ``ServiceError``."""
        try:
            yield
        except stripe.APIConnectionError as e:
            cause = type(e.__cause__).__name__ if e.__cause__ else "connection error"
            raise Unreachable(f"{self.base_url} did not answer ({cause})") from None
        except stripe.StripeError as e:
            raise ServiceError(
                e.http_status or 502,
                e.code or type(e).__name__,
                e.user_message or str(e) or "no message",
            ) from None

"""A whole Stripe stack inside the test process: localstripe (a Stripe server nobody here
wrote, its own process), the wire-fault proxy between it and our adapter, the service API
and a worker whose gateway is the Stripe adapter, on a real Temporal and PostgreSQL.

localstripe delivers its webhooks to the proxy's relay path, which hands them to the API's
``/v1/webhooks/stripe``: faults on the wire, never inside the adapter.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import stripe
from temporalio.client import Client

from payorders.core.settings import Settings
from payorders.localstack.localstripe import LocalStripe, pay_payment_intent
from payorders.localstack.stripe_wire import RELAY_PATH, StripeWire
from payorders.runtime import open_resources
from payorders.service import webhook
from payorders.service.app import create_app
from payorders.tools.http_clients import ServiceClient
from worker import build_worker

from .conftest import make_settings
from .http_stack import API_TOKEN, free_port, serve

API_KEY = "sk_test_payorders_e2e"
WEBHOOK_SECRET = "whsec_test_stripe_e2e"


@dataclass
class StripeStack:
    settings: Settings
    service: ServiceClient
    wire: StripeWire
    localstripe: LocalStripe
    stripe: stripe.StripeClient
    """Straight to localstripe: the customer's side, and Stripe's own records."""
    pool: asyncpg.Pool
    client: Client

    async def checkout(self, amount: int = 1999, **body: Any) -> dict[str, Any]:
        doc = await self.service.create(
            order_no=f"st-{uuid.uuid4().hex[:10]}", amount=amount, currency="USD", **body
        )
        return doc

    async def pay(self, pi_id: str) -> stripe.PaymentIntent:
        return await pay_payment_intent(self.stripe, pi_id)

    async def other_payment(self, pay_order_no: str, amount: int) -> stripe.PaymentIntent:
        """Money by another route: a second PaymentIntent for the same pay order, paid."""
        pi = await self.stripe.v1.payment_intents.create_async(
            {
                "amount": amount,
                "currency": "usd",
                "metadata": {"pay_order_no": pay_order_no},
                "payment_method_types": ["card"],
            }
        )
        return await self.pay(pi.id)

    async def refunds_of(self, pi_id: str) -> list[stripe.Refund]:
        """Stripe's own count of the refunds of a PaymentIntent."""
        page = await self.stripe.v1.refunds.list_async({"payment_intent": pi_id, "limit": 100})
        return list(page.data)

    async def intent(self, pi_id: str) -> stripe.PaymentIntent:
        return await self.stripe.v1.payment_intents.retrieve_async(pi_id)

    async def wait_order(
        self, pay_order_no: str, until: Callable[[dict[str, Any]], bool], within: float = 60
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            order = await self.service.get(pay_order_no)
            if until(order):
                return order
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last: {order}")
            await asyncio.sleep(0.1)

    async def counts(self) -> dict[str, int]:
        """Every row a webhook could have written."""
        tables = ["pay_order", "payment", "refund", "webhook_event"]
        async with self.pool.acquire() as conn:
            return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


def signed(body: bytes, secret: str = WEBHOOK_SECRET, *, at: int | None = None) -> dict[str, str]:
    """Headers of a webhook signed the way Stripe signs (``t=..,v1=..``, HMAC-SHA256)."""
    t = int(time.time()) if at is None else at
    return {
        "Content-Type": "application/json",
        "Stripe-Signature": webhook.sign_header([secret], t, body),
    }


@asynccontextmanager
async def stripe_stack(
    client: Client,
    temporal_address: str,
    db_url: str,
    localstripe: LocalStripe,
    *,
    worker: bool = True,
    **overrides: Any,
) -> AsyncIterator[StripeStack]:
    """``worker=False``: no worker in this process (the test runs its own, to kill it)."""
    api_port, wire_port = free_port(), free_port()
    values: dict[str, Any] = {
        "temporal_address": temporal_address,
        "database_url": db_url,
        "api_url": f"http://127.0.0.1:{api_port}",
        "api_token": API_TOKEN,
        "gateway": "stripe",
        "stripe_api_key": API_KEY,
        "stripe_webhook_secret": [WEBHOOK_SECRET, "whsec_test_stripe_old"],
        "stripe_api_base": f"http://127.0.0.1:{wire_port}",
        "settlement_window_s": 2,
    }
    values.update(overrides)
    settings = make_settings(**values)
    # The proxy holds a lost answer past our client's timeout, then lets it go.
    wire = StripeWire(
        upstream=localstripe.url,
        webhook_target=f"http://127.0.0.1:{api_port}/v1/webhooks/stripe",
        withhold_answer_s=settings.gateway_client_timeout_ms / 1000 + 1,
    )
    await localstripe.flush()
    await localstripe.register_webhook(f"http://127.0.0.1:{wire_port}{RELAY_PATH}", WEBHOOK_SECRET)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(serve(wire.app(), wire_port))  # type: ignore[arg-type]
        direct = await stack.enter_async_context(localstripe.client(API_KEY))
        res = await stack.enter_async_context(open_resources(settings, db_url))
        await stack.enter_async_context(serve(create_app(settings), api_port))
        if worker:
            await stack.enter_async_context(
                build_worker(client, res, task_queue=settings.task_queue)
            )
        service = ServiceClient(settings)
        stack.push_async_callback(service.aclose)
        yield StripeStack(
            settings=settings,
            service=service,
            wire=wire,
            localstripe=localstripe,
            stripe=direct,
            pool=res.pool,
            client=client,
        )

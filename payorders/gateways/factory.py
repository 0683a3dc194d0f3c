"""The one place that builds the configured gateway from the settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from payorders.core.settings import Settings
from payorders.gateways.http_sandbox import HttpGateway
from payorders.gateways.port import Gateway
from payorders.gateways.stripe import StripeGateway, StripeKeyRefused


class GatewayNotConfigured(ValueError):
    """The settings name no gateway the product can reach."""


@asynccontextmanager
async def open_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The gateway activities and the webhook adapter call, with our client timeout."""
    timeout_s = settings.gateway_client_timeout_ms / 1000
    gateway: HttpGateway | StripeGateway
    if settings.gateway == "stripe":
        key = settings.stripe_api_key.get_secret_value() if settings.stripe_api_key else ""
        if not key.startswith(("sk_", "rk_")):
            raise GatewayNotConfigured(
                "gateway stripe: set PAYORDERS_STRIPE_API_KEY to a secret key (sk_... or rk_...)"
            )
        gateway = StripeGateway(key, api_base=settings.stripe_api_base, client_timeout_s=timeout_s)
        try:
            await gateway.check_key()
        except StripeKeyRefused as e:
            await gateway.aclose()
            raise GatewayNotConfigured(f"gateway stripe: {e}") from None
    else:
        if not settings.gateway_url:
            raise GatewayNotConfigured(
                "no gateway: set PAYORDERS_GATEWAY_URL (the local stack sets it to its sandbox"
                " gateway), or PAYORDERS_GATEWAY=stripe"
            )
        gateway = HttpGateway(settings.gateway_url, client_timeout_s=timeout_s)
    try:
        yield gateway
    finally:
        await gateway.aclose()

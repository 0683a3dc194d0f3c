"""The one place that builds the configured gateway from the settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from payorders.core.settings import Settings
from payorders.gateways.http_sandbox import HttpGateway
from payorders.gateways.port import Gateway


class GatewayNotConfigured(ValueError):
    """The settings name no gateway the product can reach."""


@asynccontextmanager
async def open_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The gateway activities and the webhook adapter call, with our client timeout."""
    if not settings.gateway_url:
        raise GatewayNotConfigured(
            "no gateway: set PAYORDERS_GATEWAY_URL (the local stack sets it to its sandbox gateway)"
        )
    http = HttpGateway(
        settings.gateway_url, client_timeout_s=settings.gateway_client_timeout_ms / 1000
    )
    try:
        yield http
    finally:
        await http.aclose()

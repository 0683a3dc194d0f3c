"""The one place that builds the configured gateway from the settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from payorders.core.settings import Settings
from payorders.gateways.alipay import AlipayConfig, AlipayGateway, AlipayKeyRefused
from payorders.gateways.http_sandbox import HttpGateway
from payorders.gateways.port import Gateway, TradeBook
from payorders.gateways.stripe import StripeGateway, StripeKeyRefused


class GatewayNotConfigured(ValueError):
    """The settings name no gateway the product can reach."""


def _pem(what: str, value: str | None, path: Path | None) -> str:
    if value and path:
        raise GatewayNotConfigured(f"gateway alipay: set {what} or {what}_FILE, not both")
    if path is not None:
        try:
            value = path.read_text()
        except OSError as e:
            raise GatewayNotConfigured(
                f"gateway alipay: cannot read {what}_FILE ({e.strerror})"
            ) from None
    if not value or "-----BEGIN" not in value:
        raise GatewayNotConfigured(f"gateway alipay: set {what} (or {what}_FILE) to a PEM key")
    return value


def alipay_config(settings: Settings) -> AlipayConfig:
    """The Alipay adapter's configuration, each missing or malformed part named.

    Raises:
        GatewayNotConfigured: the app id, a key or the notify URL is missing, or a key is
            not PEM.
    """
    if not settings.alipay_app_id:
        raise GatewayNotConfigured("gateway alipay: set PAYORDERS_ALIPAY_APP_ID")
    if not settings.alipay_notify_url:
        raise GatewayNotConfigured(
            "gateway alipay: set PAYORDERS_ALIPAY_NOTIFY_URL (this service's public"
            " /v1/webhooks/alipay)"
        )
    secret = settings.alipay_private_key
    return AlipayConfig(
        app_id=settings.alipay_app_id,
        private_key_pem=_pem(
            "PAYORDERS_ALIPAY_PRIVATE_KEY",
            None if secret is None else secret.get_secret_value(),
            settings.alipay_private_key_file,
        ),
        alipay_public_key_pem=_pem(
            "PAYORDERS_ALIPAY_PUBLIC_KEY",
            settings.alipay_public_key,
            settings.alipay_public_key_file,
        ),
        notify_url=settings.alipay_notify_url,
        gateway_url=settings.alipay_gateway_url,
    )


def check_alipay(settings: Settings) -> None:
    """Refuse an Alipay configuration that cannot work (a part missing, a key the SDK
    cannot load), before anything starts.

    Raises:
        GatewayNotConfigured: what is wrong, by its variable.
    """
    try:
        AlipayGateway.check(alipay_config(settings))
    except AlipayKeyRefused as e:
        raise GatewayNotConfigured(f"gateway alipay: {e}") from None


@asynccontextmanager
async def open_gateway(
    settings: Settings, *, book: TradeBook | None = None
) -> AsyncIterator[Gateway]:
    """The gateway activities and the webhook adapter call, with our client timeout.
    ``book``: our records of the trades, which Alipay's statement is read by."""
    timeout_s = settings.gateway_client_timeout_ms / 1000
    gateway: HttpGateway | StripeGateway | AlipayGateway
    if settings.gateway == "alipay":
        try:
            gateway = AlipayGateway(alipay_config(settings), client_timeout_s=timeout_s, book=book)
        except AlipayKeyRefused as e:
            raise GatewayNotConfigured(f"gateway alipay: {e}") from None
    elif settings.gateway == "stripe":
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

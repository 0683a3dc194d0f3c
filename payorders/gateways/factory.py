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
from payorders.gateways.wechatpay import WechatPayConfig, WechatPayGateway, WechatPayKeyRefused


class GatewayNotConfigured(ValueError):
    """The settings name no gateway the product can reach."""


def _pem(what: str, value: str | None, path: Path | None, *, gateway: str = "alipay") -> str:
    if value and path:
        raise GatewayNotConfigured(f"gateway {gateway}: set {what} or {what}_FILE, not both")
    if path is not None:
        try:
            value = path.read_text()
        except OSError as e:
            raise GatewayNotConfigured(
                f"gateway {gateway}: cannot read {what}_FILE ({e.strerror})"
            ) from None
    if not value or "-----BEGIN" not in value:
        raise GatewayNotConfigured(f"gateway {gateway}: set {what} (or {what}_FILE) to a PEM key")
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


def wechatpay_config(settings: Settings) -> WechatPayConfig:
    """The WeChat Pay adapter's configuration, each missing or malformed part named.

    Raises:
        GatewayNotConfigured: an id, a key, the APIv3 key or the notify URL is missing, or
            a key is not PEM.
    """
    for name, value in [
        ("MCHID", settings.wechatpay_mchid),
        ("APPID", settings.wechatpay_appid),
        ("CERT_SERIAL_NO", settings.wechatpay_cert_serial_no),
        ("PUBLIC_KEY_ID", settings.wechatpay_public_key_id),
    ]:
        if not value:
            raise GatewayNotConfigured(f"gateway wechatpay: set PAYORDERS_WECHATPAY_{name}")
    apiv3 = settings.wechatpay_apiv3_key
    if apiv3 is None or not apiv3.get_secret_value():
        raise GatewayNotConfigured("gateway wechatpay: set PAYORDERS_WECHATPAY_APIV3_KEY")
    if not settings.wechatpay_notify_url:
        raise GatewayNotConfigured(
            "gateway wechatpay: set PAYORDERS_WECHATPAY_NOTIFY_URL (this service's public"
            " /v1/webhooks/wechatpay)"
        )
    assert settings.wechatpay_mchid and settings.wechatpay_appid
    assert settings.wechatpay_cert_serial_no and settings.wechatpay_public_key_id
    secret = settings.wechatpay_private_key
    return WechatPayConfig(
        mchid=settings.wechatpay_mchid,
        appid=settings.wechatpay_appid,
        private_key_pem=_pem(
            "PAYORDERS_WECHATPAY_PRIVATE_KEY",
            None if secret is None else secret.get_secret_value(),
            settings.wechatpay_private_key_file,
            gateway="wechatpay",
        ),
        cert_serial_no=settings.wechatpay_cert_serial_no,
        apiv3_key=apiv3.get_secret_value(),
        public_key_pem=_pem(
            "PAYORDERS_WECHATPAY_PUBLIC_KEY",
            settings.wechatpay_public_key,
            settings.wechatpay_public_key_file,
            gateway="wechatpay",
        ),
        public_key_id=settings.wechatpay_public_key_id,
        notify_url=settings.wechatpay_notify_url,
        gateway_url=settings.wechatpay_gateway_url,
    )


def check_gateway(settings: Settings) -> None:
    """Refuse a gateway configuration that cannot work (a part missing, a key the SDK cannot
    load), before anything starts; the sandbox and Stripe are checked as they open.

    Raises:
        GatewayNotConfigured: what is wrong, by its variable.
    """
    if settings.gateway == "alipay":
        check_alipay(settings)
    elif settings.gateway == "wechatpay":
        try:
            WechatPayGateway.check(wechatpay_config(settings))
        except WechatPayKeyRefused as e:
            raise GatewayNotConfigured(f"gateway wechatpay: {e}") from None


@asynccontextmanager
async def open_gateway(
    settings: Settings, *, book: TradeBook | None = None
) -> AsyncIterator[Gateway]:
    """The gateway activities and the webhook adapter call, with our client timeout.
    ``book``: our records of the trades, which Alipay's statement is read by."""
    timeout_s = settings.gateway_client_timeout_ms / 1000
    gateway: HttpGateway | StripeGateway | AlipayGateway | WechatPayGateway
    if settings.gateway == "wechatpay":
        try:
            gateway = WechatPayGateway(
                wechatpay_config(settings), client_timeout_s=timeout_s, book=book
            )
        except WechatPayKeyRefused as e:
            raise GatewayNotConfigured(f"gateway wechatpay: {e}") from None
    elif settings.gateway == "alipay":
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

"""One settings object, read from the environment in entry points and passed down."""

from __future__ import annotations

import ipaddress
import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from payorders.core.models import ReconcileInput, RetryConfig, Timeouts
from payorders.core.tokens import TokenSpec

TASK_QUEUE = "pay-orders"


class Settings(BaseSettings):
    """Configuration from ``PAYORDERS_*`` variables, plus Temporal's own two."""

    model_config = SettingsConfigDict(
        env_prefix="PAYORDERS_",
        extra="ignore",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
    )

    temporal_address: str = Field(
        default="127.0.0.1:7233", validation_alias=AliasChoices("TEMPORAL_ADDRESS")
    )
    temporal_namespace: str = Field(
        default="default", validation_alias=AliasChoices("TEMPORAL_NAMESPACE")
    )
    temporal_ui_url: str = "http://127.0.0.1:8233"
    """Where operators open the Temporal UI; used to print links to pay orders."""
    task_queue: str = TASK_QUEUE
    database_url: str | None = None
    """PostgreSQL URL; when unset, ``payorders dev`` runs an embedded server in ``data_dir``."""
    data_dir: Path = Path("data")
    db_pool_min: PositiveInt = 2
    db_pool_max: PositiveInt = 10

    default_expires_in_s: PositiveInt = 3600
    settlement_window_s: PositiveInt = 25 * 3600

    gateway_server_timeout_ms: PositiveInt = 5_000
    """How long the gateway itself works on a request before it gives up (sandbox: enforced)."""
    gateway_client_timeout_ms: PositiveInt = 10_000
    """Our client's timeout: longer than the gateway's own, so a timeout is rare and ambiguous."""
    checkout_wait_ms: PositiveInt = 15_000
    """How long checkout waits for the workflow to open the trade at the gateway before it
    answers 503 (retry: the same pay order and trade)."""
    cancel_wait_ms: PositiveInt = 15_000
    """How long a cancel waits for the workflow to close the pay order (the gateway's close
    first) before it answers 503 (the cancel stands; retry to learn the outcome)."""
    refund_retry_initial_ms: PositiveInt = 1_000
    refund_retry_max_ms: PositiveInt = 300_000
    refund_alert_after_attempts: PositiveInt = 10
    refund_window_days: PositiveInt = 365
    """How long after its payment a paid pay order may still be refunded by the shop."""

    sandbox_schema: str = "sandbox_gateway"

    api_url: str = "http://127.0.0.1:8000"
    """Where the service API listens (checkout, reads, the gateway webhook)."""
    api_tokens: list[TokenSpec] = []
    """The API's bearer tokens, JSON: ``[{"name", "scopes", "sha256" | "token"}]`` (see
    ``payorders.core.tokens``); no default: the API refuses to start without one."""
    api_token: SecretStr | None = None
    """Deprecated: one token with the ``admin`` scope (use ``api_tokens``). Clients (the
    CLI, the tools) send this one."""
    gateway: Literal["sandbox", "stripe", "alipay", "wechatpay"] = "sandbox"
    """Which gateway adapter the worker and the API use."""
    gateway_url: str | None = None
    """The sandbox gateway's HTTP base (required with ``gateway=sandbox``; the local stack
    sets its sandbox gateway's)."""
    stripe_api_key: SecretStr | None = None
    """Stripe secret key (``sk_...``; ``rk_...`` restricted keys work too): required with
    ``gateway=stripe``."""
    stripe_webhook_secret: Annotated[list[SecretStr], NoDecode] = []
    """Signing secrets of the Stripe webhook endpoint (``whsec_...``), JSON list or one
    value; the first is current, the others are accepted while a secret rotates."""
    stripe_api_base: str = "https://api.stripe.com"
    """Where the Stripe SDK sends its calls (the local stack points it at localstripe)."""
    alipay_app_id: str | None = None
    """The app's id at Alipay (required with ``gateway=alipay``)."""
    alipay_private_key: SecretStr | None = None
    """The app's RSA private key (PEM), which signs every request; or ``_file``."""
    alipay_private_key_file: Path | None = None
    """A file holding ``alipay_private_key`` (the PEM), instead of the value itself."""
    alipay_public_key: str | None = None
    """Alipay's RSA public key (PEM), which verifies every answer and notification; or
    ``_file``."""
    alipay_public_key_file: Path | None = None
    """A file holding ``alipay_public_key``."""
    alipay_gateway_url: str = "https://openapi.alipay.com/gateway.do"
    """Alipay's gateway (the local stack points it at its local Alipay)."""
    alipay_notify_url: str | None = None
    """Where Alipay sends a trade's notifications: this service's public
    ``/v1/webhooks/alipay`` (required with ``gateway=alipay``)."""
    alipay_notify_max_age_s: PositiveInt = 2 * 86400
    """A notification whose ``notify_time`` is older is refused as stale (Alipay retries
    for about 25 h)."""
    wechatpay_mchid: str | None = None
    """The merchant's id at WeChat Pay (required with ``gateway=wechatpay``)."""
    wechatpay_appid: str | None = None
    """The app id the merchant's trades are made for (required with ``gateway=wechatpay``)."""
    wechatpay_private_key: SecretStr | None = None
    """The merchant's API private key (PEM), which signs every request; or ``_file``."""
    wechatpay_private_key_file: Path | None = None
    """A file holding ``wechatpay_private_key`` (the PEM), instead of the value itself."""
    wechatpay_cert_serial_no: str | None = None
    """The serial number of the merchant's API certificate (hex), named in each request."""
    wechatpay_apiv3_key: SecretStr | None = None
    """The merchant's APIv3 key (32 bytes), which decrypts callbacks."""
    wechatpay_public_key: str | None = None
    """WeChat Pay's public key (PEM, the "WeChat Pay public key" mode), which verifies every
    answer and callback; or ``_file``."""
    wechatpay_public_key_file: Path | None = None
    """A file holding ``wechatpay_public_key``."""
    wechatpay_public_key_id: str | None = None
    """That key's id (``PUB_KEY_ID_...``), which answers and callbacks name."""
    wechatpay_gateway_url: str = "https://api.mch.weixin.qq.com"
    """WeChat Pay's API (the local stack points it at its local WeChat Pay)."""
    wechatpay_notify_url: str | None = None
    """Where WeChat Pay sends callbacks: this service's public ``/v1/webhooks/wechatpay``
    (required with ``gateway=wechatpay``)."""
    wechatpay_callback_tolerance_s: PositiveInt = 300
    """A callback whose ``Wechatpay-Timestamp`` is further from now is refused as stale (WeChat
    Pay signs each delivery afresh)."""
    webhook_url: str = "http://127.0.0.1:8000/v1/webhooks/gateway"
    """Where the (sandbox) gateway delivers its webhooks."""
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = []
    """Accepted webhook signing secrets of the sandbox gateway, JSON list; the first one
    signs (rotation). No default: the API and the sandbox refuse to start without one."""
    webhook_tolerance_s: PositiveInt = 300
    max_body_bytes: PositiveInt = 65_536
    reconcile_every_s: PositiveInt = 300
    """Interval of the reconciliation Schedule."""
    reconcile_lookback_s: PositiveInt = 2 * 86400
    """Period of the gateway statement each run compares."""
    reconcile_pending_after_s: PositiveInt = 600
    """A refund pending longer than this is a finding."""
    reconcile_stuck_after_s: PositiveInt = 600
    """A pay order PAYING this long past its expiry, with no workflow, is re-driven."""
    reconcile_page_size: PositiveInt = 20_000
    sandbox_webhook_max_attempts: PositiveInt = 8
    sandbox_webhook_retry_initial_ms: PositiveInt = 500
    workflow_sandbox: bool = True
    """Run workflows in the SDK's sandbox (guards determinism; costs worker CPU)."""
    worker_workflow_task_pollers: PositiveInt = 5
    worker_activity_task_pollers: PositiveInt = 5
    worker_max_cached_workflows: PositiveInt = 1000
    """Workflows kept in worker memory (sticky); evicted ones replay on their next task."""
    worker_metrics_address: str | None = "127.0.0.1:9464"
    """IP:port of the worker's Prometheus endpoint (``/metrics``); empty: no endpoint."""
    order_events_url: str | None = None
    """Where the relay POSTs order events (the order service's endpoint); unset or empty:
    no relay runs (the events stay readable from ``GET /v1/events``)."""
    order_events_secret: SecretStr | None = None
    """Signs each delivery (``Payorders-Event-Signature``); no default: a worker with
    ``order_events_url`` refuses to start without it."""
    order_events_retry_initial_ms: PositiveInt = 500
    """First retry interval of an unacknowledged event (doubles each attempt)."""
    order_events_retry_max_ms: PositiveInt = 60_000
    """Cap of the retry interval; events are retried without a limit on attempts."""
    order_events_concurrency: PositiveInt = 16
    """Pay orders whose events one relay delivers at the same time."""
    order_events_alert_after_s: PositiveInt = 900
    """An event undelivered longer than this is a reconciliation exception."""

    @field_validator("stripe_webhook_secret", "webhook_secrets", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if not v:
                return []
            return json.loads(v) if v.startswith("[") else [v]
        return v

    @field_validator("worker_metrics_address", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("order_events_url", mode="before")
    @classmethod
    def _no_url_when_empty(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("worker_metrics_address")
    @classmethod
    def _ip_and_port(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        host, _, port = v.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
            ok = (ip.version == 6) == bracketed and port.isdigit() and 0 < int(port) < 65536
        except ValueError:
            ok = False
        if not ok:
            # The SDK's exporter binds a literal socket address: no host names.
            raise ValueError(
                "worker_metrics_address must be IP:port (e.g. 127.0.0.1:9464, [::1]:9464),"
                " or empty to serve no metrics"
            )
        return v

    @field_validator("sandbox_schema")
    @classmethod
    def _schema_is_identifier(cls, v: str) -> str:
        if not v.isidentifier() or not v.islower():
            raise ValueError("sandbox_schema must be a lower-case SQL identifier")
        return v

    @field_validator("gateway_client_timeout_ms")
    @classmethod
    def _client_outlasts_server(cls, v: int, info: object) -> int:
        data = getattr(info, "data", {})
        server = data.get("gateway_server_timeout_ms")
        if server is not None and v <= server:
            raise ValueError("gateway_client_timeout_ms must exceed gateway_server_timeout_ms")
        return v

    def timeouts(self) -> Timeouts:
        # The activity does at most a call and a follow-up query, each bounded by the client.
        client = self.gateway_client_timeout_ms
        return Timeouts(
            gateway_client_ms=client,
            activity_start_to_close_ms=2 * client + 5_000,
        )

    def refund_retry(self) -> RetryConfig:
        return RetryConfig(
            initial_interval_ms=self.refund_retry_initial_ms,
            maximum_interval_ms=self.refund_retry_max_ms,
        )

    @property
    def default_expires_in(self) -> timedelta:
        return timedelta(seconds=self.default_expires_in_s)

    def reconcile_input(self) -> ReconcileInput:
        return ReconcileInput(
            lookback_s=self.reconcile_lookback_s,
            page_size=self.reconcile_page_size,
            pending_after_s=self.reconcile_pending_after_s,
            stuck_after_s=self.reconcile_stuck_after_s,
            timeouts=self.timeouts(),
            refund_retry=self.refund_retry(),
        )

    def ui_link(self, workflow_id: str) -> str:
        return (
            f"{self.temporal_ui_url}/namespaces/{self.temporal_namespace}/workflows/{workflow_id}"
        )

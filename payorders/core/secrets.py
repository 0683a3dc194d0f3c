"""The secrets a process needs before it may start, and what is refused as one.

No secret has a default. A process that needs one and finds it unset, empty, shorter than
``MIN_LENGTH`` or a placeholder (``change-me``, a value the docs show, a former default)
refuses to start with one line naming the variable; the value itself is never printed.
"""

from __future__ import annotations

import secrets as _random
from collections.abc import Iterable
from typing import Literal

from payorders.core.settings import Settings
from payorders.core.tokens import Scope, TokenBook, TokenSpec, token_digest

MIN_LENGTH = 24

# Values that stood in docs, compose files or as defaults: known to whoever read them.
PLACEHOLDERS = frozenset(
    {
        "dev-api-token",
        "whsec_dev_only",
        "whsec_order_events_dev_only",
        "evsec_payorders_dev_only",
        "whsec_payorders_dev_only",
        "test-token",
        "change-me",
        "changeme",
        "secret",
        "password",
        "token",
    }
)
# Words that mark a value as an example to replace.
PLACEHOLDER_MARKS = (
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "replace_me",
    "placeholder",
    "example",
    "dev_only",
    "dev-only",
    "your-",
    "your_",
    "<",
    "...",
)
_PLACEHOLDER_DIGESTS = frozenset(token_digest(p) for p in PLACEHOLDERS)

Role = Literal["api", "worker", "gateway", "orders"]
"""The processes that need secrets: the service API, the worker (its order-events relay),
the sandbox gateway (signs its webhooks) and the example order service."""


class SecretRefused(ValueError):
    """A secret a process needs is missing or not fit to be one; the message names the
    variable and never holds the value."""


def generate(prefix: str = "") -> str:
    """A new random secret: 256 bits, URL-safe, after ``prefix`` (``whsec_``...)."""
    return prefix + _random.token_urlsafe(32)


def why_weak(value: str) -> str | None:
    """Why ``value`` cannot be a secret, or None when it can."""
    if not value.strip():
        return "is empty"
    lowered = value.lower()
    if lowered in PLACEHOLDERS or any(mark in lowered for mark in PLACEHOLDER_MARKS):
        return "is a placeholder (a value from the docs or a former default): generate one"
    if len(value) < MIN_LENGTH:
        return f"is shorter than {MIN_LENGTH} characters"
    return None


def check(variable: str, value: str | None) -> str:
    """``value`` if it can be a secret.

    Raises:
        SecretRefused: unset, empty, a placeholder or too short.
    """
    if value is None:
        raise SecretRefused(
            f"{variable} is not set: generate a secret of at least {MIN_LENGTH}"
            " characters (e.g. python -c 'import secrets; print(secrets."
            "token_urlsafe(32))')"
        )
    why = why_weak(value)
    if why is not None:
        raise SecretRefused(f"{variable} {why}")
    return value


def _check_all(variable: str, values: Iterable[str]) -> None:
    values = list(values)
    if not values:
        check(variable, None)
    for i, value in enumerate(values):
        check(variable if len(values) == 1 else f"{variable}[{i}]", value)


def token_book(settings: Settings) -> TokenBook:
    """The API's tokens: ``PAYORDERS_API_TOKENS``, and the deprecated
    ``PAYORDERS_API_TOKEN`` as one more token with the ``admin`` scope.

    Raises:
        SecretRefused: no token at all, a clear token that is weak, a hash of a placeholder.
    """
    specs = list(settings.api_tokens)
    if settings.api_token is not None:
        legacy = check("PAYORDERS_API_TOKEN", settings.api_token.get_secret_value())
        specs.append(TokenSpec(name="api-token", scopes=frozenset({Scope.ADMIN}), token=legacy))
    if not specs:
        raise SecretRefused(
            "PAYORDERS_API_TOKENS is not set: list the API's tokens as JSON, e.g."
            ' [{"name": "checkout", "scopes": ["checkout"], "sha256": "<hex>"}]'
        )
    for i, spec in enumerate(settings.api_tokens):
        where = f"PAYORDERS_API_TOKENS[{i}] ({spec.name})"
        if spec.token is not None:
            check(where, spec.token.get_secret_value())
        elif spec.digest() in _PLACEHOLDER_DIGESTS:
            raise SecretRefused(f"{where} is the hash of a placeholder token: generate one")
    try:
        return TokenBook(specs)
    except ValueError as e:
        raise SecretRefused(f"PAYORDERS_API_TOKENS: {e}") from None


def _alipay_key(settings: Settings) -> None:
    """Alipay notifications are verified with Alipay's public key and requests signed with
    the app's private key, which is the secret; it is read and checked as a key when the
    gateway opens (``gateways.factory.alipay_config``)."""
    key = settings.alipay_private_key
    if (key is None or not key.get_secret_value().strip()) and not settings.alipay_private_key_file:
        raise SecretRefused(
            "PAYORDERS_ALIPAY_PRIVATE_KEY is not set (nor PAYORDERS_ALIPAY_PRIVATE_KEY_FILE):"
            " the app's RSA private key, PEM"
        )


def _wechatpay_secrets(settings: Settings) -> None:
    """WeChat Pay's two secrets: the merchant's private key (signs every request; read and
    checked as a key when the gateway opens) and the APIv3 key (decrypts callbacks), which
    must be exactly 32 bytes."""
    key = settings.wechatpay_private_key
    if (key is None or not key.get_secret_value().strip()) and not (
        settings.wechatpay_private_key_file
    ):
        raise SecretRefused(
            "PAYORDERS_WECHATPAY_PRIVATE_KEY is not set (nor PAYORDERS_WECHATPAY_PRIVATE_KEY_FILE):"
            " the merchant's API private key, PEM"
        )
    apiv3 = settings.wechatpay_apiv3_key
    if apiv3 is None or len(apiv3.get_secret_value().encode()) != 32:
        raise SecretRefused(
            "PAYORDERS_WECHATPAY_APIV3_KEY must be the merchant's APIv3 key, 32 bytes"
        )


def _gateway_secret(settings: Settings) -> None:
    """The secret of the adapter itself, where it has one (Alipay, WeChat Pay)."""
    if settings.gateway == "alipay":
        _alipay_key(settings)
    elif settings.gateway == "wechatpay":
        _wechatpay_secrets(settings)


def require(settings: Settings, role: Role) -> None:
    """Refuse to start ``role`` without the secrets it needs.

    Raises:
        SecretRefused: the first secret missing or weak, by its variable's name.
    """
    if role == "api":
        token_book(settings)
        if settings.gateway == "sandbox":
            _check_all(
                "PAYORDERS_WEBHOOK_SECRETS",
                (s.get_secret_value() for s in settings.webhook_secrets),
            )
        elif settings.gateway == "stripe":
            _check_all(
                "PAYORDERS_STRIPE_WEBHOOK_SECRET",
                (s.get_secret_value() for s in settings.stripe_webhook_secret),
            )
        else:
            _gateway_secret(settings)
    elif role == "gateway":
        _check_all(
            "PAYORDERS_WEBHOOK_SECRETS", (s.get_secret_value() for s in settings.webhook_secrets)
        )
    if role == "worker":
        _gateway_secret(settings)
    if role in ("api", "gateway"):
        return
    if settings.order_events_url is not None or role == "orders":
        secret = settings.order_events_secret
        check(
            "PAYORDERS_ORDER_EVENTS_SECRET", None if secret is None else secret.get_secret_value()
        )

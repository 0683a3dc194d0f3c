"""The Stripe adapter (stub: being written)."""

from __future__ import annotations


class StripeKeyRefused(Exception):
    """Stripe refused the API key."""


class StripeGateway:
    name = "stripe"

    def __init__(self, api_key: str, *, api_base: str, client_timeout_s: float) -> None:
        raise NotImplementedError

    async def check_key(self) -> None: ...

    async def aclose(self) -> None: ...

"""The resources every entry point needs, built from one settings object: a database pool
(migrated), our store, and the configured gateway with its client-side timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg

from payorders.core import store
from payorders.core.settings import Settings
from payorders.gateways.factory import open_gateway
from payorders.gateways.port import Gateway
from payorders.localstack import stackinfo


class StackNotRunning(RuntimeError):
    """The local stack (or the database it names) cannot be reached."""


@dataclass
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    store: store.PayOrderStore
    gateway: Gateway
    """What activities and the webhook adapter call."""


def database_url(settings: Settings) -> str:
    """The configured URL, else the one of the running local stack."""
    if settings.database_url:
        return settings.database_url
    info = stackinfo.read(settings.data_dir)
    if info is None:
        raise StackNotRunning(
            f"no database: set PAYORDERS_DATABASE_URL, or start the local stack"
            f" (scripts/dev, or payorders dev) with its data in {settings.data_dir}"
        )
    return info.database_url


def with_stack_defaults(settings: Settings) -> Settings:
    """Point unset addresses at the running local stack, if there is one."""
    info = stackinfo.read(settings.data_dir)
    if info is None:
        return settings
    updates: dict[str, object] = {}
    for env_name, value in info.tuning.items():
        field = env_name.removeprefix("PAYORDERS_").lower()
        if field in Settings.model_fields and field not in settings.model_fields_set:
            updates[field] = value
    if "temporal_address" not in settings.model_fields_set:
        updates["temporal_address"] = info.temporal_address
    if "temporal_ui_url" not in settings.model_fields_set:
        updates["temporal_ui_url"] = info.temporal_ui_url
    for field in ("database_url", "api_url", "gateway_url"):
        if field not in settings.model_fields_set:
            updates[field] = getattr(info, field)
    if "gateway" not in settings.model_fields_set:
        updates["gateway"] = info.gateway
        if info.gateway == "stripe":
            # The stack's own dev-only key and its wire proxy, unless this shell sets them.
            if "stripe_api_base" not in settings.model_fields_set and info.stripe_api_base:
                updates["stripe_api_base"] = info.stripe_api_base
            if "stripe_api_key" not in settings.model_fields_set:
                updates["stripe_api_key"] = stackinfo.DEV_STRIPE_API_KEY
            if "stripe_webhook_secret" not in settings.model_fields_set:
                updates["stripe_webhook_secret"] = [stackinfo.DEV_STRIPE_WEBHOOK_SECRET]
    # Validate again, so tuning strings become the fields' types.
    return Settings(**{**settings.model_dump(), **updates})


@asynccontextmanager
async def open_resources(
    settings: Settings, url: str, *, gateway: Gateway | None = None
) -> AsyncIterator[Resources]:
    """A migrated pool, our store and the gateway (``gateway``: one the caller built, such
    as an in-process sandbox in tests; default: the configured one)."""
    try:
        pool = await store.create_pool(
            url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
        )
    except (OSError, asyncpg.PostgresError) as e:
        raise StackNotRunning(f"cannot reach PostgreSQL ({e})") from e
    async with AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        await store.migrate(pool)
        if gateway is None:
            gateway = await stack.enter_async_context(open_gateway(settings))
        yield Resources(
            settings=settings, pool=pool, store=store.PayOrderStore(pool), gateway=gateway
        )

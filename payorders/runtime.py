"""The resources every entry point needs, built from one settings object: a database pool
(migrated), our store, and the configured gateway with its client-side timeout."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn

import asyncpg
from pydantic import ValidationError

from payorders.core import secrets, store
from payorders.core.reconcile import ReconcileStore
from payorders.core.settings import Settings
from payorders.gateways.factory import GatewayNotConfigured, check_gateway, open_gateway
from payorders.gateways.port import Gateway
from payorders.localstack import stackinfo


def settings_or_exit(role: secrets.Role) -> Settings:
    """The settings of an entry point (``role``) from the environment; when they are not
    valid, or a secret it needs is missing or weak, one line on stderr naming the variable
    (never its value) and exit 2."""
    try:
        settings = Settings()
        secrets.require(settings, role)
    except ValidationError as e:
        first = e.errors(include_input=False, include_url=False)[0]
        loc = [str(part) for part in first["loc"]]
        variable = f"PAYORDERS_{loc[0].upper()}" if loc else "the settings"
        where = "".join(f"[{part}]" for part in loc[1:])
        _refuse(role, f"{variable}{where}: {first['msg']}")
    except secrets.SecretRefused as e:
        _refuse(role, str(e))
    if role in ("api", "worker"):
        try:
            check_gateway(settings)
        except GatewayNotConfigured as e:
            _refuse(role, str(e))
    return settings


def _refuse(role: str, why: str) -> NoReturn:
    print(f"payorders {role}: cannot start: {why}", file=sys.stderr, flush=True)
    raise SystemExit(2)


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
        # The stack's wire proxy in front of localstripe, unless this shell sets one.
        if info.gateway == "stripe" and "stripe_api_base" not in settings.model_fields_set:
            updates["stripe_api_base"] = info.stripe_api_base
    # The stack's generated secrets (its API token among them), unless this shell sets them.
    for env_name, value in (info.secrets or {}).items():
        field = env_name.removeprefix("PAYORDERS_").lower()
        if field in Settings.model_fields and field not in settings.model_fields_set:
            updates[field] = value
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
            gateway = await stack.enter_async_context(
                open_gateway(settings, book=ReconcileStore(pool))
            )
        yield Resources(
            settings=settings, pool=pool, store=store.PayOrderStore(pool), gateway=gateway
        )

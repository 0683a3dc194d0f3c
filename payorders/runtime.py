"""The resources every entry point needs, built from one settings object: a database pool
(migrated), our store, and the sandbox gateway with its client-side timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg

from payorders.core import store
from payorders.core.settings import Settings
from payorders.gateways.http_sandbox import HttpGateway
from payorders.gateways.port import Gateway
from payorders.localstack import stackinfo
from payorders.sandbox.ledger import SandboxGateway, TimeoutClient


class StackNotRunning(RuntimeError):
    """The local stack (or the database it names) cannot be reached."""


@dataclass
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    store: store.PayOrderStore
    sandbox: SandboxGateway
    """The sandbox's ledger, in-process: tests and local tools read and arm it directly."""
    gateway: Gateway
    """What activities and the webhook adapter call: HTTP when ``gateway_url`` is set."""


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
    # Validate again, so tuning strings become the fields' types.
    return Settings(**{**settings.model_dump(), **updates})


@asynccontextmanager
async def open_resources(settings: Settings, url: str) -> AsyncIterator[Resources]:
    try:
        pool = await store.create_pool(
            url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
        )
    except (OSError, asyncpg.PostgresError) as e:
        raise StackNotRunning(f"cannot reach PostgreSQL ({e})") from e
    stack = AsyncExitStack()
    try:
        await store.migrate(pool)
        sandbox = SandboxGateway(
            pool,
            schema=settings.sandbox_schema,
            server_timeout_s=settings.gateway_server_timeout_ms / 1000,
        )
        await sandbox.install()
        client_timeout_s = settings.gateway_client_timeout_ms / 1000
        gateway: Gateway
        if settings.gateway_url:
            http = HttpGateway(settings.gateway_url, client_timeout_s=client_timeout_s)
            stack.push_async_callback(http.aclose)
            gateway = http
        else:
            gateway = TimeoutClient(sandbox, client_timeout_s=client_timeout_s)
        yield Resources(
            settings=settings,
            pool=pool,
            store=store.PayOrderStore(pool),
            sandbox=sandbox,
            gateway=gateway,
        )
    finally:
        await stack.aclose()
        await pool.close()

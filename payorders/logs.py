"""Logging for our processes: a fault a running system expects (PostgreSQL restarting, a
peer not answering yet) is one line; a traceback is kept for what may be a bug.

The SDK and the drivers log such faults with their traceback: asyncpg's pool while it
restores its minimum of connections, the Temporal worker for each failed activity attempt
(retried). Entry points call ``configure`` once; nothing here catches anything.
"""

from __future__ import annotations

import errno
import logging

import asyncpg
import httpx

from payorders.gateways.port import GatewayAmbiguous, GatewayUnavailable

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

_TRANSIENT: tuple[type[BaseException], ...] = (
    # SQLSTATE class 08: the connection does not exist, failed, or was rejected.
    asyncpg.PostgresConnectionError,
    # 57P01-57P03: the server is shutting down, restarting, or not accepting yet.
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    # Refused, reset, aborted, broken pipe; a timeout (asyncio's is the same class).
    ConnectionError,
    TimeoutError,
    # A peer over HTTP (the gateway, the API) not answering or gone mid-answer (not
    # httpx's other transport errors, such as a URL without a scheme), and our gateway
    # port's retry-safe errors: the callers retry them.
    httpx.NetworkError,
    httpx.TimeoutException,
    httpx.RemoteProtocolError,
    GatewayUnavailable,
    GatewayAmbiguous,
)
_NETWORK_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection fault that retrying resolves (not a bug)."""
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # The connection went away under us; other interface errors are misuse (bugs).
        return "connection is closed" in str(exc)
    if isinstance(exc, FileNotFoundError):
        # Connecting to a Unix socket its server has removed while it restarts: a file
        # operation names its file, a socket connect does not.
        return exc.filename is None
    return isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Formatter(logging.Formatter):
    """Writes a transient fault as ``message (ErrorType: text)`` on the record's one line,
    and anything else, tracebacks included, as ``logging.Formatter`` does."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not is_transient(exc):
            return super().format(record)
        # A copy: other handlers of the same record still see its traceback.
        line = logging.makeLogRecord(
            {**record.__dict__, "exc_info": None, "exc_text": None, "args": None}
        )
        line.msg = f"{record.getMessage()} ({_one_line(exc)})"
        return super().format(line)


def configure(level: int = logging.INFO) -> None:
    """Log to stderr at ``level`` and above through ``Formatter``; once per process (a
    second call changes only the level)."""
    root = logging.getLogger()
    root.setLevel(level)
    if any(isinstance(h.formatter, Formatter) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(Formatter(FORMAT))
    root.addHandler(handler)

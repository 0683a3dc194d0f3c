"""Free ports for stacks of their own (tests, the torture, benchmarks).

A port found by binding port 0 comes from the kernel's ephemeral range, the range every
outgoing connection takes its local port from. Between choosing a port and the server
binding it (PostgreSQL starts for seconds in between), a client connection of the same
machine may take it: the Temporal dev server then exits with "address already in use".
Ports are therefore chosen at random below that range, where no outgoing connection
lands, and checked bindable.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10000
"""Below it live the well-known and commonly configured ports."""

_random = random.SystemRandom()
"""Not the module's generator: a seeded torture run must not make two runs choose alike."""


def ephemeral_start(path: Path = EPHEMERAL_RANGE) -> int:
    """The first port of the kernel's ephemeral range (Linux's default 32768 elsewhere)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(ip: str, port: int) -> bool:
    """Whether ``port`` can be listened on now (a port with only TIME_WAIT left is free, as
    the servers themselves bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
        return True


def free_port(ip: str = "127.0.0.1", *, attempts: int = 200) -> int:
    """A port free now, outside the ephemeral range when there is room below it."""
    top = ephemeral_start()
    if top - LOWEST >= 1000:
        for _ in range(attempts):
            port = _random.randrange(LOWEST, top)
            if bindable(ip, port):
                return port
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def port_beside(ip: str, port: int) -> int:
    """The port after ``port`` if it is free now, else any free one."""
    if port + 1 < 65536 and bindable(ip, port + 1):
        return port + 1
    return free_port(ip)

"""What a running ``payorders dev`` stack tells other shells: its addresses, in a file in
its data directory, present only while the stack runs."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

FILENAME = "stack.json"

MAX_PROCESSES = 16
"""The most workers, and the most API processes, one stack runs."""


def check_processes(what: str, n: int) -> int:
    """``n`` if it is a count of processes a stack may run (1 to ``MAX_PROCESSES``).

    Raises:
        ValueError: any other number, with a message that says what is allowed.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROCESSES:
        raise ValueError(f"{what} must be a whole number from 1 to {MAX_PROCESSES}, not {n!r}")
    return n


@dataclass(frozen=True)
class StackInfo:
    pid: int
    temporal_address: str
    temporal_ui_url: str
    database_url: str
    api_url: str
    gateway_url: str
    tuning: dict[str, str]
    """Local settings of the stack (PAYORDERS_* names), applied by every client of it."""
    worker_metrics_url: str | None = None
    """The worker's Prometheus endpoint (None in files written before it existed)."""
    gateway: str = "sandbox"
    """The gateway the stack runs, ``sandbox`` or ``stripe`` (files written before the
    choice existed: ``sandbox``). With ``stripe``, ``gateway_url`` is the Stripe wire's, whose
    faults API is the sandbox's."""
    stripe_api_base: str | None = None
    """With ``stripe``: where the Stripe SDK's calls go, the fault proxy in front of
    localstripe (``PAYORDERS_STRIPE_API_BASE``)."""
    localstripe_url: str | None = None
    """With ``stripe``: localstripe itself, behind the proxy."""
    order_events_url: str | None = None
    """Where the worker delivers the order events (``PAYORDERS_ORDER_EVENTS_URL``): the
    example order service's ``/events``, or the shop's own (``--order-events-url``)."""
    order_service_url: str | None = None
    """The example order service, when the stack runs it (``GET /events``: what it received)."""
    secrets: dict[str, str] | None = None
    """What a client needs to be let in, by variable (``PAYORDERS_API_TOKEN`` and the
    signing secrets): the stack's generated secrets, as its banner prints them."""
    workers: int = 1
    """How many pay-order workers the stack runs (each with an order-events relay)."""
    api_processes: int = 1
    """How many API processes serve ``api_url`` (they share its listening socket)."""
    worker_metrics_urls: list[str] | None = None
    """Every worker's Prometheus endpoint, the first one's first."""


def write(data_dir: Path, info: StackInfo) -> None:
    """Write the file, readable by its owner only: it holds the stack's secrets."""
    tmp = data_dir / f".{FILENAME}.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(info), indent=2) + "\n")
    tmp.replace(data_dir / FILENAME)


def read(data_dir: Path) -> StackInfo | None:
    """The running stack's info, or None (no file, or its process is gone)."""
    try:
        doc = json.loads((data_dir / FILENAME).read_text())
        # Keys a newer stack added are left out: this reader knows only its own fields.
        known = {f.name for f in fields(StackInfo)}
        info = StackInfo(**{k: v for k, v in doc.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return info


def remove(data_dir: Path) -> None:
    (data_dir / FILENAME).unlink(missing_ok=True)

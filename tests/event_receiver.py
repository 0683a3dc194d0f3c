"""A real order-service endpoint for the relay's tests: a small ASGI app on 127.0.0.1
(uvicorn) that verifies each delivery's signature, answers as the test tells it (2xx, a
503, no answer yet), and checks the delivery contract as requests arrive: an event of a
pay order arrives only after every lower sequence of that pay order was acknowledged. And
the relay as its own process (``python -m payorders.service.relay``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn

from payorders.service import webhook
from payorders.service.relay import SIGNATURE_HEADER

from .http_stack import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_order_events_test_receiver"


@dataclass
class Delivery:
    event: dict[str, Any]
    raw: bytes
    verified: bool
    arrived: float
    status: int | None = None
    """What was answered (None: held, never answered)."""


@dataclass
class EventReceiver:
    secret: str
    port: int = field(default_factory=free_port)
    answer: Callable[[dict[str, Any]], int] = lambda _e: 200
    """The status to answer an event with (the test may swap it)."""
    hold: asyncio.Event | None = None
    """When set to an unset event, requests wait for it before they are answered."""
    requests: list[Delivery] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Acknowledged events by id (the first acknowledgement's body)."""
    acked_order: dict[str, list[int]] = field(default_factory=dict)
    """Per pay order, the sequences acknowledged, in the order acknowledged."""
    held: asyncio.Event = field(default_factory=asyncio.Event)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/order-events"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            webhook.verify(
                headers.get(SIGNATURE_HEADER.lower()),
                raw,
                secrets=[self.secret],
                now=datetime.now(UTC),
            )
            verified = True
        except webhook.WebhookRejected:
            verified = False
        event = json.loads(raw)
        delivery = Delivery(event=event, raw=raw, verified=verified, arrived=time.monotonic())
        self.requests.append(delivery)
        no, seq = event["pay_order_no"], event["sequence"]
        have = set(self.acked_order.get(no, []))
        missing = [n for n in range(1, seq) if n not in have]
        if missing:
            self.violations.append(f"{event['id']} ({no} #{seq}) arrived before #{missing}")
        if self.hold is not None and not self.hold.is_set():
            self.held.set()
            await self.hold.wait()
            return  # the sender is gone: never answered
        status = self.answer(event)
        delivery.status = status
        if 200 <= status < 300 and verified:
            # Recorded before the answer leaves: the relay can only send the next after it.
            self.acked.setdefault(event["id"], event)
            if seq not in have:
                self.acked_order.setdefault(no, []).append(seq)
        else:
            status = status if not (200 <= status < 300) else 401
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def start(self) -> None:
        config = uvicorn.Config(
            self,
            host="127.0.0.1",
            port=self.port,
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the receiver stopped before it started")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop listening: connections are refused until ``start`` again."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            if self.hold is not None:
                self.hold.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = self._task = None

    async def wait_acked(self, ids: set[str], within: float = 60) -> None:
        deadline = time.monotonic() + within
        while not ids <= self.acked.keys():
            if time.monotonic() > deadline:
                raise AssertionError(f"not acknowledged in time: {sorted(ids - self.acked.keys())}")
            await asyncio.sleep(0.05)

    def received(self, event_id: str) -> list[Delivery]:
        return [d for d in self.requests if d.event["id"] == event_id]


class RelayProcess:
    """``python -m payorders.service.relay`` as a child process, its log kept in memory."""

    def __init__(self, dsn: str, url: str, **env: str) -> None:
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("PAYORDERS_", "TEMPORAL_"))
        }
        self.env = {
            **base,
            "PAYORDERS_DATABASE_URL": dsn,
            "PAYORDERS_ORDER_EVENTS_URL": url,
            "PAYORDERS_ORDER_EVENTS_SECRET": SECRET,
            "PAYORDERS_ORDER_EVENTS_RETRY_INITIAL_MS": "100",
            "PAYORDERS_ORDER_EVENTS_RETRY_MAX_MS": "1000",
            "PAYORDERS_ORDER_EVENTS_CONCURRENCY": "4",
            **env,
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "payorders.service.relay",
            cwd=ROOT,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_line("relay: delivering order events")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode().rstrip())

    async def wait_line(self, text: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not any(text in line for line in self.lines):
            assert self.proc is not None
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the relay's log: {self.lines}")
            await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader is not None:
            await self._reader
        return code

"""Run localstripe (a fake Stripe server by others, GPL-3.0) on loopback, with its state in
a file we choose: ``python -m payorders.localstack.localstripe_server --port P --state FILE``.

localstripe's own command listens on every interface and keeps its state in one fixed file
in the system temp folder, shared by every instance on the machine. This runner is a
separate process that imports ``localstripe.server`` (its aiohttp ``app`` and its
``store``), points the store's load and save at ``--state``, and serves the app on
127.0.0.1 only. It adds one route of ours, ``GET /_payorders/ready``, answering this
process's id, so that whoever started it knows the answer comes from this process and not
from another server that happened to hold the port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import signal
import socket
import sys
from pathlib import Path
from typing import Any

READY_PATH = "/_payorders/ready"
"""Our readiness route: answers ``{"pid": ...}`` once the server accepts connections."""

HOST = "127.0.0.1"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m payorders.localstack.localstripe_server",
        description="localstripe on 127.0.0.1, its state in --state",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument(
        "--state", type=Path, required=True, help="pickle file: loaded at start, saved on writes"
    )
    return parser.parse_args(argv)


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A port with only TIME_WAIT connections left (a stack just restarted) is free.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


def _keep_state_in(store: Any, path: Path) -> None:
    """Make localstripe's store load from and save to ``path`` (instead of its fixed file).

    Saves replace the file atomically, so a kill mid-write leaves the previous state.
    """
    tmp = path.with_name(f".{path.name}.tmp")

    def save() -> None:
        with tmp.open("wb") as f:
            pickle.dump(dict(store), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    def load() -> None:
        try:
            with path.open("rb") as f:
                saved = pickle.load(f)
        except FileNotFoundError:
            return
        store.clear()
        # dict.update, not the store's own __setitem__, which would save once per object.
        dict.update(store, saved)

    # Instance attributes win over the class's methods, for every caller inside localstripe.
    store.dump_to_disk = save
    store.try_load_from_disk = load


async def _serve(app: Any, sock: socket.socket) -> None:
    from aiohttp import web

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"pid": os.getpid()})

    app.router.add_get(READY_PATH, ready)
    # A short shutdown: open keep-alive connections must not hold a stop for a minute.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.SockSite(runner, sock).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        sock = _bind(args.port)  # before the slow import: a taken port fails at once
    except OSError as e:
        print(f"localstripe: cannot listen on {HOST}:{args.port}: {e}", file=sys.stderr)
        return 3
    # Its webhook sender logs each delivery on this logger; our log file keeps those lines.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    # Imported here: it builds its app at import time. No type information ships with it.
    from localstripe import server  # type: ignore[import-untyped]

    args.state.parent.mkdir(parents=True, exist_ok=True)
    _keep_state_in(server.store, args.state)
    server.store.try_load_from_disk()
    asyncio.run(_serve(server.app, sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())

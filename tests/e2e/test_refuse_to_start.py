"""The real entry points refuse to start without their secrets: the API factory under
uvicorn, the worker, the sandbox gateway and the example order service, each as its own
process with nothing but the variables a case gives it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TOKEN = "tok-" + "k" * 40
SECRET = "whsec_" + "w" * 40
EVENTS = "evsec_" + "e" * 40
# Nothing answers here: a process that got past its checks fails later, and differently.
NOWHERE = {
    "PAYORDERS_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
    "TEMPORAL_ADDRESS": "127.0.0.1:9",
    "PAYORDERS_GATEWAY_URL": "http://127.0.0.1:9",
    "PAYORDERS_WORKER_METRICS_ADDRESS": "",
}
API = [sys.executable, "-m", "uvicorn", "--factory", "payorders.service.app:app", "--port", "0"]
WORKER = [sys.executable, "worker.py"]
GATEWAY = [sys.executable, "-m", "uvicorn", "--factory", "payorders.sandbox.app:app", "--port", "0"]
ORDERS = [
    sys.executable,
    *["-m", "uvicorn", "--factory", "payorders.sandbox.order_service:app", "--port", "0"],
]
API_OK = {"PAYORDERS_API_TOKEN": TOKEN, "PAYORDERS_WEBHOOK_SECRETS": json.dumps([SECRET])}
RELAY = {"PAYORDERS_ORDER_EVENTS_URL": "http://127.0.0.1:9/events"}


def _tokens(**entry: object) -> str:
    return json.dumps([{"name": "shop", "scopes": ["checkout"], **entry}])


# (case, command, variables, the variable the one line must name, what it must say)
REFUSALS = [
    (
        "api: no token",
        API,
        {"PAYORDERS_WEBHOOK_SECRETS": SECRET},
        "PAYORDERS_API_TOKENS",
        "not set",
    ),
    (
        "api: empty token",
        API,
        {**API_OK, "PAYORDERS_API_TOKEN": ""},
        "PAYORDERS_API_TOKEN",
        "empty",
    ),
    (
        "api: placeholder token",
        API,
        {**API_OK, "PAYORDERS_API_TOKEN": "change-me"},
        "PAYORDERS_API_TOKEN",
        "placeholder",
    ),
    (
        "api: the old default token",
        API,
        {**API_OK, "PAYORDERS_API_TOKEN": "dev-api-token"},
        "PAYORDERS_API_TOKEN",
        "placeholder",
    ),
    (
        "api: short token",
        API,
        {**API_OK, "PAYORDERS_API_TOKEN": "k" * 23},
        "PAYORDERS_API_TOKEN",
        "shorter than 24",
    ),
    (
        "api: placeholder in the token list",
        API,
        {"PAYORDERS_WEBHOOK_SECRETS": SECRET, "PAYORDERS_API_TOKENS": _tokens(token="change-me")},
        "PAYORDERS_API_TOKENS[0]",
        "placeholder",
    ),
    (
        "api: hash of a placeholder",
        API,
        {
            "PAYORDERS_WEBHOOK_SECRETS": SECRET,
            "PAYORDERS_API_TOKENS": _tokens(sha256=hashlib.sha256(b"change-me").hexdigest()),
        },
        "PAYORDERS_API_TOKENS[0]",
        "placeholder",
    ),
    (
        "api: malformed token list",
        API,
        {"PAYORDERS_WEBHOOK_SECRETS": SECRET, "PAYORDERS_API_TOKENS": _tokens()},
        "PAYORDERS_API_TOKENS[0]",
        "exactly one of sha256 and token",
    ),
    (
        "api: no webhook secret",
        API,
        {"PAYORDERS_API_TOKEN": TOKEN},
        "PAYORDERS_WEBHOOK_SECRETS",
        "not set",
    ),
    (
        "api: placeholder webhook secret",
        API,
        {**API_OK, "PAYORDERS_WEBHOOK_SECRETS": '["change-me"]'},
        "PAYORDERS_WEBHOOK_SECRETS",
        "placeholder",
    ),
    (
        "api: the old default webhook secret",
        API,
        {**API_OK, "PAYORDERS_WEBHOOK_SECRETS": "whsec_dev_only"},
        "PAYORDERS_WEBHOOK_SECRETS",
        "placeholder",
    ),
    ("worker: relay without its secret", WORKER, RELAY, "PAYORDERS_ORDER_EVENTS_SECRET", "not set"),
    (
        "worker: relay with the old default secret",
        WORKER,
        {**RELAY, "PAYORDERS_ORDER_EVENTS_SECRET": "whsec_order_events_dev_only"},
        "PAYORDERS_ORDER_EVENTS_SECRET",
        "placeholder",
    ),
    (
        "worker: relay with a short secret",
        WORKER,
        {**RELAY, "PAYORDERS_ORDER_EVENTS_SECRET": "e" * 10},
        "PAYORDERS_ORDER_EVENTS_SECRET",
        "shorter than 24",
    ),
    ("gateway: no webhook secret", GATEWAY, {}, "PAYORDERS_WEBHOOK_SECRETS", "not set"),
    ("order service: no secret", ORDERS, {}, "PAYORDERS_ORDER_EVENTS_SECRET", "not set"),
]


def _env(variables: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PAYORDERS_", "TEMPORAL_"))}
    return {**base, **NOWHERE, **variables}


async def _run(
    command: list[str], variables: dict[str, str], within: float
) -> tuple[int | None, str]:
    """The exit code (None: still running after ``within`` s, then killed) and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=_env(variables),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), within)
        return proc.returncode, err.decode()
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
        return None, err.decode()


async def test_each_missing_or_placeholder_secret_stops_its_process_with_one_line() -> None:
    results = await asyncio.gather(*(_run(cmd, env, 60) for _, cmd, env, _, _ in REFUSALS))
    for (case, _, env, variable, says), (code, err) in zip(REFUSALS, results, strict=True):
        lines = [line for line in err.splitlines() if "cannot start" in line]
        assert code == 2, f"{case}: exit {code}\n{err}"
        assert len(lines) == 1, f"{case}: {err}"
        assert (
            f": cannot start: {variable} " in lines[0]
            or f": cannot start: {variable}:" in (lines[0])
        ), f"{case}: {lines[0]}"
        assert says in lines[0], f"{case}: {lines[0]}"
        assert "Traceback" not in err, f"{case}: {err}"
        for value in env.values():
            # The line names the variable, never a value (a placeholder is no secret, but a
            # near-miss of a real one could be).
            if len(value) >= 8 and not value.startswith(("http", "[", "{")):
                assert value not in err, f"{case}: the value is printed"


async def test_with_every_secret_good_each_process_goes_past_its_checks() -> None:
    """The other side of the refusals: the same commands, with good secrets, do not refuse
    (they fail later on the unreachable database, or keep waiting for it)."""
    events = {**RELAY, "PAYORDERS_ORDER_EVENTS_SECRET": EVENTS}
    hashed = _tokens(sha256=hashlib.sha256(TOKEN.encode()).hexdigest())
    cases = [
        (API, API_OK),
        (API, {"PAYORDERS_WEBHOOK_SECRETS": SECRET, "PAYORDERS_API_TOKENS": hashed}),
        (WORKER, events),
        (GATEWAY, {"PAYORDERS_WEBHOOK_SECRETS": SECRET}),
        (ORDERS, {"PAYORDERS_ORDER_EVENTS_SECRET": EVENTS}),
    ]
    results = await asyncio.gather(*(_run(cmd, env, 8) for cmd, env in cases))
    for (cmd, _), (code, err) in zip(cases, results, strict=True):
        assert "cannot start" not in err, f"{cmd}: {err}"
        assert code != 2, f"{cmd}: exit {code}\n{err}"

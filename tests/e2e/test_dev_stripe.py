"""``payorders dev --gateway stripe``: localstripe behind the Stripe wire, as the stack runs
them. The banner's variables, loopback only, localstripe's state in the data directory,
its webhook endpoint registered at the wire's relay, the faults API reached by ``payorders
fault``, and nothing left behind once the stack stops. The choice also reaches the
children's environment and the settings of a private stack's clients."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import stripe

from payorders.core.settings import Settings
from payorders.localstack import stackinfo
from payorders.localstack.binaries import find_binary
from payorders.localstack.stack import DevOptions, DevStack
from payorders.localstack.stripe_wire import DELIVERIES_PATH

from .dev_process import DevProcess, clean_env, dev_process

CLI = find_binary("payorders")


def exports(banner: str) -> dict[str, str]:
    """The ``export NAME=value`` lines of a banner."""
    return {
        m.group(1): m.group(2).strip("'")
        for m in re.finditer(r"^\s+export (\w+)=(\S+)$", banner, re.MULTILINE)
    }


# --- the stack as built (no process started) ------------------------------------------------


def test_the_stripe_stack_gives_its_children_and_clients_the_stripe_variables(
    tmp_path: Path,
) -> None:
    stack = DevStack(
        Settings(data_dir=tmp_path), DevOptions(stripe_port=8520, api_port=8100, gateway="stripe")
    )
    env = stack.child_env()
    key, secret = (stack.secrets[f"PAYORDERS_STRIPE_{k}"] for k in ("API_KEY", "WEBHOOK_SECRET"))
    assert env["PAYORDERS_GATEWAY"] == "stripe"
    assert env["PAYORDERS_STRIPE_API_BASE"] == "http://127.0.0.1:8520" == stack.stripe_url
    assert env["PAYORDERS_STRIPE_API_KEY"] == key
    assert env["PAYORDERS_STRIPE_WEBHOOK_SECRET"] == secret
    assert env["PAYORDERS_GATEWAY_URL"] == stack.stripe_url  # the faults API of the wire
    wire = stack.children["gateway"].args
    assert wire[wire.index("--host") + 1] == "127.0.0.1"
    assert wire[wire.index("--upstream") + 1] == stack.localstripe_url != stack.stripe_url
    assert wire[wire.index("--webhook-target") + 1] == "http://127.0.0.1:8100/v1/webhooks/stripe"
    banner = stack.banner()
    assert {
        k: v for k, v in exports(banner).items() if "STRIPE" in k or k == "PAYORDERS_GATEWAY"
    } == {
        "PAYORDERS_GATEWAY": "stripe",
        "PAYORDERS_STRIPE_API_BASE": "http://127.0.0.1:8520",
        "PAYORDERS_STRIPE_API_KEY": key,
        "PAYORDERS_STRIPE_WEBHOOK_SECRET": secret,
    }
    assert "never put a real Stripe key here" in banner and stack.localstripe_url is not None
    assert stack.localstripe_url in banner
    # Generated for this stack: another data directory, other values.
    assert key.startswith("sk_test_") and secret.startswith("whsec_")
    other = DevStack(Settings(data_dir=tmp_path / "other"), DevOptions(gateway="stripe"))
    assert other.secrets["PAYORDERS_STRIPE_API_KEY"] != key


def test_a_private_stripe_stack_s_clients_use_stripe(tmp_path: Path) -> None:
    stack = DevStack.private(tmp_path, gateway="stripe")
    s = stack.client_settings()
    assert (s.gateway, s.stripe_api_base, s.gateway_url) == (
        "stripe",
        stack.stripe_url,
        stack.stripe_url,
    )
    assert s.stripe_api_key is not None
    assert s.stripe_api_key.get_secret_value() == stack.secrets["PAYORDERS_STRIPE_API_KEY"]
    assert [w.get_secret_value() for w in s.stripe_webhook_secret] == [
        stack.secrets["PAYORDERS_STRIPE_WEBHOOK_SECRET"]
    ]


def test_the_sandbox_stack_says_it_is_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYORDERS_GATEWAY", "stripe")  # another stack's, in this shell
    stack = DevStack(Settings(data_dir=tmp_path), DevOptions())
    assert stack.child_env()["PAYORDERS_GATEWAY"] == "sandbox"
    assert stack.stripe_url is None and "localstripe" not in stack.banner()
    assert "payorders.sandbox.app:app" in stack.children["gateway"].args
    private = DevStack.private(tmp_path)
    assert (private.client_settings().gateway, private.stripe_url) == ("sandbox", None)


def test_a_stack_file_written_before_the_gateway_choice_reads_as_the_sandbox(
    tmp_path: Path,
) -> None:
    old = {
        "pid": os.getpid(),
        "temporal_address": "127.0.0.1:7233",
        "temporal_ui_url": "http://127.0.0.1:8233",
        "database_url": "postgresql://postgres@/payorders",
        "api_url": "http://127.0.0.1:8000",
        "gateway_url": "http://127.0.0.1:8001",
        "tuning": {},
    }
    (tmp_path / stackinfo.FILENAME).write_text(json.dumps(old))
    info = stackinfo.read(tmp_path)
    assert info is not None
    assert (info.gateway, info.stripe_api_base, info.localstripe_url) == ("sandbox", None, None)
    # A key a newer stack adds does not make the file unreadable.
    (tmp_path / stackinfo.FILENAME).write_text(json.dumps({**old, "from_the_future": 1}))
    assert stackinfo.read(tmp_path) == info


# --- the stack as a process ----------------------------------------------------------------


@pytest.fixture
def stripe_dev() -> Iterator[DevProcess]:
    with dev_process("payorders-dev-stripe-", "--gateway", "stripe") as dev:
        yield dev


def listeners(port: int) -> list[psutil._common.sconn]:
    return [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    ]


@pytest.mark.slow
def test_payorders_dev_runs_localstripe_behind_the_wire_and_leaves_nothing(
    stripe_dev: DevProcess,
) -> None:
    info = stackinfo.read(stripe_dev.data_dir)
    assert info is not None and info.gateway == "stripe"
    wire_url = f"http://127.0.0.1:{stripe_dev.ports['stripe']}"
    assert info.stripe_api_base == wire_url == info.gateway_url
    assert info.localstripe_url is not None and info.localstripe_url != wire_url
    localstripe_port = int(info.localstripe_url.rsplit(":", 1)[1])

    # The banner: the variables for another shell, the secrets said to be this stack's.
    banner = stripe_dev.banner()
    exported = exports(banner)
    assert exported["PAYORDERS_GATEWAY"] == "stripe"
    assert exported["PAYORDERS_STRIPE_API_BASE"] == wire_url
    assert exported["PAYORDERS_STRIPE_API_KEY"].startswith("sk_test_")
    assert exported["PAYORDERS_STRIPE_WEBHOOK_SECRET"].startswith("whsec_")
    assert exported["PAYORDERS_API_URL"] == f"http://127.0.0.1:{stripe_dev.ports['api']}"
    assert "generated for this stack" in banner
    assert (
        info.secrets is not None
        and info.secrets["PAYORDERS_STRIPE_API_KEY"] == (exported["PAYORDERS_STRIPE_API_KEY"])
    )

    # Loopback only, both of them.
    pids = set()
    for port in (stripe_dev.ports["stripe"], localstripe_port):
        found = listeners(port)
        assert found and {c.laddr.ip for c in found} == {"127.0.0.1"}, found
        pids |= {c.pid for c in found if c.pid}

    # The SDK with the banner's key, through the wire; the state lands in the data directory.
    client = stripe.StripeClient(
        exported["PAYORDERS_STRIPE_API_KEY"],
        base_addresses={"api": wire_url},
        max_network_retries=0,
        http_client=stripe.HTTPXClient(timeout=10, allow_sync_methods=True),
    )
    no = f"po_devstripe-{uuid.uuid4().hex[:8]}"
    pi = client.v1.payment_intents.create(
        params={
            "amount": 1999,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "metadata": {"pay_order_no": no},
        }
    )
    client.v1.payment_intents.confirm(pi.id)
    state = stripe_dev.data_dir / "localstripe" / "localstripe.pickle"
    assert state.is_file() and pi.id.encode() in state.read_bytes()

    # localstripe's webhook endpoint is the wire's relay: the event went on to the API.
    deadline = time.monotonic() + 30
    while not [
        d for d in httpx.get(f"{wire_url}{DELIVERIES_PATH}").json() if d["pay_order_no"] == no
    ]:
        assert time.monotonic() < deadline, "localstripe's webhook never reached the wire"
        time.sleep(0.2)
    [delivery] = [
        d for d in httpx.get(f"{wire_url}{DELIVERIES_PATH}").json() if d["pay_order_no"] == no
    ]
    assert delivery["type"] == "payment_intent.succeeded"
    assert all(isinstance(s, int) for s in delivery["statuses"]), delivery  # the API answered

    # ``payorders fault`` finds the wire's faults API from the data directory.
    done = subprocess.run(
        [CLI, "fault", "--order", no, "--fail-next-refunds", "2", "--json"],
        env=clean_env(stripe_dev.data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert httpx.get(f"{wire_url}/v1/faults").json()[0]["fail_next_refunds"] == 2

    # Stopped: no state file, nothing listening, no process of it left.
    stripe_dev.proc.send_signal(signal.SIGINT)
    assert stripe_dev.proc.wait(60) == 0, stripe_dev.banner()
    assert "stopped" in stripe_dev.banner()
    assert stackinfo.read(stripe_dev.data_dir) is None
    assert not (stripe_dev.data_dir / stackinfo.FILENAME).exists()
    for port in (stripe_dev.ports["stripe"], localstripe_port):
        assert listeners(port) == []
    assert [p for p in pids if psutil.pid_exists(p)] == []
    left = subprocess.run(
        ["pgrep", "-f", str(stripe_dev.data_dir)], capture_output=True, text=True
    ).stdout.split()
    assert left == []
    assert state.is_file()  # localstripe's state stays for the next start

"""``payorders dev`` and the CLI, used as a person would: real processes, real ports."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from payorders.core.settings import Settings
from payorders.localstack import stackinfo
from payorders.localstack.binaries import find_binary
from payorders.localstack.ports import free_port
from payorders.tools import cli

pytestmark = pytest.mark.slow

CLI = find_binary("payorders")


@dataclass
class DevProcess:
    data_dir: Path
    temporal_port: int
    ui_port: int
    api_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    worker_metrics_port: int = field(default_factory=free_port)
    orders_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None

    def port_args(self) -> list[str]:
        return [
            "--temporal-port",
            str(self.temporal_port),
            "--ui-port",
            str(self.ui_port),
            "--api-port",
            str(self.api_port),
            "--gateway-port",
            str(self.gateway_port),
            "--worker-metrics-port",
            str(self.worker_metrics_port),
            "--orders-port",
            str(self.orders_port),
        ]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYORDERS_", "TEMPORAL_"))}
        env["PAYORDERS_DATA_DIR"] = str(self.data_dir)
        return env

    def start(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [CLI, "dev", *self.port_args(), *extra],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 90
        while stackinfo.read(self.data_dir) is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"payorders dev exited: {self.proc.stdout.read()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise AssertionError("payorders dev did not come up")
            time.sleep(0.2)

    def stop(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, out
        return out

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [CLI, *args], env=self.env(), capture_output=True, text=True, timeout=120
        )
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def wait_status(
        self, pay_order_no: str, until: Callable[[dict[str, Any]], bool], within: float = 60
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while not until(status := self.cli_json("status", pay_order_no)):
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        return status


@pytest.fixture(scope="module")
def dev() -> Iterator[DevProcess]:
    tmp = Path(tempfile.mkdtemp(prefix="payorders-dev-"))
    stack = DevProcess(data_dir=tmp / "data", temporal_port=free_port(), ui_port=free_port())
    try:
        stack.start()
        yield stack
    finally:
        try:
            if stack.proc is not None and stack.proc.poll() is None:
                stack.stop()
        finally:
            # PostgreSQL, Temporal's SQLite file and the logs: about 50 MB a run.
            shutil.rmtree(tmp, ignore_errors=True)


def ui_query(dev: DevProcess, query: str) -> list[str]:
    url = (
        f"http://127.0.0.1:{dev.ui_port}/api/v1/namespaces/default/workflows?"
        + urllib.parse.urlencode({"query": query})
    )
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    return [e["execution"]["workflowId"] for e in body.get("executions") or []]


def test_checkout_payment_and_status_through_the_cli(dev: DevProcess) -> None:
    created = dev.cli_json("create", "--order-no", "cli-A", "--amount", "1999", "--currency", "USD")
    assert created["pay_order_no"] == "po_cli-A" and created["created"] is True
    again = dev.cli_json("create", "--order-no", "cli-A", "--amount", "1999", "--currency", "USD")
    assert again["created"] is False and again["expires_at"] == created["expires_at"]
    paid = dev.cli_json("pay", "po_cli-A")
    assert paid["amount"] == 1999 and paid["txn_id"]
    status = dev.wait_status("po_cli-A", lambda s: s["status"] != "PAYING")
    assert status["status"] == "PAY_SUCCESS"
    assert status["fund_identity"]["holds"] is True
    assert status["gateway"]["captured"] == 1999
    assert status["workflow_status"] == "RUNNING"  # in its settlement window
    assert status["workflow"]["status"] == "PAY_SUCCESS"  # the workflow's own view
    assert status["ui"].endswith("/namespaces/default/workflows/pay-order-po_cli-A")
    table = dev.cli("status", "po_cli-A").stdout
    assert "PAY_SUCCESS" in table and "holds" in table
    listed = dev.cli_json("list", "--status", "PAY_SUCCESS")
    assert "pay-order-po_cli-A" in {r["workflow_id"] for r in listed}


def test_the_worker_serves_prometheus_metrics_on_its_own_port(dev: DevProcess) -> None:
    url = f"http://127.0.0.1:{dev.worker_metrics_port}/metrics"
    info = stackinfo.read(dev.data_dir)
    assert info is not None and info.worker_metrics_url == url
    dev.cli("create", "--order-no", "metrics-A", "--amount", "100", "--currency", "USD")
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        if "\npayorders_orders_created{" in text:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert "\ntemporal_num_pollers{" in text  # the SDK's own, on the same endpoint
    assert "\npayorders_refund_oldest_pending_seconds{" in text


def test_the_banner_and_the_worker_get_the_metrics_addresses(tmp_path: Path) -> None:
    from payorders.core.settings import Settings
    from payorders.localstack.stack import DevOptions, DevStack

    stack = DevStack(
        Settings(data_dir=tmp_path), DevOptions(api_port=8100, worker_metrics_port=9564)
    )
    assert stack.child_env()["PAYORDERS_WORKER_METRICS_ADDRESS"] == "127.0.0.1:9564"
    banner = stack.banner()
    assert "http://127.0.0.1:9564/metrics" in banner
    assert "http://127.0.0.1:8100/metrics" in banner  # the API's


def test_notify_replays_a_notification_and_faults_can_be_set(dev: DevProcess) -> None:
    dev.cli("create", "--order-no", "cli-B", "--amount", "500", "--currency", "EUR")
    txn = dev.cli_json("pay", "po_cli-B", "--amount", "499")["txn_id"]  # a wrong amount
    replay = ["notify", "po_cli-B", "--txn-id", txn, "--amount", "499", "--currency", "EUR"]
    out = dev.cli_json(*replay)
    assert out["received"] is True and out["outcome"] == "SIGNALLED"
    status = dev.wait_status("po_cli-B", lambda s: s["refunded_amount"] == 499)
    assert status["status"] == "PAYING" and len(status["payments"]) == 1  # replay deduplicated
    forged = dev.cli(
        "notify",
        "po_cli-B",
        "--txn-id",
        "never-paid",
        "--amount",
        "500",
        "--currency",
        "EUR",
        check=False,
    )
    assert forged.returncode == 2 and "no such transaction" in forged.stderr
    faults = dev.cli_json(
        "fault", "--order", "po_cli-B", "--fail-next-refunds", "3", "--webhook-drop", "1"
    )
    assert {"scope": "po_cli-B", "fail_next_refunds": 3, "webhook_drop_next": 1}.items() <= faults[
        0
    ].items()
    assert dev.cli_json("fault", "--clear", "--order", "po_cli-B") == []


MALFORMED = [
    ["create", "--order-no", "bad order", "--amount", "1", "--currency", "USD"],
    ["create", "--order-no", "o-1", "--amount", "1.5", "--currency", "USD"],
    ["create", "--order-no", "o-1", "--amount", "-3", "--currency", "USD"],
    ["create", "--order-no", "o-1", "--amount", "0", "--currency", "USD"],
    ["create", "--order-no", "o-1", "--amount", "1", "--currency", "usd"],
    ["create", "--order-no", "o-1", "--amount", "1", "--currency", "USD", "--expires-in", "x"],
    ["create", "--order-no", "o-1", "--amount", "1", "--currency", "USD", "--expires-in", "8d"],
    ["create", "--order-no", "o'--", "--amount", "1", "--currency", "USD"],
    ["pay", "not-a-pay-order"],
    ["pay", "po_cli-A", "--amount", "ten"],
    ["notify", "po_cli-A", "--txn-id", "t 1", "--amount", "1", "--currency", "USD"],
    [
        "notify",
        "po_cli-A",
        "--txn-id",
        "t1",
        "--amount",
        "1",
        "--currency",
        "USD",
        "--paid-at",
        "yesterday",
    ],
    ["status"],
    ["list", "--status", "DONE"],
    ["fault", "--fail-next-refunds", "-1"],
    ["fault", "--paid-on-close", "12.5", "USD"],
]


def test_malformed_arguments_get_one_line_and_change_nothing(
    dev: DevProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process, as the CLI's main runs them (a subprocess each cost about 1.3 s of
    # imports, three per case); the stack's state is read before and after by the real CLI.
    before = dev.cli_json("list")
    for name in [k for k in os.environ if k.startswith(("PAYORDERS_", "TEMPORAL_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PAYORDERS_DATA_DIR", str(dev.data_dir))
    for args in MALFORMED:
        try:
            parsed = cli.build_parser().parse_args(args)
        except SystemExit as exited:
            code = exited.code
        else:
            code = asyncio.run(cli.execute(parsed, Settings()))
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert "error:" in err, (args, err)
    assert dev.cli_json("list") == before


def test_an_unknown_pay_order_is_reported_as_such(dev: DevProcess) -> None:
    done = dev.cli("status", "po_never-was", check=False)
    assert (done.returncode, done.stderr.strip()) == (
        1,
        "payorders status: error: no pay order po_never-was",
    )
    done = dev.cli(
        "notify",
        "po_never-was",
        "--txn-id",
        "t1",
        "--amount",
        "1",
        "--currency",
        "USD",
        check=False,
    )
    # The adapter believes a notification only as far as the gateway's record of it.
    assert done.returncode == 2 and "no such transaction" in done.stderr


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    # The console script once, the rest in this process (a subprocess each cost ~1.5 s).
    done = subprocess.run([CLI, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: payorders" in done.stdout
    commands = ("dev", "create", "pay", "notify", "status", "list", "fault", "demo", "reconcile")
    for cmd in (*commands, "cancel", "torture", "refund"):
        with pytest.raises(SystemExit) as exited:
            cli.main([cmd, "--help"])
        assert exited.value.code == 0
        assert "usage: payorders" in capsys.readouterr().out


def test_commands_that_need_the_stack_say_how_to_start_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYORDERS_", "TEMPORAL_"))}
    env["PAYORDERS_DATA_DIR"] = str(tmp_path)
    done = subprocess.run([CLI, "status", "po_x"], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "scripts/dev" in done.stderr


def test_the_demo_passes_and_its_orders_are_found_in_the_temporal_ui(dev: DevProcess) -> None:
    done = dev.cli("demo")
    assert "the fund identity holds for every one" in done.stdout
    for scenario in ("paid in time", "late payment", "double payment", "already paid"):
        assert scenario in done.stdout
    run_id = done.stdout.split("demo ", 1)[1].split(":", 1)[0]
    success = ui_query(
        dev, f"PayOrderStatus = 'PAY_SUCCESS' AND OrderNo STARTS_WITH 'demo-{run_id}'"
    )
    expired = ui_query(
        dev, f"PayOrderStatus = 'PAY_EXPIRED' AND OrderNo STARTS_WITH 'demo-{run_id}'"
    )
    assert f"pay-order-po_demo-{run_id}-paid-0" in success
    assert f"pay-order-po_demo-{run_id}-closepaid-0" in success
    assert f"pay-order-po_demo-{run_id}-late-0" in expired
    assert len(success) + len(expired) == 58


def test_a_second_stack_on_the_same_data_or_ports_is_a_clear_error(dev: DevProcess) -> None:
    same_data = subprocess.run(
        [CLI, "dev", "--temporal-port", str(free_port()), "--ui-port", str(free_port())],
        env=dev.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert same_data.returncode == 2 and "is held by another payorders dev" in same_data.stderr
    assert_only_one_error_line(same_data)
    other = DevProcess(
        data_dir=dev.data_dir.parent / "other", temporal_port=dev.temporal_port, ui_port=free_port()
    )
    same_port = subprocess.run(
        [CLI, "dev", "--temporal-port", str(other.temporal_port), "--ui-port", str(other.ui_port)],
        env=other.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert same_port.returncode == 2 and "already in use" in same_port.stderr
    assert_only_one_error_line(same_port)
    assert stackinfo.read(dev.data_dir) is not None  # the running stack runs on


def assert_only_one_error_line(refused: subprocess.CompletedProcess[str]) -> None:
    """A refused start says why in one line, and nothing that reads as if the running
    stack had stopped."""
    out = refused.stdout + refused.stderr
    assert "stopping" not in out and "stopped" not in out, out
    assert refused.stdout == "" and len(refused.stderr.strip().splitlines()) == 1, out


def test_reconcile_runs_now_and_lists_its_history(dev: DevProcess) -> None:
    out = dev.cli_json("reconcile")
    report = out["report"]
    assert report["checked"] >= 1 and report["finished_at"] is not None
    assert (
        report["consistent"] + len({f["pay_order_no"] for f in out["findings"]})
        >= report["checked"]
    )
    history = dev.cli_json("reconcile", "--history")
    assert report["run_id"] in {r["run_id"] for r in history}
    assert "checked" in dev.cli("reconcile").stdout


def test_restart_carries_on_with_the_open_workflows(dev: DevProcess) -> None:
    dev.cli(
        "create",
        "--order-no",
        "restart-A",
        "--amount",
        "100",
        "--currency",
        "USD",
        "--expires-in",
        "6s",
    )
    out = dev.stop()
    assert "stopped" in out
    assert stackinfo.read(dev.data_dir) is None
    children = subprocess.run(
        ["pgrep", "-f", str(dev.data_dir)], capture_output=True, text=True
    ).stdout.split()
    assert children == []  # PostgreSQL, Temporal and the worker all stopped
    time.sleep(7)  # the order expires while nothing runs
    dev.start()
    status = dev.wait_status("po_restart-A", lambda s: s["status"] != "PAYING")
    assert status["status"] == "PAY_EXPIRED"
    # An order paid before the restart is still in its settlement window, still served.
    assert dev.cli_json("status", "po_cli-A")["workflow_status"] == "RUNNING"
    dev.cli_json("pay", "po_cli-A")
    status = dev.wait_status("po_cli-A", lambda s: s["refunded_amount"] == 1999)
    assert status["fund_identity"]["holds"]


def test_the_cli_module_is_the_installed_entry_point() -> None:
    assert Path(CLI).parent == Path(sys.executable).parent

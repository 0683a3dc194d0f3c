"""``payorders dev --gateway alipay``: the local Alipay as the stack's gateway, its two key
pairs generated per stack in the data directory, the adapter's variables in the banner,
the demo run to its tables, ``payorders pay`` and ``payorders fault`` against it, Alipay's
notifications refused at the API unless signed, and nothing left behind once it stops."""

from __future__ import annotations

import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import httpx
import psutil
import pytest
from Cryptodome.PublicKey import RSA

from payorders.core.settings import Settings
from payorders.gateways.alipay import china_time, out_trade_no_of
from payorders.localstack import alipay_keys, stackinfo
from payorders.localstack.stack import DevOptions, DevStack

from ..unit.test_alipay import signed
from .dev_process import CLI, DevProcess, clean_env, dev_process
from .test_dev_stripe import exports, listeners


def test_the_alipay_stack_gives_its_children_the_adapter_s_variables(tmp_path: Path) -> None:
    stack = DevStack(
        Settings(data_dir=tmp_path), DevOptions(gateway_port=8601, api_port=8600, gateway="alipay")
    )
    env = stack.child_env()
    keys = alipay_keys.key_files(tmp_path)
    assert env["PAYORDERS_GATEWAY"] == "alipay"
    assert env["PAYORDERS_ALIPAY_GATEWAY_URL"] == "http://127.0.0.1:8601/gateway.do"
    assert env["PAYORDERS_ALIPAY_NOTIFY_URL"] == "http://127.0.0.1:8600/v1/webhooks/alipay"
    assert env["PAYORDERS_ALIPAY_PRIVATE_KEY_FILE"] == str(keys.app_private)
    assert env["PAYORDERS_ALIPAY_PUBLIC_KEY_FILE"] == str(keys.alipay_public)
    assert "payorders.sandbox.alipay:app" in stack.children["gateway"].args
    banner = stack.banner()
    assert "local Alipay" in banner and "PRIVATE KEY" not in banner  # paths, never keys


@dataclass
class AlipayDev:
    dev: DevProcess

    def env(self) -> dict[str, str]:
        """A new shell's environment with the banner's variables exported."""
        return {**clean_env(), **exports(self.dev.banner())}

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture
def alipay_dev() -> Iterator[AlipayDev]:
    with dev_process("payorders-dev-alipay-", "--gateway", "alipay") as dev:
        yield AlipayDev(dev)


@pytest.mark.slow
def test_payorders_dev_runs_the_demo_on_the_local_alipay_and_leaves_nothing(
    alipay_dev: AlipayDev,
) -> None:
    info = stackinfo.read(alipay_dev.dev.data_dir)
    assert info is not None and info.gateway == "alipay"
    exported = exports(alipay_dev.dev.banner())
    gateway_url = f"http://127.0.0.1:{alipay_dev.dev.ports['gateway']}"
    assert exported["PAYORDERS_GATEWAY"] == "alipay"
    assert exported["PAYORDERS_ALIPAY_GATEWAY_URL"] == f"{gateway_url}/gateway.do"
    keys = alipay_keys.key_files(alipay_dev.dev.data_dir)
    for key in (keys.app_private, keys.alipay_private):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key  # owner-only
    assert Path(exported["PAYORDERS_ALIPAY_PRIVATE_KEY_FILE"]) == keys.app_private
    found = listeners(alipay_dev.dev.ports["gateway"])
    assert found and {c.laddr.ip for c in found} == {"127.0.0.1"}, found
    pids = {c.pid for c in found if c.pid}

    # The demo, from another shell with the banner's variables, to its tables.
    demo = alipay_dev.cli("demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "(local Alipay)" in demo.stdout
    assert "the gateway refuses the second payment" in demo.stdout
    assert "the fund identity holds for every one" in demo.stdout

    # payorders pay and payorders fault reach the local Alipay, by the trade's out_trade_no.
    api = exported["PAYORDERS_API_URL"]
    token = {"Authorization": f"Bearer {exported['PAYORDERS_API_TOKEN']}"}
    order_no = f"devali-{uuid.uuid4().hex[:8]}"
    created = httpx.post(
        f"{api}/v1/pay-orders",
        json={"order_no": order_no, "amount": 1999, "currency": "CNY"},
        headers=token,
        timeout=30,
    )
    assert created.status_code == 201, created.text
    no = created.json()["pay_order_no"]
    assert created.json()["checkout"]["out_trade_no"] == out_trade_no_of(no)
    assert created.json()["checkout"]["qr_code"].startswith("https://qr.alipay.com/")
    usd = httpx.post(
        f"{api}/v1/pay-orders",
        json={"order_no": f"{order_no}-usd", "amount": 1999, "currency": "USD"},
        headers=token,
        timeout=30,
    )
    assert usd.status_code == 422 and "CNY only" in usd.text
    fault = alipay_dev.cli("fault", "--order", no, "--fail-next-refunds", "2", "--json")
    assert fault.returncode == 0, fault.stderr
    armed = httpx.get(f"{gateway_url}/v1/faults").json()
    assert [f["fail_next_refunds"] for f in armed if f["scope"] == out_trade_no_of(no)] == [2]
    paid = alipay_dev.cli("pay", no, "--json")
    assert paid.returncode == 0, paid.stderr
    deadline = time.monotonic() + 30
    while httpx.get(f"{api}/v1/pay-orders/{no}", headers=token).json()["status"] != "PAY_SUCCESS":
        assert time.monotonic() < deadline, "the notification did not reach the pay order"
        time.sleep(0.2)

    # Alipay's notification route takes only what Alipay signed, as a form, about our trade.
    route = f"{api}/v1/webhooks/alipay"
    alipay_key = RSA.import_key(keys.alipay_private.read_bytes())
    stranger = RSA.generate(2048)
    txn = httpx.get(f"{api}/v1/pay-orders/{no}", headers=token).json()["payments"][0]["txn_id"]
    now = datetime.now(UTC)

    def note(**changes: str) -> dict[str, str]:
        base = {
            "notify_time": china_time(now),
            "notify_type": "trade_status_sync",
            "notify_id": uuid.uuid4().hex,
            "app_id": alipay_keys.APP_ID,
            "charset": "utf-8",
            "version": "1.0",
            "trade_no": txn,
            "out_trade_no": out_trade_no_of(no),
            "trade_status": "TRADE_SUCCESS",
            "total_amount": "19.99",
            "gmt_payment": china_time(now),
        }
        return {**base, **changes}

    def post(form: dict[str, str]) -> httpx.Response:
        return httpx.post(
            route,
            content=urlencode(form),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )

    for form, status in [
        (note(), 401),  # unsigned
        (signed(note(), stranger), 401),  # signed by another key
        (signed(note(app_id="2021000000000099"), alipay_key), 400),
        (signed(note(notify_time=china_time(now - timedelta(days=3))), alipay_key), 401),
        (signed(note(total_amount="19.98"), alipay_key), 422),  # the amount differs
        (signed(note(out_trade_no="po_never-opened"), alipay_key), 404),  # no such order
    ]:
        answer = post(form)
        assert (answer.status_code, answer.text != "success") == (status, True), form
    assert httpx.post(route, json={"out_trade_no": no}).status_code == 415  # not a form
    again = signed(note(), alipay_key)  # Alipay's own, as it resends it: acknowledged
    assert (post(again).text, post(again).text) == ("success", "success")

    # Stopped: no state file, nothing listening, no process of it left.
    alipay_dev.dev.proc.send_signal(signal.SIGINT)
    assert alipay_dev.dev.proc.wait(60) == 0, alipay_dev.dev.banner()
    assert stackinfo.read(alipay_dev.dev.data_dir) is None
    assert listeners(alipay_dev.dev.ports["gateway"]) == []
    assert [p for p in pids if psutil.pid_exists(p)] == []
    left = subprocess.run(
        ["pgrep", "-f", str(alipay_dev.dev.data_dir)], capture_output=True, text=True
    ).stdout.split()
    assert left == []

"""``payorders dev --gateway wechatpay``: the local WeChat Pay as the stack's gateway, its key
material made per stack in the data directory, the adapter's variables in the banner, the
demo run to its tables, ``payorders pay`` and ``payorders fault`` against it, callbacks
refused at the API unless signed and encrypted as WeChat Pay does, and nothing left behind
once it stops."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from payorders.core.settings import Settings
from payorders.gateways.wechatpay import CHINA, out_trade_no_of
from payorders.localstack import stackinfo, wechatpay_keys
from payorders.localstack.stack import DevOptions, DevStack

from ..unit.test_wechatpay import callback, encrypted, signed, transaction
from .dev_process import CLI, DevProcess, clean_env, dev_process
from .test_dev_stripe import exports, listeners


def test_the_wechatpay_stack_gives_its_children_the_adapter_s_variables(tmp_path: Path) -> None:
    stack = DevStack(
        Settings(data_dir=tmp_path),
        DevOptions(gateway_port=8701, api_port=8700, gateway="wechatpay"),
    )
    env = stack.child_env()
    wx = wechatpay_keys.material(tmp_path)
    assert env["PAYORDERS_GATEWAY"] == "wechatpay"
    assert env["PAYORDERS_WECHATPAY_GATEWAY_URL"] == "http://127.0.0.1:8701"
    assert env["PAYORDERS_WECHATPAY_NOTIFY_URL"] == "http://127.0.0.1:8700/v1/webhooks/wechatpay"
    assert env["PAYORDERS_WECHATPAY_PRIVATE_KEY_FILE"] == str(wx.merchant_private)
    assert env["PAYORDERS_WECHATPAY_PUBLIC_KEY_FILE"] == str(wx.wechatpay_public)
    assert env["PAYORDERS_WECHATPAY_PUBLIC_KEY_ID"] == wx.public_key_id
    assert env["PAYORDERS_WECHATPAY_APIV3_KEY"] == wx.apiv3_key
    assert len(wx.apiv3_key.encode()) == 32
    assert "payorders.sandbox.wechatpay:app" in stack.children["gateway"].args
    assert "PRIVATE KEY" not in stack.banner() and "local WeChat Pay" in stack.banner()
    # Made once per stack: the same again from its data directory, others elsewhere.
    assert wechatpay_keys.material(tmp_path) == wx
    assert wechatpay_keys.material(tmp_path / "other").apiv3_key != wx.apiv3_key
    for secret in (wx.merchant_private, wx.wechatpay_private, tmp_path / "wechatpay" / "apiv3_key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


@dataclass
class WechatDev:
    dev: DevProcess

    def env(self) -> dict[str, str]:
        """A new shell's environment with the banner's variables exported."""
        return {**clean_env(), **exports(self.dev.banner())}

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture
def wechat_dev() -> Iterator[WechatDev]:
    with dev_process("payorders-dev-wechatpay-", "--gateway", "wechatpay") as dev:
        yield WechatDev(dev)


@pytest.mark.slow
def test_payorders_dev_runs_the_demo_on_the_local_wechatpay_and_leaves_nothing(
    wechat_dev: WechatDev,
) -> None:
    dev = wechat_dev.dev
    info = stackinfo.read(dev.data_dir)
    assert info is not None and info.gateway == "wechatpay"
    exported = exports(dev.banner())
    gateway_url = f"http://127.0.0.1:{dev.ports['gateway']}"
    assert exported["PAYORDERS_GATEWAY"] == "wechatpay"
    assert exported["PAYORDERS_WECHATPAY_GATEWAY_URL"] == gateway_url
    found = listeners(dev.ports["gateway"])
    assert found and {c.laddr.ip for c in found} == {"127.0.0.1"}, found
    pids = {c.pid for c in found if c.pid}

    demo = wechat_dev.cli("demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "(local WeChat Pay)" in demo.stdout
    assert "the gateway refuses the second payment" in demo.stdout
    assert "the fund identity holds for every one" in demo.stdout

    api = exported["PAYORDERS_API_URL"]
    token = {"Authorization": f"Bearer {exported['PAYORDERS_API_TOKEN']}"}
    order_no = f"devwx-{uuid.uuid4().hex[:8]}"
    created = httpx.post(
        f"{api}/v1/pay-orders",
        json={"order_no": order_no, "amount": 1999, "currency": "CNY"},
        headers=token,
        timeout=30,
    )
    assert created.status_code == 201, created.text
    no = created.json()["pay_order_no"]
    assert created.json()["checkout"]["out_trade_no"] == out_trade_no_of(no)
    assert created.json()["checkout"]["code_url"].startswith("weixin://")
    usd = httpx.post(
        f"{api}/v1/pay-orders",
        json={"order_no": f"{order_no}-usd", "amount": 1999, "currency": "USD"},
        headers=token,
        timeout=30,
    )
    assert usd.status_code == 422 and "CNY" in usd.text
    fault = wechat_dev.cli("fault", "--order", no, "--fail-next-refunds", "2", "--json")
    assert fault.returncode == 0, fault.stderr
    armed = httpx.get(f"{gateway_url}/v1/faults").json()
    assert [f["fail_next_refunds"] for f in armed if f["scope"] == out_trade_no_of(no)] == [2]
    paid = wechat_dev.cli("pay", no, "--json")
    assert paid.returncode == 0, paid.stderr

    deadline = time.monotonic() + 30
    while httpx.get(f"{api}/v1/pay-orders/{no}", headers=token).json()["status"] != "PAY_SUCCESS":
        assert time.monotonic() < deadline, "the callback did not reach the pay order"
        time.sleep(0.2)

    # The callback route takes only what WeChat Pay signed and sealed, about our order.
    route = f"{api}/v1/webhooks/wechatpay"
    wx = wechatpay_keys.material(dev.data_dir)
    platform = serialization.load_pem_private_key(wx.wechatpay_private.read_bytes(), None)
    assert isinstance(platform, rsa.RSAPrivateKey)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    txn = httpx.get(f"{api}/v1/pay-orders/{no}", headers=token).json()["payments"][0]["txn_id"]
    now = datetime.now(UTC)

    def payment(**changes: object) -> dict[str, object]:
        base = transaction(
            appid=wechatpay_keys.APPID,
            mchid=wechatpay_keys.MCHID,
            out_trade_no=out_trade_no_of(no),
            attach=no,
            transaction_id=txn,
            success_time=now.astimezone(CHINA).isoformat(timespec="seconds"),
        )
        return {**base, **changes}

    def post(resource: dict[str, object], key: rsa.RSAPrivateKey, *, at: datetime = now,
             apiv3: str = wx.apiv3_key, note_id: str | None = None) -> httpx.Response:  # fmt: skip
        body = callback(encrypted(resource, key=apiv3), id=note_id or uuid.uuid4().hex)
        headers = signed(body, key, at=at, serial=wx.public_key_id)
        return httpx.post(
            route, content=body, headers={**headers, "Content-Type": "application/json"}
        )

    for answer, status in [
        (httpx.post(route, json={"id": "x", "event_type": "TRANSACTION.SUCCESS"}), 401),
        (post(payment(), stranger), 401),  # signed by another key
        (post(payment(), platform, at=now - timedelta(minutes=10)), 401),  # stale
        (post(payment(), platform, apiv3="x" * 32), 401),  # sealed with another APIv3 key
        (post(payment(mchid="1900000999"), platform), 400),  # another merchant
        (post(payment(amount={"total": 1998, "currency": "CNY"}), platform), 422),
        # Another order's number on this transaction: not what WeChat Pay's record says.
        (post(payment(out_trade_no="po_never-opened", attach="po_never-opened"), platform), 422),
    ]:
        assert answer.status_code == status, answer.text
    once = uuid.uuid4().hex  # WeChat Pay's own callback, as it resends it: acknowledged
    assert [post(payment(), platform, note_id=once).status_code for _ in range(2)] == [204, 204]

    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(60) == 0, dev.banner()
    assert stackinfo.read(dev.data_dir) is None
    assert listeners(dev.ports["gateway"]) == []
    assert [p for p in pids if psutil.pid_exists(p)] == []
    left = subprocess.run(
        ["pgrep", "-f", str(dev.data_dir)], capture_output=True, text=True
    ).stdout.split()
    assert left == []
    assert os.environ.get("PAYORDERS_WECHATPAY_APIV3_KEY") is None  # nothing leaked here

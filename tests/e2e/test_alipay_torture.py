"""``payorders torture --chaos --gateway alipay|wechatpay``: the storm against the local
Alipay and the local WeChat Pay on private stacks, each verdict read from that gateway's
own ledger. Both refuse what the sandbox takes (a second payment of a trade, one after its
``time_expire``): counted, never captured, and the money still adds up."""

from __future__ import annotations

import re

import pytest

from payorders.core.settings import Settings

from .test_stripe_tools import figure, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("gateway", "label"), [("alipay", "local Alipay"), ("wechatpay", "local WeChat Pay")]
)
async def test_the_chaos_torture_runs_its_private_stack_on_a_local_chinese_gateway(
    capsys: pytest.CaptureFixture[str], gateway: str, label: str
) -> None:
    argv = ["torture", "--chaos", "--gateway", gateway, "--orders", "60", "--worker-kills", "1",
            "--api-kills", "1", "--relay-kills", "0"]  # fmt: skip
    code, out, err = await run(
        Settings(), capsys, *argv, "--expires-in-s", "6", "--seed", "11", "--settle-within-s", "120"
    )
    print(out)
    assert (code, err) == (0, ""), out
    assert "VIOLATION" not in out
    assert figure(out, "violations") == "0"
    assert figure(out, "orders") == "60"
    assert f"at the {label}" in out
    refused = re.findall(r"^payments the gateway refused: \S+ +(\d+)$", out, re.MULTILINE)
    assert sum(map(int, refused)) > 0
    at_gateway, recorded = figure(
        out, "merchant refunded: at the gateway / recorded (minor units)"
    ).split(" / ")
    assert at_gateway == recorded and int(at_gateway) > 0
    for fault in (
        "kill the worker (SIGKILL)",
        "kill api (SIGKILL) as webhooks arrive",
        "restart the Temporal dev server",
        "restart PostgreSQL",
        f"stop the {label} for 5s",
    ):
        assert f"chaos: {fault}, recovered in (s)" in out

"""``payorders torture --chaos --gateway alipay``: the storm against the local Alipay on a
private stack, its verdict read from the local Alipay's own ledger. Alipay refuses what
the sandbox takes (a second payment of a trade, one after ``time_expire``): counted, never
captured, and the money still adds up."""

from __future__ import annotations

import pytest

from payorders.core.settings import Settings

from .test_stripe_tools import figure, run

pytestmark = pytest.mark.slow


async def test_the_chaos_torture_runs_its_private_stack_on_the_local_alipay(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["torture", "--chaos", "--gateway", "alipay", "--orders", "60", "--worker-kills", "1",
            "--api-kills", "1", "--relay-kills", "0"]  # fmt: skip
    code, out, err = await run(
        Settings(), capsys, *argv, "--expires-in-s", "6", "--seed", "11", "--settle-within-s", "120"
    )
    print(out)
    assert (code, err) == (0, ""), out
    assert "VIOLATION" not in out
    assert figure(out, "violations") == "0"
    assert figure(out, "orders") == "60"
    assert "at the local Alipay" in out
    assert int(figure(out, "payments the gateway refused: payment_refused")) > 0
    at_gateway, recorded = figure(
        out, "merchant refunded: at the gateway / recorded (minor units)"
    ).split(" / ")
    assert at_gateway == recorded and int(at_gateway) > 0
    for fault in (
        "kill the worker (SIGKILL)",
        "kill api (SIGKILL) as webhooks arrive",
        "restart the Temporal dev server",
        "restart PostgreSQL",
        "stop the local Alipay for 5s",
    ):
        assert f"chaos: {fault}, recovered in (s)" in out

"""The CLI's arguments and answers: refusals that name the flag and the rule, the payment
deadline given either way, and output that says what each field means.

Parsing is tested without a stack. The commands run in-process (``cli.execute``) against
a real HTTP stack: the service API and sandbox gateway on real ports, a worker, a real
Temporal dev server and PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from payorders.core.settings import Settings
from payorders.localstack import stackinfo
from payorders.localstack.binaries import find_binary
from payorders.tools import cli

from ..http_stack import HttpStack, http_stack

CREATE = ["create", "--order-no", "o-1", "--amount", "100", "--currency", "USD"]


def _in(delta: timedelta, zone: timezone = UTC) -> str:
    return (datetime.now(UTC) + delta).astimezone(zone).isoformat()


def parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a refused command line prints; it must exit 2."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# --- parsing: no stack ----------------------------------------------------------------------


def test_the_deadline_is_given_as_a_window_or_a_time_or_not_at_all() -> None:
    window = parse([*CREATE, "--expires-in", "15m"])
    assert (window.expires_in, window.expires_at) == (timedelta(minutes=15), None)
    at = parse([*CREATE, "--expires-at", _in(timedelta(hours=2), timezone(timedelta(hours=-5)))])
    assert at.expires_in is None and at.expires_at.utcoffset() == timedelta(0)
    assert timedelta(hours=1) < at.expires_at - datetime.now(UTC) <= timedelta(hours=2)
    neither = parse(CREATE)
    assert (neither.expires_in, neither.expires_at) == (None, None)  # the service's default


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--expires-in", "0s"],
            "argument --expires-in: the payment window must be longer than zero",
        ),
        (
            ["--expires-in", "0"],
            "argument --expires-in: the payment window must be longer than zero",
        ),
        (
            ["--expires-in", "-5m"],
            "argument --expires-in: the payment window must be longer than zero",
        ),
        (
            ["--expires-in=-5m"],
            "argument --expires-in: the payment window must be longer than zero",
        ),
        (
            ["--expires-in", "8d"],
            "argument --expires-in: the payment window must be at most 7 days",
        ),
        (
            ["--expires-in", "99999999999999999999d"],
            "argument --expires-in: the payment window must be at most 7 days",
        ),
        (["--expires-in", "soon"], "argument --expires-in: not a duration: 'soon' (use 90s"),
        (
            ["--expires-at", "2026-12-01T11:00:00"],
            "argument --expires-at: the time needs a zone, e.g. 2026-11-27T11:00:00Z",
        ),
        (
            ["--expires-at", _in(-timedelta(hours=1))],
            "argument --expires-at: the deadline must be in the future",
        ),
        (
            ["--expires-at", _in(timedelta(days=7, hours=1))],
            "argument --expires-at: the deadline must be at most 7 days away",
        ),
        (
            ["--expires-at", "tomorrow"],
            "argument --expires-at: not an ISO 8601 time: 'tomorrow' (e.g. 2026-11-27T11:00:00Z)",
        ),
        (
            ["--expires-in", "15m", "--expires-at", _in(timedelta(hours=1))],
            "argument --expires-at: not allowed with argument --expires-in",
        ),
        # A missing value is still reported as missing, not taken from the next option.
        (["--expires-in", "--json"], "argument --expires-in: expected one argument"),
    ],
)
def test_a_bad_deadline_is_refused_naming_the_flag_and_the_rule(
    extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert refusal([*CREATE, *extra], capsys).startswith(f"payorders create: error: {expected}")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["create", "--order-no", "o-1", "--amount", "-3", "--currency", "USD"],
            "argument --amount: amount must be greater than zero",
        ),
        (
            ["create", "--order-no", "o-1", "--amount", "0", "--currency", "USD"],
            "argument --amount: amount must be greater than zero",
        ),
        (
            ["pay", "po_x", "--amount", "ten"],
            "argument --amount: not an amount: 'ten' (a whole number of minor units",
        ),
        (
            ["fault", "--fail-next-refunds", "-1"],
            "argument --fail-next-refunds: not a count: '-1' (a whole number, 0 to 999999)",
        ),
        (
            ["notify", "po_x", "--txn-id", "t1", "--amount", "1", "--currency", "USD",
             "--paid-at", "yesterday"],
            "argument --paid-at: not an ISO 8601 time: 'yesterday' (e.g. 2026-11-27T11:00:00Z)",
        ),
    ],
)  # fmt: skip
def test_other_refusals_name_the_flag_and_the_rule(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in refusal(argv, capsys)


TXN_ALONE = (
    "--txn refunds money without a pay order: give it alone, not with a pay order, --amount,"
    " --refund-no or --reason"
)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["refund"], "give PAY_ORDER_NO with --amount and --refund-no, or --txn TXN"),
        (["refund", "po_x", "--amount", "5"], "a refund of po_x needs --refund-no"),
        (["refund", "po_x"], "a refund of po_x needs --amount and --refund-no"),
        (["refund", "po_x", "--txn", "t1"], TXN_ALONE),
        (["refund", "--txn", "t1", "--amount", "5"], TXN_ALONE),
    ],
)
async def test_a_refund_is_of_a_pay_order_or_of_a_txn_never_both(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Judged before the command connects to anything: no stack here.
    assert await cli.execute(parse(argv), Settings()) == 2
    assert capsys.readouterr().err.strip() == f"payorders refund: error: {expected}"


def test_a_refund_key_and_amount_are_checked_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    bad_key = refusal(["refund", "po_x", "--amount", "5", "--refund-no", "r 1"], capsys)
    assert "argument --refund-no: refund_no must be 1-48 characters" in bad_key
    assert "argument --amount: amount must be greater than zero" in refusal(
        ["refund", "po_x", "--amount", "0", "--refund-no", "r1"], capsys
    )


async def test_a_bad_paid_on_close_names_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    # Checked by the command, before it connects to anything.
    args = parse(["fault", "--paid-on-close", "12.5", "USD"])
    assert await cli.execute(args, Settings()) == 2
    assert capsys.readouterr().err.strip() == (
        "payorders fault: error: argument --paid-on-close: not an amount: '12.5'"
        " (a whole number of minor units, e.g. 1999 for 19.99)"
    )


def test_the_installed_command_refuses_a_negative_window_with_its_reason() -> None:
    done = subprocess.run(
        [find_binary("payorders"), *CREATE, "--expires-in", "-5m"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "payorders create: error: argument --expires-in: the payment window must be longer"
        " than zero\n"
    )


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        (None, "open (not paid, not closed)"),  # the sandbox keeps no row for an open trade
        ("OPEN", "open (not paid, not closed)"),
        ("PAID", "paid"),
        ("CLOSED", "closed"),
    ],
)
def test_the_gateway_trade_reads_as_its_state(state: str | None, shown: str) -> None:
    assert cli.trade_text({"trade_state": state}) == shown


def test_notify_shows_the_event_flag_by_its_own_name() -> None:
    answer = {
        "received": True,
        "outcome": "SIGNALLED",
        "event_duplicate": False,
        "txn_already_recorded": True,
        "duplicate": False,
    }
    assert cli.notify_output(answer) == {
        "received": True,
        "outcome": "SIGNALLED",
        "event_duplicate": False,
        "txn_already_recorded": True,
    }


def test_demo_and_torture_take_the_gateway() -> None:
    assert parse(["demo", "--gateway", "stripe"]).gateway == "stripe"
    assert parse(["demo"]).gateway is None  # the running stack's
    chaos = parse(["torture", "--chaos", "--gateway", "stripe", "--orders", "50"])
    assert (chaos.chaos, chaos.gateway, chaos.orders) == (True, "stripe", 50)
    assert parse(["torture", "--gateway", "sandbox"]).gateway == "sandbox"
    assert parse(["torture"]).gateway is None


def test_dev_and_chaos_take_how_many_workers_and_api_processes() -> None:
    dev = parse(["dev", "--workers", "3", "--api-processes", "2"])
    assert (dev.workers, dev.api_processes) == (3, 2)
    assert (parse(["dev"]).workers, parse(["dev"]).api_processes) == (1, 1)
    chaos = parse(
        ["torture", "--chaos", "--workers", "16", "--api-kills", "2", "--relay-kills", "0"]
    )
    assert (chaos.workers, chaos.api_processes, chaos.api_kills, chaos.relay_kills) == (
        16,
        None,
        2,
        0,
    )


@pytest.mark.parametrize("flag", ["--workers", "--api-processes"])
@pytest.mark.parametrize("command", [["dev"], ["torture", "--chaos"]])
@pytest.mark.parametrize("value", ["0", "17", "-1", "two", "1.5"])
def test_a_count_of_processes_out_of_range_is_refused_naming_the_rule(
    flag: str, command: list[str], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert refusal([*command, flag, value], capsys) == (
        f"payorders {command[0]}: error: argument {flag}: {flag}: {value!r} is not a whole"
        " number from 1 to 16"
    )


async def test_the_torture_without_chaos_refuses_to_size_a_stack(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = await cli.execute(parse(["torture", "--workers", "3"]), Settings())
    assert code == 1
    assert "--workers and --api-processes size the private stack of --chaos" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("command", ["demo", "torture"])
def test_an_unknown_gateway_is_refused_naming_the_choices(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert refusal([command, "--gateway", "paypal"], capsys) == (
        f"payorders {command}: error: argument --gateway: invalid choice: 'paypal'"
        " (choose from 'sandbox', 'stripe', 'alipay', 'wechatpay')"
    )


def _running_stack(data_dir: Path, gateway: str) -> None:
    """A ``stack.json`` naming this process, as a running ``payorders dev`` writes one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    stripe = gateway == "stripe"
    stackinfo.write(
        data_dir,
        stackinfo.StackInfo(
            pid=os.getpid(),
            temporal_address="127.0.0.1:7301",
            temporal_ui_url="http://127.0.0.1:8301",
            database_url="postgresql://postgres@127.0.0.1:5301/payorders",
            api_url="http://127.0.0.1:8101",
            gateway_url="http://127.0.0.1:8420" if stripe else "http://127.0.0.1:8102",
            tuning={},
            gateway=gateway,
            stripe_api_base="http://127.0.0.1:8420" if stripe else None,
            secrets={
                "PAYORDERS_API_TOKEN": STACK_TOKEN,
                **({"PAYORDERS_STRIPE_API_KEY": STACK_STRIPE_KEY} if stripe else {}),
            },
        ),
    )


STACK_TOKEN = "pot_" + "t" * 40
STACK_STRIPE_KEY = "sk_test_" + "s" * 30


def test_the_cli_takes_the_gateway_of_the_running_stack(tmp_path: Path) -> None:
    _running_stack(tmp_path, "stripe")
    s = cli.stack_settings(Settings(data_dir=tmp_path))
    assert (s.gateway, s.stripe_api_base, s.api_url) == (
        "stripe",
        "http://127.0.0.1:8420",
        "http://127.0.0.1:8101",
    )
    assert s.stripe_api_key is not None and s.stripe_api_key.get_secret_value() == (
        STACK_STRIPE_KEY
    )
    assert s.api_token is not None and s.api_token.get_secret_value() == STACK_TOKEN
    assert cli.stack_settings(Settings(data_dir=tmp_path), gateway="stripe").gateway == "stripe"
    # A key or token set in the environment wins over the stack's.
    own = cli.stack_settings(
        Settings(data_dir=tmp_path, stripe_api_key="sk_test_mine", api_token="mine-" + "m" * 30)
    )
    assert own.stripe_api_key is not None and own.api_token is not None
    assert own.stripe_api_key.get_secret_value() == "sk_test_mine"
    assert own.api_token.get_secret_value() == "mine-" + "m" * 30


def test_a_gateway_the_running_stack_does_not_run_is_refused(tmp_path: Path) -> None:
    _running_stack(tmp_path, "sandbox")
    assert cli.stack_settings(Settings(data_dir=tmp_path)).gateway == "sandbox"
    with pytest.raises(cli.CliError, match="runs the sandbox gateway, not stripe"):
        cli.stack_settings(Settings(data_dir=tmp_path), gateway="stripe")
    with pytest.raises(cli.CliError, match="payorders dev --gateway stripe"):
        cli.stack_settings(Settings(data_dir=tmp_path, gateway="stripe"))


def test_without_a_stack_the_gateway_asked_for_is_taken(tmp_path: Path) -> None:
    assert cli.stack_settings(Settings(data_dir=tmp_path), gateway="stripe").gateway == "stripe"
    assert cli.stack_settings(Settings(data_dir=tmp_path)).gateway == "sandbox"


# --- commands against a running stack ---------------------------------------------------------


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, db_url: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    # A settlement window long enough for a delayed webhook to find its workflow open.
    async with http_stack(dev_env.client, target, db_url, settlement_window_s=60) as stack:
        yield stack


async def run(
    web: HttpStack, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await cli.execute(parse(list(argv)), web.settings)
    out = capsys.readouterr()
    return code, out.out, out.err


def new_order() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}"


async def assert_no_workflow(dev_env: WorkflowEnvironment, order_no: str) -> None:
    with pytest.raises(RPCError, match="not found"):
        await dev_env.client.get_workflow_handle(f"pay-order-po_{order_no}").describe()


@pytest.mark.slow
async def test_create_takes_an_absolute_deadline_and_a_retry_is_the_same_order(
    web: HttpStack, capsys: pytest.CaptureFixture[str]
) -> None:
    no = new_order()
    deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=30)
    argv = ["create", "--order-no", no, "--amount", "100", "--currency", "USD"]
    at = ["--expires-at", deadline.astimezone(timezone(timedelta(hours=8))).isoformat()]
    code, out, err = await run(web, capsys, *argv, *at, "--json")
    assert (code, err) == (0, "")
    first = json.loads(out)
    assert first["created"] is True
    assert datetime.fromisoformat(first["expires_at"]) == deadline
    code, out, _ = await run(web, capsys, *argv, *at, "--json")
    again = json.loads(out)
    assert code == 0 and again["created"] is False and again["expires_at"] == first["expires_at"]
    order = await web.wait_order(first["pay_order_no"], lambda o: o["workflow"] is not None)
    assert datetime.fromisoformat(order["workflow"]["expires_at"]) == deadline


@pytest.mark.slow
async def test_refusals_change_nothing(
    web: HttpStack, dev_env: WorkflowEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await web.counts()
    for extra in (
        ["--expires-in", "0s"],
        ["--expires-in", "-5m"],
        ["--expires-in", "8d"],
        ["--expires-at", "2026-12-01T11:00:00"],
        ["--expires-at", _in(-timedelta(hours=1))],
        ["--expires-at", _in(timedelta(days=8))],
        ["--expires-in", "15m", "--expires-at", _in(timedelta(hours=1))],
    ):
        no = new_order()
        refusal(
            ["create", "--order-no", no, "--amount", "100", "--currency", "USD", *extra], capsys
        )
        await assert_no_workflow(dev_env, no)
    assert await web.counts() == before


@pytest.mark.slow
async def test_a_422_reaches_the_user_with_its_field_and_rule(
    web: HttpStack, dev_env: WorkflowEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the service refuses and the CLI let through (an older CLI, another clock)."""
    no = new_order()
    args = parse(["create", "--order-no", no, "--amount", "100", "--currency", "USD"])
    args.expires_in = timedelta(0)  # past the CLI's own check
    before = await web.counts()
    capsys.readouterr()
    assert await cli.execute(args, web.settings) == 2
    assert capsys.readouterr().err == (
        "payorders create: error: expires_in_s: Input should be greater than 0\n"
    )
    await assert_no_workflow(dev_env, no)
    assert await web.counts() == before


@pytest.mark.slow
async def test_status_of_an_open_order_says_its_trade_is_open(
    web: HttpStack, capsys: pytest.CaptureFixture[str]
) -> None:
    no = new_order()
    await run(web, capsys, "create", "--order-no", no, "--amount", "100", "--currency", "USD")
    code, out, _ = await run(web, capsys, "status", f"po_{no}")
    assert code == 0
    gateway = next(line for line in out.splitlines() if line.startswith("gateway"))
    assert "trade open (not paid, not closed), captured 0" in gateway
    assert "None" not in out
    assert "0 repeated notification(s) of a known txn" in out


@pytest.mark.slow
async def test_notify_says_whether_the_event_and_the_transaction_were_known(
    web: HttpStack, capsys: pytest.CaptureFixture[str]
) -> None:
    no = new_order()
    await run(web, capsys, "create", "--order-no", no, "--amount", "300", "--currency", "USD")
    # The gateway's own webhook waits, so that ours is the first news of the capture.
    await web.gateway.set_faults(f"po_{no}", webhook_delay_ms=1_500)
    capture = await web.gateway.pay(pay_order_no=f"po_{no}", amount=300, currency="USD")
    notify = ["notify", f"po_{no}", "--txn-id", capture["txn_id"], "--amount", "300"]
    code, out, _ = await run(web, capsys, *notify, "--currency", "USD", "--json")
    assert code == 0
    assert json.loads(out) == {
        "received": True,
        "outcome": "SIGNALLED",
        "event_duplicate": False,
        "txn_already_recorded": False,
    }
    # The gateway's delayed webhook: a new event of a transaction the order now has.
    order = await web.wait_order(
        f"po_{no}", lambda o: (o["workflow"] or {}).get("duplicate_notifications") == 1
    )
    assert order["status"] == "PAY_SUCCESS" and len(order["payments"]) == 1
    # A replay by hand now: a new event again, of a recorded transaction.
    code, out, _ = await run(web, capsys, *notify, "--currency", "USD")
    assert code == 0
    assert out.splitlines() == [
        "received                           True",
        "outcome                            SIGNALLED",
        "webhook event seen before          False",
        "txn already recorded on the order  True",
    ]
    order = await web.wait_order(
        f"po_{no}", lambda o: (o["workflow"] or {}).get("duplicate_notifications") == 2
    )
    assert len(order["payments"]) == 1


@pytest.mark.slow
async def test_a_shop_refunds_by_the_cli_and_status_lists_the_refunds(
    web: HttpStack, capsys: pytest.CaptureFixture[str]
) -> None:
    no = new_order()
    await run(web, capsys, "create", "--order-no", no, "--amount", "1000", "--currency", "USD")
    await web.gateway.pay(pay_order_no=f"po_{no}", amount=1000, currency="USD")
    await web.wait_order(f"po_{no}", lambda o: o["status"] == "PAY_SUCCESS")
    key = f"r-{uuid.uuid4().hex[:8]}"
    refund = ["refund", f"po_{no}", "--amount", "300", "--refund-no", key]
    code, out, err = await run(web, capsys, *refund, "--reason", "returned", "--wait", "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert (doc["status"], doc["amount"], doc["created"]) == ("REFUND_SUCCESS", 300, True)
    assert doc["gateway_refund_id"] and doc["reason"] == "returned"
    # The same key again: the same refund, nothing more moved.
    code, out, _ = await run(web, capsys, *refund, "--reason", "returned")
    assert code == 0
    assert "REFUND_SUCCESS (asked before: nothing more moved)" in out
    # More than is left: the service's refusal, naming what is refundable; nothing written.
    code, _, err = await run(
        web, capsys, "refund", f"po_{no}", "--amount", "701", "--refund-no", f"{key}-b"
    )
    assert code == 2 and "at most 700" in err
    code, out, _ = await run(web, capsys, "status", f"po_{no}")
    assert code == 0
    merchant = next(line for line in out.splitlines() if line.startswith("merchant refunds"))
    assert merchant.endswith(" refunded 300, 0 in flight, refundable 700")
    row = next(line for line in out.splitlines() if line.startswith(key))
    assert row.split()[:5] == [key, "300", "USD", "REFUND_SUCCESS", "api"]
    code, out, _ = await run(web, capsys, "status", f"po_{no}", "--json")
    listed = json.loads(out)["merchant_refunds"]
    assert [(r["refund_no"], r["status"]) for r in listed] == [(key, "REFUND_SUCCESS")]
    ledger = await web.gateway.ledger(f"po_{no}")
    assert ledger["refunded"] == 300 and len(ledger["refunds"]) == 1

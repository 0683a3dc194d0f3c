"""The reduced torture CI runs: 200 orders with racing payments, duplicates, wrong amounts,
late payments, gateway faults and merchant refunds (in parts, duplicated, racing for what is
left and racing late payments), on a scaled-out private stack (3 workers, each with an
order-events relay, and 2 API processes) where a worker is SIGKILLed while the others carry
on, an API process as a webhook arrives, a worker whose relay is mid-delivery, and
PostgreSQL is restarted; verified from the database, the gateway's ledger and what the
order service received.

The private stack runs with the variables of another stack exported (the lines
``payorders dev`` prints), pointing at closed ports: it must use only its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from payorders.localstack.stack import DEV_WORKER_DEFAULTS, DevStack
from payorders.tools.torture import ChaosPlan, run_chaos_torture

# Another stack's banner exports, plus a token and a tuning value set in the shell. Port 1
# on loopback is closed: anything that reaches for these fails at once.
OTHER_STACK = {
    "TEMPORAL_ADDRESS": "127.0.0.1:1",
    "TEMPORAL_NAMESPACE": "other-namespace",
    "PAYORDERS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/other",
    "PAYORDERS_TEMPORAL_UI_URL": "http://127.0.0.1:1",
    "PAYORDERS_API_URL": "http://127.0.0.1:1",
    "PAYORDERS_GATEWAY_URL": "http://127.0.0.1:1",
    "PAYORDERS_WEBHOOK_URL": "http://127.0.0.1:1/v1/webhooks/gateway",
    "PAYORDERS_WORKER_METRICS_ADDRESS": "127.0.0.1:1",
    "PAYORDERS_DATA_DIR": "/nonexistent/other-data",
    "PAYORDERS_API_TOKEN": "other-token",
    "PAYORDERS_GATEWAY_CLIENT_TIMEOUT_MS": "60000",
}


@pytest.fixture
def other_stack_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in OTHER_STACK.items():
        monkeypatch.setenv(name, value)


def test_a_private_stack_ignores_another_stacks_variables(
    other_stack_exported: None, tmp_path: Path
) -> None:
    stack = DevStack.private(tmp_path / "data")
    stack.database_url = "postgresql://postgres@/payorders?host=/private"  # set by start()
    s = stack.client_settings()
    assert s.temporal_address == stack.temporal_address != "127.0.0.1:1"
    assert s.temporal_namespace == "default"
    assert s.temporal_ui_url == stack.ui_url
    assert s.database_url == stack.database_url
    assert s.api_url == stack.api_url
    assert s.gateway_url == stack.gateway_url
    assert s.webhook_url == f"{stack.api_url}/v1/webhooks/gateway"
    assert s.worker_metrics_address == stack.worker_metrics_address
    assert s.data_dir == tmp_path / "data"
    # Its own generated token, the one its API knows by hash.
    assert s.api_token is not None
    assert s.api_token.get_secret_value() == stack.secrets["PAYORDERS_API_TOKEN"]
    assert stack.secrets["PAYORDERS_API_TOKEN"] not in stack.child_env().values()
    assert s.gateway_client_timeout_ms == int(
        DEV_WORKER_DEFAULTS["PAYORDERS_GATEWAY_CLIENT_TIMEOUT_MS"]
    )
    # Its children see the same: none of the other stack's values reaches them.
    env = stack.child_env()
    assert set(OTHER_STACK.values()).isdisjoint(env.values())
    assert "PAYORDERS_API_TOKEN" not in env
    assert env["TEMPORAL_ADDRESS"] == stack.temporal_address
    assert env["PAYORDERS_DATABASE_URL"] == stack.database_url


def test_a_private_stack_takes_the_tuning_it_is_given(
    other_stack_exported: None, tmp_path: Path
) -> None:
    stack = DevStack.private(tmp_path, tuning={"PAYORDERS_RECONCILE_EVERY_S": "86400"})
    assert stack.client_settings().reconcile_every_s == 86400
    assert stack.child_env()["PAYORDERS_RECONCILE_EVERY_S"] == "86400"


def test_a_private_stack_runs_the_workers_and_api_processes_it_is_asked_for(
    tmp_path: Path,
) -> None:
    stack = DevStack.private(tmp_path, workers=3, api_processes=2)
    assert stack.group("worker") == ["worker", "worker-2", "worker-3"]
    assert stack.group("api") == ["api", "api-2"]
    addresses = [
        stack.children[n].env["PAYORDERS_WORKER_METRICS_ADDRESS"] for n in stack.group("worker")
    ]
    assert len(set(addresses)) == 3 and addresses[0] == stack.worker_metrics_address
    banner = stack.banner()
    assert re.search(r"workers +3 \(worker, worker-2, worker-3\)", banner), banner
    assert re.search(r"API processes +2 \(api, api-2\) on the one port", banner), banner
    assert re.search(r"worker-3 metrics +http://", banner), banner


@pytest.mark.parametrize("count", [0, 17, -1, True])
def test_a_stack_refuses_a_count_of_processes_out_of_range(tmp_path: Path, count: int) -> None:
    with pytest.raises(ValueError, match="workers must be a whole number from 1 to 16"):
        DevStack.private(tmp_path, workers=count)
    with pytest.raises(ValueError, match="api_processes must be a whole number from 1 to 16"):
        DevStack.private(tmp_path, api_processes=count)


@pytest.mark.slow
async def test_scaled_out_torture_with_worker_api_and_relay_kills_loses_nothing(
    other_stack_exported: None,
) -> None:
    lines: list[str] = []
    code = await run_chaos_torture(
        ChaosPlan(
            worker_kills=1,
            api_kills=1,
            relay_kills=1,
            temporal_restarts=0,
            postgres_restarts=1,
            gateway_pauses=0,
        ),
        workers=3,
        api_processes=2,
        orders=200,
        expires_in_s=6,
        seed=7,
        settle_within_s=240,
        out=lines.append,
    )
    report = "\n".join(lines)
    print(report)
    assert code == 0, report
    assert "VIOLATION" not in report
    assert re.search(r"^violations +0$", report, re.MULTILINE), report
    assert re.search(r"chaos: kill worker(-\d)? \(SIGKILL; 2 other worker\(s\) carry on\)", report)
    assert re.search(r"chaos: kill api(-\d)? \(SIGKILL\) as webhooks arrive", report)
    assert re.search(
        r"chaos: kill worker(-\d)?'s order-events relay \(SIGKILL\) mid-delivery", report
    )
    assert "chaos: restart PostgreSQL" in report
    assert "probe orders (one after each fault)" in report
    assert "order events: outbox / acknowledged / taken by the order service" in report
    # Merchant refunds went out, each once: the gateway's ledger and our rows agree.
    merchant = re.search(
        r"^merchant refunded: at the gateway / recorded \(minor units\) +(\d+) / (\d+)$",
        report,
        re.MULTILINE,
    )
    assert merchant and int(merchant[1]) == int(merchant[2]) > 0, report
    assert re.search(r"^merchant refund requests: refused \(422 exceeds_refundable\) +\d+$",
                     report, re.MULTILINE), report  # fmt: skip

"""The reduced torture CI runs: 200 orders with racing payments, duplicates, wrong amounts,
late payments and gateway faults, on a private stack whose worker is SIGKILLed and whose
PostgreSQL is restarted mid-storm; verified from the database and the gateway's ledger.

The private stack runs with the variables of another stack exported (the lines
``payorders dev`` prints), pointing at closed ports: it must use only its own."""

from __future__ import annotations

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
    assert s.api_token.get_secret_value() == "dev-api-token"  # what its API expects
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


@pytest.mark.slow
async def test_reduced_torture_with_a_worker_kill_and_a_postgres_restart_loses_nothing(
    other_stack_exported: None,
) -> None:
    lines: list[str] = []
    code = await run_chaos_torture(
        ChaosPlan(worker_kills=1, temporal_restarts=0, postgres_restarts=1, gateway_pauses=0),
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
    assert "chaos: kill the worker (SIGKILL)" in report
    assert "chaos: restart PostgreSQL" in report

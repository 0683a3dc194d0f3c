"""The reduced torture CI runs: 200 orders with racing payments, duplicates, wrong amounts,
late payments and gateway faults, on a private stack whose worker is SIGKILLed and whose
PostgreSQL is restarted mid-storm; verified from the database and the gateway's ledger."""

from __future__ import annotations

import pytest

from payorders.core.settings import Settings
from payorders.tools.torture import ChaosPlan, run_chaos_torture

pytestmark = pytest.mark.slow


async def test_reduced_torture_with_a_worker_kill_and_a_postgres_restart_loses_nothing() -> None:
    lines: list[str] = []
    code = await run_chaos_torture(
        Settings(),
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

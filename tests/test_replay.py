"""Replay saved histories against today's workflow code.

A change that would break running pay orders (reordered commands, a timer added or
removed without ``workflow.patched``) fails here. Refresh the files with
``PAYORDERS_RECORD_HISTORIES=1 pytest tests/test_integration.py -k histories``
only when a change is meant to be incompatible and no old run can still be open.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.late_refund import LateRefundWorkflow
from workflows.pay_order import PayOrderWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_cover_every_saved_path() -> None:
    assert {p.stem for p in HISTORIES} >= {"paid", "expired", "late_refund"}


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_saved_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(f"replay-{path.stem}", path.read_text())
    replayer = Replayer(
        workflows=[PayOrderWorkflow, LateRefundWorkflow], data_converter=pydantic_data_converter
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure

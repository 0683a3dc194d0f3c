"""Replay saved histories against today's workflow code.

A change that would break running pay orders (reordered commands, a timer added or
removed without ``workflow.patched``) fails here. Refresh the files with
``PAYORDERS_RECORD_HISTORIES=1 pytest tests/integration/test_integration.py -k histories``
only when a change is meant to be incompatible and no old run can still be open.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from payorders.core.models import PayOrderInput, PayOrderResult
from workflows.late_refund import LateRefundWorkflow
from workflows.pay_order import PayOrderWorkflow

HISTORIES = sorted((Path(__file__).resolve().parents[1] / "histories").rglob("*.json"))


def test_histories_cover_every_saved_path() -> None:
    from ..integration.test_integration import HISTORY_PATHS

    assert {p.stem for p in HISTORIES} >= set(HISTORY_PATHS)


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_saved_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(f"replay-{path.stem}", path.read_text())
    replayer = Replayer(
        workflows=[PayOrderWorkflow, LateRefundWorkflow], data_converter=pydantic_data_converter
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure


# --- a worked example of changing the workflow safely -----------------------------------------
#
# Say we want the workflow to wait a second before it creates its row. Pay orders already
# running were recorded without that timer; replaying them through the new code would meet
# a timer their history does not have, and fail. workflow.patched() makes the change only for
# workflows that reach it for the first time (it writes a marker in their history); running
# ones replay the old way. When no run without the marker can be open any more, replace the
# patched() branch with workflow.deprecate_patch(...), and later remove that too.


@workflow.defn(name="PayOrderWorkflow", sandboxed=False)
class UnguardedChange(PayOrderWorkflow):
    @workflow.run
    async def run(self, input: PayOrderInput) -> PayOrderResult:
        await workflow.sleep(timedelta(seconds=1))
        return await super().run(input)


@workflow.defn(name="PayOrderWorkflow", sandboxed=False)
class PatchedChange(PayOrderWorkflow):
    @workflow.run
    async def run(self, input: PayOrderInput) -> PayOrderResult:
        if workflow.patched("wait-before-create"):
            await workflow.sleep(timedelta(seconds=1))
        return await super().run(input)


@pytest.mark.parametrize(("change", "replays"), [(UnguardedChange, False), (PatchedChange, True)])
async def test_a_change_replays_only_behind_workflow_patched(change: type, replays: bool) -> None:
    path = next(p for p in HISTORIES if p.stem == "paid")
    history = WorkflowHistory.from_json("replay-paid", path.read_text())
    replayer = Replayer(workflows=[change], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert (result.replay_failure is None) is replays, result.replay_failure

"""The benchmarks' ceiling runs as the product does: the trivial-workflow worker and the
pay-order worker take their runner, pollers and cache from one function of the same
settings, so the ratios the benchmarks report compare like with like."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from temporalio import workflow
from temporalio.worker import UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

import worker
from bench import _trivial_worker
from payorders.core.settings import Settings
from payorders.runtime import Resources

TUNING = (
    "workflow_runner",
    "workflow_task_poller_behavior",
    "activity_task_poller_behavior",
    "max_cached_workflows",
)


def _arguments(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> dict[str, Any]:
    """What ``module`` passes to ``Worker(...)`` (recorded, no server needed)."""
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(module, "Worker", lambda client, **kwargs: seen.append(kwargs))
    return seen


def _tuning_of_both(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> tuple[dict[str, Any], dict[str, Any]]:
    product = _arguments(monkeypatch, worker)
    ceiling = _arguments(monkeypatch, _trivial_worker)
    # Nothing is called on the resources while a worker is built: no database, no gateway.
    res = Resources(settings=settings, pool=None, store=None, gateway=None)  # type: ignore[arg-type]
    worker.build_worker(None, res, task_queue="q")  # type: ignore[arg-type]
    _trivial_worker.build_trivial_worker(None, settings)  # type: ignore[arg-type]
    [p], [c] = product, ceiling
    return {k: p[k] for k in TUNING}, {k: c[k] for k in TUNING}


def _settings(*, sandbox: bool) -> Settings:
    return Settings(
        workflow_sandbox=sandbox,
        worker_workflow_task_pollers=17,
        worker_activity_task_pollers=3,
        worker_max_cached_workflows=123,
    )


@pytest.mark.parametrize("sandbox", [True, False])
def test_the_ceiling_worker_gets_the_pay_order_workers_tuning(
    monkeypatch: pytest.MonkeyPatch, sandbox: bool
) -> None:
    product, ceiling = _tuning_of_both(monkeypatch, _settings(sandbox=sandbox))
    runner = SandboxedWorkflowRunner if sandbox else UnsandboxedWorkflowRunner
    assert type(product.pop("workflow_runner")) is runner
    assert type(ceiling.pop("workflow_runner")) is runner
    assert product == ceiling
    assert product["workflow_task_poller_behavior"].maximum == 17
    assert product["activity_task_poller_behavior"].maximum == 3
    assert product["max_cached_workflows"] == 123


def test_flipping_the_sandbox_setting_flips_both_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    on = _tuning_of_both(monkeypatch, _settings(sandbox=True))
    off = _tuning_of_both(monkeypatch, _settings(sandbox=False))
    assert [type(t["workflow_runner"]) for t in on] == [SandboxedWorkflowRunner] * 2
    assert [type(t["workflow_runner"]) for t in off] == [UnsandboxedWorkflowRunner] * 2


def test_the_trivial_workflow_takes_the_runner_of_its_worker() -> None:
    # A per-workflow ``sandboxed=False`` would run it unsandboxed whatever the setting says.
    assert workflow._Definition.must_from_class(_trivial_worker.TrivialWorkflow).sandboxed


async def test_the_trivial_workflow_passes_the_sandboxs_checks() -> None:
    # Its module imports everything else through the pass-through block, as workflows/ do,
    # so a sandboxed ceiling re-imports only that small module per run.
    defn = workflow._Definition.must_from_class(_trivial_worker.TrivialWorkflow)
    SandboxedWorkflowRunner().prepare_workflow(defn)

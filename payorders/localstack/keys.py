"""Key material the local stack makes for its local gateways: RSA-2048 pairs and secrets in
its data directory, readable by their owner only, made at the first start and kept across
restarts, so no two stacks share one and no key has a default."""

from __future__ import annotations

import os
from pathlib import Path

from Cryptodome.PublicKey import RSA

KEY_BITS = 2048
"""What Alipay's RSA2 and WeChat Pay's WECHATPAY2-SHA256-RSA2048 ask of a key."""


def private_folder(path: Path) -> Path:
    """``path``, made if missing, owner-only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def key_pair(private: Path, public: Path) -> None:
    """Make and save an RSA key pair unless both halves exist (PKCS#8 private, SPKI public)."""
    if private.exists() and public.exists():
        return
    key = RSA.generate(KEY_BITS)
    write_secret(public, key.publickey().export_key().decode())
    write_secret(private, key.export_key(pkcs=8).decode())


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` owner-only, whole or not at all."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)

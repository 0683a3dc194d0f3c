"""The local stack's two RSA key pairs for Alipay: the app's (it signs our requests; the
local Alipay verifies them with its public half) and the local Alipay's own (it signs its
answers and notifications; our adapter verifies them with its public half). Made at the
stack's first start in its data directory, readable by their owner only, and kept across
restarts, so no two stacks share one and no key has a default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from payorders.localstack.keys import key_pair, private_folder

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
    folder = private_folder(data_dir / "alipay")
    files = KeyFiles(
        app_private=folder / "app_private.pem",
        app_public=folder / "app_public.pem",
        alipay_private=folder / "alipay_private.pem",
        alipay_public=folder / "alipay_public.pem",
    )
    key_pair(files.app_private, files.app_public)
    key_pair(files.alipay_private, files.alipay_public)
    return files

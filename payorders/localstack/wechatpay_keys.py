"""The local stack's key material for WeChat Pay (API v3, "WeChat Pay public key" mode):
the merchant's RSA key pair (it signs our requests; the local WeChat Pay verifies them
with its public half, known by the merchant certificate's serial number), the local
WeChat Pay's own pair (it signs answers and callbacks; our adapter verifies them with its
public half, known by its public key id), and the merchant's APIv3 key (32 bytes: the
callbacks' AEAD_AES_256_GCM key). Made at the stack's first start in its data directory,
owner-only, kept across restarts."""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from payorders.localstack.keys import key_pair, private_folder, write_secret

MCHID = "1900000109"
"""The local stack's merchant id: 10 digits, the shape of WeChat Pay's."""
APPID = "wx0000000000000000"
"""The app id its trades are made for: ``wx`` and 16 more, the shape of WeChat's."""
APIV3_ALPHABET = string.ascii_letters + string.digits
APIV3_LENGTH = 32


@dataclass(frozen=True)
class Material:
    merchant_private: Path
    merchant_public: Path
    wechatpay_private: Path
    wechatpay_public: Path
    apiv3_key: str
    merchant_serial_no: str
    """Stands for the merchant API certificate's serial number: 40 hex digits of the key."""
    public_key_id: str
    """``PUB_KEY_ID_`` and hex digits of the local WeChat Pay's public key."""


def material(data_dir: Path) -> Material:
    """The stack's WeChat Pay key material, each part made and saved first if missing."""
    folder = private_folder(data_dir / "wechatpay")
    merchant_private, merchant_public = (
        folder / "merchant_private.pem",
        folder / "merchant_public.pem",
    )
    platform_private, platform_public = (
        folder / "wechatpay_private.pem",
        folder / "wechatpay_public.pem",
    )
    key_pair(merchant_private, merchant_public)
    key_pair(platform_private, platform_public)
    apiv3 = folder / "apiv3_key"
    if not apiv3.exists():
        write_secret(apiv3, "".join(secrets.choice(APIV3_ALPHABET) for _ in range(APIV3_LENGTH)))
    return Material(
        merchant_private=merchant_private,
        merchant_public=merchant_public,
        wechatpay_private=platform_private,
        wechatpay_public=platform_public,
        apiv3_key=apiv3.read_text(),
        merchant_serial_no=_digest(merchant_public)[:40].upper(),
        public_key_id=f"PUB_KEY_ID_{_digest(platform_public)[:32].upper()}",
    )


def _digest(public: Path) -> str:
    return hashlib.sha256(public.read_bytes()).hexdigest()

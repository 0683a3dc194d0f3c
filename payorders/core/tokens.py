"""API tokens with scopes: who a bearer token is and what it may do.

The service keeps each token's SHA-256, never the token itself (a clear ``token`` is taken
for development and hashed at once). A presented token is hashed and compared with every
known hash in constant time, so neither the answer nor its timing says which tokens exist.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class Scope(StrEnum):
    """What a token may do. ``admin`` includes every other scope."""

    CHECKOUT = "checkout"
    """Create and cancel pay orders, read one."""
    READ = "read"
    """Every read (``GET``), the event feed among them."""
    REFUND = "refund"
    """Every route that moves money out (operator refunds, merchant refunds)."""
    ADMIN = "admin"


TOKEN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$"


class TokenSpec(BaseModel):
    """One entry of ``PAYORDERS_API_TOKENS``: a name, its scopes, and the token's SHA-256
    in hex (``sha256``) or, for development, the token in clear (``token``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=TOKEN_NAME)]
    """Who holds it (``checkout-eu``, ``support-tool``): written to the access log and to
    the rows its requests write, never the token."""
    scopes: Annotated[frozenset[Scope], Field(min_length=1)]
    sha256: Annotated[str | None, Field(pattern=r"^[0-9a-fA-F]{64}$")] = None
    token: SecretStr | None = None

    @model_validator(mode="after")
    def _one_form(self) -> TokenSpec:
        if (self.sha256 is None) == (self.token is None):
            raise ValueError(f"token {self.name!r}: give exactly one of sha256 and token")
        return self

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.token is not None
        return token_digest(self.token.get_secret_value())


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Caller:
    """Who made a request: the token's name and scopes."""

    name: str
    scopes: frozenset[Scope]

    def may(self, allowed: frozenset[Scope]) -> bool:
        """Whether the caller holds one of ``allowed`` (``admin`` holds them all)."""
        return Scope.ADMIN in self.scopes or bool(self.scopes & allowed)


class TokenBook:
    """The known tokens, by hash.

    Raises:
        ValueError: two entries with one name, or one token given twice.
    """

    def __init__(self, specs: list[TokenSpec]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("api tokens: every token needs a name of its own")
        self._entries = [(s.digest(), Caller(s.name, s.scopes)) for s in specs]
        if len({d for d, _ in self._entries}) != len(self._entries):
            raise ValueError("api tokens: the same token is listed twice")

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, token: str) -> Caller | None:
        """The caller a token belongs to, or None; every entry is compared, in constant
        time, whatever matches."""
        given = token_digest(token)
        found: Caller | None = None
        for digest, caller in self._entries:
            if hmac.compare_digest(given, digest):
                found = caller
        return found

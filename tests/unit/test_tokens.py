"""API tokens (``payorders.core.tokens``): who a bearer token is and what it may do. Pure:
no server, no fixtures."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from payorders.core.tokens import Caller, Scope, TokenBook, TokenSpec

CHECKOUT = "tok-checkout-" + "c" * 24
READ = "tok-read-" + "r" * 24
ADMIN = "tok-admin-" + "a" * 24


def spec(
    name: str, *scopes: Scope, token: str | None = None, sha256: str | None = None
) -> TokenSpec:
    return TokenSpec(name=name, scopes=frozenset(scopes), token=token, sha256=sha256)


def book() -> TokenBook:
    return TokenBook(
        [
            spec("checkout-eu", Scope.CHECKOUT, token=CHECKOUT),
            spec("reader", Scope.READ, sha256=hashlib.sha256(READ.encode()).hexdigest()),
            spec("ops", Scope.ADMIN, token=ADMIN),
        ]
    )


def test_a_clear_token_and_a_hashed_one_are_both_known_by_their_names() -> None:
    tokens = book()
    assert tokens.identify(CHECKOUT) == Caller("checkout-eu", frozenset({Scope.CHECKOUT}))
    assert tokens.identify(READ) == Caller("reader", frozenset({Scope.READ}))
    assert len(tokens) == 3


@pytest.mark.parametrize(
    "token", ["", " ", CHECKOUT + " ", CHECKOUT.upper(), CHECKOUT[:-1], "Bearer " + CHECKOUT]
)
def test_anything_but_a_listed_token_is_nobody(token: str) -> None:
    assert book().identify(token) is None


def test_a_hash_in_upper_case_hex_is_the_same_token() -> None:
    upper = hashlib.sha256(READ.encode()).hexdigest().upper()
    assert TokenBook([spec("reader", Scope.READ, sha256=upper)]).identify(READ) is not None


def test_two_tokens_with_one_scope_both_work_while_one_replaces_the_other() -> None:
    new, old = "tok-new-" + "n" * 24, "tok-old-" + "o" * 24
    tokens = TokenBook(
        [
            spec("checkout-2", Scope.CHECKOUT, token=new),
            spec("checkout-1", Scope.CHECKOUT, token=old),
        ]
    )
    assert [tokens.identify(t) for t in (new, old)] == [
        Caller("checkout-2", frozenset({Scope.CHECKOUT})),
        Caller("checkout-1", frozenset({Scope.CHECKOUT})),
    ]


def test_a_caller_may_what_one_of_its_scopes_allows_and_admin_may_everything() -> None:
    checkout = Caller("c", frozenset({Scope.CHECKOUT}))
    reader = Caller("r", frozenset({Scope.READ}))
    admin = Caller("a", frozenset({Scope.ADMIN}))
    both = Caller("b", frozenset({Scope.READ, Scope.REFUND}))
    assert checkout.may(frozenset({Scope.CHECKOUT, Scope.READ}))
    assert not checkout.may(frozenset({Scope.READ}))
    assert not reader.may(frozenset({Scope.REFUND}))
    assert both.may(frozenset({Scope.REFUND})) and both.may(frozenset({Scope.READ}))
    assert not both.may(frozenset({Scope.CHECKOUT}))
    for allowed in (Scope.CHECKOUT, Scope.READ, Scope.REFUND, Scope.ADMIN):
        assert admin.may(frozenset({allowed}))
    assert not checkout.may(frozenset({Scope.ADMIN}))


def test_a_book_refuses_one_name_twice_and_one_token_twice() -> None:
    with pytest.raises(ValueError, match="name of its own"):
        TokenBook([spec("a", Scope.READ, token=READ), spec("a", Scope.CHECKOUT, token=CHECKOUT)])
    hashed = hashlib.sha256(READ.encode()).hexdigest()
    with pytest.raises(ValueError, match="listed twice"):
        TokenBook([spec("a", Scope.READ, token=READ), spec("b", Scope.ADMIN, sha256=hashed)])


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"name": "a", "scopes": ["read"]}, "exactly one of sha256 and token"),
        (
            {"name": "a", "scopes": ["read"], "token": READ, "sha256": "0" * 64},
            "exactly one of sha256 and token",
        ),
        ({"name": "a", "scopes": [], "token": READ}, "at least 1"),
        ({"name": "a", "scopes": ["write"], "token": READ}, "checkout"),
        ({"name": "a", "scopes": ["read"], "sha256": "0" * 63}, "pattern"),
        ({"name": "not a name", "scopes": ["read"], "token": READ}, "pattern"),
        ({"name": "a", "scopes": ["read"], "token": READ, "note": "x"}, "Extra inputs"),
    ],
)
def test_a_token_entry_has_a_name_scopes_and_one_form_of_the_token(
    fields: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        TokenSpec.model_validate(fields)


def test_the_entry_keeps_the_clear_token_out_of_its_repr() -> None:
    entry = spec("checkout-eu", Scope.CHECKOUT, token=CHECKOUT)
    assert CHECKOUT not in repr(entry) and CHECKOUT not in str(entry.model_dump())

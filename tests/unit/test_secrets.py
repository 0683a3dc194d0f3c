"""What a process takes as a secret, and which secrets each process needs (pure)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from payorders.core import secrets
from payorders.core.secrets import SecretRefused
from payorders.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
GOOD = "s3cr3t-" + "q" * 30


def settings(**values: object) -> Settings:
    # Every field not given is its default: nothing from the test's environment.
    defaults = {
        n: f.get_default(call_default_factory=True) for n, f in Settings.model_fields.items()
    }
    return Settings(**{**defaults, **values})


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("short-but-random-9f", "shorter than 24 characters"),
        ("change-me", "placeholder"),
        ("CHANGE-ME-" + "x" * 30, "placeholder"),
        ("dev-api-token", "placeholder"),
        ("whsec_dev_only", "placeholder"),
        ("whsec_order_events_dev_only", "placeholder"),
        ("<your-api-token-here-please>", "placeholder"),
        ("an-example-token-that-is-long", "placeholder"),
    ],
)
def test_a_weak_value_is_refused_with_the_reason(value: str, why: str) -> None:
    assert why in (secrets.why_weak(value) or "")
    with pytest.raises(SecretRefused, match=f"^PAYORDERS_X is .*{re.escape(why)}"):
        secrets.check("PAYORDERS_X", value)


def test_a_generated_secret_is_taken_and_never_the_same_twice() -> None:
    a, b = secrets.generate("whsec_"), secrets.generate("whsec_")
    assert a != b and a.startswith("whsec_")
    assert secrets.why_weak(a) is None
    assert secrets.check("PAYORDERS_X", a) == a


def test_an_unset_secret_names_its_variable_and_how_to_make_one() -> None:
    with pytest.raises(SecretRefused, match=r"^PAYORDERS_X is not set: generate a secret"):
        secrets.check("PAYORDERS_X", None)


def test_the_refusal_never_holds_the_value() -> None:
    value = "changeme-" + "z" * 40
    with pytest.raises(SecretRefused) as e:
        secrets.check("PAYORDERS_X", value)
    assert value not in str(e.value)


def test_settings_have_no_default_secret() -> None:
    s = settings()
    assert s.api_token is None and s.api_tokens == []
    assert s.webhook_secrets == [] and s.order_events_secret is None
    assert s.stripe_api_key is None and s.stripe_webhook_secret == []


def test_the_api_needs_a_token_and_the_gateways_webhook_secret() -> None:
    with pytest.raises(SecretRefused, match=r"^PAYORDERS_API_TOKENS is not set"):
        secrets.require(settings(webhook_secrets=[GOOD]), "api")
    with pytest.raises(SecretRefused, match=r"^PAYORDERS_WEBHOOK_SECRETS is not set"):
        secrets.require(settings(api_token=GOOD), "api")
    with pytest.raises(SecretRefused, match=r"^PAYORDERS_WEBHOOK_SECRETS\[1\] is a placeholder"):
        secrets.require(settings(api_token=GOOD, webhook_secrets=[GOOD, "change-me"]), "api")
    with pytest.raises(SecretRefused, match=r"^PAYORDERS_STRIPE_WEBHOOK_SECRET is not set"):
        secrets.require(settings(api_token=GOOD, gateway="stripe"), "api")
    secrets.require(settings(api_token=GOOD, webhook_secrets=[GOOD]), "api")


def test_each_token_entry_is_checked() -> None:
    clear = [{"name": "shop", "scopes": ["checkout"], "token": "change-me"}]
    with pytest.raises(
        SecretRefused, match=r"^PAYORDERS_API_TOKENS\[0\] \(shop\) is a placeholder"
    ):
        secrets.token_book(settings(api_tokens=clear))
    placeholder_hash = hashlib.sha256(b"dev-api-token").hexdigest()
    hashed = [{"name": "shop", "scopes": ["read"], "sha256": placeholder_hash}]
    with pytest.raises(SecretRefused, match="hash of a placeholder"):
        secrets.token_book(settings(api_tokens=hashed))
    twice = [
        {"name": "a", "scopes": ["read"], "token": GOOD},
        {"name": "b", "scopes": ["admin"], "token": GOOD},
    ]
    with pytest.raises(SecretRefused, match="the same token is listed twice"):
        secrets.token_book(settings(api_tokens=twice))


def test_the_deprecated_single_token_is_one_admin_token_beside_the_list() -> None:
    other = "another-" + "r" * 30
    book = secrets.token_book(
        settings(api_token=GOOD, api_tokens=[{"name": "ro", "scopes": ["read"], "token": other}])
    )
    legacy, ro = book.identify(GOOD), book.identify(other)
    assert legacy is not None and legacy.name == "api-token" and [*legacy.scopes] == ["admin"]
    assert ro is not None and ro.name == "ro"
    with pytest.raises(SecretRefused, match=r"^PAYORDERS_API_TOKEN is shorter"):
        secrets.token_book(settings(api_token="x" * 23))


def test_the_worker_needs_the_order_events_secret_only_with_a_relay() -> None:
    secrets.require(settings(), "worker")
    with pytest.raises(SecretRefused, match=r"^PAYORDERS_ORDER_EVENTS_SECRET is not set"):
        secrets.require(settings(order_events_url="http://127.0.0.1:9/events"), "worker")
    secrets.require(
        settings(order_events_url="http://127.0.0.1:9/events", order_events_secret=GOOD), "worker"
    )


def test_no_secret_the_docs_show_is_taken() -> None:
    """A value that stands in the README, the docs or the compose file as an example of a
    secret must be refused: whoever read it knows it."""
    texts = [ROOT / "README.md", ROOT / "docker-compose.yml", *sorted((ROOT / "docs").glob("*.md"))]
    pattern = re.compile(
        r"PAYORDERS_(?:API_TOKEN|WEBHOOK_SECRETS|ORDER_EVENTS_SECRET|STRIPE_WEBHOOK_SECRET)"
        r"[=:]\s*['\"]?([^\s'\"$]+)"
    )
    shown = {m.group(1) for path in texts for m in pattern.finditer(path.read_text())}
    for value in shown:
        if value.startswith("["):
            try:
                values = json.loads(value)
            except ValueError:
                continue
        else:
            values = [value]
        for v in values:
            assert secrets.why_weak(v) is not None, f"the docs show a usable secret: {v!r}"


def test_with_alipay_the_api_and_the_worker_need_the_apps_private_key(tmp_path: Path) -> None:
    token = secrets.generate("pot_")
    for role, base in (("api", {"api_token": token}), ("worker", {})):
        settings = Settings(gateway="alipay", **base)  # type: ignore[arg-type]
        with pytest.raises(SecretRefused, match="PAYORDERS_ALIPAY_PRIVATE_KEY is not set"):
            secrets.require(settings, role)  # type: ignore[arg-type]
        pem = tmp_path / "app.pem"
        pem.write_text("-----BEGIN PRIVATE KEY-----")
        secrets.require(settings.model_copy(update={"alipay_private_key_file": pem}), role)  # type: ignore[arg-type]

"""Static checks of docker-compose.yml and the Dockerfile (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices

from payorders.core import search_attributes as sa
from payorders.core import secrets
from payorders.core.settings import TASK_QUEUE, Settings

ROOT = Path(__file__).resolve().parents[2]
ONE_SHOT = "temporal-create-search-attributes"
CONDITIONS = {"service_healthy", "service_completed_successfully"}


@cache
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


# What an operator sets for the variables Compose requires (``${VAR:?message}``).
REQUIRED = {
    "APP_DB_PASSWORD": "app-db-" + "p" * 24,
    "TEMPORAL_DB_PASSWORD": "temporal-db-" + "p" * 24,
    "PAYORDERS_API_TOKENS": json.dumps(
        [{"name": "checkout", "scopes": ["checkout"], "sha256": "ab" * 32}]
    ),
    "PAYORDERS_WEBHOOK_SECRETS": json.dumps(["whsec_" + "w" * 32]),
}
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*)|(:?\?)([^}]*))?\}")


def interpolate(value: object, given: dict[str, str] = REQUIRED) -> str:
    """Resolve Compose's ``${VAR:-default}``, ``${VAR:?message}`` (from ``given``: Compose
    itself refuses to start without it) and ``$$``, the way it runs with no .env."""

    def resolve(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        if match.group(4) is not None:
            assert name in given, f"{match.group(0)} is required: add {name} to REQUIRED"
            return given[name]
        if match.group(2) is None:
            raise AssertionError(f"{match.group(0)} has no default; give one (${{VAR:-x}})")
        return str(match.group(3))

    return _VARIABLE.sub(resolve, str(value))


def environment(name: str) -> dict[str, str]:
    env = services()[name].get("environment", {})
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: interpolate(value) for key, value in env.items()}


def settings_env_names() -> set[str]:
    """The variables ``Settings`` reads: ``PAYORDERS_<FIELD>``, plus each field's aliases."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = {f"{prefix}{field}".upper() for field in Settings.model_fields}
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
    return names


APP_SERVICES = ["worker", "api", "sandbox-gateway"]


def worker_settings(monkeypatch: pytest.MonkeyPatch, name: str = "worker") -> Settings:
    """The settings an app container starts with: its environment and nothing else."""
    allowed = settings_env_names()
    for key in list(os.environ):
        if key.upper() in allowed:
            monkeypatch.delenv(key)
    for key, value in environment(name).items():
        monkeypatch.setenv(key, value)
    return Settings()


def mounts(name: str) -> dict[str, str]:
    """Source -> target of a service's volumes, short ("src:dst[:mode]") or long form."""
    result: dict[str, str] = {}
    for volume in services()[name].get("volumes", []):
        if isinstance(volume, dict):
            result[volume.get("source", "")] = volume["target"]
        else:
            source, target = str(volume).split(":")[:2]
            result[source] = target
    return result


def dockerfile() -> str:
    build = services()["worker"]["build"]
    if isinstance(build, str):
        build = {"context": build}
    context: str = build.get("context", ".")
    name: str = build.get("dockerfile", "Dockerfile")
    path = (ROOT / context / name).resolve()
    assert path == ROOT / "Dockerfile", f"worker must build from the repo's Dockerfile: {path}"
    return path.read_text()


def instructions(text: str, keyword: str) -> list[str]:
    """Arguments of every ``keyword`` instruction in a Dockerfile, continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [
        line.split(None, 1)[1].strip()
        for line in joined.splitlines()
        if line.strip() and line.split()[0].upper() == keyword
    ]


def test_every_image_is_pinned_to_a_version() -> None:
    for name, service in services().items():
        if "build" in service:
            continue
        image = interpolate(service["image"])
        if "@sha256:" in image:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {image} has no tag"
        # A bare major (postgres:17) or latest moves under us; want at least major.minor.
        assert re.match(r"v?\d+\.\d+", tag), f"{name}: {image} is not pinned to a version"


def test_every_long_running_service_has_a_healthcheck() -> None:
    assert ONE_SHOT in services()
    for name, service in services().items():
        if name == ONE_SHOT:
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"] not in (["NONE"], "NONE"), f"{name} disables its healthcheck"


def test_every_dependency_waits_on_a_condition() -> None:
    for name, service in services().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must be the long form"
        for target, spec in depends.items():
            condition = (spec or {}).get("condition")
            assert condition in CONDITIONS, f"{name} -> {target}: condition {condition!r}"
            assert target in services(), f"{name} depends on unknown {target}"
            if condition == "service_healthy":
                # Compose refuses to start a service waiting on a healthcheck that isn't there.
                assert "healthcheck" in services()[target], f"{target} has no healthcheck"


def test_search_attributes_service_creates_exactly_ours() -> None:
    service = services()[ONE_SHOT]
    script = " ".join(map(str, [service.get("entrypoint", ""), service.get("command", "")]))
    created = re.findall(
        r"search-attribute create --namespace (\S+) --name (\S+) --type (\S+)", script
    )
    expected = sorted((key.name, key.indexed_value_type.name) for key in sa.ALL)
    # The CLI spells types KeywordList where the SDK says KEYWORD_LIST.
    found = sorted((name, kind.upper()) for _, name, kind in created)
    assert found == [(name, kind.replace("_", "")) for name, kind in expected]
    namespace = environment("worker")["TEMPORAL_NAMESPACE"]
    assert {ns for ns, _, _ in created} == {namespace}, "not the worker's namespace"
    assert service["depends_on"]["temporal"]["condition"] == "service_healthy"
    assert (
        services()["worker"]["depends_on"][ONE_SHOT]["condition"]
        == "service_completed_successfully"
    )


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_get_only_settings_variables(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    env = environment(name)
    unread = sorted(set(env) - settings_env_names())
    assert not unread, f"Settings never reads {unread}"
    assert "PAYORDERS_DATABASE_URL" in env

    settings = worker_settings(monkeypatch, name)  # validates the values, too
    assert settings.task_queue == TASK_QUEUE
    assert settings.database_url is not None
    # Each app service waits, healthy, for each server it connects to.
    hosts = {urlsplit(settings.database_url).hostname}
    if name != "sandbox-gateway":
        hosts |= {settings.temporal_address.split(":")[0], urlsplit(settings.gateway_url).hostname}
    for host in hosts:
        assert host in services(), f"{name} connects to {host}, which is not a service"
        assert services()[name]["depends_on"][host]["condition"] == "service_healthy"
    assert settings.temporal_namespace == environment("temporal")["DEFAULT_NAMESPACE"]
    if name == "api":
        secrets.require(settings, "api")  # the operator's values pass the API's own checks


def test_the_api_and_gateway_run_the_project_apps() -> None:
    assert "payorders.service.app:app" in services()["api"]["command"]
    assert "payorders.sandbox.app:app" in services()["sandbox-gateway"]["command"]
    for name in ("api", "sandbox-gateway"):
        assert services()[name]["build"] == services()["worker"]["build"]


def test_the_api_keeps_idle_connections_longer_than_a_load_balancer_does() -> None:
    # A backend that closes an idle connection first makes the proxy answer 502.
    cmd = [str(c) for c in services()["api"]["command"]]
    assert "--timeout-keep-alive" in cmd, cmd
    assert int(cmd[cmd.index("--timeout-keep-alive") + 1]) > 60


def test_worker_is_built_from_the_repo_dockerfile() -> None:
    text = dockerfile()
    cmd = instructions(text, "CMD")
    assert cmd, "Dockerfile has no CMD"
    assert "worker.py" in json.loads(cmd[-1]), f"CMD does not run worker.py: {cmd[-1]}"
    assert services()["worker"].get("command", ["python", "worker.py"]) == ["python", "worker.py"]
    base = instructions(text, "FROM")[-1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim\S*", base), f"unpinned base image {base}"
    user = instructions(text, "USER")
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the worker must not run as root"
    # A healthcheck script has to be in the image, or the worker is never healthy.
    for arg in services()["worker"]["healthcheck"]["test"]:
        if str(arg).endswith(".py") and arg != "worker.py":
            assert (ROOT / arg).is_file(), arg
            assert any(arg in copy for copy in instructions(text, "COPY")), f"{arg} not copied"


def test_temporal_persists_in_its_own_postgres() -> None:
    env = environment("temporal")
    assert "postgres" in env["DB"], env["DB"]
    assert env["POSTGRES_SEEDS"] == "temporal-db"
    assert services()["temporal"]["depends_on"]["temporal-db"]["condition"] == "service_healthy"
    assert interpolate(services()["temporal-db"]["image"]).startswith("postgres:")
    # The dynamic config the server reads is this repo's file, mounted where the env says.
    path = env["DYNAMIC_CONFIG_FILE_PATH"]
    sources = [src for src, dst in mounts("temporal").items() if dst == path]
    assert sources, f"nothing is mounted at {path}"
    assert isinstance(yaml.safe_load((ROOT / sources[0]).read_text()), dict)


@pytest.mark.parametrize("name", ["app-db", "temporal-db"])
def test_databases_keep_their_data_in_named_volumes(name: str) -> None:
    declared = yaml.safe_load((ROOT / "docker-compose.yml").read_text()).get("volumes") or {}
    assert set(mounts(name)) & set(declared), f"{name} has no named volume"


def test_workers_and_api_processes_scale_out() -> None:
    # Several workers share the task queue (and, with order events, the relay's queue).
    assert services()["worker"]["deploy"]["replicas"] >= 2
    assert services()["api"]["deploy"]["replicas"] >= 1
    # uvicorn's own supervisor runs the API processes, as many as API_PROCESSES says.
    cmd = [str(c) for c in services()["api"]["command"]]
    assert "--workers" in cmd, cmd
    processes = cmd[cmd.index("--workers") + 1]
    assert "${API_PROCESSES:-" in processes, "the count comes from API_PROCESSES"
    assert int(interpolate(processes)) >= 1


SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "PWD", "API_KEY")


def test_no_secret_has_a_default_compose_refuses_without_it() -> None:
    """Every variable that carries a secret is ``${VAR:?message}`` (Compose refuses to
    start, naming it) or, for an optional one, empty by default: none has a value."""
    text = (ROOT / "docker-compose.yml").read_text()
    for match in _VARIABLE.finditer(text):
        name = match.group(1)
        if name is None or not any(word in name for word in SECRET_WORDS):
            continue
        if match.group(4) is not None:
            assert name in (match.group(5) or ""), f"{match.group(0)}: the message names it"
        else:
            assert match.group(2) is not None and match.group(3) == "", (
                f"{match.group(0)} gives a secret a default"
            )
    for name in ("APP_DB_PASSWORD", "TEMPORAL_DB_PASSWORD", "PAYORDERS_API_TOKENS"):
        assert f"${{{name}:?" in text, f"{name} must be required"

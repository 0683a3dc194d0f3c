"""Scoped API tokens over real HTTP (DESIGN.md "Who may do what"): every route against a
token of each scope, allowed or a 403 naming the scope; every way of not having a valid
token one identical 401; tokens kept by hash and in clear, two of one scope (rotation);
the cancel and the operator refund record the token's name. One stack for the module: the
API, the sandbox gateway and a worker on a real Temporal dev server and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from payorders.core.tokens import Scope
from payorders.localstack import postgres as embedded

from ..http_stack import HttpStack, http_stack

pytestmark = pytest.mark.slow

# name: (token, scope, kept as); the names are what rows and logs show.
TOKENS: dict[str, tuple[str, Scope, str]] = {
    "checkout": ("tok-scopes-checkout-" + "c" * 24, Scope.CHECKOUT, "token"),
    "checkout-next": ("tok-scopes-checkout-next-" + "n" * 24, Scope.CHECKOUT, "token"),
    "read": ("tok-scopes-read-" + "r" * 24, Scope.READ, "sha256"),
    "refund": ("tok-scopes-refund-" + "f" * 24, Scope.REFUND, "token"),
    "admin": ("tok-scopes-admin-" + "a" * 24, Scope.ADMIN, "sha256"),
}
# The token of each scope in the route x scope table.
BY_SCOPE = {Scope.CHECKOUT: "checkout", Scope.READ: "read", Scope.REFUND: "refund"}
BY_SCOPE[Scope.ADMIN] = "admin"

UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "a valid bearer token is required"}}


def spec(name: str) -> dict[str, Any]:
    token, scope, form = TOKENS[name]
    kept = hashlib.sha256(token.encode()).hexdigest() if form == "sha256" else token
    return {"name": name, "scopes": [scope.value], form: kept}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][0]}"}


def new_order() -> str:
    return f"scope-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
async def scopes_db(pg_admin_url: str) -> str:
    return await embedded.ensure_database(pg_admin_url, f"payorders_scopes_{os.getpid()}")


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, scopes_db: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(
        dev_env.client,
        target,
        scopes_db,
        api_token=None,
        api_tokens=[spec(name) for name in TOKENS],
    ) as stack:
        yield stack


@pytest.fixture
async def http(web: HttpStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=30) as client:
        yield client


async def checkout(http: httpx.AsyncClient, web: HttpStack, by: str = "admin") -> str:
    """A new PAYING pay order, its row written; its number."""
    resp = await http.post(
        "/v1/pay-orders",
        json={"order_no": new_order(), "amount": 100, "currency": "USD"},
        headers=auth(by),
    )
    assert resp.status_code == 201, resp.text
    no: str = resp.json()["pay_order_no"]
    async with web.pool.acquire() as conn:
        for _ in range(300):
            if await conn.fetchval("SELECT 1 FROM pay_order WHERE pay_order_no = $1", no):
                return no
            await asyncio.sleep(0.02)
    raise AssertionError(f"{no} was never written")


async def requested_by(web: HttpStack, sql: str, key: str) -> str | None:
    async with web.pool.acquire() as conn:
        value: str | None = await conn.fetchval(sql, key)
    return value


# route: (method, path, the scopes that may call it besides admin, status when allowed)
ROUTES: dict[str, tuple[str, str, tuple[Scope, ...], int]] = {
    "create": ("POST", "/v1/pay-orders", (Scope.CHECKOUT,), 201),
    "get": ("GET", "/v1/pay-orders/{no}", (Scope.CHECKOUT, Scope.READ), 200),
    "cancel": ("POST", "/v1/pay-orders/{no}/cancel", (Scope.CHECKOUT,), 200),
    # An unknown transaction: past authentication, nothing moves.
    "operator-refund": ("POST", "/v1/operator-refunds", (Scope.REFUND,), 404),
    "get-operator-refund": (
        "GET",
        "/v1/operator-refunds/txn_never",
        (Scope.READ, Scope.REFUND),
        404,
    ),
    "events": ("GET", "/v1/events", (Scope.READ,), 200),
    # An unpaid pay order: past authentication, refused as not refundable, nothing moves.
    "refund": ("POST", "/v1/pay-orders/{no}/refunds", (Scope.REFUND,), 409),
    "refunds": ("GET", "/v1/pay-orders/{no}/refunds", (Scope.READ, Scope.REFUND), 200),
    "get-refund": (
        "GET",
        "/v1/pay-orders/{no}/refunds/r-never",
        (Scope.READ, Scope.REFUND),
        404,
    ),
}


async def request(
    http: httpx.AsyncClient, web: HttpStack, route: str, headers: list[tuple[str, str]]
) -> tuple[httpx.Response, str | None]:
    """One call of ``route`` (a pay order made for it where it needs one); the pay order."""
    method, path, _, _ = ROUTES[route]
    no = await checkout(http, web) if "{no}" in path else None
    kwargs: dict[str, Any] = {}
    if route == "create":
        kwargs["json"] = {"order_no": new_order(), "amount": 100, "currency": "USD"}
    elif route == "operator-refund":
        kwargs["json"] = {"txn_id": "txn_never_captured"}
    elif route == "refund":
        kwargs["json"] = {"refund_no": "r-scope", "amount": 10}
    resp = await http.request(method, path.format(no=no), headers=headers, **kwargs)
    return resp, no


@pytest.mark.parametrize("scope", list(BY_SCOPE))
@pytest.mark.parametrize("route", list(ROUTES))
async def test_each_route_lets_in_its_scopes_and_admin_and_names_the_scope_to_the_rest(
    web: HttpStack,
    http: httpx.AsyncClient,
    dev_env: WorkflowEnvironment,
    route: str,
    scope: Scope,
) -> None:
    _, _, scopes, allowed_status = ROUTES[route]
    resp, no = await request(http, web, route, list(auth(BY_SCOPE[scope]).items()))
    if scope in scopes or scope is Scope.ADMIN:
        assert resp.status_code == allowed_status, resp.text
        return
    assert resp.status_code == 403, resp.text
    needs = " or ".join(scopes)
    assert resp.json() == {
        "error": {"code": "forbidden", "message": f"this route needs the scope {needs} (or admin)"}
    }
    if route == "create":  # nothing started
        sent = resp.request.content.decode()
        order_no = sent.split('"order_no":')[1].split('"')[1]
        with pytest.raises(RPCError, match="not found"):
            await dev_env.client.get_workflow_handle(f"pay-order-po_{order_no}").describe()
    if route == "cancel":  # nothing cancelled, nobody noted
        order = await http.get(f"/v1/pay-orders/{no}", headers=auth("read"))
        assert order.json()["status"] == "PAYING"
        assert order.json()["cancel_requested_by"] is None


BAD_HEADERS: dict[str, list[tuple[str, str]]] = {
    "none": [],
    "unknown token": [("Authorization", "Bearer tok-scopes-unknown-" + "u" * 24)],
    "empty Bearer": [("Authorization", "Bearer ")],
    "Bearer alone": [("Authorization", "Bearer")],
    "Basic": [("Authorization", "Basic xyz")],
    "two tokens in one header": [
        ("Authorization", f"Bearer {TOKENS['admin'][0]} {TOKENS['checkout'][0]}")
    ],
    "two headers": [
        ("Authorization", f"Bearer {TOKENS['admin'][0]}"),
        ("Authorization", f"Bearer {TOKENS['admin'][0]}"),
    ],
    "a token's hash as the token": [("Authorization", f"Bearer {spec('admin')['sha256']}")],
}


async def raw(
    url: str, method: str, path: str, headers: list[tuple[str, str]]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One request written byte for byte (httpx refuses to send ``Bearer `` with its
    trailing space); its status, headers (lower-case names) and JSON body."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"txn_id": "x"}'
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, content = answer.partition(b"\r\n\r\n")
    status_line, *fields = head.decode().split("\r\n")
    named = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), named, json.loads(content)


async def test_every_way_of_lacking_a_valid_token_is_the_same_401_on_every_route(
    web: HttpStack,
) -> None:
    before = await web.counts(timers=False)
    for route, (method, path, _, _) in ROUTES.items():
        for case, headers in BAD_HEADERS.items():
            status, answered, doc = await raw(
                web.settings.api_url, method, path.format(no="po_anything"), headers
            )
            assert (status, doc) == (401, UNAUTHORIZED), (route, case, doc)
            assert answered["www-authenticate"] == "Bearer", (route, case)
    assert await web.counts(timers=False) == before


async def test_a_hashed_and_a_clear_token_both_work_and_so_do_two_of_one_scope(
    web: HttpStack, http: httpx.AsyncClient
) -> None:
    """``read`` and ``admin`` are kept by their SHA-256, the checkout tokens in clear; two
    checkout tokens side by side is how one replaces the other."""
    nos = [await checkout(http, web, by) for by in ("checkout", "checkout-next", "admin")]
    for no in nos:
        for by in ("read", "checkout", "checkout-next", "admin"):
            resp = await http.get(f"/v1/pay-orders/{no}", headers=auth(by))
            assert resp.status_code == 200, (by, resp.text)


async def test_the_open_routes_need_no_token(web: HttpStack, http: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await http.get(path)).status_code == 200, path
    # A webhook proves itself by its signature: without one it is refused for that, with
    # or without a bearer token.
    for headers in ({}, auth("admin")):
        resp = await http.post(
            "/v1/webhooks/gateway",
            content=b"{}",
            headers={**headers, "Content-Type": "application/json"},
        )
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "webhook_rejected"


async def test_a_cancel_records_the_first_caller_that_asked(
    web: HttpStack, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="payorders")
    no = await checkout(http, web, "checkout")
    untouched = await checkout(http, web, "checkout")
    first = await http.post(f"/v1/pay-orders/{no}/cancel", headers=auth("checkout-next"))
    assert first.status_code == 200 and first.json()["closed"] is True, first.text
    again = await http.post(f"/v1/pay-orders/{no}/cancel", headers=auth("admin"))
    assert again.status_code == 200 and again.json()["closed"] is False, again.text
    order = (await http.get(f"/v1/pay-orders/{no}", headers=auth("read"))).json()
    assert (order["status"], order["reason"]) == ("PAY_EXPIRED", "CANCELLED")
    assert order["cancel_requested_by"] == "checkout-next"
    sql = "SELECT cancel_requested_by FROM pay_order WHERE pay_order_no = $1"
    assert await requested_by(web, sql, no) == "checkout-next"
    assert await requested_by(web, sql, untouched) is None
    other = (await http.get(f"/v1/pay-orders/{untouched}", headers=auth("read"))).json()
    assert other["cancel_requested_by"] is None
    assert f"cancel {no}: PAY_EXPIRED/CANCELLED (closed now) by checkout-next" in caplog.text
    assert f"POST /v1/pay-orders/{no}/cancel -> 200 by admin" in caplog.text
    for token, _, _ in TOKENS.values():
        assert token not in caplog.text


async def test_an_operator_refund_records_who_asked(
    web: HttpStack, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="payorders")
    # A customer pays the gateway for a pay order we never had (our webhook answers 404).
    paid = await web.gateway.pay(pay_order_no=f"po_{new_order()}", amount=700, currency="USD")
    txn = str(paid["txn_id"])
    opened = await http.post("/v1/operator-refunds", json={"txn_id": txn}, headers=auth("refund"))
    assert opened.status_code in (200, 202), opened.text
    assert (opened.json()["created"], opened.json()["requested_by"]) == (True, "refund")
    again = await http.post("/v1/operator-refunds", json={"txn_id": txn}, headers=auth("admin"))
    assert (again.json()["created"], again.json()["requested_by"]) == (False, "refund")
    for _ in range(300):
        got = await http.get(f"/v1/operator-refunds/{txn}", headers=auth("read"))
        if got.json()["status"] == "SUCCEEDED":
            break
        await asyncio.sleep(0.1)
    assert got.json()["status"] == "SUCCEEDED" and got.json()["requested_by"] == "refund"
    sql = "SELECT requested_by FROM operator_refund WHERE txn_id = $1"
    assert await requested_by(web, sql, txn) == "refund"
    assert "(opened) by refund" in caplog.text and "(asked before) by admin" in caplog.text
    assert f"GET /v1/operator-refunds/{txn} -> 200 by read" in caplog.text
    for token, _, _ in TOKENS.values():
        assert token not in caplog.text

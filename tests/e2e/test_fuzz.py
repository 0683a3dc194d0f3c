"""Property-based fuzzing of the service API from its own OpenAPI schema (schemathesis):
no request, valid or not, gets a 5xx, and no rejected request changes any state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from temporalio.testing import WorkflowEnvironment

from ..http_stack import API_TOKEN, HttpStack, http_stack

pytestmark = pytest.mark.slow

EXAMPLES = 150


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, db_url: str) -> AsyncIterator[HttpStack]:
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, db_url) as stack:
        yield stack


def generate(spec: dict[str, Any], mode: GenerationMode, n: int) -> list[Any]:
    """Draw ``n`` cases up front (no I/O inside Hypothesis), to send from the event loop."""
    schema = schemathesis.openapi.from_dict(spec)
    cases: list[Any] = []

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(generation_mode=mode))
    def draw(case: Any) -> None:
        cases.append(case)

    draw()
    return cases


async def _send(http: httpx.AsyncClient, case: Any, token: str | None) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=str(http.base_url).rstrip("/"))
    headers = {
        k: v for k, v in (kwargs.get("headers") or {}).items() if k.lower() != "authorization"
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await http.request(
        kwargs["method"],
        kwargs["url"],
        headers=headers,
        params=kwargs.get("params"),
        json=kwargs.get("json"),
        content=kwargs.get("data") if isinstance(kwargs.get("data"), bytes | str) else None,
    )


async def _row_written(web: HttpStack, pay_order_no: str) -> None:
    async with web.pool.acquire() as conn:
        for _ in range(300):
            if await conn.fetchval("SELECT 1 FROM pay_order WHERE pay_order_no = $1", pay_order_no):
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"{pay_order_no} was never written")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
async def test_fuzzing_finds_no_5xx_and_no_change_from_a_rejected_request(
    web: HttpStack, mode: GenerationMode
) -> None:
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=30) as http:
        spec = (await http.get("/openapi.json")).json()
        cases = generate(spec, mode, EXAMPLES)
        assert len(cases) >= EXAMPLES // 2
        statuses: dict[int, int] = {}
        for i, case in enumerate(cases):
            # Half of them carry the token, so the fuzzer gets past authentication.
            token = API_TOKEN if i % 2 == 0 else None
            before = await web.counts(timers=False)
            resp = await _send(http, case, token)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (case.method, case.formatted_path, resp.text)
            if resp.status_code in (200, 201) and case.formatted_path == "/v1/pay-orders":
                # An accepted checkout goes on changing state (its workflow writes the row):
                # let it finish before the next request is judged.
                await _row_written(web, resp.json()["pay_order_no"])
            if resp.status_code >= 400:
                assert await web.counts(timers=False) == before, (case.method, case.formatted_path)
    print(
        f"fuzz {mode.value}: {sum(statuses.values())} requests, statuses {sorted(statuses.items())}"
    )
    assert any(400 <= s < 500 for s in statuses)

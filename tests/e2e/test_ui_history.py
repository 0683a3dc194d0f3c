"""The Temporal UI tells each pay order's story: read through the UI server's own HTTP API,
the routes its pages call, on a dev server started with its UI (and the story's wording,
unit-tested on its own).

What the timeline shows is the UI's choice, so the rule is written down here from its
bundle (UI 2.54, ``timeline-graph-row.svelte``): a local activity is labelled by its
activity type alone, a timer by its summary, an activity by its type and summary, a signal
by its name. The Event History table shows every event's summary; the User Metadata tab
shows the workflow's current details (the query ``__temporal_workflow_metadata``).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from payorders.core.domain import PayOrderStatus, workflow_id_for
from payorders.runtime import Resources
from workflows._story import Story, when

from ..conftest import order_no, pay, running_stack, start_dev_server
from ..http_stack import free_port

LOCAL_ACTIVITY_MARKERS = {"core_local_activity", "LocalActivity"}


@pytest.fixture(scope="module")
async def ui_env() -> AsyncIterator[tuple[WorkflowEnvironment, str]]:
    ui_port = free_port()
    env = await start_dev_server(ui=True, ui_port=ui_port)
    async with env:
        yield env, f"http://127.0.0.1:{ui_port}"


def _payload(p: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(p["data"]))


def summary_of(event: dict[str, Any]) -> str | None:
    """The summary the Event History table shows beside an event."""
    s = event.get("userMetadata", {}).get("summary")
    return None if s is None else str(_payload(s))


def timeline_label(event: dict[str, Any]) -> str | None:
    """The label of the timeline row this event starts, as UI 2.54 draws it (None: no row
    of its own)."""
    kind = event["eventType"].removeprefix("EVENT_TYPE_")
    summary = summary_of(event)
    if kind == "MARKER_RECORDED":
        attrs = event["markerRecordedEventAttributes"]
        if attrs["markerName"] in LOCAL_ACTIVITY_MARKERS:
            # The activity type from the marker's data wins over any summary.
            return str(_payload(attrs["details"]["data"]["payloads"][0])["activity_type"])
        return summary or attrs["markerName"]
    if kind == "TIMER_STARTED":
        return summary or event["timerStartedEventAttributes"]["timerId"]
    if kind == "ACTIVITY_TASK_SCHEDULED":
        name = event["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        return f"{name} • {summary}" if summary else name
    if kind == "WORKFLOW_EXECUTION_SIGNALED":
        return str(event["workflowExecutionSignaledEventAttributes"]["signalName"])
    return None


class UI:
    """The UI server's HTTP API, called the way its pages call it."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def version(self) -> str:
        r = await self.http.get("/api/v1/settings")
        r.raise_for_status()
        return str(r.json()["Version"])

    async def history(self, workflow_id: str) -> list[dict[str, Any]]:
        r = await self.http.get(
            f"/api/v1/namespaces/default/workflows/{workflow_id}/history",
            params={"waitNewEvent": "false", "maximumPageSize": "1000"},
        )
        r.raise_for_status()
        events: list[dict[str, Any]] = r.json()["history"]["events"]
        return events

    async def wait_for(self, workflow_id: str, event_type: str, within: float = 30) -> None:
        """Poll the history until an event of this type is in it."""
        deadline = asyncio.get_running_loop().time() + within
        while not any(
            e["eventType"] == f"EVENT_TYPE_{event_type}" for e in await self.history(workflow_id)
        ):
            assert asyncio.get_running_loop().time() < deadline, f"no {event_type} in {workflow_id}"
            await asyncio.sleep(0.05)

    async def current_details(self, workflow_id: str) -> str:
        # The page's POSTs carry the _csrf cookie back in a header.
        (await self.http.get("/")).raise_for_status()
        r = await self.http.post(
            f"/api/v1/namespaces/default/workflows/{workflow_id}/query/__temporal_workflow_metadata",
            json={
                "execution": {"workflowId": workflow_id},
                "query": {"queryType": "__temporal_workflow_metadata"},
            },
            headers={"X-CSRF-TOKEN": self.http.cookies["_csrf"]},
        )
        r.raise_for_status()
        metadata = _payload(r.json()["queryResult"]["payloads"][0])
        return str(metadata.get("currentDetails", ""))


@pytest.fixture
async def ui(ui_env: tuple[WorkflowEnvironment, str]) -> AsyncIterator[UI]:
    async with httpx.AsyncClient(base_url=ui_env[1], timeout=10) as http:
        client = UI(http)
        # The rule in timeline_label is this UI's: re-read its bundle when it changes.
        assert (await client.version()).startswith("2.54."), await client.version()
        yield client


def assert_in_order(expected: list[str], actual: list[str]) -> None:
    """Each expected line starts one of the actual lines, in this order."""
    rest = iter(actual)
    for want in expected:
        assert any(line.startswith(want) for line in rest), (want, actual)


def test_each_wait_summary_tells_the_steps_since_the_last_wait_and_the_story_tells_all() -> None:
    t0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    s = Story()
    s.tell(t0, "pay order created: 1999 USD")
    window = s.wait(t0, "payment window", t0 + timedelta(hours=1))
    t1 = t0 + timedelta(hours=1)
    s.tell(t1, "trade closed at the gateway")
    s.tell(t1, "pay order PAY_EXPIRED")
    settling = s.wait(t1, "settlement window", t1 + timedelta(hours=25))
    s.tell(t1, "txn_1 1999 USD: refund (LATE)")
    # Restarted after the payment, to the same end: the timer says why, the story once.
    again = s.wait(t1, "settlement window", t1 + timedelta(hours=25, microseconds=5))
    assert window == "pay order created: 1999 USD; payment window until 2026-11-27 11:00:00 UTC"
    assert settling == (
        "trade closed at the gateway; pay order PAY_EXPIRED;"
        " settlement window until 2026-11-28 12:00:00 UTC"
    )
    assert again == "txn_1 1999 USD: refund (LATE); settlement window until 2026-11-28 12:00:00 UTC"
    assert s.markdown("PAY_EXPIRED").splitlines() == [
        "**PAY_EXPIRED**",
        "",
        "1. `2026-11-27 10:00:00 UTC` pay order created: 1999 USD",
        "2. `2026-11-27 10:00:00 UTC` payment window until 2026-11-27 11:00:00 UTC",
        "3. `2026-11-27 11:00:00 UTC` trade closed at the gateway",
        "4. `2026-11-27 11:00:00 UTC` pay order PAY_EXPIRED",
        "5. `2026-11-27 11:00:00 UTC` settlement window until 2026-11-28 12:00:00 UTC",
        "6. `2026-11-27 11:00:00 UTC` txn_1 1999 USD: refund (LATE)",
    ]


@pytest.mark.slow
async def test_the_ui_tells_an_expired_order_that_refunds_a_late_payment(
    ui_env: tuple[WorkflowEnvironment, str], ui: UI, svc: Resources
) -> None:
    env, _ = ui_env
    async with running_stack(env, svc, settlement_window_s=8) as stack:
        started = await stack.api.start_pay_order(
            order_no=order_no("ui-late"),
            amount=1999,
            currency="USD",
            expires_in=timedelta(seconds=2),
        )
        no = started.pay_order_no
        await stack.wait_view(no, lambda v: v.status is PayOrderStatus.PAY_EXPIRED)
        txn = await pay(stack, no, 1999)
        await stack.wait_view(no, lambda v: v.refunded_amount == 1999)
        assert (await stack.result(no)).status is PayOrderStatus.PAY_EXPIRED

        events = await ui.history(workflow_id_for(no))
        rows = [label for e in events if (label := timeline_label(e)) is not None]
        settlement = "settlement window until "
        assert_in_order(
            [
                "create_pay_order",
                "open_trade",
                "pay order created: 1999 USD; trade opened at the sandbox gateway;"
                f" payment window until {when(started.expires_at)}",
                "close_trade",
                "expire_pay_order",
                f"trade closed at the gateway; pay order PAY_EXPIRED; {settlement}",
                "payment_succeeded",
                "record_payment",
            ],
            rows,
        )
        assert f"refund_payment • refund {txn} 1999 USD (LATE)" in rows
        assert any(r.startswith(f"{txn} 1999 USD: refund (LATE); {settlement}") for r in rows)
        assert_in_order(
            [
                "create pay order 1999 USD",
                "open the trade at the gateway: 1999 USD",
                "payment window over: close the trade at the gateway",
                "trade closed: expire the pay order",
                f"record payment {txn} 1999 USD -> refund (LATE)",
            ],
            [s for e in events if (s := summary_of(e)) is not None],
        )

        details = await ui.current_details(workflow_id_for(no))
        lines = details.splitlines()
        assert lines[0] == "**PAY_EXPIRED · 1999 USD · paid 1999 · refunded 1999**", details
        steps = [line.split("` ", 1)[-1] for line in lines[2:]]
        assert_in_order(
            [
                "pay order created: 1999 USD",
                "trade opened at the sandbox gateway",
                f"payment window until {when(started.expires_at)}",
                "trade closed at the gateway",
                "pay order PAY_EXPIRED",
                settlement,
                f"{txn} 1999 USD: refund (LATE)",
                f"refund {txn} 1999 USD: SUCCEEDED",
            ],
            steps,
        )


@pytest.mark.slow
async def test_the_ui_tells_a_paid_order(
    ui_env: tuple[WorkflowEnvironment, str], ui: UI, svc: Resources
) -> None:
    env, _ = ui_env
    async with running_stack(env, svc, settlement_window_s=1) as stack:
        started = await stack.api.start_pay_order(
            order_no=order_no("ui-paid"), amount=42, currency="EUR"
        )
        no = started.pay_order_no
        # Paid once the order waits (a payment that lands with the start is told with the
        # creation, before any wait).
        await ui.wait_for(workflow_id_for(no), "TIMER_STARTED")
        txn = await pay(stack, no, 42, "EUR")
        assert (await stack.result(no)).status is PayOrderStatus.PAY_SUCCESS

        events = await ui.history(workflow_id_for(no))
        rows = [label for e in events if (label := timeline_label(e)) is not None]
        assert_in_order(
            [
                "create_pay_order",
                "open_trade",
                "pay order created: 42 EUR; trade opened at the sandbox gateway;"
                f" payment window until {when(started.expires_at)}",
                "payment_succeeded",
                "record_payment",
                f"{txn} 42 EUR settled: PAY_SUCCESS; settlement window until ",
            ],
            rows,
        )
        assert f"record payment {txn} 42 EUR -> settle" in [summary_of(e) for e in events]
        details = await ui.current_details(workflow_id_for(no))
        assert details.startswith("**PAY_SUCCESS · 42 EUR · paid 42 · refunded 0**"), details
        assert f"{txn} 42 EUR settled: PAY_SUCCESS" in details

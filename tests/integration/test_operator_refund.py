"""Operator refunds: money the gateway captured for a pay order we never had goes back when
an operator asks (``payorders refund --txn``, ``POST /v1/operator-refunds``), once, through
the refund activity's discipline; refused, with nothing moved, for a transaction one of our
pay orders holds. The rows and the database's own refusals on a real PostgreSQL; the whole
path over real HTTP on a real Temporal dev server, the sandbox gateway and reconciliation."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from payorders.core.domain import RefundReason
from payorders.core.models import (
    CreatePayOrder,
    PaymentNotification,
    ReconcileReport,
    RecordPayment,
)
from payorders.core.reconcile import ReconcileStore
from payorders.core.store import NotRefundable, Refusal
from payorders.gateways.port import Capture
from payorders.localstack import postgres as embedded
from payorders.pay_orders import operator_refund_workflow_id
from payorders.runtime import Resources
from payorders.sandbox.ledger import SandboxGateway
from payorders.tools import cli
from payorders.tools.http_clients import ServiceError
from workflows.operator_refund import OperatorRefundWorkflow
from workflows.reconcile import ReconcileWorkflow

from ..conftest import order_no
from ..http_stack import AUTH, HttpStack, http_stack

HISTORIES = Path(__file__).resolve().parents[1] / "operator_refund_histories"
HISTORY = HISTORIES / "refunded_after_failures.json"


# --- the rows, on a real PostgreSQL ----------------------------------------------------------


async def ghost_capture(svc: Resources, amount: int = 500) -> Capture:
    """Money at the gateway for a pay order we never had."""
    return await svc.sandbox.capture(
        pay_order_no=f"po_{order_no('ghost')}", amount=amount, currency="USD"
    )


async def rows(svc: Resources, txn_id: str) -> dict[str, int]:
    async with svc.pool.acquire() as conn:
        return {
            t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE txn_id = $1", txn_id)
            for t in ("payment", "refund", "operator_refund")
        }


async def test_opening_twice_returns_the_same_refund_and_the_database_refuses_a_second(
    svc: Resources,
) -> None:
    c = await ghost_capture(svc)
    first, created = await svc.store.operator_refunds.open(c)
    again, created_again = await svc.store.operator_refunds.open(c)
    assert (created, created_again) == (True, False)
    assert again == first
    assert first.refund_key == f"refund-{c.pay_order_no}-{c.txn_id}"
    assert (first.amount, first.currency, first.status.value) == (500, "USD", "PENDING")
    async with svc.pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO operator_refund (refund_key, txn_id, pay_order_no, amount, currency,"
                " captured_at) VALUES ($1, $2, $3, 500, 'USD', now())",
                f"refund-po_other-{c.txn_id}",
                c.txn_id,
                "po_other",
            )
    assert await rows(svc, c.txn_id) == {"payment": 0, "refund": 0, "operator_refund": 1}


async def test_the_refund_keeps_who_opened_it_and_a_repeat_does_not_change_it(
    svc: Resources,
) -> None:
    c = await ghost_capture(svc)
    first, _ = await svc.store.operator_refunds.open(c, requested_by="support-tool")
    again, created = await svc.store.operator_refunds.open(c, requested_by="ops")
    assert not created and first.requested_by == again.requested_by == "support-tool"
    assert (await svc.store.operator_refunds.get(c.txn_id)) == first
    nameless, _ = await svc.store.operator_refunds.open(await ghost_capture(svc))
    assert nameless.requested_by is None


async def test_a_transaction_refunded_by_an_operator_can_never_become_a_pay_orders_payment(
    svc: Resources,
) -> None:
    c = await ghost_capture(svc)
    await svc.store.operator_refunds.open(c)
    # Checkout creates the very pay order later: its payment must not settle it.
    no = c.pay_order_no.removeprefix("po_")
    await svc.store.create_pay_order(
        CreatePayOrder(
            pay_order_no=c.pay_order_no,
            order_no=no,
            amount=500,
            currency="USD",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
    )
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="refunded by an operator"):
        await svc.store.record_payment(
            RecordPayment(
                pay_order_no=c.pay_order_no,
                payment=PaymentNotification(
                    txn_id=c.txn_id, amount=500, currency="USD", paid_at=c.captured_at
                ),
                refund_reason=None,
                expected_lock_version=0,
            )
        )
    row = await svc.store.get_pay_order(c.pay_order_no)
    assert row is not None and (row.status.value, row.paid_amount) == ("PAYING", 0)
    assert await rows(svc, c.txn_id) == {"payment": 0, "refund": 0, "operator_refund": 1}


async def _order_with_payment(svc: Resources, *, settles: bool) -> tuple[str, Capture]:
    no = order_no("held")
    po = f"po_{no}"
    await svc.store.create_pay_order(
        CreatePayOrder(
            pay_order_no=po,
            order_no=no,
            amount=100,
            currency="USD",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
    )
    c = await svc.sandbox.capture(pay_order_no=po, amount=100, currency="USD")
    await svc.store.record_payment(
        RecordPayment(
            pay_order_no=po,
            payment=PaymentNotification(
                txn_id=c.txn_id, amount=100, currency="USD", paid_at=c.captured_at
            ),
            refund_reason=None if settles else RefundReason.DUPLICATE,
            expected_lock_version=0 if settles else None,
        )
    )
    return po, c


async def test_a_transaction_one_of_our_pay_orders_holds_is_refused_and_nothing_is_written(
    svc: Resources,
) -> None:
    _, settled = await _order_with_payment(svc, settles=True)
    _, refunding = await _order_with_payment(svc, settles=False)
    no = order_no("known")
    await svc.store.create_pay_order(
        CreatePayOrder(
            pay_order_no=f"po_{no}",
            order_no=no,
            amount=100,
            currency="USD",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
    )
    lost = await svc.sandbox.capture(pay_order_no=f"po_{no}", amount=100, currency="USD")
    for capture, refusal in [
        (settled, Refusal.SETTLED),
        (refunding, Refusal.REFUNDING),
        (lost, Refusal.ORDER_KNOWN),
    ]:
        before = await rows(svc, capture.txn_id)
        with pytest.raises(NotRefundable) as refused:
            await svc.store.operator_refunds.open(capture)
        assert refused.value.refusal is refusal
        assert capture.txn_id in str(refused.value)
        assert await rows(svc, capture.txn_id) == before
    # And the database itself, whoever writes the SQL.
    async with svc.pool.acquire() as conn:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="payment of a pay"):
            await conn.execute(
                "INSERT INTO operator_refund (refund_key, txn_id, pay_order_no, amount, currency,"
                " captured_at) VALUES ($1, $2, $3, 100, 'USD', now())",
                f"refund-{settled.pay_order_no}-{settled.txn_id}",
                settled.txn_id,
                settled.pay_order_no,
            )


async def test_an_operator_refund_is_confirmed_once_and_its_terminal_status_is_final(
    svc: Resources,
) -> None:
    c = await ghost_capture(svc)
    refund, _ = await svc.store.operator_refunds.open(c)
    ledger = svc.store.operator_refunds
    key = refund.refund_key
    await ledger.note_refund_attempt(key, 2, "gateway down")
    assert await ledger.confirm_refund(key, "rf_1") is True
    assert await ledger.confirm_refund(key, "rf_2") is False
    assert await ledger.reject_refund(key, "too late") is False
    done = await ledger.get(c.txn_id)
    assert done is not None
    assert (done.status.value, done.gateway_refund_id, done.attempts) == ("SUCCEEDED", "rf_1", 2)
    assert done.last_error is None and done.succeeded_at is not None
    async with svc.pool.acquire() as conn:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="terminal"):
            await conn.execute(
                "UPDATE operator_refund SET status = 'PENDING' WHERE refund_key = $1", key
            )
    with pytest.raises(LookupError):
        await ledger.confirm_refund("refund-po_nobody-txn_nobody", "rf_3")


@pytest.mark.parametrize(
    "argv",
    # A bare "refund" is refused by the command, before it connects (tests/e2e/test_cli.py).
    [["refund", "--txn", "not a txn"], ["refund", "--txn", "t", "--wait-s", "x"]],
)
def test_a_bad_refund_command_is_a_usage_error(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as usage:
        cli.build_parser().parse_args(argv)
    assert usage.value.code == 2
    assert "payorders refund: error:" in capsys.readouterr().err


async def test_the_saved_operator_refund_history_replays() -> None:
    """A change to ``OperatorRefundWorkflow`` that would break a running one fails here."""
    history = WorkflowHistory.from_json("replay-operator-refund", HISTORY.read_text())
    replayer = Replayer(workflows=[OperatorRefundWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure


# --- the whole path, over HTTP ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def web(dev_env: WorkflowEnvironment, pg_admin_url: str) -> AsyncIterator[HttpStack]:
    # A database of its own: the reconciliations here see (and repair) only this module's.
    url = await embedded.ensure_database(pg_admin_url, f"operator_refund_{os.getpid()}")
    target = dev_env.client.service_client.config.target_host
    async with http_stack(dev_env.client, target, url) as stack:
        yield stack


@pytest.fixture
async def http(web: HttpStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web.settings.api_url, timeout=30) as client:
        yield client


TOKEN = AUTH


async def reconcile(
    web: HttpStack, client: Client
) -> tuple[ReconcileReport, dict[str, list[dict[str, Any]]]]:
    """One reconciliation run now; its findings by transaction."""
    report: ReconcileReport = await client.execute_workflow(
        ReconcileWorkflow.run,
        web.settings.reconcile_input(),
        id=f"reconcile-operator-{uuid.uuid4().hex[:8]}",
        task_queue=web.settings.task_queue,
    )
    by_txn: dict[str, list[dict[str, Any]]] = {}
    for f in await ReconcileStore(web.pool).findings(report.run_id):
        by_txn.setdefault(f["txn_id"], []).append(f)
    return report, by_txn


async def ghost_payment(web: HttpStack, amount: int) -> tuple[str, str]:
    """A customer pays the gateway for a pay order we never had; our adapter refuses the
    webhook (404 unknown pay order), so the money is ours to give back."""
    ghost = f"po_{order_no('ghost')}"
    paid = await web.gateway.pay(pay_order_no=ghost, amount=amount, currency="USD")
    return ghost, str(paid["txn_id"])


async def wait_refund(web: HttpStack, txn: str, status: str, within: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while (doc := await web.service.get_operator_refund(txn))["status"] != status:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out; last: {doc}")
        await asyncio.sleep(0.1)
    return doc


async def until(web: HttpStack, sql: str, *args: Any, within: float = 60) -> None:
    """Wait until ``sql`` answers true (in real time)."""
    deadline = asyncio.get_running_loop().time() + within
    async with web.pool.acquire() as conn:
        while not await conn.fetchval(sql, *args):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for: {sql} {args}")
            await asyncio.sleep(0.05)


async def everything(web: HttpStack) -> dict[str, int]:
    """Every row a refund could write, ours and the gateway's (expiries left out)."""
    counts = await web.counts(timers=False)
    async with web.pool.acquire() as conn:
        counts["operator_refund"] = await conn.fetchval("SELECT count(*) FROM operator_refund")
        counts["refund_call"] = await conn.fetchval(
            f"SELECT count(*) FROM {web.schema}.refund_call"
        )
    return counts


def refused(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("payorders_api_operator_refunds_total", {"outcome": outcome}) or 0
    )


@pytest.mark.slow
async def test_money_for_an_order_we_never_had_is_refunded_once_and_reconciles(
    web: HttpStack, http: httpx.AsyncClient, dev_env: WorkflowEnvironment, capsys: Any
) -> None:
    ghost, txn = await ghost_payment(web, 777)
    _, found = await reconcile(web, dev_env.client)
    [before] = found[txn]
    assert (before["kind"], before["action"]) == ("money_without_order", "EXCEPTION")
    assert f"payorders refund --txn {txn}" in before["detail"]

    resp = await http.post("/v1/operator-refunds", json={"txn_id": txn}, headers=TOKEN)
    assert resp.status_code == 202, resp.text
    doc = resp.json()
    key = f"refund-{ghost}-{txn}"
    assert (doc["refund_key"], doc["amount"], doc["currency"], doc["created"]) == (
        key,
        777,
        "USD",
        True,
    )
    assert doc["pay_order_no"] == ghost and doc["workflow_id"] == f"operator-refund-{txn}"
    done = await wait_refund(web, txn, "SUCCEEDED")

    ledger = await web.gateway.ledger(ghost)
    assert [r["idempotency_key"] for r in ledger["refunds"]] == [key]
    assert ledger["refunded"] == ledger["captured"] == 777
    assert done["gateway_refund_id"] == ledger["refunds"][0]["id"]
    async with web.pool.acquire() as conn:
        ours = await conn.fetchval("SELECT count(*) FROM pay_order WHERE pay_order_no = $1", ghost)
    assert ours == 0, "an operator refund makes up no pay order"

    # The next run finds it refunded by an operator: no longer an exception.
    report, found = await reconcile(web, dev_env.client)
    [after] = found[txn]
    assert (after["kind"], after["action"], after["refund_key"]) == (
        "money_without_order",
        "RESOLVED",
        key,
    )
    assert "refunded by an operator" in after["detail"]
    assert report.money_in_flight == 0

    # The same command again, over HTTP and through the CLI: the same refund, nothing moved.
    counts = await everything(web)
    again = await http.post("/v1/operator-refunds", json={"txn_id": txn}, headers=TOKEN)
    assert again.status_code == 200, again.text
    assert (again.json()["refund_key"], again.json()["created"]) == (key, False)
    args = cli.build_parser().parse_args(["refund", "--txn", txn, "--wait"])
    assert await args.fn(args, web.settings) == 0
    out = capsys.readouterr().out
    assert key in out and "SUCCEEDED (asked before" in out and "777 USD" in out
    assert await everything(web) == counts
    ledger = await web.gateway.ledger(ghost)
    assert [c["outcome"] for c in ledger["refund_calls"]] == ["SUCCEEDED"]


@pytest.mark.slow
async def test_a_refund_the_gateway_fails_is_retried_under_its_key_until_it_succeeds_once(
    web: HttpStack, dev_env: WorkflowEnvironment
) -> None:
    ghost, txn = await ghost_payment(web, 4242)
    await web.gateway.set_faults(ghost, fail_next_refunds=100_000)
    doc = await web.service.operator_refund(txn)
    assert doc["status"] == "PENDING"
    await until(web, "SELECT attempts >= 2 FROM operator_refund WHERE txn_id = $1", txn)
    # While it retries, the books count it as money in flight, under way.
    report, found = await reconcile(web, dev_env.client)
    [pending] = found[txn]
    assert (pending["kind"], pending["action"]) == ("money_without_order", "RESOLVED")
    assert "under way" in pending["detail"]
    assert (report.money_in_flight, report.in_flight_count) == (4242, 1)
    # Two more failures, then the gateway refunds it, and withholds its answer once.
    await web.gateway.set_faults(ghost, fail_next_refunds=2, timeout_after_success_next=1)
    done = await wait_refund(web, txn, "SUCCEEDED")
    assert done["attempts"] >= 4

    ledger = await web.gateway.ledger(ghost)
    assert len(ledger["refunds"]) == 1 and ledger["refunded"] == 4242
    outcomes = [c["outcome"] for c in ledger["refund_calls"]]
    assert outcomes.count("SUCCEEDED") == 1 and "ANSWER_WITHHELD" in outcomes
    assert outcomes.count("FAILED_INJECTED") >= 4
    handle = dev_env.client.get_workflow_handle_for(
        OperatorRefundWorkflow.run, operator_refund_workflow_id(txn)
    )
    assert (await handle.result()).status.value == "SUCCEEDED"
    history = await handle.fetch_history()
    replayed = await Replayer(
        workflows=[OperatorRefundWorkflow], data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=False)
    assert replayed.replay_failure is None
    if os.environ.get("PAYORDERS_RECORD_HISTORIES"):
        HISTORY.parent.mkdir(exist_ok=True)
        HISTORY.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
    report, found = await reconcile(web, dev_env.client)
    assert [f["action"] for f in found[txn]] == ["RESOLVED"]
    assert report.money_in_flight == 0


@pytest.mark.slow
async def test_an_operator_refund_whose_workflow_was_terminated_is_restarted_by_reconciliation(
    web: HttpStack, dev_env: WorkflowEnvironment
) -> None:
    ghost, txn = await ghost_payment(web, 300)
    await web.gateway.set_faults(ghost, fail_next_refunds=100_000)
    await web.service.operator_refund(txn)
    handle = dev_env.client.get_workflow_handle(operator_refund_workflow_id(txn))
    await handle.terminate("operator mistake")
    await web.gateway.clear_faults(ghost)
    _, found = await reconcile(web, dev_env.client)
    [restarted] = found[txn]
    assert (restarted["kind"], restarted["action"]) == ("refund_pending_too_long", "REPAIRED")
    await wait_refund(web, txn, "SUCCEEDED")
    assert len((await web.gateway.ledger(ghost))["refunds"]) == 1
    _, found = await reconcile(web, dev_env.client)
    assert [f["action"] for f in found[txn]] == ["RESOLVED"]


async def _refused(
    web: HttpStack, http: httpx.AsyncClient, client: Client, txn: str, status: int, code: str
) -> dict[str, Any]:
    """Answered ``status``/``code``, counted by its outcome, and nothing moved or started."""
    before = await everything(web)
    counted = refused(code)
    resp = await http.post("/v1/operator-refunds", json={"txn_id": txn}, headers=TOKEN)
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code
    assert await everything(web) == before, "a refused refund moves nothing"
    assert refused(code) == counted + 1
    with pytest.raises(RPCError) as none:
        await client.get_workflow_handle(operator_refund_workflow_id(txn)).describe()
    assert none.value.status is RPCStatusCode.NOT_FOUND
    return error


@pytest.mark.slow
async def test_refused_for_money_one_of_our_pay_orders_holds_unknown_or_unauthenticated(
    web: HttpStack, http: httpx.AsyncClient, dev_env: WorkflowEnvironment
) -> None:
    client = dev_env.client
    # Settled a pay order here.
    doc = await web.service.create(order_no=order_no("settled"), amount=300, currency="USD")
    paid = await web.gateway.pay(pay_order_no=doc["pay_order_no"], amount=300, currency="USD")
    await web.wait_order(doc["pay_order_no"], lambda o: o["status"] == "PAY_SUCCESS")
    error = await _refused(web, http, client, paid["txn_id"], 409, "settled")
    assert doc["pay_order_no"] in error["message"]

    # Paid late: its pay order is refunding it (and keeps failing), then has refunded it.
    late = await web.service.create(
        order_no=order_no("late"), amount=200, currency="USD", expires_in_s=1
    )
    no = late["pay_order_no"]
    await web.wait_order(no, lambda o: o["status"] == "PAY_EXPIRED")
    await web.gateway.set_faults(no, fail_next_refunds=100_000)
    late_paid = await web.gateway.pay(pay_order_no=no, amount=200, currency="USD")
    await web.wait_order(no, lambda o: [p["refund_status"] for p in o["payments"]] == ["PENDING"])
    error = await _refused(web, http, client, late_paid["txn_id"], 409, "already_refunding")
    assert "PENDING" in error["message"]
    await web.gateway.clear_faults(no)
    await web.wait_order(no, lambda o: o["refunded_amount"] == 200)
    await _refused(web, http, client, late_paid["txn_id"], 409, "already_refunding")
    assert len((await web.gateway.ledger(no))["refunds"]) == 1

    # Its pay order is ours, the notification was lost: reconciliation hands it over.
    known = await web.service.create(
        order_no=order_no("known"), amount=100, currency="USD", expires_in_s=600
    )
    await until(web, "SELECT true FROM pay_order WHERE pay_order_no = $1", known["pay_order_no"])
    sandbox = SandboxGateway(web.pool, schema=web.schema, server_timeout_s=1)
    lost = await sandbox.capture(pay_order_no=known["pay_order_no"], amount=100, currency="USD")
    await _refused(web, http, client, lost.txn_id, 409, "order_known")
    await reconcile(web, dev_env.client)  # feeds it to its order: it settles
    await web.wait_order(known["pay_order_no"], lambda o: o["status"] == "PAY_SUCCESS")

    # Unknown at the gateway.
    await _refused(web, http, client, "txn_nobody_ever_paid", 404, "unknown_transaction")
    with pytest.raises(ServiceError) as missing:
        await web.service.get_operator_refund("txn_nobody_ever_paid")
    assert missing.value.status == 404

    # Without the token (or with another), for a refund that would otherwise be accepted.
    _, txn = await ghost_payment(web, 100)
    before = await everything(web)
    for headers in ({}, {"Authorization": "Bearer guess"}):
        resp = await http.post("/v1/operator-refunds", json={"txn_id": txn}, headers=headers)
        assert resp.status_code == 401, resp.text
        assert (await http.get(f"/v1/operator-refunds/{txn}", headers=headers)).status_code == 401
    bad = await http.post("/v1/operator-refunds", json={"txn_id": "not a txn"}, headers=TOKEN)
    assert bad.status_code == 422
    assert await everything(web) == before

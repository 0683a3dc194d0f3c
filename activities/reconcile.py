"""Reconciliation activities: each checks a bounded slice (a keyset page of pay orders, or a
time window of the gateway's statement), repairs what it safely can, and records every
finding. Repairs are idempotent, so a retried activity or a second run repairs nothing
twice."""

from __future__ import annotations

import collections
import logging
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from activities.reconcile_merchant import MerchantRefundChecks
from payorders.core import domain, metrics
from payorders.core.domain import PayOrderStatus, RefundStatus
from payorders.core.models import (
    LateRefundInput,
    PaymentNotification,
    ReconcilePage,
    ReconcilePageResult,
    ReconcileReport,
    ReconcileStart,
    ReconcileWindow,
    RedriveInput,
    RetryConfig,
    Timeouts,
)
from payorders.core.reconcile import (
    EXCEPTION,
    REPAIRED,
    RESOLVED,
    Finding,
    Kind,
    ReconcileStore,
    judge,
)
from payorders.core.settings import Settings
from payorders.core.store import PayOrderStore
from payorders.gateways.port import Capture, Gateway, GatewayRefund
from payorders.pay_orders import PayOrders, operator_refund_workflow_id, workflow_running

log = logging.getLogger(__name__)


class ReconcileActivities:
    def __init__(
        self, recon: ReconcileStore, store: PayOrderStore, gateway: Gateway, settings: Settings
    ) -> None:
        self._recon = recon
        self._store = store
        self._gateway = gateway
        self._settings = settings
        self._merchant = MerchantRefundChecks(recon, store, gateway)

    def _here(self) -> Settings:
        """Settings whose task queue is this worker's: repairs run where this activity runs."""
        return self._settings.model_copy(update={"task_queue": activity.info().task_queue})

    @activity.defn(name="reconcile_start")
    async def start(self, cmd: ReconcileStart) -> None:
        await self._recon.start_run(cmd.run_id, cmd.period_start, cmd.period_end)

    @activity.defn(name="reconcile_finish")
    async def finish(self, run_id: str) -> ReconcileReport:
        if self._settings.order_events_url is not None:
            # Only where a relay delivers: a feed-only deployment never marks events delivered.
            late = await self._recon.record_undelivered_events(
                run_id, self._settings.order_events_alert_after_s
            )
            _count(late)
        run = await self._recon.finish(run_id)
        log.info("reconciliation %s: %s", run_id, run)
        return ReconcileReport.model_validate(run)

    # --- our own rows, page by page ---------------------------------------------------------

    @activity.defn(name="reconcile_page")
    async def page(self, cmd: ReconcilePage) -> ReconcilePageResult:
        page = await self._recon.page(
            cmd.after,
            cmd.limit,
            pending_after_s=cmd.pending_after_s,
            stuck_after_s=cmd.stuck_after_s,
        )
        client = activity.client()
        findings: list[Finding] = []
        for order in page.suspects:
            findings += judge(order)
            findings += await self._owed(client, order, cmd.refund_retry, cmd.timeouts)
            findings += await self._old_pending(client, order, cmd.refund_retry, cmd.timeouts)
            findings += await self._stuck(client, order, cmd)
        if page.last is not None:
            orders = PayOrders(client, self._store, self._here())
            findings += await self._merchant.page(
                client, orders, cmd.after, page.last, cmd.pending_after_s
            )
        await self._recon.record(cmd.run_id, findings)
        _count(findings)
        suspects = {o["pay_order_no"] for o in page.suspects}
        await self._recon.add_counts(
            cmd.run_id,
            checked=page.checked,
            consistent=page.checked - len(suspects),
            in_flight=page.in_flight,
            money=page.money_in_flight,
        )
        return ReconcilePageResult(checked=page.checked, last=page.last, findings=len(findings))

    async def _owed(
        self, client: Client, order: dict[str, Any], retry: RetryConfig, timeouts: Timeouts
    ) -> list[Finding]:
        """Payments owed back that have no refund row: put the row back, then finish it."""
        no = str(order["pay_order_no"])
        uncovered = int(order["refunded_amount"]) - int(order["refunds_sum"])
        if uncovered < 0:
            return [
                Finding(
                    Kind.REFUNDED_AMOUNT_MISMATCH,
                    EXCEPTION,
                    f"refunded_amount {order['refunded_amount']} is below its succeeded refunds"
                    f" {order['refunds_sum']}",
                    pay_order_no=no,
                    amount=uncovered,
                )
            ]
        findings: list[Finding] = []
        payments = await self._recon.payments_by_txn(list(order["owed"]))
        for txn, payment in payments.items():
            key = domain.refund_key(no, txn)
            at_gateway = await self._gateway.query_refund(key, txn)
            done = at_gateway is not None and at_gateway.status is RefundStatus.SUCCEEDED
            covered = done and uncovered >= payment["amount"]
            await self._recon.restore_refund(
                key,
                txn,
                gateway_refund_id=at_gateway.gateway_refund_id if done and at_gateway else None,
                covered=covered,
            )
            if covered:
                uncovered -= payment["amount"]
                detail = (
                    "refund row missing; the gateway refunded it and the order counts it: restored"
                )
            elif done and at_gateway is not None:
                await self._store.confirm_refund(key, at_gateway.gateway_refund_id)
                detail = "refund row missing; the gateway refunded it: restored and counted"
            else:
                await _start_refund(client, self._here(), no, payment, retry, timeouts)
                detail = "payment owed back had no refund: refund row created and refund started"
            findings.append(
                Finding(
                    Kind.REFUND_MISSING,
                    REPAIRED,
                    detail,
                    pay_order_no=no,
                    txn_id=txn,
                    refund_key=key,
                    amount=payment["amount"],
                )
            )
        if uncovered > 0 and not findings:
            findings.append(
                Finding(
                    Kind.REFUNDED_AMOUNT_MISMATCH,
                    EXCEPTION,
                    f"refunded_amount counts {uncovered} that no refund row or gateway"
                    " refund explains",
                    pay_order_no=no,
                    amount=uncovered,
                )
            )
        return findings

    async def _old_pending(
        self, client: Client, order: dict[str, Any], retry: RetryConfig, timeouts: Timeouts
    ) -> list[Finding]:
        no = str(order["pay_order_no"])
        findings: list[Finding] = []
        for key, txn in zip(order["old_pending"], order["old_pending_txns"], strict=True):
            at_gateway = await self._gateway.query_refund(key, txn)
            if at_gateway is not None and at_gateway.status is RefundStatus.SUCCEEDED:
                await self._store.confirm_refund(key, at_gateway.gateway_refund_id)
                findings.append(
                    Finding(
                        Kind.REFUND_CONFIRMED_AT_GATEWAY,
                        REPAIRED,
                        "the gateway had refunded it; recorded here",
                        pay_order_no=no,
                        refund_key=key,
                        amount=at_gateway.amount,
                    )
                )
                continue
            if await workflow_running(client, domain.workflow_id_for(no)):
                findings.append(
                    Finding(
                        Kind.REFUND_PENDING_TOO_LONG,
                        EXCEPTION,
                        "refund still retrying in its workflow: look at the gateway",
                        pay_order_no=no,
                        refund_key=key,
                    )
                )
                continue
            txn = key.removeprefix(f"refund-{no}-")
            payment = (await self._recon.payments_by_txn([txn]))[txn]
            await _start_refund(client, self._here(), no, payment, retry, timeouts)
            findings.append(
                Finding(
                    Kind.REFUND_PENDING_TOO_LONG,
                    REPAIRED,
                    "refund pending with no workflow running it: restarted",
                    pay_order_no=no,
                    txn_id=txn,
                    refund_key=key,
                    amount=payment["amount"],
                )
            )
        return findings

    async def _stuck(
        self, client: Client, order: dict[str, Any], cmd: ReconcilePage
    ) -> list[Finding]:
        no = str(order["pay_order_no"])
        if order["status"] != PayOrderStatus.PAYING.value:
            return []
        expires_at: datetime = order["expires_at"]
        if (datetime.now(expires_at.tzinfo) - expires_at).total_seconds() < cmd.stuck_after_s:
            return []
        if await workflow_running(client, domain.workflow_id_for(no)):
            return []
        await client.start_workflow(
            "RedriveWorkflow",
            RedriveInput(pay_order_no=no, timeouts=cmd.timeouts, refund_retry=cmd.refund_retry),
            id=f"redrive-{no}",
            task_queue=self._here().task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=f"reconciliation: re-drive stuck pay order {no}",
        )
        return [
            Finding(
                Kind.STUCK_PAYING,
                REPAIRED,
                "PAYING past its expiry with no workflow: re-driven (close, then settle or expire)",
                pay_order_no=no,
            )
        ]

    # --- the gateway's statement, window by window ------------------------------------------

    @activity.defn(name="reconcile_statement")
    async def statement(self, cmd: ReconcileWindow) -> int:
        stmt = await self._gateway.statement(cmd.start, cmd.end)
        client = activity.client()
        findings: list[Finding] = []
        captured = {c.txn_id: c for c in stmt.captures}
        ours = await self._recon.payments_by_txn(list(captured))
        unknown = [c for txn, c in captured.items() if txn not in ours]
        # Refunded by an operator: never fed to a pay order (its trigger would refuse it).
        by_operator = await self._recon.operator_refunds_by_txn([c.txn_id for c in unknown])
        unknown = [c for c in unknown if c.txn_id not in by_operator]
        have_order = await self._recon.orders_exist([c.pay_order_no for c in unknown])
        orders = PayOrders(client, self._store, self._here())
        for txn, refund in by_operator.items():
            findings.append(await self._operator_refunded(client, captured[txn], refund))
        for c in unknown:
            if c.pay_order_no not in have_order:
                findings.append(
                    Finding(
                        Kind.MONEY_WITHOUT_ORDER,
                        EXCEPTION,
                        f"captured {c.amount} {c.currency} at {c.captured_at.isoformat()} for a"
                        " pay order we never had: refund it with"
                        f" `payorders refund --txn {c.txn_id}`",
                        pay_order_no=c.pay_order_no,
                        txn_id=c.txn_id,
                        amount=c.amount,
                    )
                )
                continue
            outcome = await orders.notify_payment(
                pay_order_no=c.pay_order_no,
                txn_id=c.txn_id,
                amount=c.amount,
                currency=c.currency,
                paid_at=c.captured_at,
            )
            findings.append(
                Finding(
                    Kind.LOST_NOTIFICATION,
                    REPAIRED,
                    f"captured at the gateway, unknown here: fed to its order ({outcome.value})",
                    pay_order_no=c.pay_order_no,
                    txn_id=c.txn_id,
                    amount=c.amount,
                )
            )
        for txn, c in captured.items():
            p = ours.get(txn)
            if p is not None and (p["amount"], p["currency"].strip(), p["pay_order_no"]) != (
                c.amount,
                c.currency,
                c.pay_order_no,
            ):
                findings.append(
                    Finding(
                        Kind.AMOUNT_DIFFERS,
                        EXCEPTION,
                        f"we recorded {p['amount']} {p['currency'].strip()} for"
                        f" {p['pay_order_no']}, the gateway captured {c.amount} {c.currency}"
                        f" for {c.pay_order_no}",
                        pay_order_no=p["pay_order_no"],
                        txn_id=txn,
                        amount=c.amount,
                    )
                )
        after = ""
        while batch := await self._recon.payments_in_period(cmd.start, cmd.end, after, 5_000):
            after = batch[-1]["txn_id"]
            missing = [p for p in batch if p["txn_id"] not in captured]
            for p in missing:
                if await self._gateway.query_capture(p["txn_id"]) is None:
                    findings.append(
                        Finding(
                            Kind.PAYMENT_ABSENT_AT_GATEWAY,
                            EXCEPTION,
                            "recorded here, never captured at the gateway",
                            pay_order_no=p["pay_order_no"],
                            txn_id=p["txn_id"],
                            amount=p["amount"],
                        )
                    )
        findings += await self._refunds(stmt.refunds, cmd, orders)
        await self._recon.record(cmd.run_id, findings)
        _count(findings)
        return len(findings)

    async def _operator_refunded(
        self, client: Client, c: Capture, refund: dict[str, Any]
    ) -> Finding:
        """A capture for a pay order we never had, which an operator refunds or refunded."""
        key = str(refund["refund_key"])

        def found(kind: Kind, action: str, detail: str) -> Finding:
            return Finding(
                kind,
                action,
                detail,
                pay_order_no=c.pay_order_no,
                txn_id=c.txn_id,
                refund_key=key,
                amount=c.amount,
            )

        what = f"captured {c.amount} {c.currency} for a pay order we never had"
        status = RefundStatus(refund["status"])
        if status is RefundStatus.SUCCEEDED:
            return found(
                Kind.MONEY_WITHOUT_ORDER,
                RESOLVED,
                f"{what}: refunded by an operator (gateway refund {refund['gateway_refund_id']},"
                f" {refund['succeeded_at'].isoformat()})",
            )
        if status is RefundStatus.REJECTED:
            return found(
                Kind.MONEY_WITHOUT_ORDER,
                EXCEPTION,
                f"{what}: the gateway rejected the operator's refund ({refund['last_error']}):"
                " look at the gateway",
            )
        at_gateway = await self._gateway.query_refund(key, c.txn_id)
        if at_gateway is not None and at_gateway.status is RefundStatus.SUCCEEDED:
            if await self._store.operator_refunds.confirm_refund(key, at_gateway.gateway_refund_id):
                return found(
                    Kind.REFUND_CONFIRMED_AT_GATEWAY,
                    REPAIRED,
                    "operator refund: the gateway had refunded it; recorded here",
                )
            # Confirmed meanwhile by its own workflow.
            return found(Kind.MONEY_WITHOUT_ORDER, RESOLVED, f"{what}: refunded by an operator")
        if await workflow_running(client, operator_refund_workflow_id(c.txn_id)):
            age = datetime.now(UTC) - refund["created_at"]
            if age.total_seconds() > self._settings.reconcile_pending_after_s:
                return found(
                    Kind.REFUND_PENDING_TOO_LONG,
                    EXCEPTION,
                    "operator refund still retrying in its workflow: look at the gateway",
                )
            return found(
                Kind.MONEY_WITHOUT_ORDER,
                RESOLVED,
                f"{what}: an operator's refund is under way (in flight)",
            )
        # Opened, but its workflow never started (Temporal was down) or was terminated.
        orders = PayOrders(client, self._store, self._here())
        await orders.refund_orphan_payment(c.txn_id, gateway=self._gateway)
        return found(
            Kind.REFUND_PENDING_TOO_LONG,
            REPAIRED,
            "operator refund pending with no workflow running it: restarted",
        )

    async def _refunds(
        self, refunds: list[GatewayRefund], cmd: ReconcileWindow, orders: PayOrders
    ) -> list[Finding]:
        gateway_keys = {r.idempotency_key: r for r in refunds}
        ours = await self._recon.refunds_by_key(list(gateway_keys))
        by_operator = await self._recon.operator_refunds_by_key(
            [k for k in gateway_keys if k not in ours]
        )
        # Merchant refunds first (ours after PAY_SUCCESS, and the dashboard's): what they
        # explain is no compensation's business.
        findings, merchant = await self._merchant.statement(
            refunds, orders, not_merchant=set(ours) | set(by_operator)
        )
        for key, r in gateway_keys.items():
            if key in merchant:
                continue
            mine = ours.get(key)
            if r.status is not RefundStatus.SUCCEEDED:
                continue
            if mine is None and key in by_operator:
                operator = by_operator[key]
                if operator["status"] == RefundStatus.PENDING.value and (
                    await self._store.operator_refunds.confirm_refund(key, r.gateway_refund_id)
                ):
                    findings.append(
                        Finding(
                            Kind.REFUND_CONFIRMED_AT_GATEWAY,
                            REPAIRED,
                            "operator refund: refunded at the gateway while our record said"
                            " pending: recorded",
                            pay_order_no=operator["pay_order_no"],
                            txn_id=r.txn_id,
                            refund_key=key,
                            amount=r.amount,
                        )
                    )
                continue
            if mine is None:
                payment = (await self._recon.payments_by_txn([r.txn_id])).get(r.txn_id)
                if payment is None or payment["settled"]:
                    findings.append(
                        Finding(
                            Kind.REFUND_ABSENT_AT_GATEWAY,
                            EXCEPTION,
                            "the gateway refunded a payment we do not owe back",
                            txn_id=r.txn_id,
                            refund_key=key,
                            amount=r.amount,
                        )
                    )
                    continue
                covered = await self._recon.uncovered(payment["pay_order_no"]) >= r.amount
                restored = await self._recon.restore_refund(
                    key, r.txn_id, gateway_refund_id=r.gateway_refund_id, covered=covered
                )
                if restored:
                    if not covered:
                        await self._store.confirm_refund(key, r.gateway_refund_id)
                    findings.append(
                        Finding(
                            Kind.REFUND_RESTORED,
                            REPAIRED,
                            "refunded at the gateway, no record here: recorded"
                            + (" (the order already counted it)" if covered else ""),
                            pay_order_no=payment["pay_order_no"],
                            txn_id=r.txn_id,
                            refund_key=key,
                            amount=r.amount,
                        )
                    )
            elif mine["status"] == RefundStatus.PENDING.value:
                await self._store.confirm_refund(key, r.gateway_refund_id)
                findings.append(
                    Finding(
                        Kind.REFUND_CONFIRMED_AT_GATEWAY,
                        REPAIRED,
                        "refunded at the gateway while our record said pending: recorded",
                        pay_order_no=mine["pay_order_no"],
                        txn_id=r.txn_id,
                        refund_key=key,
                        amount=r.amount,
                    )
                )
        for mine in await self._recon.succeeded_refunds_in_period(cmd.start, cmd.end):
            if mine["refund_key"] in gateway_keys:
                continue
            if await self._gateway.query_refund(mine["refund_key"], mine["txn_id"]) is None:
                findings.append(
                    Finding(
                        Kind.REFUND_ABSENT_AT_GATEWAY,
                        EXCEPTION,
                        "recorded as refunded here, unknown at the gateway",
                        pay_order_no=mine["pay_order_no"],
                        txn_id=mine["txn_id"],
                        refund_key=mine["refund_key"],
                        amount=mine["amount"],
                    )
                )
        return findings


def _count(findings: list[Finding]) -> None:
    """Count the findings just written (after the insert returned, so none that failed to
    be recorded). A retried slice writes its findings again, and a problem that lasts is
    found by every run: the counter follows the rows of ``reconciliation_finding``."""
    meter = activity.metric_meter()
    for (kind, action), n in collections.Counter((f.kind, f.action) for f in findings).items():
        metrics.RECONCILE_FINDINGS.add(meter, n, kind=kind.value, action=action)


async def _start_refund(
    client: Client,
    settings: Settings,
    pay_order_no: str,
    payment: dict[str, Any],
    retry: RetryConfig,
    timeouts: Timeouts,
) -> None:
    """Run the payment's refund to the end in a workflow of its own (same idempotency key)."""
    txn = str(payment["txn_id"])
    await client.start_workflow(
        "LateRefundWorkflow",
        LateRefundInput(
            pay_order_no=pay_order_no,
            payment=PaymentNotification(
                txn_id=txn,
                amount=int(payment["amount"]),
                currency=str(payment["currency"]).strip(),
                paid_at=payment["paid_at"],
            ),
            refund_retry=retry,
            timeouts=timeouts,
        ),
        id=f"refund-repair-{txn}",
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=f"reconciliation: finish the refund of {txn}",
    )

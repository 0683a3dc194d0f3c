"""The Python API of the two callers: checkout and the gateway adapter, plus reads.

The Temporal client is built here and only here, with the pydantic data converter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributeIndexedValueType,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.runtime import Runtime
from temporalio.service import RetryConfig, RPCError, RPCStatusCode

from payorders.core import domain
from payorders.core import search_attributes as sa
from payorders.core.domain import MerchantRefundStatus, PayOrderStatus, RefundStatus
from payorders.core.merchant_refunds import Opened, RefundRefused, SeenAtGateway
from payorders.core.models import (
    PAY_ORDER_VERSION,
    CancelResult,
    Checkout,
    CheckoutTerms,
    LateRefundInput,
    MerchantRefund,
    MerchantRefundInput,
    OperatorRefund,
    OperatorRefundInput,
    PaymentNotification,
    PayOrderInput,
    PayOrderRow,
    PayOrderView,
    RefundPayment,
)
from payorders.core.settings import Settings
from payorders.core.store import PayOrderStore
from payorders.gateways.port import Gateway, GatewayRefund

log = logging.getLogger(__name__)


async def workflow_running(client: Client, workflow_id: str) -> bool:
    """Whether a workflow of that id is running now (False: none, or it has closed)."""
    try:
        desc = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as e:
        if e.status is RPCStatusCode.NOT_FOUND:
            return False
        raise
    return desc.status is WorkflowExecutionStatus.RUNNING


class UnknownPayOrder(LookupError):
    """No pay order with that number: nothing was changed."""


class PayOrderConflict(ValueError):
    """The order already has a pay order with another amount or currency."""


class UnknownTransaction(LookupError):
    """The gateway has no capture with that transaction id: nothing was changed."""


# A request handler answers within its caller's patience: give up on an unreachable
# Temporal after about 2 s (and say 503) rather than after the SDK's default 10 s.
FAIL_FAST = RetryConfig(max_elapsed_time_millis=2_000, max_retries=4)


async def connect(
    settings: Settings, *, service: bool = False, runtime: Runtime | None = None
) -> Client:
    """The one Temporal client of a process, with the pydantic data converter.

    ``service``: for a request-serving process: connect on first use (so it can start,
    and answer 503, while Temporal is down) and fail fast instead of retrying for long.
    ``runtime``: the SDK runtime (its telemetry: the worker's Prometheus endpoint); a
    worker built on this client uses it too. Default: the SDK's default runtime.
    """
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        lazy=service,
        retry_config=FAIL_FAST if service else None,
        runtime=runtime,
    )


async def ensure_search_attributes(client: Client, namespace: str) -> None:
    """Register our search attributes where the server does not have them yet."""
    kinds = {
        SearchAttributeIndexedValueType.KEYWORD: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
        SearchAttributeIndexedValueType.DATETIME: IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
    }
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=namespace,
            search_attributes={key.name: kinds[key.indexed_value_type] for key in sa.ALL},
        )
    )


RECONCILE_SCHEDULE_ID = "payorders-reconcile"


async def ensure_reconcile_schedule(client: Client, settings: Settings) -> None:
    """Create the reconciliation Schedule, or bring an existing one up to date."""
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            "ReconcileWorkflow",
            settings.reconcile_input(),
            id="payorders-reconcile-run",
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.reconcile_every_s))]
        ),
        policy=SchedulePolicy(
            overlap=ScheduleOverlapPolicy.SKIP,
            catchup_window=timedelta(seconds=max(60, settings.reconcile_every_s)),
        ),
    )
    try:
        await client.create_schedule(RECONCILE_SCHEDULE_ID, schedule)
    except ScheduleAlreadyRunningError:
        handle = client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
        await handle.update(lambda _: ScheduleUpdate(schedule=schedule))


@dataclass(frozen=True)
class StartedPayOrder:
    pay_order_no: str
    order_no: str
    amount: int
    currency: str
    expires_at: datetime
    workflow_id: str
    created: bool
    """False when checkout was retried and the existing pay order was returned."""
    checkout: Checkout | None = None
    """What the front end needs to pay (the same for every retry); None when the pay order
    can no longer be paid (``not_payable`` says why) or was started without waiting."""
    not_payable: str | None = None


class CheckoutPending(Exception):
    """The gateway has not opened the trade yet: the same checkout, retried, finds it."""


class CancelPending(Exception):
    """The workflow has not closed the pay order in time (the gateway's close keeps failing,
    or no worker runs): the cancel stands, and the same call again answers its outcome.

    Not a ``RuntimeError``: the service reads those as an unreachable Temporal."""


class NotifyOutcome(StrEnum):
    SIGNALLED = "SIGNALLED"
    LATE_REFUND_STARTED = "LATE_REFUND_STARTED"
    LATE_REFUND_EXISTS = "LATE_REFUND_EXISTS"


@dataclass(frozen=True)
class OperatorRefundStarted:
    refund: OperatorRefund
    """The refund's row as it is now (PENDING until the gateway confirms)."""
    created: bool
    """False when the same transaction was asked for before: no second refund."""
    workflow_id: str


def operator_refund_workflow_id(txn_id: str) -> str:
    """One operator refund per transaction: a repeated request finds this workflow."""
    return f"operator-refund-{txn_id}"


@dataclass(frozen=True)
class PayOrderDetails:
    row: PayOrderRow
    payments: list[dict[str, Any]]
    fund: domain.FundCheck
    merchant: domain.MerchantRefunds
    workflow_status: str | None
    view: PayOrderView | None


class PayOrders:
    """Checkout starts pay orders; the gateway adapter reports payments."""

    def __init__(self, client: Client, store: PayOrderStore, settings: Settings) -> None:
        self._client = client
        self._store = store
        self._settings = settings

    def ui_link(self, pay_order_no: str) -> str:
        return self._settings.ui_link(domain.workflow_id_for(pay_order_no))

    async def start_pay_order(
        self,
        *,
        order_no: str,
        amount: int,
        currency: str,
        expires_in: timedelta | None = None,
        expires_at: datetime | None = None,
        now: datetime | None = None,
        wait_checkout: bool = True,
    ) -> StartedPayOrder:
        """Start the pay order of ``order_no``; a retried checkout returns the same one.

        It expires at ``expires_at`` (with a time zone) or ``expires_in`` from now, at most
        one of them; with neither, after the configured default window. With
        ``wait_checkout`` it waits (the workflow's ``checkout`` update) until the workflow
        has opened the trade at the gateway, and returns what the front end needs to pay.

        Raises:
            InvalidPayOrder: bad input; nothing was started.
            PayOrderConflict: the order already has a pay order for another amount.
            CheckoutPending: started, but the gateway has not opened the trade in time;
                the same call again returns the same pay order and its trade.
        """
        now = now or datetime.now(UTC)
        expires_at = domain.pay_order_deadline(
            now=now,
            default=self._settings.default_expires_in,
            expires_at=expires_at,
            expires_in=expires_in,
        )
        domain.validate_new_pay_order(
            order_no=order_no, amount=amount, currency=currency, expires_at=expires_at, now=now
        )
        pay_order_no = domain.pay_order_no_for(order_no)
        workflow_id = domain.workflow_id_for(pay_order_no)
        # The start id tells our own start from an existing run: a retried checkout with the
        # same absolute deadline has an otherwise identical memo.
        memo = {
            "amount": amount,
            "currency": currency,
            "expires_at": expires_at.isoformat(),
            "start_id": uuid.uuid4().hex,
        }
        pay_input = PayOrderInput(
            pay_order_no=pay_order_no,
            order_no=order_no,
            amount=amount,
            currency=currency,
            expires_at=expires_at,
            settlement_window_s=self._settings.settlement_window_s,
            refund_retry=self._settings.refund_retry(),
            timeouts=self._settings.timeouts(),
            version=PAY_ORDER_VERSION,
        )
        start: dict[str, Any] = {
            "id": workflow_id,
            "task_queue": self._settings.task_queue,
            "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
            "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
            "search_attributes": TypedSearchAttributes(
                [
                    SearchAttributePair(sa.PAY_ORDER_STATUS, PayOrderStatus.PAYING.value),
                    SearchAttributePair(sa.ORDER_NO, order_no),
                    SearchAttributePair(sa.EXPIRES_AT, expires_at),
                ]
            ),
            "memo": memo,
            "static_summary": f"pay order for {order_no}: {amount} {currency}",
        }
        checkout: Checkout | None = None
        not_payable: str | None = None
        terms: CheckoutTerms | None = None
        handle: WorkflowHandle[Any, Any]
        try:
            if wait_checkout:
                # Start and ask in one call: the update rides in the workflow's first task,
                # so checkout waits one trip to the gateway and no extra workflow task.
                checkout, terms, not_payable = await self._checkout_with_start(
                    WithStartWorkflowOperation("PayOrderWorkflow", pay_input, **start),
                    pay_order_no,
                )
                handle = self._client.get_workflow_handle(workflow_id)
            else:
                handle = await self._client.start_workflow("PayOrderWorkflow", pay_input, **start)
        except WorkflowAlreadyStartedError:
            # Closed (its settlement window is over) and never started again: nothing to pay.
            handle = self._client.get_workflow_handle(workflow_id)
            if wait_checkout:
                not_payable = await self._closed_reason(pay_order_no)
        if terms is not None:
            # The run's own answer carries its memo's facts: no describe on the happy path.
            existing: Mapping[str, Any] = {
                "amount": terms.amount,
                "currency": terms.currency,
                "expires_at": terms.expires_at.isoformat(),
                "start_id": terms.start_id,
            }
        else:
            existing = await (await handle.describe()).memo()
        if existing.get("amount") != amount or existing.get("currency") != currency:
            raise PayOrderConflict(
                f"order {order_no} already has pay order {pay_order_no}"
                f" for {existing.get('amount')} {existing.get('currency')}"
            )
        return StartedPayOrder(
            pay_order_no=pay_order_no,
            order_no=order_no,
            amount=amount,
            currency=currency,
            expires_at=datetime.fromisoformat(existing["expires_at"]),
            workflow_id=workflow_id,
            created=existing.get("start_id") == memo["start_id"],
            checkout=checkout,
            not_payable=not_payable,
        )

    async def _checkout_with_start(
        self, start: WithStartWorkflowOperation[Any, Any], pay_order_no: str
    ) -> tuple[Checkout | None, CheckoutTerms | None, str | None]:
        """The workflow's answer to ``checkout_terms``: its trade and terms, or why there is
        no trade to pay. A worker older than that update (a rolling upgrade) is asked
        ``checkout`` instead, and the terms are left to a describe."""
        rpc_timeout = timedelta(milliseconds=self._settings.checkout_wait_ms)
        try:
            try:
                # The RPC's own deadline, not a cancelled task: the SDK then says so plainly.
                terms: CheckoutTerms = await self._client.execute_update_with_start_workflow(
                    "checkout_terms",
                    start_workflow_operation=start,
                    result_type=CheckoutTerms,
                    rpc_timeout=rpc_timeout,
                )
                return terms.checkout, terms, None
            except WorkflowUpdateFailedError as e:
                if not _unknown_update(e):
                    raise
            handle = await start.workflow_handle()
            checkout: Checkout = await handle.execute_update(
                "checkout", result_type=Checkout, rpc_timeout=rpc_timeout
            )
            return checkout, None, None
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # Our deadline or the server's ran out first: either way the workflow may be
            # started and still opening the trade. The operation keeps the start's own
            # outcome in a future of its own: read it, so it is not reported as lost.
            with contextlib.suppress(Exception):
                await start.workflow_handle()
            raise CheckoutPending(
                f"the gateway has not opened the trade of {pay_order_no} yet; retry"
            ) from None
        except WorkflowUpdateFailedError as e:
            cause = e.cause
            if isinstance(cause, ApplicationError) and cause.type == "NotPayable":
                return None, None, cause.message
            raise

    async def _closed_reason(self, pay_order_no: str) -> str:
        row = await self._store.get_pay_order(pay_order_no)
        return f"pay order {pay_order_no} is {row.status.value if row else 'closed'}"

    async def cancel_pay_order(
        self, pay_order_no: str, *, requested_by: str | None = None
    ) -> CancelResult:
        """Checkout cancels: close the pay order now, by the expiry's path (the workflow's
        ``cancel`` update). Returns once the outcome is durable: ``PAY_EXPIRED`` with
        ``CANCELLED``, or ``PAY_SUCCESS`` when the gateway says it was already paid.
        Idempotent: a repeat, or a cancel of a closed order, answers the current status
        (``closed`` False) and changes nothing. Once the workflow has completed (its
        settlement window is over) the row answers. ``requested_by`` (the API token's name)
        is kept on the row as ``cancel_requested_by`` when the order is ``PAYING`` and
        nobody asked before, whatever the outcome.

        Raises:
            InvalidInput: not a pay order number; nothing was asked.
            UnknownPayOrder: no such pay order; nothing was changed.
            CancelPending: not closed within ``cancel_wait_ms``; the cancel stands, retry.
            RPCError: Temporal cannot be reached.
        """
        domain.check_identifier(pay_order_no.removeprefix("po_"), "pay_order_no")
        if requested_by is not None:
            # Before the update: once it has run the order is terminal and the guarded
            # write would find nothing to note. A row not written yet notes nobody.
            await self._store.note_cancel_requested(pay_order_no, requested_by)
        handle = self._client.get_workflow_handle(domain.workflow_id_for(pay_order_no))
        try:
            async with asyncio.timeout(self._settings.cancel_wait_ms / 1000):
                result: CancelResult = await handle.execute_update(
                    "cancel", result_type=CancelResult
                )
                return result
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            raise CancelPending(
                f"pay order {pay_order_no} is not closed yet (the gateway has not closed its"
                " trade); the cancel stands: retry to learn the outcome"
            ) from None
        except RPCError as e:
            # Never started, or completed after its settlement window: the row decides.
            if e.status is not RPCStatusCode.NOT_FOUND:
                raise
        row = await self._store.get_pay_order(pay_order_no)
        if row is None:
            raise UnknownPayOrder(f"no pay order {pay_order_no}")
        return CancelResult(
            pay_order_no=pay_order_no,
            status=row.status,
            close_reason=row.close_reason,
            closed=False,
        )

    async def notify_payment(
        self, *, pay_order_no: str, txn_id: str, amount: int, currency: str, paid_at: datetime
    ) -> NotifyOutcome:
        """Report a confirmed payment. Returns once Temporal has durably accepted it.

        Raises:
            InvalidPayment: bad input; nothing was sent.
            UnknownPayOrder: no such pay order; nothing was sent.
        """
        domain.validate_payment(txn_id=txn_id, amount=amount, currency=currency)
        try:
            domain.check_identifier(pay_order_no.removeprefix("po_"), "pay_order_no")
        except domain.InvalidInput as e:
            raise domain.InvalidPayment(str(e)) from None
        payment = PaymentNotification(
            txn_id=txn_id, amount=amount, currency=currency, paid_at=paid_at
        )
        handle = self._client.get_workflow_handle(domain.workflow_id_for(pay_order_no))
        try:
            await handle.signal("payment_succeeded", payment)
            return NotifyOutcome.SIGNALLED
        except RPCError as e:
            if e.status is not RPCStatusCode.NOT_FOUND:
                raise
        # Not running: closed (late money, refund it) or never existed (refuse).
        try:
            desc = await handle.describe()
        except RPCError as e:
            if e.status is RPCStatusCode.NOT_FOUND:
                raise UnknownPayOrder(f"no pay order {pay_order_no}") from None
            raise
        if desc.status is WorkflowExecutionStatus.RUNNING:
            # It was completing while we signalled; the server delivers to the open run.
            await handle.signal("payment_succeeded", payment)
            return NotifyOutcome.SIGNALLED
        try:
            await self._client.start_workflow(
                "LateRefundWorkflow",
                LateRefundInput(
                    pay_order_no=pay_order_no,
                    payment=payment,
                    refund_retry=self._settings.refund_retry(),
                    timeouts=self._settings.timeouts(),
                ),
                id=domain.late_refund_workflow_id(txn_id),
                task_queue=self._settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                static_summary=f"late payment {txn_id} for {pay_order_no}: refund",
            )
        except WorkflowAlreadyStartedError:
            return NotifyOutcome.LATE_REFUND_EXISTS
        return NotifyOutcome.LATE_REFUND_STARTED

    async def get_pay_order(self, pay_order_no: str) -> PayOrderDetails:
        row, payments = await self._store.snapshot(pay_order_no)
        handle = self._client.get_workflow_handle(domain.workflow_id_for(pay_order_no))
        view: PayOrderView | None = None
        wf_status: str | None = None
        try:
            desc = await handle.describe()
            wf_status = desc.status.name if desc.status else None
            if desc.status is WorkflowExecutionStatus.RUNNING:
                view = await handle.query("status", result_type=PayOrderView)
        except RPCError:
            desc = None
        if row is None and view is not None and desc is not None:
            # Started, but its first activity has not written the row yet: still PAYING.
            row = PayOrderRow(
                pay_order_no=pay_order_no,
                order_no=view.order_no,
                amount=view.amount,
                currency=view.currency,
                status=PayOrderStatus.PAYING,
                paid_amount=0,
                refunded_amount=0,
                lock_version=0,
                expires_at=view.expires_at,
                created_at=desc.start_time,
                updated_at=desc.start_time,
            )
        if row is None:
            raise UnknownPayOrder(f"no pay order {pay_order_no}")
        return PayOrderDetails(
            row=row,
            payments=payments,
            fund=domain.fund_check(
                status=row.status,
                amount=row.amount,
                paid_amount=row.paid_amount,
                refunded_amount=row.refunded_amount,
            ),
            merchant=await self._store.merchant_refunds.totals(pay_order_no, row.amount),
            workflow_status=wf_status,
            view=view,
        )

    async def refund_pay_order(
        self,
        pay_order_no: str,
        *,
        refund_no: str,
        amount: int,
        reason: str | None = None,
        requested_by: str | None = None,
        now: datetime | None = None,
    ) -> Opened:
        """The shop refunds (part of) a paid pay order by the original route.

        Opens the ``merchant_refund`` row under the pay order's lock (the one writer: it
        decides whether the amount still fits), then runs ``MerchantRefundWorkflow``
        (``merchant-refund-{refund_no}``), which refunds under ``mrefund-{refund_no}`` until
        the gateway confirms or finally refuses. Idempotent by ``refund_no``: the same
        request again answers the same refund and moves nothing (it starts the workflow
        again only if the first request died between the row and the start).

        Raises:
            InvalidInput: a bad ``refund_no`` or amount; nothing was written.
            RefundRefused: not refundable (not paid, past the window, more than is left,
                ``refund_no`` taken by another refund); nothing was written.
            RPCError: Temporal cannot be reached after the row was opened; asking again
                starts the refund.
        """
        domain.check_refund_no(refund_no)
        domain.check_amount(amount)
        opened = await self._store.merchant_refunds.open(
            pay_order_no=pay_order_no,
            refund_no=refund_no,
            amount=amount,
            reason=reason,
            requested_by=requested_by,
            now=now or datetime.now(UTC),
            window=timedelta(days=self._settings.refund_window_days),
        )
        if opened.refund.status is MerchantRefundStatus.REFUNDING:
            await self.run_merchant_refund(opened.refund, requested_by=requested_by)
        return opened

    async def run_merchant_refund(
        self, r: MerchantRefund, *, requested_by: str | None = None
    ) -> None:
        """Start (or join) the workflow of an open merchant refund; reconciliation calls it
        for a ``REFUNDING`` row whose workflow never started (Temporal was down when the API
        opened the row, and nobody asked again) or was terminated."""
        # It completed between our read and the start: the row says how.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await self._client.start_workflow(
                "MerchantRefundWorkflow",
                MerchantRefundInput(
                    refund_no=r.refund_no,
                    pay_order_no=r.pay_order_no,
                    txn_id=r.txn_id,
                    amount=r.amount,
                    currency=r.currency,
                    refund_retry=self._settings.refund_retry(),
                    timeouts=self._settings.timeouts(),
                ),
                id=domain.merchant_refund_workflow_id(r.refund_no),
                task_queue=self._settings.task_queue,
                # A request repeated while it runs joins it; after it completed, the row
                # answers; a run terminated mid-way may be started again (same key).
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                static_summary=f"merchant refund {r.refund_no}: {r.amount} {r.currency} of"
                f" {r.pay_order_no}" + (f", asked by {requested_by}" if requested_by else ""),
            )

    async def record_gateway_refunds(self, made: list[GatewayRefund]) -> list[MerchantRefund]:
        """Record, as merchant refunds with ``source: gateway``, the refunds the gateway
        confirmed that none of our rows holds (made at its dashboard); ours, and those
        recorded before, are left alone. Returns the ones recorded now.

        A refund that is no merchant refund (of a late or duplicate payment, or more than the
        order's amount) is logged and left to reconciliation, which reports it.
        """
        recorded: list[MerchantRefund] = []
        for r in made:
            if r.status is not RefundStatus.SUCCEEDED:
                continue  # pending at the gateway: its next notification, or reconciliation
            seen = SeenAtGateway(
                key=r.idempotency_key,
                gateway_refund_id=r.gateway_refund_id,
                txn_id=r.txn_id,
                amount=r.amount,
                currency=r.currency,
                created_at=r.created_at,
            )
            try:
                row = await self._store.merchant_refunds.record_gateway_made(seen)
            except RefundRefused as e:
                log.warning("gateway refund %s not recorded: %s", r.gateway_refund_id, e)
                continue
            if row is not None:
                log.info(
                    "refund %s made at the gateway recorded as %s (%d %s of %s)",
                    r.gateway_refund_id,
                    row.refund_no,
                    row.amount,
                    row.currency,
                    row.pay_order_no,
                )
                recorded.append(row)
        return recorded

    async def refund_orphan_payment(
        self, txn_id: str, *, gateway: Gateway, requested_by: str | None = None
    ) -> OperatorRefundStarted:
        """An operator's refund of money the gateway captured for a pay order we never had.

        Believes only the gateway: amount, currency and pay order number are those of its
        capture. Opens the ``operator_refund`` row, then runs ``OperatorRefundWorkflow``
        (``operator-refund-{txn_id}``), which refunds under ``refund-{pay_order_no}-{txn_id}``
        until the gateway confirms; ``requested_by`` (the API token's name) is kept on the
        row it opens. Idempotent by ``txn_id``: asked again, it answers with the
        same refund and moves nothing (and restarts the workflow only if it was terminated
        before the gateway answered).

        Raises:
            InvalidInput: not a transaction id; nothing was asked or written.
            UnknownTransaction: the gateway has no such capture; nothing was written.
            NotRefundable: one of our pay orders holds the transaction (settled it, refunds
                it) or will (its pay order is ours); nothing was written.
            GatewayError: the gateway cannot be reached; nothing was written.
            RPCError: Temporal cannot be reached after the row was opened; asking again
                starts the refund.
        """
        domain.check_identifier(txn_id, "txn_id")
        capture = await gateway.query_capture(txn_id)
        if capture is None:
            raise UnknownTransaction(f"the gateway has no transaction {txn_id}")
        refund, created = await self._store.operator_refunds.open(
            capture, requested_by=requested_by
        )
        workflow_id = operator_refund_workflow_id(txn_id)
        if refund.status is not RefundStatus.PENDING:
            return OperatorRefundStarted(refund=refund, created=created, workflow_id=workflow_id)
        try:
            await self._client.start_workflow(
                "OperatorRefundWorkflow",
                OperatorRefundInput(
                    refund=RefundPayment(
                        refund_key=refund.refund_key,
                        pay_order_no=refund.pay_order_no,
                        txn_id=refund.txn_id,
                        amount=refund.amount,
                        currency=refund.currency.strip(),
                    ),
                    refund_retry=self._settings.refund_retry(),
                    timeouts=self._settings.timeouts(),
                ),
                id=workflow_id,
                task_queue=self._settings.task_queue,
                # A request repeated while it runs joins it; after it completed, the row
                # answers; a run terminated mid-way may be started again (same key).
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                static_summary=f"operator refund of {txn_id}: {refund.amount} {refund.currency}"
                f" captured for {refund.pay_order_no}, a pay order we never had",
            )
        except WorkflowAlreadyStartedError:
            # It completed between our read and the start: the row now says how.
            refund = await self._store.operator_refunds.get(txn_id) or refund
        return OperatorRefundStarted(refund=refund, created=created, workflow_id=workflow_id)


def _unknown_update(error: WorkflowUpdateFailedError) -> bool:
    """Whether the worker that ran the update has no handler of that name (the SDK's
    rejection says so in its message: it has no code or type of its own)."""
    cause = error.cause
    return (
        isinstance(cause, ApplicationError)
        and "expected but not found" in cause.message
        and "Update handler for" in cause.message
    )

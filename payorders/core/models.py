"""Payload models: one pydantic model in and one out for every workflow, signal, query and
activity. Plain data, no I/O, safe to pass through the workflow sandbox."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, StrictInt

from payorders.core.domain import (
    CloseReason,
    MerchantRefundStatus,
    PayOrderStatus,
    RefundReason,
    RefundSource,
    RefundStatus,
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetryConfig(_Model):
    """Backoff of the refund retries: unlimited attempts, capped interval."""

    initial_interval_ms: int = 1_000
    maximum_interval_ms: int = 300_000


class Timeouts(_Model):
    """Gateway client timeout (longer than the gateway's own) and the activity timeout above it."""

    gateway_client_ms: int = 10_000
    activity_start_to_close_ms: int = 30_000
    db_activity_start_to_close_ms: int = 10_000


# The behaviour version a new pay order is started with. A running workflow's input never
# changes, so branching on it is as deterministic as ``workflow.patched`` and, unlike a
# patch, costs no history events (a patch writes a marker and upserts
# TemporalChangeVersion: two of the twenty events the happy path may have).
#   1: database writes as regular activities (orders started before version 2; the field
#      is absent from their input and reads as 1, so their histories replay unchanged).
#   2: the short database writes (create, record payment, expire) and the gateway's
#      trade close as local activities: one workflow task per payment and per expiry.
#   3: the workflow opens the trade at the gateway after creating the row (``open_trade``)
#      and answers checkout's ``checkout`` update with what the front end needs.
# An older worker refuses an input carrying a version field (``extra="forbid"``): its
# workflow task fails and is retried until an upgraded worker takes it, so deploy workers
# before starters and nothing runs on code that does not know the version.
PAY_ORDER_VERSION = 3


class PayOrderInput(_Model):
    pay_order_no: str
    order_no: str
    amount: StrictInt
    currency: str
    expires_at: datetime
    settlement_window_s: int = 25 * 3600
    refund_retry: RetryConfig = RetryConfig()
    timeouts: Timeouts = Timeouts()
    version: int = 1


class PaymentNotification(_Model):
    """The ``payment_succeeded`` signal: what the gateway says it captured."""

    txn_id: str
    amount: StrictInt
    currency: str
    paid_at: datetime


class PaymentView(_Model):
    txn_id: str
    amount: int
    currency: str
    settled: bool
    refund_reason: RefundReason | None = None
    refund_key: str | None = None
    refund_status: RefundStatus | None = None


class PayOrderView(_Model):
    """The workflow's own view of its pay order (query ``status``)."""

    pay_order_no: str
    order_no: str
    amount: int
    currency: str
    status: PayOrderStatus
    expires_at: datetime
    paid_amount: int
    refunded_amount: int
    payments: list[PaymentView]
    refunds_in_flight: int
    rejected_notifications: int
    duplicate_notifications: int
    settlement_ends_at: datetime | None
    close_reason: CloseReason | None = None
    """Why it closed unpaid (``PAY_EXPIRED`` only): its timer, or checkout's cancel."""
    cancel_requested_at: datetime | None = None
    """When checkout asked to cancel it (the first ``cancel`` that found it ``PAYING``)."""


class CancelResult(_Model):
    """The answer to the ``cancel`` update, once the pay order's terminal status is durable."""

    pay_order_no: str
    status: PayOrderStatus
    close_reason: CloseReason | None
    closed: bool
    """Whether this cancel closed the pay order: it was ``PAYING``, and this cancel's close of
    the trade ended it (``PAY_EXPIRED`` with ``CANCELLED``, or ``PAY_SUCCESS`` when the gateway
    answered that it was already paid). False for a repeat, or when a payment, the timer or an
    earlier cancel closed it."""


class PayOrderResult(_Model):
    pay_order_no: str
    status: PayOrderStatus
    paid_amount: int
    refunded_amount: int


class LateRefundInput(_Model):
    pay_order_no: str
    payment: PaymentNotification
    refund_retry: RetryConfig = RetryConfig()
    timeouts: Timeouts = Timeouts()


class LateRefundResult(_Model):
    txn_id: str
    refunded: bool
    refund_key: str | None


# --- activity payloads -------------------------------------------------------------------


class CreatePayOrder(_Model):
    pay_order_no: str
    order_no: str
    amount: int
    currency: str
    expires_at: datetime


class PayOrderRow(_Model):
    pay_order_no: str
    order_no: str
    amount: int
    currency: str
    status: PayOrderStatus
    paid_amount: int
    refunded_amount: int
    lock_version: int
    expires_at: datetime
    created_at: datetime
    updated_at: datetime
    gateway: str | None = None
    trade_ref: str | None = None
    """The gateway's id of the pay order's trade, once the workflow opened it (version 3)."""
    close_reason: CloseReason | None = None
    """Why it closed unpaid: set with ``PAY_EXPIRED`` only (migration 0007)."""
    cancel_requested_by: str | None = None
    """The API token's name of the first caller that asked to cancel it while it was
    ``PAYING`` (migration 0008); None when nobody did."""


class RecordPayment(_Model):
    """Record a payment; settle the order with it when ``refund_reason`` is None and the
    guarded update still finds the order ``PAYING`` at ``expected_lock_version``."""

    pay_order_no: str
    payment: PaymentNotification
    refund_reason: RefundReason | None
    expected_lock_version: int | None

    @property
    def settles(self) -> bool:
        """Whether this payment is meant to settle the order (else it is kept for a refund)."""
        return self.refund_reason is None and self.expected_lock_version is not None


class RecordedPayment(_Model):
    txn_id: str
    pay_order_no: str
    settled: bool
    refund_reason: RefundReason | None
    refund_key: str | None
    order_status: PayOrderStatus
    lock_version: int


class ExpirePayOrder(_Model):
    pay_order_no: str
    expected_lock_version: int
    reason: CloseReason = CloseReason.EXPIRED


class TransitionResult(_Model):
    """Outcome of a guarded status update: ``changed`` is False when the guard did not match."""

    changed: bool
    row: PayOrderRow


class OpenTradeCmd(_Model):
    pay_order_no: str
    amount: int
    currency: str
    expires_at: datetime


class Checkout(_Model):
    """What checkout's front end needs to let the customer pay, from the gateway that
    opened the trade. ``details``: for Stripe ``payment_intent`` and ``client_secret``; for
    the sandbox ``trade_no`` and ``pay_url``."""

    gateway: str
    trade_ref: str
    """The gateway's id of the trade (Stripe: the PaymentIntent ``pi_...``)."""
    details: dict[str, str] = {}


class CheckoutTerms(_Model):
    """The ``checkout_terms`` update's answer: ``checkout`` with the terms the pay order was
    started with (its memo's facts). A checkout client tells from it, with no describe,
    whether it started the run (``start_id`` is its own) and whether an earlier start asked
    for another amount."""

    checkout: Checkout
    amount: StrictInt
    currency: str
    expires_at: datetime
    start_id: str | None
    """The memo's ``start_id``: set by the checkout call that started the run."""


class CloseTrade(_Model):
    pay_order_no: str
    trade_ref: str | None = None


class CloseTradeResult(_Model):
    already_paid: bool
    payment: PaymentNotification | None = None


class RefundPayment(_Model):
    refund_key: str
    pay_order_no: str
    txn_id: str
    amount: int
    currency: str


class RefundOutcome(_Model):
    refund_key: str
    status: RefundStatus
    gateway_refund_id: str | None


# --- merchant refunds -----------------------------------------------------------------------


class MerchantRefund(_Model):
    """A refund the shop asked for after ``PAY_SUCCESS`` (row ``merchant_refund``)."""

    refund_no: str
    pay_order_no: str
    txn_id: str
    amount: int
    currency: str
    reason: str | None
    requested_by: str | None
    source: RefundSource
    idempotency_key: str
    status: MerchantRefundStatus
    attempts: int
    gateway_refund_id: str | None
    failure_reason: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class MerchantRefundInput(_Model):
    """``MerchantRefundWorkflow``: give this money back by the original route, retried until
    the gateway confirms it or finally refuses it."""

    refund_no: str
    pay_order_no: str
    txn_id: str
    amount: int
    currency: str
    refund_retry: RetryConfig = RetryConfig()
    timeouts: Timeouts = Timeouts()


class MerchantRefundResult(_Model):
    refund_no: str
    status: MerchantRefundStatus
    gateway_refund_id: str | None = None
    failure_reason: str | None = None


# --- reconciliation ------------------------------------------------------------------------


class ReconcileInput(_Model):
    """One reconciliation run; the cursors carry it across continue-as-new."""

    lookback_s: int = 2 * 86400
    window_s: int = 6 * 3600
    page_size: int = 20_000
    pending_after_s: int = 600
    stuck_after_s: int = 600
    period_start: datetime | None = None
    period_end: datetime | None = None
    next_window: int = 0
    page_cursor: str | None = None
    timeouts: Timeouts = Timeouts()
    refund_retry: RetryConfig = RetryConfig()


class ReconcileWindow(_Model):
    run_id: str
    start: datetime
    end: datetime
    timeouts: Timeouts = Timeouts()
    refund_retry: RetryConfig = RetryConfig()


class ReconcilePage(_Model):
    run_id: str
    after: str
    limit: int
    pending_after_s: int
    stuck_after_s: int
    timeouts: Timeouts = Timeouts()
    refund_retry: RetryConfig = RetryConfig()


class ReconcilePageResult(_Model):
    checked: int
    last: str | None
    findings: int


class ReconcileStart(_Model):
    run_id: str
    period_start: datetime
    period_end: datetime


class ReconcileReport(_Model):
    run_id: str
    period_start: datetime
    period_end: datetime
    checked: int
    consistent: int
    in_flight_count: int
    money_in_flight: int
    repaired: int
    exceptions: int
    started_at: datetime
    finished_at: datetime | None


class RedriveInput(_Model):
    pay_order_no: str
    timeouts: Timeouts = Timeouts()
    refund_retry: RetryConfig = RetryConfig()


# --- operator refunds --------------------------------------------------------------------


class OperatorRefund(_Model):
    """A refund an operator asked for, of money the gateway captured for a pay order we
    never had (row ``operator_refund``); ``pay_order_no`` is the gateway's."""

    refund_key: str
    txn_id: str
    pay_order_no: str
    amount: int
    currency: str
    captured_at: datetime
    status: RefundStatus
    attempts: int
    gateway_refund_id: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    succeeded_at: datetime | None
    requested_by: str | None = None
    """The API token's name of who asked for it (migration 0008); None for refunds asked
    for before names were recorded, or through the Python API without one."""


class OperatorRefundInput(_Model):
    """``OperatorRefundWorkflow``: refund this payment under its key, until the gateway
    confirms (or rejects) it."""

    refund: RefundPayment
    refund_retry: RetryConfig = RetryConfig()
    timeouts: Timeouts = Timeouts()


class OperatorRefundResult(_Model):
    txn_id: str
    refund_key: str
    status: RefundStatus

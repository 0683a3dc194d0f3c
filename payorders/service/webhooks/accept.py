"""What every gateway's payment notification goes through once its signature holds:
deduplicated by its event id, believed only as far as the gateway's own record of the
capture, then handed to its pay order's workflow."""

from __future__ import annotations

import logging

from payorders.gateways.port import Capture, Gateway, GatewayError
from payorders.pay_orders import UnknownPayOrder
from payorders.service import webhook
from payorders.service.deps import Deps, call_temporal
from payorders.service.errors import ApiError
from payorders.service.webhooks.schemas import WebhookAccepted

log = logging.getLogger("payorders.pay_orders")

# Where each gateway's notification carries the pay order, amount and currency: the
# names a mismatch is reported under.
SANDBOX_FIELDS = ("data.pay_order_no", "data.amount", "data.currency")
ALIPAY_FIELDS = ("out_trade_no", "total_amount", "total_amount")
WECHATPAY_FIELDS = ("resource.out_trade_no", "resource.amount.total", "resource.amount.currency")
STRIPE_FIELDS = (
    "data.object.metadata.pay_order_no",
    "data.object.amount_received",
    "data.object.currency",
)


async def accept_payment(
    deps: Deps, event: webhook.PaymentEvent, fields: tuple[str, str, str] = SANDBOX_FIELDS
) -> WebhookAccepted:
    """Deduplicate by event id, check against the gateway, then signal the pay order (or
    start its late refund): the same path for every gateway's notification."""
    seen, txn_known = await deps.store.webhook_seen(
        event.event_id, pay_order_no=event.pay_order_no, txn_id=event.txn_id
    )
    if seen is not None:
        return accepted(seen, event_duplicate=True, txn_known=txn_known)
    capture = await verify_with_gateway(deps.gateway, event, fields)
    try:
        outcome = await call_temporal(
            lambda: deps.orders.notify_payment(
                pay_order_no=event.pay_order_no,
                txn_id=event.txn_id,
                amount=event.amount,
                currency=event.currency,
                paid_at=capture.captured_at,
            )
        )
    except UnknownPayOrder:
        log.warning("webhook %s for unknown pay order %s", event.event_id, event.pay_order_no)
        raise ApiError(404, "unknown_pay_order", f"no pay order {event.pay_order_no}") from None
    await deps.store.record_webhook(
        event.event_id,
        pay_order_no=event.pay_order_no,
        txn_id=event.txn_id,
        outcome=outcome.value,
    )
    return accepted(outcome.value, event_duplicate=False, txn_known=txn_known)


REFUND_RECORDED = "REFUND_RECORDED"
"""A refund made at the gateway's dashboard, recorded now as a merchant refund."""
REFUND_KNOWN = "REFUND_KNOWN"
"""Every refund the gateway holds for the transaction is one of ours or recorded before."""


async def accept_refund(deps: Deps, notice: webhook.RefundNotice) -> WebhookAccepted:
    """A gateway says a refund of one of our transactions was made. Deduplicated by event
    id; the notice is believed for nothing but the transaction: the refunds are read from
    the gateway, and those none of our rows holds are recorded (``source: gateway``)."""
    seen, txn_known = await deps.store.webhook_seen(
        notice.event_id, pay_order_no=notice.pay_order_no, txn_id=notice.txn_id
    )
    if seen is not None:
        return accepted(seen, event_duplicate=True, txn_known=txn_known)
    try:
        made = await deps.gateway.refunds_of(notice.txn_id)
    except GatewayError as e:
        log.warning("cannot read the refunds of %s at the gateway: %s", notice.txn_id, e)
        raise ApiError(503, "gateway_unavailable", "cannot verify with the gateway; retry") from e
    recorded = await deps.orders.record_gateway_refunds(made)
    outcome = REFUND_RECORDED if recorded else REFUND_KNOWN
    await deps.store.record_webhook(
        notice.event_id, pay_order_no=notice.pay_order_no, txn_id=notice.txn_id, outcome=outcome
    )
    return accepted(outcome, event_duplicate=False, txn_known=txn_known)


def accepted(outcome: str, *, event_duplicate: bool, txn_known: bool) -> WebhookAccepted:
    return WebhookAccepted(
        received=True,
        outcome=outcome,
        event_duplicate=event_duplicate,
        txn_already_recorded=txn_known,
        duplicate=event_duplicate,
    )


async def verify_with_gateway(
    gateway: Gateway, event: webhook.PaymentEvent, fields: tuple[str, str, str]
) -> Capture:
    """Believe a notification only as far as the gateway's own record of the capture.

    A signed notification that disagrees with the gateway is refused (nothing changes);
    one that agrees with the gateway but not with the order is real money: the workflow
    records it and refunds it.
    """
    try:
        capture = await gateway.query_capture(event.txn_id)
    except GatewayError as e:
        log.warning("cannot verify webhook %s with the gateway: %s", event.event_id, e)
        raise ApiError(503, "gateway_unavailable", "cannot verify with the gateway; retry") from e
    if capture is None:
        log.warning("webhook %s: gateway has no transaction %s", event.event_id, event.txn_id)
        raise ApiError(
            422,
            "unknown_transaction",
            f"data.txn_id {event.txn_id}: the gateway has no such transaction",
        )
    differ = [
        name
        for name, ours, theirs in zip(
            fields,
            (event.pay_order_no, event.amount, event.currency),
            (capture.pay_order_no, capture.amount, capture.currency),
            strict=True,
        )
        if ours != theirs
    ]
    if differ:
        log.warning("webhook %s does not match the gateway's capture", event.event_id)
        raise ApiError(
            422,
            "mismatch",
            f"{', '.join(differ)}: the notification must match the gateway's record of"
            f" transaction {event.txn_id}",
        )
    return capture

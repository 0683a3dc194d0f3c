"""``POST /v1/pay-orders`` (checkout), ``GET /v1/pay-orders/{pay_order_no}`` and
``POST /v1/pay-orders/{pay_order_no}/cancel``: the pay order's own routes."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from payorders.core import domain
from payorders.core.tokens import Caller, Scope
from payorders.gateways import alipay, wechatpay
from payorders.pay_orders import CancelPending, CheckoutPending, PayOrderConflict, UnknownPayOrder
from payorders.service.auth import ScopedRoute, requires
from payorders.service.deps import DepsDep, call_temporal, require_json
from payorders.service.errors import ApiError
from payorders.service.pay_orders.schemas import (
    PAY_ORDER_NO,
    CancelOut,
    CreatePayOrderRequest,
    FundOut,
    PaymentOut,
    PayOrderDetailsOut,
    PayOrderOut,
)

log = logging.getLogger("payorders.pay_orders")

router = APIRouter(route_class=ScopedRoute)


@router.post(
    "/v1/pay-orders",
    response_model=PayOrderOut,
    status_code=201,
    # The token first: a caller without one learns nothing else about the request.
    dependencies=[requires(Scope.CHECKOUT), Depends(require_json)],
    responses={
        200: {"model": PayOrderOut, "description": "the existing pay order"},
        409: {"description": "the order has a pay order for another amount"},
        503: {
            "description": "Temporal cannot be reached, or the gateway has not opened the"
            " trade yet: retry the same request"
        },
    },
)
async def create_pay_order(body: CreatePayOrderRequest, deps: DepsDep) -> JSONResponse:
    """Checkout: create the pay order of an order, expiring at ``expires_at`` or
    ``expires_in_s`` from now (at most one; neither: the default window). The same
    request again returns the same pay order (200); another amount or currency for the
    order is a 409."""
    expires_in = None if body.expires_in_s is None else timedelta(seconds=body.expires_in_s)
    now = datetime.now(UTC)
    refusal = {"alipay": alipay.refusal, "wechatpay": wechatpay.refusal}.get(deps.settings.gateway)
    if refusal and (why := refusal(domain.pay_order_no_for(body.order_no), body.currency)):
        raise ApiError(422, "invalid_request", why)
    try:
        # Judged here, so that the messages use this API's field names.
        expires_at = domain.pay_order_deadline(
            now=now,
            default=deps.settings.default_expires_in,
            expires_at=body.expires_at,
            expires_in=expires_in,
            window_field="expires_in_s",
        )
        started = await call_temporal(
            lambda: deps.orders.start_pay_order(
                order_no=body.order_no,
                amount=body.amount,
                currency=body.currency,
                expires_at=expires_at,
                now=now,
            )
        )
    except domain.InvalidInput as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    except PayOrderConflict as e:
        raise ApiError(409, "conflict", str(e)) from None
    except CheckoutPending as e:
        raise ApiError(503, "checkout_pending", str(e)) from None
    c = started.checkout
    out = PayOrderOut(
        pay_order_no=started.pay_order_no,
        order_no=started.order_no,
        amount=started.amount,
        currency=started.currency,
        expires_at=started.expires_at,
        created=started.created,
        checkout=None if c is None else {"gateway": c.gateway, **c.details},
        not_payable=started.not_payable,
    )
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if started.created else 200)


@router.get(
    "/v1/pay-orders/{pay_order_no}",
    response_model=PayOrderDetailsOut,
    dependencies=[requires(Scope.CHECKOUT, Scope.READ)],
)
async def get_pay_order(
    pay_order_no: Annotated[str, Path(pattern=PAY_ORDER_NO)], deps: DepsDep
) -> PayOrderDetailsOut:
    """The pay order with its payments, refunds and whether the fund identity holds."""
    try:
        d = await deps.orders.get_pay_order(pay_order_no)
    except UnknownPayOrder:
        raise ApiError(404, "not_found", f"no pay order {pay_order_no}") from None
    row = d.row
    return PayOrderDetailsOut(
        **row.model_dump(exclude={"created_at", "updated_at", "status", "close_reason"}),
        status=row.status.value,
        reason=None if row.close_reason is None else row.close_reason.value,
        payments=[
            PaymentOut(
                txn_id=p["txn_id"],
                amount=p["amount"],
                currency=p["currency"].strip(),
                paid_at=p["paid_at"],
                settled=p["settled"],
                refund_reason=p["refund_reason"],
                refund_key=p["refund_key"],
                refund_status=p["refund_status"],
                refund_attempts=p["attempts"],
            )
            for p in d.payments
        ],
        fund_identity=FundOut(**asdict(d.fund)),
        refunded_by_merchant=d.merchant.refunded,
        merchant_refund_in_flight=d.merchant.in_flight,
        refundable=d.merchant.refundable_when(row.status),
        workflow_status=d.workflow_status,
        workflow=None if d.view is None else d.view.model_dump(mode="json", exclude={"payments"}),
    )


async def require_no_body(request: Request) -> None:
    """A cancel carries nothing to say: no body, or an empty JSON object."""
    raw = await request.body()
    if not raw.strip():
        return
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ApiError(422, "invalid_request", "body: not valid JSON") from None
    if doc != {} or not isinstance(doc, dict):
        raise ApiError(422, "invalid_request", "body: a cancel takes no fields; send no body or {}")


@router.post(
    "/v1/pay-orders/{pay_order_no}/cancel",
    response_model=CancelOut,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"type": "object", "maxProperties": 0}}},
        }
    },
    responses={
        404: {"description": "no such pay order"},
        422: {"description": "a body other than none or {}"},
        503: {
            "description": "Temporal cannot be reached, or the gateway has not closed the"
            " trade yet: the cancel stands; retry the same request"
        },
    },
)
async def cancel_pay_order(
    # The token first: a caller without one learns nothing else about the request.
    caller: Annotated[Caller, requires(Scope.CHECKOUT)],
    _no_body: Annotated[None, Depends(require_no_body)],
    pay_order_no: Annotated[str, Path(pattern=PAY_ORDER_NO)],
    deps: DepsDep,
) -> CancelOut:
    """Checkout cancels a pay order: its workflow closes it now, by the expiry's path
    (the trade is closed at the gateway first). Answered once the outcome is durable:
    ``PAY_EXPIRED`` with reason ``CANCELLED``, or ``PAY_SUCCESS`` when the gateway says
    the customer had paid already. A repeat, or a cancel of a closed order, answers the
    current status with ``closed`` false and changes nothing. The first caller to ask
    while the order is ``PAYING`` is kept as its ``cancel_requested_by``."""
    try:
        result = await call_temporal(
            lambda: deps.orders.cancel_pay_order(pay_order_no, requested_by=caller.name)
        )
    except UnknownPayOrder:
        raise ApiError(404, "not_found", f"no pay order {pay_order_no}") from None
    except CancelPending as e:
        raise ApiError(503, "cancel_pending", str(e)) from None
    log.info(
        "cancel %s: %s%s (%s) by %s",
        pay_order_no,
        result.status.value,
        f"/{result.close_reason.value}" if result.close_reason else "",
        "closed now" if result.closed else "closed before",
        caller.name,
    )
    return CancelOut(
        pay_order_no=result.pay_order_no,
        status=result.status.value,
        reason=None if result.close_reason is None else result.close_reason.value,
        closed=result.closed,
    )

"""``POST /v1/pay-orders/{pay_order_no}/refunds`` (scope ``refund``) and its reads (``read``
or ``refund``): the shop gives money back after ``PAY_SUCCESS``, by the original route.

The decision is the pay order's row lock (``payorders.core.merchant_refunds``); the money
moves in ``MerchantRefundWorkflow``. The answer comes once the refund is decided and its
workflow started, not once the gateway confirmed it: read it back, or wait for its event.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from payorders.core import domain
from payorders.core.merchant_refunds import RefundRefused, Refusal
from payorders.core.tokens import Caller, Scope
from payorders.service.auth import ScopedRoute, requires
from payorders.service.deps import DepsDep, call_temporal, require_json
from payorders.service.errors import ApiError
from payorders.service.pay_orders.schemas import PAY_ORDER_NO
from payorders.service.refunds.schemas import (
    REFUND_NO,
    CreateRefundRequest,
    RefundOut,
    RefundsOut,
)

log = logging.getLogger("payorders.refunds")

router = APIRouter(prefix="/v1/pay-orders/{pay_order_no}/refunds", route_class=ScopedRoute)

_STATUS = {
    Refusal.NOT_FOUND: 404,
    Refusal.NOT_PAID: 409,
    Refusal.WINDOW_CLOSED: 409,
    Refusal.CONFLICT: 409,
    Refusal.EXCEEDS: 422,
}

PayOrderNo = Annotated[str, Path(pattern=PAY_ORDER_NO)]


@router.post(
    "",
    response_model=RefundOut,
    status_code=201,
    responses={
        200: {"model": RefundOut, "description": "this refund_no was asked for before"},
        404: {"description": "no such pay order"},
        409: {
            "description": "not PAY_SUCCESS, past the refund window, or the refund_no is"
            " another refund's"
        },
        422: {"description": "a bad field, or more than is still refundable"},
        503: {"description": "Temporal cannot be reached: the same request again starts it"},
    },
)
async def create_refund(
    pay_order_no: PayOrderNo,
    # The token first: a caller without one learns nothing else about the request.
    caller: Annotated[Caller, requires(Scope.REFUND)],
    _json: Annotated[None, Depends(require_json)],
    body: CreateRefundRequest,
    deps: DepsDep,
) -> JSONResponse:
    """Refund (part of) a paid pay order by the original route. 201 with the refund
    (``REFUNDING``); the same ``refund_no`` and body again, 200 with it as it is now.
    Refused with nothing written: not ``PAY_SUCCESS`` (409, its status named), past
    ``PAYORDERS_REFUND_WINDOW_DAYS`` (409), more than is still refundable (422, the amount
    named), a ``refund_no`` of another refund (409). Two refunds at once for the last money
    cannot together exceed what was captured."""
    try:
        # A refund decided but not started (Temporal unreachable: 503) starts when the same
        # request comes again.
        opened = await call_temporal(
            lambda: deps.orders.refund_pay_order(
                pay_order_no,
                refund_no=body.refund_no,
                amount=body.amount,
                reason=body.reason,
                requested_by=caller.name,
            )
        )
    except domain.InvalidInput as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    except RefundRefused as e:
        raise ApiError(_STATUS[e.refusal], e.refusal.value, str(e)) from None
    log.info(
        "refund %s of %s: %d %s (%s) by %s",
        body.refund_no,
        pay_order_no,
        body.amount,
        opened.refund.status.value,
        "opened" if opened.created else "asked before",
        caller.name,
    )
    out = RefundOut.of(opened.refund, opened.totals.refundable)
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if opened.created else 200)


@router.get(
    "",
    response_model=RefundsOut,
    dependencies=[requires(Scope.READ, Scope.REFUND)],
    responses={404: {"description": "no such pay order"}},
)
async def list_refunds(pay_order_no: PayOrderNo, deps: DepsDep) -> RefundsOut:
    """The pay order's merchant refunds, oldest first, and what they add up to."""
    row = await deps.store.get_pay_order(pay_order_no)
    if row is None:
        raise ApiError(404, "not_found", f"no pay order {pay_order_no}")
    refunds = deps.store.merchant_refunds
    totals = await refunds.totals(pay_order_no, row.amount)
    return RefundsOut(
        pay_order_no=pay_order_no,
        amount=row.amount,
        currency=row.currency.strip(),
        refunded_by_merchant=totals.refunded,
        in_flight=totals.in_flight,
        refundable=totals.refundable_when(row.status),
        refunds=[RefundOut.of(r) for r in await refunds.of_pay_order(pay_order_no)],
    )


@router.get(
    "/{refund_no}",
    response_model=RefundOut,
    dependencies=[requires(Scope.READ, Scope.REFUND)],
    responses={404: {"description": "no such refund of this pay order"}},
)
async def get_refund(
    pay_order_no: PayOrderNo,
    refund_no: Annotated[str, Path(pattern=REFUND_NO)],
    deps: DepsDep,
) -> RefundOut:
    """One merchant refund as it is now."""
    refund = await deps.store.merchant_refunds.get(refund_no)
    if refund is None or refund.pay_order_no != pay_order_no:
        raise ApiError(404, "not_found", f"no refund {refund_no} of {pay_order_no}")
    return RefundOut.of(refund)

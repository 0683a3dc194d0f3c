"""``POST /v1/operator-refunds`` (``refund``) and ``GET /v1/operator-refunds/{txn_id}``
(``read`` or ``refund``): an operator refunds money captured for a pay order we never had."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse
from prometheus_client import Counter

from payorders import pay_orders as payorders_api
from payorders.core.domain import RefundStatus
from payorders.core.models import OperatorRefund
from payorders.core.store import NotRefundable
from payorders.core.tokens import Caller, Scope
from payorders.gateways.port import GatewayError
from payorders.pay_orders import UnknownTransaction
from payorders.service.auth import ScopedRoute, requires
from payorders.service.deps import DepsDep, call_temporal, require_json
from payorders.service.errors import ApiError
from payorders.service.operator_refunds.schemas import (
    TXN_ID,
    OperatorRefundOut,
    OperatorRefundRequest,
)

log = logging.getLogger("payorders.pay_orders")

OPERATOR_REFUNDS = Counter(
    "payorders_api_operator_refunds_total",
    "operator refund requests by outcome: opened, existing (asked before: nothing moved),"
    " or why it was refused",
    ["outcome"],
)

router = APIRouter(route_class=ScopedRoute)


def _operator_refund_out(refund: OperatorRefund, created: bool | None = None) -> OperatorRefundOut:
    return OperatorRefundOut(
        **refund.model_dump(include=set(OperatorRefundOut.model_fields) - {"status", "currency"}),
        status=refund.status.value,
        currency=refund.currency.strip(),
        created=created,
        workflow_id=payorders_api.operator_refund_workflow_id(refund.txn_id),
    )


@router.post(
    "/v1/operator-refunds",
    response_model=OperatorRefundOut,
    status_code=202,
    responses={
        200: {"model": OperatorRefundOut, "description": "already confirmed or rejected"},
        404: {"description": "the gateway has no such transaction"},
        409: {"description": "a pay order here settles or refunds it: refused"},
        503: {"description": "the gateway or Temporal cannot be reached; retry"},
    },
)
async def create_operator_refund(
    caller: Annotated[Caller, requires(Scope.REFUND)],
    _json: Annotated[None, Depends(require_json)],
    body: OperatorRefundRequest,
    deps: DepsDep,
) -> JSONResponse:
    """An operator refunds money the gateway captured for a pay order we never had
    (reconciliation's ``money_without_order``). Amount, currency and pay order come from
    the gateway's capture. 202 while the refund runs, 200 once it is confirmed or
    rejected; the same request again answers with the same refund and refunds nothing
    twice. Refused, with nothing moved, for a transaction a pay order here settled or
    refunds (409), or that the gateway does not know (404)."""
    try:
        started = await call_temporal(
            lambda: deps.orders.refund_orphan_payment(
                body.txn_id, gateway=deps.gateway, requested_by=caller.name
            )
        )
    except UnknownTransaction as e:
        OPERATOR_REFUNDS.labels("unknown_transaction").inc()
        raise ApiError(404, "unknown_transaction", str(e)) from None
    except NotRefundable as e:
        OPERATOR_REFUNDS.labels(e.refusal.value).inc()
        raise ApiError(409, e.refusal.value, str(e)) from None
    except GatewayError as e:
        log.warning("operator refund of %s: gateway unavailable: %s", body.txn_id, e)
        raise ApiError(
            503, "gateway_unavailable", "cannot ask the gateway for its capture; retry"
        ) from e
    OPERATOR_REFUNDS.labels("opened" if started.created else "existing").inc()
    log.info(
        "operator refund %s: %s (%s) by %s",
        started.refund.refund_key,
        started.refund.status.value,
        "opened" if started.created else "asked before",
        caller.name,
    )
    out = _operator_refund_out(started.refund, started.created)
    pending = started.refund.status is RefundStatus.PENDING
    return JSONResponse(out.model_dump(mode="json"), status_code=202 if pending else 200)


@router.get(
    "/v1/operator-refunds/{txn_id}",
    response_model=OperatorRefundOut,
    dependencies=[requires(Scope.READ, Scope.REFUND)],
    responses={404: {"description": "no operator refund of that transaction"}},
)
async def get_operator_refund(
    txn_id: Annotated[str, Path(pattern=TXN_ID)], deps: DepsDep
) -> OperatorRefundOut:
    """An operator refund as it is now: its status, attempts and the gateway's refund id."""
    refund = await deps.store.operator_refunds.get(txn_id)
    if refund is None:
        raise ApiError(404, "not_found", f"no operator refund of {txn_id}")
    return _operator_refund_out(refund)

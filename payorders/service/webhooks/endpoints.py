"""``POST /v1/webhooks/gateway`` (the sandbox gateway's protocol),
``POST /v1/webhooks/stripe``, ``POST /v1/webhooks/alipay`` and
``POST /v1/webhooks/wechatpay``: the gateways' payment notifications, authenticated by their
signature instead of a bearer token. Each answers 2xx only once Temporal has accepted the
payment, 4xx for what must never be retried, and 503 while Temporal (or the gateway, to
verify against) cannot be reached."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse

from payorders.gateways.alipay import AlipayGateway
from payorders.gateways.wechatpay import WechatPayGateway
from payorders.service import alipay_webhook, stripe_webhook, webhook, wechatpay_webhook
from payorders.service import metrics as api_metrics
from payorders.service.deps import Deps, DepsDep, require_json
from payorders.service.errors import ApiError
from payorders.service.webhooks.accept import (
    ALIPAY_FIELDS,
    STRIPE_FIELDS,
    WECHATPAY_FIELDS,
    accept_payment,
    accept_refund,
    accepted,
)
from payorders.service.webhooks.schemas import WebhookAccepted

log = logging.getLogger("payorders.pay_orders")

WEBHOOK_ROUTE = "/v1/webhooks/gateway"
STRIPE_WEBHOOK_ROUTE = "/v1/webhooks/stripe"
ALIPAY_WEBHOOK_ROUTE = "/v1/webhooks/alipay"
WECHATPAY_WEBHOOK_ROUTE = "/v1/webhooks/wechatpay"

# No scopes: a plain router (auth.ScopedRoute is for routes that need a token).
router = APIRouter()


def _signed_body(header: str) -> dict[str, Any]:
    """OpenAPI of a webhook route: its signature header and a raw JSON body, read as bytes
    (the signature covers the exact bytes, so no model parses it first)."""
    return {
        "parameters": [
            {"in": "header", "name": header, "required": True, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    }


@router.post(
    WEBHOOK_ROUTE,
    response_model=WebhookAccepted,
    dependencies=[Depends(require_json)],
    openapi_extra=_signed_body(webhook.HEADER),
    responses={401: {"description": "bad signature"}, 503: {"description": "retry later"}},
)
async def gateway_webhook(request: Request, deps: DepsDep) -> WebhookAccepted:
    """The gateway adapter: verify, deduplicate, then hand the payment to its workflow."""
    body = await request.body()
    try:
        webhook.verify(
            request.headers.get(webhook.HEADER),
            body,
            secrets=[s.get_secret_value() for s in deps.settings.webhook_secrets],
            now=datetime.now(UTC),
            tolerance_s=deps.settings.webhook_tolerance_s,
        )
        event = webhook.parse_event(body)
    except webhook.WebhookRejected as e:
        log.warning("webhook rejected: %s", e.reason)
        api_metrics.note_webhook_reason(request.scope, api_metrics.webhook_check_reason(e))
        raise ApiError(e.status, "webhook_rejected", e.reason) from None
    if isinstance(event, webhook.RefundNotice):
        return await accept_refund(deps, event)
    return await accept_payment(deps, event)


@router.post(
    STRIPE_WEBHOOK_ROUTE,
    response_model=WebhookAccepted,
    openapi_extra=_signed_body(stripe_webhook.HEADER),
    responses={401: {"description": "bad signature"}, 503: {"description": "retry later"}},
)
async def stripe_webhook_route(request: Request, deps: DepsDep) -> WebhookAccepted:
    """Stripe's webhook endpoint: verified with the Stripe SDK; ``payment_intent.succeeded``
    is handed to its pay order like any gateway's payment; ``charge.refunded`` and
    ``refund.created`` / ``refund.updated`` have the PaymentIntent's refunds read from
    Stripe and recorded where none of ours holds them; other types change nothing."""
    if deps.settings.gateway != "stripe":
        raise ApiError(404, "not_found", "this service does not use the Stripe gateway")
    body = await request.body()
    try:
        event = stripe_webhook.read_event(
            body,
            request.headers.get(stripe_webhook.HEADER),
            secrets=[s.get_secret_value() for s in deps.settings.stripe_webhook_secret],
            tolerance_s=deps.settings.webhook_tolerance_s,
        )
    except webhook.WebhookRejected as e:
        log.warning("stripe webhook rejected: %s", e.reason)
        api_metrics.note_webhook_reason(request.scope, api_metrics.webhook_check_reason(e))
        raise ApiError(e.status, "webhook_rejected", e.reason) from None
    if isinstance(event, stripe_webhook.IgnoredEvent):
        log.info("stripe webhook %s: %s ignored", event.event_id, event.type)
        return accepted("IGNORED", event_duplicate=False, txn_known=False)
    if isinstance(event, webhook.RefundNotice):
        return await accept_refund(deps, event)
    return await accept_payment(deps, event, STRIPE_FIELDS)


@router.post(
    ALIPAY_WEBHOOK_ROUTE,
    response_class=PlainTextResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {alipay_webhook.FORM: {"schema": {"type": "object"}}},
        }
    },
    responses={
        200: {"content": {"text/plain": {"example": "success"}}},
        401: {"description": "unsigned, signed by another key, or stale"},
        503: {"description": "retry later"},
    },
)
async def alipay_webhook_route(request: Request, deps: DepsDep) -> PlainTextResponse:
    """Alipay's notifications: verified with Alipay's public key through the SDK, checked
    against our app and pay order, deduplicated by ``notify_id``, then the same path as
    every gateway's payment. The answer is the literal ``success`` only once accepted;
    anything else makes Alipay send it again."""
    gateway = deps.gateway
    if deps.settings.gateway != "alipay" or not isinstance(gateway, AlipayGateway):
        raise ApiError(404, "not_found", "this service does not use the Alipay gateway")
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != alipay_webhook.FORM:
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be {alipay_webhook.FORM}")
    try:
        event = alipay_webhook.read_notification(
            alipay_webhook.form_of(await request.body()),
            verify=gateway.verify_notification,
            app_id=gateway.app_id,
            now=datetime.now(UTC),
            max_age_s=deps.settings.alipay_notify_max_age_s,
        )
    except webhook.WebhookRejected as e:
        log.warning("alipay notification rejected: %s", e.reason)
        api_metrics.note_webhook_reason(request.scope, api_metrics.webhook_check_reason(e))
        raise ApiError(e.status, "webhook_rejected", e.reason) from None
    if isinstance(event, alipay_webhook.IgnoredNotification):
        log.info("alipay notification %s: %s ignored", event.event_id, event.trade_status)
    elif isinstance(event, webhook.RefundNotice):
        await accept_refund(deps, event)
    else:
        await _check_amount(deps, event, "total_amount")
        await accept_payment(deps, event, ALIPAY_FIELDS)
    return PlainTextResponse("success")


async def _check_amount(deps: Deps, event: webhook.PaymentEvent, field: str) -> None:
    """Alipay and WeChat Pay take exactly the trade's own amount: a signed notification
    saying otherwise is no payment of this pay order's trade (422, never retried into a
    payment)."""
    order = await deps.store.get_pay_order(event.pay_order_no)
    if order is not None and (order.amount, order.currency.strip()) != (
        event.amount,
        event.currency,
    ):
        log.error("%s: %s differs from the pay order's", event.event_id, field)
        raise ApiError(422, "mismatch", f"{field}: the notification must match the pay order")


@router.post(
    WECHATPAY_WEBHOOK_ROUTE,
    status_code=204,
    response_class=Response,
    openapi_extra=_signed_body("Wechatpay-Signature"),
    responses={
        204: {"description": "accepted: WeChat Pay stops sending it"},
        401: {"description": "unsigned, signed by another key, or stale"},
        503: {"description": "retry later"},
    },
)
async def wechatpay_webhook_route(request: Request, deps: DepsDep) -> Response:
    """WeChat Pay's callbacks (API v3): the ``Wechatpay-*`` headers verified and the
    resource decrypted by the SDK, the timestamp within
    ``PAYORDERS_WECHATPAY_CALLBACK_TOLERANCE_S``, the merchant, app and pay order ours,
    deduplicated by the notification's ``id``, then the same path as every gateway's
    payment. 204 only once accepted; any other answer makes WeChat Pay send it again."""
    gateway = deps.gateway
    if deps.settings.gateway != "wechatpay" or not isinstance(gateway, WechatPayGateway):
        raise ApiError(404, "not_found", "this service does not use the WeChat Pay gateway")
    try:
        event = wechatpay_webhook.read_callback(
            request.headers,
            await request.body(),
            read=gateway.read_callback,
            mchid=gateway.mchid,
            appid=gateway.appid,
            now=datetime.now(UTC),
            tolerance_s=deps.settings.wechatpay_callback_tolerance_s,
        )
    except webhook.WebhookRejected as e:
        log.warning("wechatpay callback rejected: %s", e.reason)
        api_metrics.note_webhook_reason(request.scope, api_metrics.webhook_check_reason(e))
        raise ApiError(e.status, "webhook_rejected", e.reason) from None
    if isinstance(event, wechatpay_webhook.IgnoredCallback):
        log.info("wechatpay callback %s ignored", event.event_id)
    elif isinstance(event, webhook.RefundNotice):
        await accept_refund(deps, event)
    else:
        await _check_amount(deps, event, "amount.total")
        await accept_payment(deps, event, WECHATPAY_FIELDS)
    return Response(status_code=204)

"""A customer paying at the sandbox gateway, which then notifies the gateway adapter, as a
real gateway's payment and webhook would."""

from __future__ import annotations

from payorders.api import NotifyOutcome, PayOrders
from payorders.gateway import Capture
from payorders.sandbox_gateway import SandboxGateway


async def customer_pays(
    api: PayOrders,
    sandbox: SandboxGateway,
    *,
    pay_order_no: str,
    amount: int,
    currency: str,
    txn_id: str | None = None,
) -> tuple[Capture, NotifyOutcome]:
    capture = await sandbox.capture(
        pay_order_no=pay_order_no, amount=amount, currency=currency, txn_id=txn_id
    )
    outcome = await api.notify_payment(
        pay_order_no=pay_order_no,
        txn_id=capture.txn_id,
        amount=amount,
        currency=currency,
        paid_at=capture.captured_at,
    )
    return capture, outcome

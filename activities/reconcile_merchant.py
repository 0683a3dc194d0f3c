"""Reconciliation of merchant refunds (after ``PAY_SUCCESS``): the shop's refunds against the
gateway's own records, and the refunds made at the gateway's dashboard that no row holds.

Called by ``ReconcileActivities`` on each keyset page and each statement window; every
repair is an idempotent guarded write (a refund confirmed once, a dashboard refund recorded
once by its key), so a retried slice or a second run repairs nothing twice.
"""

from __future__ import annotations

from typing import Any

from temporalio.client import Client

from payorders.core import domain
from payorders.core.domain import MerchantRefundStatus, RefundStatus
from payorders.core.reconcile import EXCEPTION, REPAIRED, Finding, Kind, ReconcileStore
from payorders.core.store import PayOrderStore
from payorders.gateways.port import Gateway, GatewayRefund
from payorders.pay_orders import PayOrders, workflow_running


class MerchantRefundChecks:
    def __init__(self, recon: ReconcileStore, store: PayOrderStore, gateway: Gateway) -> None:
        self._recon = recon
        self._store = store
        self._gateway = gateway

    async def page(
        self, client: Client, orders: PayOrders, after: str, last: str, pending_after_s: float
    ) -> list[Finding]:
        """The page's merchant refunds: the identity ``0 <= refunded_by_merchant <= amount``
        of a ``PAY_SUCCESS`` order, and refunds ``REFUNDING`` for longer than the limit
        (confirmed from the gateway, restarted when no workflow runs them, else reported)."""
        findings = [
            Finding(
                Kind.IDENTITY_BROKEN,
                EXCEPTION,
                f"merchant refunds of {o['refunded']} recorded for an order of {o['amount']}"
                f" that is {o['status']}: a row was changed outside the application",
                pay_order_no=o["pay_order_no"],
                amount=o["refunded"],
            )
            for o in await self._recon.merchant_identity_broken(after, last)
        ]
        for row in await self._recon.old_merchant_refunds(after, last, pending_after_s):
            findings.append(await self._old(client, orders, row))
        return findings

    async def _old(self, client: Client, orders: PayOrders, row: dict[str, Any]) -> Finding:
        refund_no = str(row["refund_no"])
        key = str(row["idempotency_key"])

        def found(kind: Kind, action: str, detail: str) -> Finding:
            return Finding(
                kind,
                action,
                f"merchant refund {refund_no}: {detail}",
                pay_order_no=row["pay_order_no"],
                txn_id=row["txn_id"],
                refund_key=key,
                amount=row["amount"],
            )

        at_gateway = await self._gateway.query_refund(key, row["txn_id"])
        if at_gateway is not None and at_gateway.status is RefundStatus.SUCCEEDED:
            if at_gateway.amount != row["amount"]:
                return found(
                    Kind.MERCHANT_REFUND_DIFFERS,
                    EXCEPTION,
                    f"the gateway refunded {at_gateway.amount} under its key, we asked for"
                    f" {row['amount']}: look at the gateway",
                )
            await self._store.merchant_refunds.succeed(refund_no, at_gateway.gateway_refund_id)
            return found(
                Kind.REFUND_CONFIRMED_AT_GATEWAY,
                REPAIRED,
                "the gateway had refunded it; recorded here",
            )
        if await workflow_running(client, domain.merchant_refund_workflow_id(refund_no)):
            return found(
                Kind.REFUND_PENDING_TOO_LONG,
                EXCEPTION,
                f"still retrying in its workflow after {row['attempts']} attempt(s)"
                f" (last error: {row['last_error'] or 'none'}): look at the gateway",
            )
        refund = await self._store.merchant_refunds.get(refund_no)
        if refund is None or refund.status is not MerchantRefundStatus.REFUNDING:
            return found(Kind.REFUND_CONFIRMED_AT_GATEWAY, REPAIRED, "finished meanwhile")
        # Opened while Temporal was down (and never asked again), or its workflow was
        # terminated: the same workflow id and key, so it refunds at most once.
        await orders.run_merchant_refund(refund)
        return found(
            Kind.REFUND_PENDING_TOO_LONG,
            REPAIRED,
            "REFUNDING with no workflow running it: restarted",
        )

    async def statement(
        self, refunds: list[GatewayRefund], orders: PayOrders, not_merchant: set[str]
    ) -> tuple[list[Finding], set[str]]:
        """The window's gateway refunds that are merchant refunds (ours, or made at the
        dashboard: recorded now); returns the findings and the keys it dealt with, which
        the compensation checks then leave alone. ``not_merchant``: keys of compensations
        and operator refunds."""
        confirmed = [r for r in refunds if r.status is RefundStatus.SUCCEEDED]
        rows = await self._recon.merchant_refunds_by_key(
            [r.idempotency_key for r in confirmed], [r.gateway_refund_id for r in confirmed]
        )
        by_key = {row["idempotency_key"]: row for row in rows}
        by_id = {row["gateway_refund_id"]: row for row in rows if row["gateway_refund_id"]}
        findings: list[Finding] = []
        handled: set[str] = set()
        for r in confirmed:
            row = by_key.get(r.idempotency_key) or by_id.get(r.gateway_refund_id)
            if row is not None:
                handled.add(r.idempotency_key)
                finding = await self._matched(r, row)
                if finding is not None:
                    findings.append(finding)
                continue
            if r.idempotency_key in not_merchant:
                continue
            for made in await orders.record_gateway_refunds([r]):
                handled.add(r.idempotency_key)
                findings.append(
                    Finding(
                        Kind.GATEWAY_REFUND_RECORDED,
                        REPAIRED,
                        f"refunded at the gateway's dashboard, not through us: recorded as"
                        f" merchant refund {made.refund_no} (source gateway)",
                        pay_order_no=made.pay_order_no,
                        txn_id=made.txn_id,
                        refund_key=made.idempotency_key,
                        amount=made.amount,
                    )
                )
        return findings, handled

    async def _matched(self, r: GatewayRefund, row: dict[str, Any]) -> Finding | None:
        def found(kind: Kind, action: str, detail: str) -> Finding:
            return Finding(
                kind,
                action,
                f"merchant refund {row['refund_no']}: {detail}",
                pay_order_no=row["pay_order_no"],
                txn_id=r.txn_id,
                refund_key=r.idempotency_key,
                amount=r.amount,
            )

        status = MerchantRefundStatus(row["status"])
        if (r.amount, r.txn_id) != (row["amount"], row["txn_id"]):
            return found(
                Kind.MERCHANT_REFUND_DIFFERS,
                EXCEPTION,
                f"the gateway refunded {r.amount} of {r.txn_id}, we recorded {row['amount']}"
                f" of {row['txn_id']}",
            )
        if status is MerchantRefundStatus.REFUND_FAILED:
            return found(
                Kind.MERCHANT_REFUND_DIFFERS,
                EXCEPTION,
                f"recorded REFUND_FAILED ({row['failure_reason']}), but the gateway refunded"
                f" it ({r.gateway_refund_id}): the customer has the money back",
            )
        if status is MerchantRefundStatus.REFUNDING and await self._store.merchant_refunds.succeed(
            str(row["refund_no"]), r.gateway_refund_id
        ):
            return found(
                Kind.REFUND_CONFIRMED_AT_GATEWAY,
                REPAIRED,
                "refunded at the gateway while our record said REFUNDING: recorded",
            )
        return None

"""The worker's business metrics, on the Temporal SDK's meter: one Prometheus endpoint
(``PAYORDERS_WORKER_METRICS_ADDRESS``) serves them next to the SDK's own ``temporal_*``.

Workflows count through ``workflow.metric_meter()`` (the SDK records nothing while a
workflow replays, and a metric emits no command), activities through
``activity.metric_meter()``, the refund gauges through the runtime's meter. The exporter
adds no suffix: a counter named here is scraped under exactly this name (no ``_total``).

This module is imported by workflows: it must stay free of I/O at import and of anything
non-deterministic in what workflows call (``count`` and ``became_terminal``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from temporalio.common import MetricMeter

from payorders.core.domain import PayOrderStatus

if TYPE_CHECKING:
    from payorders.core.store import PayOrderStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counter:
    name: str
    description: str

    def add(self, meter: MetricMeter, value: int = 1, **attributes: str) -> None:
        meter.create_counter(self.name, self.description).add(value, attributes or None)


# --- counted in workflows (once per workflow run; never during replay) ---------------------
ORDERS_CREATED = Counter(
    "payorders_orders_created", "pay orders created: their workflow's create write returned"
)
ORDERS_SUCCEEDED = Counter("payorders_orders_succeeded", "pay orders that became PAY_SUCCESS")
ORDERS_EXPIRED = Counter("payorders_orders_expired", "pay orders that became PAY_EXPIRED")

# --- counted in activities --------------------------------------------------------------------
LATE_PAYMENTS = Counter(
    "payorders_late_payments",
    "payments recorded for a refund with reason LATE (the order had expired or closed);"
    " once per transaction",
)
PAYMENTS_REFUND_REQUIRED = Counter(
    "payorders_payments_refund_required",
    "payments recorded for a refund, by reason; once per transaction",
)
REFUNDS_ATTEMPTED = Counter(
    "payorders_refunds_attempted", "attempts of the refund activity (every retry counts)"
)
REFUNDS_CONFIRMED = Counter(
    "payorders_refunds_confirmed",
    "refunds this worker confirmed SUCCEEDED (the attempt that wrote it: once per key)",
)
REFUNDS_REJECTED = Counter(
    "payorders_refunds_rejected",
    "refunds the gateway refused for good (the attempt that wrote REJECTED: once per key)",
)
RECONCILE_FINDINGS = Counter(
    "payorders_reconcile_findings",
    "reconciliation findings recorded, by kind and action (REPAIRED or EXCEPTION)",
)

# --- gauges, set by the worker's refresh task -------------------------------------------------
REFUND_OLDEST_PENDING_SECONDS = "payorders_refund_oldest_pending_seconds"
REFUNDS_PENDING = "payorders_refunds_pending"
GAUGE_REFRESH_S = 15.0


def became_terminal(meter: MetricMeter, status: PayOrderStatus) -> None:
    """Count a pay order's one move into a terminal state."""
    if status is PayOrderStatus.PAY_SUCCESS:
        ORDERS_SUCCEEDED.add(meter)
    elif status is PayOrderStatus.PAY_EXPIRED:
        ORDERS_EXPIRED.add(meter)


class RefundGauges:
    """How far refunds lag: the age of the oldest refund still PENDING (0 when none), and
    how many are pending. One indexed query per refresh (``refund_pending``)."""

    def __init__(self, meter: MetricMeter, store: PayOrderStore) -> None:
        self._store = store
        self._oldest = meter.create_gauge_float(
            REFUND_OLDEST_PENDING_SECONDS,
            "age in seconds of the oldest refund neither SUCCEEDED nor REJECTED; 0 when none",
        )
        self._pending = meter.create_gauge(
            REFUNDS_PENDING, "refunds neither SUCCEEDED nor REJECTED"
        )

    async def refresh(self) -> None:
        pending, oldest_s = await self._store.pending_refunds()
        self._oldest.set(oldest_s)
        self._pending.set(pending)

    async def refresh_forever(self, every_s: float = GAUGE_REFRESH_S) -> None:
        """Refresh every ``every_s`` until cancelled. A failed refresh (PostgreSQL down, a
        slow query) is logged and tried again next tick; the gauges keep their last value."""
        while True:
            try:
                async with asyncio.timeout(every_s):
                    await self.refresh()
            except Exception as e:
                log.warning("refund gauges not refreshed (next try in %.0f s): %r", every_s, e)
            await asyncio.sleep(every_s)

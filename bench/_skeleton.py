"""The same-shape skeleton: a workflow with exactly a pay order's Temporal shape on the happy
path, and none of its code.

What the engine sees is the pay order's (``workflows/pay_order.py``, version 3): started by
update-with-start with the same search attributes, memo and summary; the ``checkout``
update answered after two local activities (create, open the trade) with the same options;
the payment window's timer with its summary; the ``payment_succeeded`` signal; a third
local activity (record the payment); the status upserted as a search attribute; the
settlement window's timer; current details at each wait; every payload of the pay order's
size (``bench._shape``). The activities have empty bodies; the one that records the
payment tells the benchmark (one UDP datagram on loopback) so it can time the order as it
times a pay order's commit. The worker registers the pay-order worker's regular
activities too, empty, under the same tuning (``bench._trivial_worker``).

The benchmark's history check (``bench.http_path``) compares one skeleton's history with
one pay order's, event type by event type.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    from bench import _shape as shape
    from payorders.core import search_attributes as sa
    from payorders.core.models import RetryConfig, Timeouts
    from workflows._common import DB_RETRY, until_success

SKELETON_QUEUE = "bench-skeleton"
ADDRESS_ENV = "PAYORDERS_BENCH_SKELETON_ADDRESS"
"""``host:port`` of the benchmark's UDP socket that learns each skeleton's "commit"."""

_TIMEOUTS = Timeouts()
_RETRY = RetryConfig()


@workflow.defn(name="BenchSkeletonWorkflow")
class SkeletonWorkflow:
    """A pay order's Temporal shape on the happy path, with empty activities."""

    @workflow.init
    def __init__(self, input: dict[str, Any]) -> None:
        self._checkout: dict[str, Any] | None = None
        self._inbox: list[dict[str, Any]] = []

    @workflow.signal(name="payment_succeeded")
    def payment_succeeded(self, payment: dict[str, Any]) -> None:
        self._inbox.append(payment)

    @workflow.update(name="checkout")
    async def checkout(self) -> dict[str, Any]:
        # The pay order answers ``checkout_terms``: its trade and the run's terms.
        await workflow.wait_condition(lambda: self._checkout is not None)
        assert self._checkout is not None
        return shape.padded(shape.CHECKOUT_TERMS, checkout=self._checkout)

    @workflow.run
    async def run(self, input: dict[str, Any]) -> dict[str, Any]:
        no = input["pay_order_no"]
        db = timedelta(milliseconds=_TIMEOUTS.db_activity_start_to_close_ms)
        gateway = timedelta(milliseconds=_TIMEOUTS.activity_start_to_close_ms)
        window = timedelta(seconds=input["expires_in_s"])
        if not input.get("merged"):
            # ``merged``: the shape with the row's creation and the trade's opening as one
            # local activity, which ``bench.server_work`` measures (the pay order has two).
            await workflow.execute_local_activity(
                "bench_create_pay_order",
                shape.padded(shape.CREATE, pay_order_no=no),
                start_to_close_timeout=db,
                retry_policy=DB_RETRY,
                summary="create pay order 1000 USD",
            )
        self._checkout = await workflow.execute_local_activity(
            "bench_open_trade",
            shape.padded(shape.OPEN, pay_order_no=no),
            start_to_close_timeout=gateway,
            schedule_to_close_timeout=window,
            retry_policy=until_success(_RETRY),
            summary="open the trade at the gateway: 1000 USD",
        )
        payment = await self._wait(window, shape.WINDOW_SUMMARY, shape.DETAILS[0])
        assert payment is not None
        await workflow.execute_local_activity(
            "bench_record_payment",
            shape.padded(shape.RECORD, pay_order_no=no, payment=payment),
            start_to_close_timeout=db,
            retry_policy=DB_RETRY,
            summary=f"record payment {payment['txn_id']} 1000 USD -> settle",
        )
        workflow.upsert_search_attributes([sa.PAY_ORDER_STATUS.value_set("PAY_SUCCESS")])
        workflow.set_current_details(shape.DETAILS[1])
        settlement = timedelta(seconds=input["settlement_window_s"])
        await self._wait(settlement, shape.SETTLEMENT_SUMMARY, shape.DETAILS[2])
        return shape.padded(shape.RESULT, pay_order_no=no)

    async def _wait(self, wait: timedelta, summary: str, details: str) -> dict[str, Any] | None:
        workflow.set_current_details(details)
        with contextlib.suppress(asyncio.TimeoutError):
            await workflow.wait_condition(
                lambda: bool(self._inbox), timeout=wait, timeout_summary=summary
            )
        return self._inbox.pop(0) if self._inbox else None


# --- the activities: empty bodies -------------------------------------------------------------


@activity.defn(name="bench_create_pay_order")
async def create_pay_order(cmd: dict[str, Any]) -> dict[str, Any]:
    return shape.padded(shape.ROW, pay_order_no=cmd["pay_order_no"])


@activity.defn(name="bench_open_trade")
async def open_trade(cmd: dict[str, Any]) -> dict[str, Any]:
    return shape.padded(shape.CHECKOUT, pay_order_no=cmd["pay_order_no"])


class Recorder:
    """``bench_record_payment``: empty, but for one datagram to the benchmark."""

    def __init__(self, address: str | None = None) -> None:
        address = address or os.environ.get(ADDRESS_ENV)
        self._to: tuple[str, int] | None = None
        if address:
            host, port = address.rsplit(":", 1)
            self._to = (host, int(port))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @activity.defn(name="bench_record_payment")
    async def record_payment(self, cmd: dict[str, Any]) -> dict[str, Any]:
        no = cmd["pay_order_no"]
        if self._to is not None:
            self._sock.sendto(no.encode(), self._to)
        return shape.padded(shape.RECORDED, pay_order_no=no)


def _empty(name: str) -> Any:
    @activity.defn(name=name)
    async def empty(arg: dict[str, Any]) -> dict[str, Any]:
        return arg

    return empty


REGULAR = [
    _empty(f"bench_{name}")
    for name in (
        "get_pay_order_row",
        "expire_pay_order",
        "close_trade",
        "refund_payment",
        "refund_operator_payment",
        "refund_merchant",
    )
]
"""The pay-order worker's other activities, registered as it registers them, never called
on the happy path."""

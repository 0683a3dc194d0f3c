"""Order events: an outbox row rendered into the body the order service receives, the same
bytes pushed by the relay (``payorders.service.relay``) and read from the pull feed
(``GET /v1/events``).

The body (``EVENTS.md``, the contract shared with the order service)::

    {"id": "evt_0000000000000123", "type": "pay_order.succeeded", "pay_order_no": "po_order-42",
     "sequence": 2, "created_at": "2026-12-01T10:00:00.123456+00:00",
     "data": {"order_no": "order-42", "amount": 1999, "currency": "USD",
              "status": "PAY_SUCCESS", "reason": null, "txn_id": "...", "refund": null}}

Everything in it comes from the outbox row (its id, type, sequence, time, payload and the
status fixed when it was written) and the pay order's immutable fields (order number,
amount, currency), so rendering the same row twice gives the same bytes: a retry is the
same event, and the consumer dedupes by ``id``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg

EVENT_ID_PREFIX = "evt_"
EVENT_ID_PATTERN = r"^evt_[0-9]{16}$"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

# The row and what the body needs of its pay order; the relay claims with the same columns.
EVENT_COLUMNS = """
       o.id, o.event_type, o.pay_order_no, o.sequence, o.created_at, o.payload,
       o.pay_order_status, p.order_no, p.amount, p.currency"""
SQL_FEED = f"""
SELECT {EVENT_COLUMNS}
  FROM outbox o JOIN pay_order p USING (pay_order_no)
 WHERE o.id > $1
 ORDER BY o.id
 LIMIT $2"""


def event_id(outbox_id: int) -> str:
    """``evt_`` and the outbox row's id, 16 digits: sorts like the id."""
    return f"{EVENT_ID_PREFIX}{outbox_id:016d}"


def outbox_id(event_id: str) -> int:
    """The outbox row id of an event id.

    Raises:
        ValueError: not an event id (``evt_`` and 16 digits).
    """
    if not _EVENT_ID.fullmatch(event_id):
        raise ValueError(
            f"{event_id!r} is not an event id: evt_ and 16 digits, e.g. evt_0000000000000123"
        )
    return int(event_id.removeprefix(EVENT_ID_PREFIX))


def _refund(payload: Mapping[str, Any]) -> dict[str, Any]:
    refund = {
        "refund_key": payload["refund_key"],
        "txn_id": payload["txn_id"],
        "amount": payload["amount"],
        "currency": payload["currency"],
    }
    if "refund_no" in payload:
        # A merchant refund (after PAY_SUCCESS, migration 0009); a compensation's body stays
        # byte for byte what it was.
        for k in ("refund_no", "source", "refundable", "failure_reason"):
            refund[k] = payload[k]
    return refund


def render(row: Mapping[str, Any] | asyncpg.Record) -> dict[str, Any]:
    """The event body of one outbox row joined with its pay order (``EVENT_COLUMNS``)."""
    payload = row["payload"]
    if isinstance(payload, str):  # asyncpg hands jsonb over as text
        payload = json.loads(payload)
    kind = row["event_type"]
    created: datetime = row["created_at"]
    reason = None
    if kind == "pay_order.expired":
        # Events written before cancels existed carry no reason: their timer expired them.
        reason = payload.get("reason") or "EXPIRED"
    return {
        "id": event_id(row["id"]),
        "type": kind,
        "pay_order_no": row["pay_order_no"],
        "sequence": row["sequence"],
        "created_at": created.astimezone(UTC).isoformat(timespec="microseconds"),
        "data": {
            "order_no": row["order_no"],
            "amount": row["amount"],
            "currency": row["currency"].strip(),
            "status": row["pay_order_status"],
            "reason": reason,
            "txn_id": payload.get("txn_id"),
            "refund": _refund(payload) if kind in ("refund.succeeded", "refund.failed") else None,
        },
    }


def body(event: Mapping[str, Any]) -> bytes:
    """The bytes sent and signed: compact JSON, keys in the contract's order."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


class EventFeed:
    """The pull feed: events after a given one, in id order (which is commit order: see
    migration 0006), with the same bodies the relay pushes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def after(self, after: str | None, limit: int) -> dict[str, Any]:
        """Up to ``limit`` events after the event id ``after`` (None: from the first).

        Returns ``{"events": [...], "next_after": <last id, or the given after>}``.

        Raises:
            ValueError: ``after`` is not an event id, or ``limit`` is not 1..``MAX_LIMIT``.
        """
        start = 0 if after is None else outbox_id(after)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_LIMIT}")
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SQL_FEED, start, limit)
        events = [render(r) for r in rows]
        return {"events": events, "next_after": events[-1]["id"] if events else after}

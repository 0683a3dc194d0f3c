"""An example order service: the shop's side of the order events (README "The order
service's side").

``payorders dev`` runs it with ``uvicorn --factory payorders.sandbox.order_service:app`` on
127.0.0.1, and its worker delivers every pay order's events to ``POST /events``. For each
event the service checks the signature, drops an event it has already handled (delivery is
at least once), checks that the pay order's ``sequence`` follows on from the last one, and
prints what a shop would do: ``order-42 paid: ship``. ``GET /events`` shows what it received.

It keeps everything in memory: a restart forgets what it saw, which is why a gap in the
sequence is only logged (the relay never sends event n+1 before n was acknowledged, so a
gap means this process forgot n, not that n is still coming; refusing n+1 would block the
pay order forever). A real shop keeps the ids it handled in its own database.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from payorders.runtime import settings_or_exit
from payorders.service.webhook import DEFAULT_TOLERANCE_S, WebhookRejected, verify

SIGNATURE_HEADER = "Payorders-Event-Signature"

# ISO 4217 minor units where they are not 2 (active codes only).
_NO_MINOR_UNIT = frozenset(
    "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split()  # noqa: SIM905
)
_THREE_MINOR_UNITS = frozenset("BHD IQD JOD KWD LYD OMR TND".split())  # noqa: SIM905


class BadEvent(ValueError):
    """A signed body that is not an event: a broken contract, answered 400 (retried)."""


def minor_unit_exponent(currency: str) -> int:
    """How many decimals the currency's minor unit has: 2 for USD, 0 for JPY, 3 for KWD."""
    if currency in _NO_MINOR_UNIT:
        return 0
    return 3 if currency in _THREE_MINOR_UNITS else 2


def format_money(amount: int, currency: str) -> str:
    """``1999, "USD"`` -> ``"19.99 USD"``; ``500, "JPY"`` -> ``"500 JPY"`` (no floats)."""
    exponent = minor_unit_exponent(currency)
    if exponent == 0:
        return f"{amount} {currency}"
    major, minor = divmod(amount, 10**exponent)
    return f"{major}.{minor:0{exponent}d} {currency}"


def what_a_shop_does(event: dict[str, Any]) -> str:
    """The one line a shop acts on for an event.

    Raises:
        BadEvent: a refund event without its refund's amount and currency.
    """
    data = event["data"]
    order_no = data["order_no"]
    kind = event["type"]
    if kind == "pay_order.succeeded":
        return f"{order_no} paid: ship"
    if kind == "pay_order.expired":
        if data.get("reason") == "CANCELLED":
            return f"{order_no} cancelled at checkout: release stock and coupon"
        return f"{order_no} expired: release stock and coupon"
    if kind == "refund.succeeded":
        refund = data.get("refund")
        if not (
            isinstance(refund, dict)
            and type(refund.get("amount")) is int
            and isinstance(refund.get("currency"), str)
        ):
            raise BadEvent("a refund.succeeded event needs data.refund's amount and currency")
        money = format_money(refund["amount"], refund["currency"])
        return f"refund of {money} for {order_no} confirmed"
    # A type added after this shop was written is acknowledged, not retried forever.
    return f"{order_no}: {kind} ignored (not a type this shop handles)"


def parse_event(body: bytes) -> dict[str, Any]:
    """The event in ``body``, with the fields this service reads checked.

    Raises:
        BadEvent: not JSON, or a field missing or of the wrong type.
    """
    try:
        event = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadEvent("body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        raise BadEvent("an event is an object with data")
    for name in ("id", "type", "pay_order_no"):
        if not isinstance(event.get(name), str):
            raise BadEvent(f"{name} must be a string")
    sequence = event.get("sequence")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise BadEvent("sequence must be a positive integer")
    if not isinstance(event["data"].get("order_no"), str):
        raise BadEvent("data.order_no must be a string")
    return event


@dataclass
class Inbox:
    """What the service received: the events it acted on, their lines (``lines[i]`` is
    the line of ``events[i]``), and the warnings (duplicates, repeats, gaps)."""

    say: Callable[[str], None]
    seen: set[str] = field(default_factory=set)
    last_sequence: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def take(self, event: dict[str, Any]) -> bool:
        """Handle one verified event; returns whether it was a duplicate. Synchronous, so
        two deliveries at once cannot both pass the duplicate check."""
        if event["id"] in self.seen:
            self._warn(f"{event['id']} delivered again: already handled")
            return True
        pay_order_no, sequence = event["pay_order_no"], event["sequence"]
        last = self.last_sequence.get(pay_order_no, 0)
        if sequence <= last:
            self.seen.add(event["id"])
            self._warn(f"{pay_order_no}: sequence {sequence} after {last}: a repeat, not acted on")
            return False
        line = what_a_shop_does(event)  # before any change: a bad event changes nothing
        if sequence > last + 1:
            self._warn(
                f"{pay_order_no}: sequence {sequence} after {last}: missed"
                f" {last + 1}..{sequence - 1} (the feed GET /v1/events has them)"
            )
        self.seen.add(event["id"])
        self.last_sequence[pay_order_no] = sequence
        self.events.append(event)
        self.lines.append(line)
        self.say(line)
        return False

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.say(f"warning: {message}")


def _print(line: str) -> None:
    print(line, flush=True)


def _now() -> datetime:
    return datetime.now(UTC)


def create_order_service(
    secret: str,
    *,
    now: Callable[[], datetime] = _now,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    say: Callable[[str], None] = _print,
) -> Starlette:
    """The order service's ASGI app.

    Args:
        secret: the signing secret of the order events (``PAYORDERS_ORDER_EVENTS_SECRET``).
        now: the clock the signature's age is measured with.
        tolerance_s: how old (or how far ahead) a signature may be.
        say: where the lines go (stdout).
    """
    if not secret:
        raise ValueError("the order service needs the order events' signing secret")
    inbox = Inbox(say)

    async def receive(request: Request) -> JSONResponse:
        body = await request.body()
        header = request.headers.get(SIGNATURE_HEADER)
        try:
            if header is None:
                raise WebhookRejected(
                    f"missing {SIGNATURE_HEADER} header", status=401, code="missing_signature"
                )
            verify(header, body, secrets=[secret], now=now(), tolerance_s=tolerance_s)
        except WebhookRejected as e:
            say(f"rejected a delivery: {e.reason}")
            return JSONResponse({"error": e.reason}, status_code=401)
        try:
            duplicate = inbox.take(parse_event(body))
        except BadEvent as e:
            say(f"rejected a signed delivery: {e}")
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"received": True, "duplicate": duplicate})

    async def received(request: Request) -> JSONResponse:
        return JSONResponse(
            {"lines": inbox.lines, "events": inbox.events, "warnings": inbox.warnings}
        )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/events", receive, methods=["POST"]),
            Route("/events", received, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def app() -> Starlette:
    """For ``uvicorn --factory payorders.sandbox.order_service:app``: the secret from
    ``PAYORDERS_ORDER_EVENTS_SECRET``, the one the relay signs with."""
    secret = settings_or_exit("orders").order_events_secret
    assert secret is not None  # required for the role
    return create_order_service(secret.get_secret_value())

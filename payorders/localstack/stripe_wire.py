"""The Stripe wire: a fault proxy the local stack runs between the Stripe adapter and
localstripe, so that faults happen on the wire and never inside the adapter.

Every Stripe API request is forwarded as it came (method, path, query, form body, headers
with ``Authorization`` and ``Idempotency-Key``) and its answer relayed. localstripe posts its
webhooks to ``RELAY_PATH``; they go on to the API's Stripe endpoint byte for byte, with
their ``Stripe-Signature``. The faults and their control API are the sandbox gateway's
(``GET /v1/faults``, ``PUT /v1/faults/{scope}``, ``DELETE /v1/faults[/{scope}]``; a scope is
a pay order number or ``*``), so ``payorders fault`` drives either gateway:

- ``fail_next_refunds``: ``POST /v1/refunds`` gets a Stripe-shaped 500 ``api_error`` and is
  never forwarded;
- ``timeout_after_success_next``: the refund is forwarded and made, then its answer is held
  back until the caller hangs up (see ``WITHHOLD_ANSWER_S``);
- ``delay_ms``: every call of the pay order waits that long before it is forwarded;
- ``paid_on_close_amount``/``_currency``: a cancel of an unpaid PaymentIntent is preceded by
  its payment, so the payment wins the race at the instant of expiry and the cancel is
  refused (the customer's payment is ``localstripe.pay_payment_intent``'s). A PaymentIntent
  can only be paid for its own amount: the fault's amount arms it;
- ``webhook_delay_ms``, ``webhook_drop_next``, ``webhook_duplicate_next``,
  ``webhook_reorder_next``: the relay waits, loses, sends twice, or holds back a webhook.
  localstripe never resends a webhook, so a lost one stays lost (reconciliation's job).

A request's pay order is learnt from what crosses the wire: ``metadata[pay_order_no]`` in a
request, and the metadata of every PaymentIntent, refund and event relayed (Stripe object
id -> pay order). The faults live in this process's memory, and a check and its decrement
never interleave: one asyncio loop, no ``await`` between them.

Run: ``python -m payorders.localstack.stripe_wire --port P --upstream URL --webhook-target URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import parse_qsl

import httpx
import stripe
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from payorders.core import domain
from payorders.localstack.faults import COUNTERS, Faults, FaultsPatch
from payorders.localstack.localstripe import pay_payment_intent

log = logging.getLogger(__name__)

RELAY_PATH = "/_wire/webhook"
"""Where localstripe posts its webhooks (the stack registers this URL)."""
DELIVERIES_PATH = "/_wire/webhooks"
"""What the relay did with each webhook, newest last (for tests and operators)."""
WITHHOLD_ANSWER_S = 120.0
"""How long a lost refund answer is held. Holding it, rather than closing the connection,
is what a lost answer is to the caller: its request went out, no byte comes back, and its
own client timeout fires. A closed connection would be a different, earlier signal."""
REORDER_HOLD_S = 1.5
"""How long a reordered webhook is held back, so one sent after it goes first (as the
sandbox does)."""
UPSTREAM_TIMEOUT_S = 60.0
"""Our own patience with localstripe: longer than any client's, so the caller decides."""
KEPT_DELIVERIES = 10_000
_INT32_MAX = 2**31 - 1
_PAYABLE = frozenset({"requires_payment_method", "requires_confirmation"})
# Hop-by-hop headers (RFC 9110 7.6.1) and those the HTTP clients set again themselves.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    }
)


# --- faults ----------------------------------------------------------------------------------


class FaultBook:
    """The armed faults by scope. Like the sandbox's ledger: a pay order's own row stands
    for it whole (else ``*``'s), and a counter is taken from the order's own row first."""

    def __init__(self) -> None:
        self._rows: dict[str, Faults] = {}

    def set(self, scope: str, changes: dict[str, Any]) -> Faults:
        row = self._rows[scope] = replace(self._rows.get(scope, Faults()), **changes)
        return row

    def of(self, scope: str) -> Faults:
        """The faults of exactly this scope (no fallback to ``*``)."""
        return self._rows.get(scope, Faults())

    def effective(self, pay_order_no: str | None) -> Faults:
        row = self._rows.get(pay_order_no) if pay_order_no else None
        return row or self._rows.get("*") or Faults()

    def consume(self, pay_order_no: str | None, counter: str) -> bool:
        """Take one unit of a counting fault; whether there was one."""
        assert counter in COUNTERS
        for scope in (pay_order_no, "*"):
            row = self._rows.get(scope) if scope else None
            if scope is not None and row is not None and getattr(row, counter) > 0:
                self._rows[scope] = replace(row, **{counter: getattr(row, counter) - 1})
                return True
        return False

    def armed(self) -> list[dict[str, Any]]:
        """The scopes with a fault still armed (spent counters are left out), by scope."""
        return [
            {"scope": scope, **asdict(row)}
            for scope, row in sorted(self._rows.items())
            if row.armed()
        ]

    def has_order_scopes(self) -> bool:
        return any(scope != "*" and row.armed() for scope, row in self._rows.items())

    def clear(self, scope: str | None = None) -> None:
        if scope is None:
            self._rows.clear()
        else:
            self._rows.pop(scope, None)


# --- which pay order ----------------------------------------------------------------------


class Owners:
    """Stripe object id (``pi_``, ``ch_``, ``re_``, ...) -> pay order number, learnt from the
    metadata of what crosses the wire."""

    _MAX_DEPTH = 6

    def __init__(self) -> None:
        self._of: dict[str, str] = {}

    def get(self, object_id: str) -> str | None:
        return self._of.get(object_id)

    def learn(self, doc: Any, depth: int = 0) -> None:
        """Record every object in ``doc`` (an answer, a list, an event) that names its pay
        order in its metadata, or belongs to a PaymentIntent that does."""
        if depth > self._MAX_DEPTH:
            return
        if isinstance(doc, list):
            for item in doc:
                self.learn(item, depth + 1)
            return
        if not isinstance(doc, dict):
            return
        metadata = doc.get("metadata")
        no = metadata.get("pay_order_no") if isinstance(metadata, dict) else None
        pi = doc.get("payment_intent")
        if not isinstance(no, str) or not no:
            no = self._of.get(pi) if isinstance(pi, str) else None
        if no is not None:
            for key in (doc.get("id"), pi):
                if isinstance(key, str) and key:
                    self._of[key] = no
        for value in doc.values():
            if isinstance(value, dict | list):
                self.learn(value, depth + 1)


def _named_pay_order(pairs: Iterable[tuple[str, str]]) -> str | None:
    for key, value in pairs:
        if key == "metadata[pay_order_no]" and value:
            return value
    return None


def _named_objects(path: str, pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Stripe ids a request names: ``/v1/{resource}/{id}[/...]`` and ``payment_intent=``."""
    parts = path.strip("/").split("/")
    ids = [parts[2]] if len(parts) >= 3 and parts[0] == "v1" and "_" in parts[2] else []
    ids += [v for k, v in pairs if k == "payment_intent" and v]
    return ids


def _form(body: bytes, content_type: str) -> list[tuple[str, str]]:
    if not body or "application/x-www-form-urlencoded" not in content_type:
        return []
    try:
        return parse_qsl(body.decode(), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return []


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except (UnicodeDecodeError, ValueError):
        return None


# --- answers -------------------------------------------------------------------------------


def stripe_error(status: int, message: str, *, error_type: str = "api_error") -> JSONResponse:
    """An error as Stripe answers one, so the SDK raises its own exception for it."""
    return JSONResponse(
        {"error": {"type": error_type, "message": message}},
        status_code=status,
        headers={"Request-Id": f"req_wire_{uuid.uuid4().hex[:14]}"},
    )


def control_error(status: int, code: str, message: str) -> JSONResponse:
    """An error of the control API, in the sandbox gateway's shape."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _relayed(resp: httpx.Response) -> Response:
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in _NOT_FORWARDED}
    return Response(resp.content, status_code=resp.status_code, headers=headers)


async def _disconnected(request: Request) -> None:
    # The body has been read by now: the next message is the caller hanging up.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- the proxy -----------------------------------------------------------------------------


class StripeWire:
    """The proxy's state and its routes.

    Args:
        upstream: localstripe's base URL.
        webhook_target: the API's Stripe webhook endpoint, where relayed webhooks go.
        withhold_answer_s: how long a lost refund answer is held at most.
        reorder_hold_s: how long a reordered webhook is held back.
    """

    def __init__(
        self,
        *,
        upstream: str,
        webhook_target: str,
        withhold_answer_s: float = WITHHOLD_ANSWER_S,
        reorder_hold_s: float = REORDER_HOLD_S,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.webhook_target = webhook_target
        self.withhold_answer_s = withhold_answer_s
        self.reorder_hold_s = reorder_hold_s
        self.faults = FaultBook()
        self.owners = Owners()
        self.deliveries: deque[dict[str, Any]] = deque(maxlen=KEPT_DELIVERIES)
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "the proxy's client opens when the app starts"
        return self._http

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT_S) as http:
                self._http = http
                try:
                    yield
                finally:
                    self._http = None

        methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
        return Starlette(
            routes=[
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/v1/faults", self.list_faults, methods=["GET"]),
                Route("/v1/faults", self.clear_all_faults, methods=["DELETE"]),
                Route("/v1/faults/{scope}", self.set_faults, methods=["PUT"]),
                Route("/v1/faults/{scope}", self.clear_faults, methods=["DELETE"]),
                Route(RELAY_PATH, self.relay_webhook, methods=["POST"]),
                Route(DELIVERIES_PATH, self.list_deliveries, methods=["GET"]),
                Route("/{path:path}", self.forward, methods=methods),
            ],
            lifespan=lifespan,
        )

    # --- control API ----------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "upstream": self.upstream})

    async def list_faults(self, request: Request) -> Response:
        return JSONResponse(self.faults.armed())

    async def set_faults(self, request: Request) -> Response:
        scope = request.path_params["scope"]
        try:
            _check_scope(scope)
            patch = FaultsPatch.model_validate_json(await request.body())
        except domain.InvalidInput as e:
            return control_error(422, "invalid_request", str(e))
        except ValidationError as e:
            return control_error(422, "invalid_request", _problems(e))
        row = self.faults.set(scope, patch.model_dump(exclude_unset=True))
        return JSONResponse({"scope": scope, **asdict(row)})

    async def clear_all_faults(self, request: Request) -> Response:
        self.faults.clear()
        return Response(status_code=204)

    async def clear_faults(self, request: Request) -> Response:
        scope = request.path_params["scope"]
        try:
            self.faults.clear(_check_scope(scope))
        except domain.InvalidInput as e:
            return control_error(422, "invalid_request", str(e))
        return Response(status_code=204)

    async def list_deliveries(self, request: Request) -> Response:
        return JSONResponse(list(self.deliveries))

    # --- the Stripe API -------------------------------------------------------------------

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        pairs = [
            *parse_qsl(request.url.query),
            *_form(body, request.headers.get("content-type", "")),
        ]
        no = await self._pay_order_of(request, path, pairs)
        faults = self.faults.effective(no)
        if faults.delay_ms:
            await asyncio.sleep(faults.delay_ms / 1000)
        is_refund = request.method == "POST" and path == "/v1/refunds"
        if is_refund and self.faults.consume(no, "fail_next_refunds"):
            log.warning("refund for %s failed (injected fault), not forwarded", no or "?")
            return stripe_error(500, "An error occurred with our connection to Stripe (injected).")
        if faults.paid_on_close_amount and _is_cancel(request.method, path):
            await self._pay_before_cancel(request, path.split("/")[3])
        try:
            resp = await self._send(request, path, body)
        except httpx.HTTPError as e:
            return stripe_error(502, f"localstripe did not answer ({type(e).__name__})")
        answer = _json(resp.content)
        self.owners.learn(answer)
        if is_refund and resp.is_success and self.faults.consume(no, "timeout_after_success_next"):
            log.warning("refund for %s made; its answer is withheld (injected fault)", no or "?")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_disconnected(request), self.withhold_answer_s)
        return _relayed(resp)

    async def _send(self, request: Request, path: str, body: bytes) -> httpx.Response:
        url = self.upstream + path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
        return await self.http.request(request.method, url, content=body, headers=headers)

    async def _pay_order_of(
        self, request: Request, path: str, pairs: Sequence[tuple[str, str]]
    ) -> str | None:
        named = _named_pay_order(pairs)
        if named is not None:
            return named
        ids = _named_objects(path, pairs)
        for object_id in ids:
            if (no := self.owners.get(object_id)) is not None:
                return no
        # Only worth a call when a fault is armed for some pay order: this process may have
        # started after the PaymentIntent was created (a restart), and forgotten it.
        if self.faults.has_order_scopes():
            for object_id in ids:
                if object_id.startswith("pi_"):
                    await self._look_up(request, object_id)
                    if (no := self.owners.get(object_id)) is not None:
                        return no
        return None

    async def _look_up(self, request: Request, pi_id: str) -> None:
        auth = request.headers.get("authorization")
        try:
            resp = await self.http.get(
                f"{self.upstream}/v1/payment_intents/{pi_id}",
                headers={"Authorization": auth} if auth else {},
            )
        except httpx.HTTPError:
            return
        if resp.is_success:
            self.owners.learn(_json(resp.content))

    async def _pay_before_cancel(self, request: Request, pi_id: str) -> None:
        """The customer pays at the very instant we cancel: the payment lands first."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            log.warning("paid_on_close: no bearer key on the cancel of %s; not paid", pi_id)
            return
        http = stripe.HTTPXClient(timeout=UPSTREAM_TIMEOUT_S)
        customer = stripe.StripeClient(
            key, base_addresses={"api": self.upstream}, max_network_retries=0, http_client=http
        )
        try:
            pi = await customer.v1.payment_intents.retrieve_async(pi_id)
            if pi.status not in _PAYABLE:
                return
            paid = await pay_payment_intent(customer, pi_id)
        except stripe.StripeError as e:
            log.warning("paid_on_close: paying %s failed (%s)", pi_id, type(e).__name__)
            return
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]
        log.warning("paid_on_close: %s paid (%s) before its cancel", pi_id, paid.status)

    # --- webhooks -------------------------------------------------------------------------

    async def relay_webhook(self, request: Request) -> Response:
        body = await request.body()
        event = _json(body)
        self.owners.learn(event)
        no = _event_pay_order(event, self.owners)
        faults = self.faults.effective(no)
        duplicate = self.faults.consume(no, "webhook_duplicate_next")
        drop = self.faults.consume(no, "webhook_drop_next")
        reorder = self.faults.consume(no, "webhook_reorder_next")
        record: dict[str, Any] = {
            "event_id": event.get("id") if isinstance(event, dict) else None,
            "type": event.get("type") if isinstance(event, dict) else None,
            "pay_order_no": no,
            "received_at": time.time(),
            "copies": 0 if drop else 2 if duplicate else 1,
            "statuses": [],
            "outcome": "dropped" if drop else "pending",
        }
        self.deliveries.append(record)
        if drop:
            log.warning("webhook %s for %s lost (injected fault)", record["event_id"], no)
            return stripe_error(502, "lost on the wire (injected fault)")
        hold_s = faults.webhook_delay_ms / 1000 + (self.reorder_hold_s if reorder else 0)
        if hold_s:
            await asyncio.sleep(hold_s)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("stripe-signature", "content-type", "user-agent")
        }
        for _ in range(record["copies"]):
            record["statuses"].append(await self._deliver(body, headers))
        first = record["statuses"][0]
        record["outcome"] = "delivered" if isinstance(first, int) and first < 300 else "failed"
        if isinstance(first, int):
            return Response(status_code=first)
        return stripe_error(502, f"the webhook target did not answer ({first})")

    async def _deliver(self, body: bytes, headers: dict[str, str]) -> int | str:
        """The target's status code, or the name of the error that kept it from answering."""
        try:
            return (
                await self.http.post(self.webhook_target, content=body, headers=headers)
            ).status_code
        except httpx.HTTPError as e:
            return type(e).__name__


def _is_cancel(method: str, path: str) -> bool:
    parts = path.strip("/").split("/")
    return (
        method == "POST"
        and len(parts) == 4
        and parts[:2] == ["v1", "payment_intents"]
        and (parts[3] == "cancel")
    )


def _event_pay_order(event: Any, owners: Owners) -> str | None:
    obj = event.get("data", {}).get("object") if isinstance(event, dict) else None
    if not isinstance(obj, dict):
        return None
    metadata = obj.get("metadata")
    no = metadata.get("pay_order_no") if isinstance(metadata, dict) else None
    if isinstance(no, str) and no:
        return no
    object_id = obj.get("id")
    return owners.get(object_id) if isinstance(object_id, str) else None


def _check_scope(scope: str) -> str:
    # The sandbox's rule: ``*``, or a pay order number.
    if scope == "*":
        return scope
    if not scope.startswith("po_"):
        raise domain.InvalidInput("scope must be '*' or a pay order number (po_...)")
    domain.check_identifier(scope.removeprefix("po_"), "scope")
    return scope


def _problems(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: {err.get('msg', 'invalid')}"
        for err in e.errors()
    )


# --- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the proxy with uvicorn, on loopback unless told otherwise."""
    import uvicorn

    p = argparse.ArgumentParser(prog="stripe_wire", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="localstripe's base URL")
    p.add_argument("--webhook-target", required=True, help="the API's Stripe webhook URL")
    p.add_argument("--withhold-answer-s", type=float, default=WITHHOLD_ANSWER_S)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    wire = StripeWire(
        upstream=args.upstream,
        webhook_target=args.webhook_target,
        withhold_answer_s=args.withhold_answer_s,
    )
    uvicorn.run(
        wire.app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        # A held answer must not keep the proxy from stopping.
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()

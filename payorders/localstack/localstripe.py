"""localstripe (a fake Stripe server by others, GPL-3.0) as a process of ours, and the
customer's side of a Stripe payment, for the local stack, the tools and the tests.

``LocalStripe`` runs ``python -m payorders.localstack.localstripe_server`` (loopback only,
its state in our data directory) and talks to its ``/_config`` API. ``pay_payment_intent``
and ``money_by_pay_order`` use only Stripe's public API, so they work the same against
Stripe's test mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import stripe

from payorders.localstack.localstripe_server import READY_PATH
from payorders.localstack.ports import free_port

DEFAULT_API_KEY = "sk_test_payorders_local"
"""A key localstripe accepts (any ``sk_`` key longer than 5 characters; it checks no more)."""

PAY_ORDER = "pay_order_no"
"""The PaymentIntent metadata key that names its pay order (as the Stripe adapter sets it)."""

STATE_FILE = "localstripe.pickle"
LOG_FILE = "localstripe.log"


class LocalStripeError(RuntimeError):
    """localstripe did not start, or refused a configuration call."""


class LocalStripe:
    """One localstripe process on 127.0.0.1, its state in ``data_dir``.

    Use as ``async with LocalStripe(dir) as ls:`` or ``await start()`` / ``await stop()``.
    Webhook endpoints live in its memory only: register them after every start.

    Args:
        data_dir: where its state (``localstripe.pickle``) and its log are kept; the state
            survives a restart (``flush`` empties it).
        port: its port; 0 picks a free one (see ``url`` once started).
        log_path: its output (default ``data_dir/localstripe.log``).
        startup_timeout_s: how long it may take to answer after start.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        log_path: Path | None = None,
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.data_dir = data_dir
        self.state_file = data_dir / STATE_FILE
        self.log_path = log_path or data_dir / LOG_FILE
        self._port = port
        self._startup_timeout = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the API base for the SDK (``api_base``)."""
        if not self._port:
            raise LocalStripeError("localstripe has no port yet: start it first")
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def command(self, port: int) -> list[str]:
        """The command line that runs it (for a supervisor that spawns it itself)."""
        return [
            sys.executable,
            "-m",
            "payorders.localstack.localstripe_server",
            "--port",
            str(port),
            "--state",
            str(self.state_file),
        ]

    async def __aenter__(self) -> LocalStripe:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start it and wait until it answers.

        Raises:
            LocalStripeError: it exited, or did not answer within ``startup_timeout_s``.
        """
        if self.pid is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A port picked here may be taken by someone else before the child binds it: the
        # child then exits at once, and a fresh port is tried.
        attempts = 1 if self._port else 3
        for attempt in range(attempts):
            port = self._port or free_port()
            self._spawn(port)
            try:
                await self._wait_ready(port)
            except LocalStripeError:
                await self.stop()
                if attempt + 1 == attempts:
                    raise
                continue
            self._port = port
            return

    def _spawn(self, port: int) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(port),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def _wait_ready(self, port: int) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        url = f"http://127.0.0.1:{port}{READY_PATH}"
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                if self._proc.poll() is not None:
                    raise LocalStripeError(
                        f"localstripe exited ({self._proc.returncode}) on port {port};"
                        f" see {self.log_path}"
                    )
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    resp = await http.get(url, headers=_auth(DEFAULT_API_KEY))
                    # Ours, not another server that holds the port.
                    if resp.status_code == 200 and resp.json().get("pid") == self._proc.pid:
                        return
                if loop.time() > deadline:
                    raise LocalStripeError(
                        f"localstripe did not answer on port {port} within"
                        f" {self._startup_timeout:.0f}s; see {self.log_path}"
                    )
                await asyncio.sleep(0.1)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Terminate it; kill it if it has not exited within ``grace_s``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def register_webhook(
        self,
        url: str,
        secret: str,
        id: str = "payorders",
        *,
        events: Sequence[str] | None = None,
    ) -> None:
        """Have it send its events to ``url``, signed with ``secret`` (memory only: again
        after every start). It sends each event once, about 1 s after the change, with no
        retry, and only ``payment_intent.succeeded`` and ``payment_intent.payment_failed``."""
        data: dict[str, str | list[str]] = {"url": url, "secret": secret}
        if events is not None:
            data["events[]"] = list(events)
        await self._config("POST", f"/_config/webhooks/{id}", data=data)

    async def flush(self) -> None:
        """Forget every object (PaymentIntents, charges, refunds, ...); webhooks stay."""
        await self._config("DELETE", "/_config/data")

    async def _config(self, method: str, path: str, **kwargs: Any) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            resp = await http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise LocalStripeError(f"localstripe {method} {path}: HTTP {resp.status_code}")

    @contextlib.asynccontextmanager
    async def client(
        self, api_key: str = DEFAULT_API_KEY, *, timeout_s: float = 10.0
    ) -> AsyncIterator[stripe.StripeClient]:
        """A Stripe SDK client of this server (the customer's or an operator's side)."""
        http = stripe.HTTPXClient(timeout=timeout_s)
        try:
            yield stripe.StripeClient(
                api_key,
                base_addresses={"api": self.url},
                max_network_retries=0,
                http_client=http,
            )
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]


def _auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


# --- the customer's side -----------------------------------------------------------------


async def pay_payment_intent(
    client: stripe.StripeClient, pi_id: str, payment_method: str = "pm_card_visa"
) -> stripe.PaymentIntent:
    """Pay a PaymentIntent as the customer would, with a test card; returns it afterwards.

    The method is attached with an update, then the PaymentIntent is confirmed without
    parameters: localstripe answers ``confirm(payment_method=...)`` with a 500.

    Raises:
        stripe.CardError: the card was declined (e.g. ``pm_card_chargeCustomerFail``).
    """
    await client.v1.payment_intents.update_async(pi_id, {"payment_method": payment_method})
    return await client.v1.payment_intents.confirm_async(pi_id)


@dataclass
class StripeMoney:
    """What Stripe's own records say about one pay order's money."""

    captured: int = 0
    """Received by its succeeded PaymentIntents."""
    refunded: int = 0
    """Refunded by succeeded refunds."""
    payment_intents: list[str] = field(default_factory=list)
    refunds: int = 0
    """Refunds that did not fail (succeeded or pending)."""
    over_refunded: list[str] = field(default_factory=list)
    """PaymentIntents whose refunds (not failed) exceed what they received: must be empty."""


async def money_by_pay_order(client: stripe.StripeClient) -> dict[str, StripeMoney]:
    """Captured and refunded money per ``metadata.pay_order_no``, from Stripe's records.

    Reads every PaymentIntent and every refund (for a final check, not a hot path).
    """
    intents = [pi async for pi in _every(client.v1.payment_intents.list_async)]
    refunds = [r async for r in _every(client.v1.refunds.list_async)]
    by_charge: dict[str, list[stripe.Refund]] = {}
    by_intent: dict[str, list[stripe.Refund]] = {}
    for r in refunds:
        # localstripe records the PaymentIntent only on refunds created with it.
        if r.payment_intent is not None:
            by_intent.setdefault(_id(r.payment_intent), []).append(r)
        elif r.charge is not None:
            by_charge.setdefault(_id(r.charge), []).append(r)
    money: dict[str, StripeMoney] = {}
    for pi in intents:
        pay_order_no = _pay_order_of(pi)
        if not pay_order_no:
            continue
        m = money.setdefault(pay_order_no, StripeMoney())
        m.payment_intents.append(pi.id)
        received = _received(pi)
        m.captured += received
        mine = by_intent.get(pi.id, [])
        if pi.latest_charge is not None:
            mine = mine + by_charge.get(_id(pi.latest_charge), [])
        live = [r for r in mine if r.status not in ("failed", "canceled")]
        m.refunded += sum(r.amount for r in live if r.status == "succeeded")
        m.refunds += len(live)
        if sum(r.amount for r in live) > received:
            m.over_refunded.append(pi.id)
    return money


def _pay_order_of(pi: stripe.PaymentIntent) -> str | None:
    try:  # SDK objects are no dicts: no .get
        return str(pi.metadata[PAY_ORDER]) or None
    except KeyError:
        return None


def _id(ref: Any) -> str:
    return ref if isinstance(ref, str) else str(ref.id)


def _received(pi: stripe.PaymentIntent) -> int:
    if pi.status != "succeeded":
        return 0
    if "amount_received" in pi:
        return int(pi.amount_received)
    # localstripe has no amount_received; its latest charge is embedded and took it all.
    charge = pi.latest_charge
    return int(charge.amount) if isinstance(charge, stripe.Charge) else pi.amount


async def _every(list_call: Any) -> AsyncIterator[Any]:
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after:
            params["starting_after"] = after
        page = await list_call(params)
        for item in page.data:
            yield item
        if not page.has_more or not page.data:
            return
        after = page.data[-1].id

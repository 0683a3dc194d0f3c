"""The order-events relay: every outbox row POSTed to the order service, at least once, in
order per pay order, signed, retried until a 2xx.

How it holds its promises:

- **Woken by the commit.** A trigger (migration 0006) NOTIFYs ``payorders_order_events``
  with the pay order's number when an event is written; PostgreSQL delivers it at commit.
  The relay LISTENs on a connection of its own and starts that pay order's delivery at
  once. A scan of the queue runs after each delivery, at the next due retry, after the
  listener reconnects, and every ``POLL_S`` as a safety net only.
- **In order per pay order.** Only a pay order's *head* is ever sent: its undelivered event
  with no undelivered event of a lower sequence. Sequences are handed out in commit order
  (migration 0006), so a snapshot that shows event n+1 shows n too; n+1 becomes the head
  only once n's ``delivered_at`` is committed, which happens only after n's 2xx.
- **A claim is a row lock held while sending.** A delivery opens a short transaction,
  claims the head with ``SELECT ... FOR UPDATE SKIP LOCKED``, POSTs it, records the outcome
  (``delivered_at``, or ``attempts``, ``last_error`` and ``next_attempt_at``) and commits.
  Another relay's claim skips a locked head, and the next event is not a head while the
  locked one is undelivered, so several relays (one per worker replica) never send one
  pay order's events in parallel. Chosen over a lease column because the lock needs no
  clock, no expiry to tune and no clean-up: it goes when the claimer's session goes.
- **A relay that dies holding a claim.** Its session ends (the kernel closes the socket of
  a killed process; PostgreSQL notices at once), the transaction rolls back, the lock is
  gone and the event is still undelivered: the next scan of any relay sends it again, with
  the same id and bytes (the consumer dedupes by id). A relay that hangs instead (SIGSTOP,
  a paused VM) loses its session to ``idle_in_transaction_session_timeout``
  (``CLAIM_TIMEOUT_S``, longer than the HTTP timeout); if it wakes up later its request may
  still reach the consumer after newer events: a late duplicate of an event already
  acknowledged, which the consumer recognises by id.
- **Capped exponential backoff, for days.** A failed event waits ``retry_initial_ms``,
  doubling (with jitter) to ``retry_max_ms``; attempts are not limited. After
  ``DOWN_AFTER`` failures in a row the endpoint looks down: the relay then sends one event
  at a time, at growing intervals, instead of retrying the whole backlog; its first 2xx
  brings every waiting event forward and the backlog drains at full concurrency.
- **PostgreSQL restarts** break the pool's connections and the listener: deliveries in
  flight are not recorded (so sent again later), the dispatcher retries with backoff, and
  the listener reconnects, LISTENs again and scans for what it missed.

Metrics (on the Temporal SDK's meter: the worker's Prometheus endpoint, next to
``payorders_refunds_*``): ``payorders_order_event_deliveries{outcome}`` (``acknowledged``,
``http_4xx``, ``http_5xx``, ``unreachable``, ``timeout``), ``payorders_order_events_backlog``
and ``payorders_order_event_oldest_undelivered_seconds``.

Run by the worker when ``PAYORDERS_ORDER_EVENTS_URL`` is set, or alone:
``python -m payorders.service.relay [--metrics-address IP:PORT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import asyncpg
from temporalio.common import MetricMeter

from payorders import logs
from payorders.core import secrets
from payorders.core.settings import Settings
from payorders.core.store import Conn, PooledConnection
from payorders.gateways.http_sandbox import aiohttp_session
from payorders.service.events import feed
from payorders.service.webhook import sign_header

log = logging.getLogger("payorders.relay")

CHANNEL = "payorders_order_events"
SIGNATURE_HEADER = "Payorders-Event-Signature"
SEND_TIMEOUT_S = 10.0
"""How long one POST may take; a longer one counts as a failed attempt."""
CLAIM_TIMEOUT_S = 30.0
"""A claiming session idle in its transaction this long is ended by PostgreSQL (its claim
released): longer than ``SEND_TIMEOUT_S``, so a live relay never loses its claim mid-send."""
POLL_S = 5.0
"""The safety net's scan interval; NOTIFY is what wakes the relay."""
SKIP_S = 2.0
"""A pay order another relay holds is left to it this long before this relay looks again."""
DOWN_AFTER = 3
"""Failures in a row after which the endpoint looks down (one probe at a time)."""
DB_RETRY_MAX_S = 5.0
GAUGE_REFRESH_S = 5.0

DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # What a pooled connection can raise when PostgreSQL dies under it mid-operation
    # ("cannot switch to state 15; another operation is in progress").
    asyncpg.InternalClientError,
)

_HEAD = """
   AND NOT EXISTS (SELECT 1 FROM outbox e
                    WHERE e.pay_order_no = o.pay_order_no AND e.delivered_at IS NULL
                      AND e.sequence < o.sequence)"""
# ``more``: whether another event of the pay order waits behind this one (in this
# statement's snapshot), so that a lane whose last event was acknowledged ends without one
# more claim that would find nothing.
SQL_CLAIM_HEAD = f"""
SELECT {feed.EVENT_COLUMNS}, o.attempts,
       EXISTS (SELECT 1 FROM outbox n
                WHERE n.pay_order_no = o.pay_order_no AND n.delivered_at IS NULL
                  AND n.sequence > o.sequence) AS more
  FROM outbox o JOIN pay_order p USING (pay_order_no)
 WHERE o.pay_order_no = $1 AND o.delivered_at IS NULL AND o.next_attempt_at <= now(){_HEAD}
 ORDER BY o.sequence
 LIMIT 1
 FOR UPDATE OF o SKIP LOCKED"""
# Heads by due time, except the pay orders this relay has in hand or leaves to another.
SQL_SCAN = f"""
SELECT o.pay_order_no, o.next_attempt_at <= now() AS due,
       greatest(extract(epoch FROM o.next_attempt_at - now()), 0)::float8 AS wait_s
  FROM outbox o
 WHERE o.delivered_at IS NULL AND NOT (o.pay_order_no = ANY($1::text[])){_HEAD}
 ORDER BY o.next_attempt_at
 LIMIT $2"""
# Sent with the COMMIT in one round trip (the simple protocol takes no parameters: both
# values are integers this relay read from the row, formatted with %d).
SQL_DELIVERED_AND_COMMIT = """
UPDATE outbox SET attempts = %d, last_attempt_at = clock_timestamp(),
       delivered_at = clock_timestamp()
 WHERE id = %d;
COMMIT"""
SQL_RETRY_LATER = """
UPDATE outbox SET attempts = $2, last_attempt_at = clock_timestamp(), last_error = $3,
       next_attempt_at = clock_timestamp() + make_interval(secs => $4)
 WHERE id = $1"""
# The endpoint answered again after an outage: what waits for its backoff goes now.
SQL_BRING_FORWARD = """
UPDATE outbox SET next_attempt_at = now() WHERE delivered_at IS NULL AND next_attempt_at > now()"""
SQL_BACKLOG = """
SELECT count(*) AS backlog,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_s
  FROM outbox WHERE delivered_at IS NULL"""


class Outcome(StrEnum):
    ACKNOWLEDGED = "acknowledged"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    HTTP_OTHER = "http_other"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"


class _Claim(StrEnum):
    NONE = "none"  # nothing to claim: delivered, not due, or held by another relay
    SENT = "sent"  # acknowledged, and another event of the pay order waits behind it
    SENT_LAST = "sent_last"  # acknowledged, and none waited behind it
    FAILED = "failed"


@dataclass(frozen=True)
class RelayConfig:
    url: str
    secret: str
    retry_initial_s: float
    retry_max_s: float
    concurrency: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RelayConfig:
        if settings.order_events_url is None:
            raise ValueError("PAYORDERS_ORDER_EVENTS_URL is not set: no relay to run")
        secret = secrets.check(
            "PAYORDERS_ORDER_EVENTS_SECRET",
            None
            if settings.order_events_secret is None
            else settings.order_events_secret.get_secret_value(),
        )
        return cls(
            url=settings.order_events_url,
            secret=secret,
            retry_initial_s=settings.order_events_retry_initial_ms / 1000,
            retry_max_s=settings.order_events_retry_max_ms / 1000,
            concurrency=settings.order_events_concurrency,
        )

    def backoff_s(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failure: doubling from the initial interval,
        capped, with a quarter of jitter so a backlog does not retry in lockstep."""
        base = min(self.retry_max_s, self.retry_initial_s * 2.0 ** min(attempts - 1, 40))
        return base * (0.75 + random.random() / 4)


class RelayMetrics:
    """The relay's series on an SDK meter (noop without one)."""

    def __init__(self, meter: MetricMeter | None) -> None:
        meter = meter or MetricMeter.noop
        self._deliveries = meter.create_counter(
            "payorders_order_event_deliveries",
            "order event delivery attempts, by outcome (acknowledged: a 2xx)",
        )
        self._backlog = meter.create_gauge(
            "payorders_order_events_backlog", "order events not yet acknowledged"
        )
        self._oldest = meter.create_gauge_float(
            "payorders_order_event_oldest_undelivered_seconds",
            "age in seconds of the oldest order event not yet acknowledged; 0 when none",
        )

    def delivery(self, outcome: Outcome) -> None:
        self._deliveries.add(1, {"outcome": outcome.value})

    def backlog(self, backlog: int, oldest_s: float) -> None:
        self._backlog.set(backlog)
        self._oldest.set(oldest_s)


class Relay:
    """One relay process's dispatcher, listener and deliveries (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        config: RelayConfig,
        *,
        metrics: RelayMetrics | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self._dsn = dsn
        self._config = config
        self._metrics = metrics or RelayMetrics(None)
        self._poll_s = poll_s
        self._pool: asyncpg.Pool | None = None
        self._http: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._hints: set[str] = set()
        self._skipped: dict[str, float] = {}
        self._scan_needed = True
        self._next_due: float | None = None
        self._failures_in_a_row = 0
        self._down = False
        self._probes = 0
        self._probe_at = 0.0
        self.outcomes: Counter[str] = Counter()
        """Delivery attempts by outcome since start (for logs and tests)."""
        self.listener_connects = 0
        """How often the listener (re)connected and LISTENed."""
        self.backlog = 0
        self.oldest_undelivered_s = 0.0

    # --- running -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then finish the deliveries in hand."""
        self._pool = await self._open_pool(stop)
        if self._pool is None:
            return
        self._http = aiohttp_session(
            SEND_TIMEOUT_S,
            limit=self._config.concurrency,
            headers={"User-Agent": "payorders-relay"},
        )
        background = [
            asyncio.create_task(self._listen_forever(), name="relay-listener"),
            asyncio.create_task(self._dispatch_forever(), name="relay-dispatcher"),
            asyncio.create_task(self._gauges_forever(), name="relay-gauges"),
        ]
        log.info(
            "relay: delivering order events to %s (%d pay orders at a time)",
            self._config.url,
            self._config.concurrency,
        )
        try:
            await stop.wait()
        finally:
            self._stopping = True
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            lanes = list(self._lanes.values())
            if lanes:
                _, pending = await asyncio.wait(lanes, timeout=SEND_TIMEOUT_S + 5)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*lanes, return_exceptions=True)
            await self._http.close()
            await self._pool.close()
            log.info("relay stopped: %s", dict(self.outcomes) or "nothing sent")

    async def _open_pool(self, stop: asyncio.Event) -> asyncpg.Pool | None:
        delay = 0.5
        while not stop.is_set():
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._config.concurrency + 3,
                    connection_class=PooledConnection,
                    server_settings={
                        "application_name": _session_name(self._dsn, "payorders-relay"),
                        "idle_in_transaction_session_timeout": str(int(CLAIM_TIMEOUT_S * 1000)),
                    },
                )
                assert pool is not None
                return pool
            except DB_ERRORS as e:
                log.warning("relay: waiting for PostgreSQL (%s)", _one_line(e))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, DB_RETRY_MAX_S)
        return None

    def _poke(self, *, scan: bool = False) -> None:
        if scan:
            self._scan_needed = True
        self._wake.set()

    # --- the listener ------------------------------------------------------------------

    def _on_notify(self, _conn: object, _pid: int, _channel: str, pay_order_no: object) -> None:
        self._hints.add(str(pay_order_no))
        self._poke()

    async def _listen_forever(self) -> None:
        delay = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=10,
                    server_settings={
                        "application_name": _session_name(self._dsn, "payorders-relay-listener")
                    },
                )
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_event, lost))
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listener_connects += 1
                if self.listener_connects > 1:
                    log.warning("relay: listening again after a lost connection")
                delay = 0.5
                self._poke(scan=True)  # what committed while nobody listened
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self._poll_s)
                    if not lost.is_set():
                        # A connection that died without a word is found here.
                        await conn.fetchval("SELECT 1", timeout=5)
                log.warning("relay: the listener's connection was lost; reconnecting")
            except DB_ERRORS as e:
                log.warning(
                    "relay: listener unavailable, retrying in %.1f s (%s)", delay, _one_line(e)
                )
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, DB_RETRY_MAX_S)

    # --- the dispatcher ----------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                timeout = await self._dispatch_once()
                delay = 0.5
            except DB_ERRORS as e:
                log.warning(
                    "relay: database unavailable, retrying in %.1f s (%s)", delay, _one_line(e)
                )
                self._scan_needed = True
                timeout = delay
                delay = min(delay * 2, DB_RETRY_MAX_S)
            except Exception:
                # Anything else is a bug to log, never the end of delivery: a dispatcher
                # that died here would leave every event undelivered without a word.
                log.exception("relay: dispatching failed; retrying in %.1f s", delay)
                self._scan_needed = True
                timeout = delay
                delay = min(delay * 2, DB_RETRY_MAX_S)
            woke = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
                woke = True
            if not woke:
                self._scan_needed = True
                self._next_due = None

    async def _dispatch_once(self) -> float:
        """Start what can start now; returns how long to wait for the next wake at most."""
        self._wake.clear()
        now = time.monotonic()
        self._skipped = {p: t for p, t in self._skipped.items() if t > now}
        if self._down:
            # The endpoint looks down: one delivery at a time, at growing intervals. What
            # the hints named is found by the scan once the probe is due.
            if self._hints:
                self._hints.clear()
                self._scan_needed = True
            if self._lanes:
                return self._poll_s
            if now < self._probe_at:
                return self._probe_at - now
            free = 1
        else:
            free = self._config.concurrency - len(self._lanes)
        hints, self._hints = self._hints, set()
        for p in hints:
            if free > 0 and p not in self._lanes and p not in self._skipped:
                self._start_lane(p)
                free -= 1
        if free > 0 and self._scan_needed:
            self._scan_needed = False
            assert self._pool is not None
            exclude = [*self._lanes, *self._skipped]
            rows = await self._pool.fetch(SQL_SCAN, exclude, free + 1)
            due = [r["pay_order_no"] for r in rows if r["due"]]
            for p in due[:free]:
                self._start_lane(p)
            later = [r["wait_s"] for r in rows if not r["due"]]
            self._next_due = now + later[0] if later else None
        wait = self._poll_s
        if self._next_due is not None:
            wait = min(wait, max(self._next_due - time.monotonic(), 0.0))
        return wait

    def _start_lane(self, pay_order_no: str) -> None:
        if self._down:
            self._probes += 1
        self._lanes[pay_order_no] = asyncio.create_task(
            self._lane(pay_order_no), name=f"relay-{pay_order_no}"
        )

    async def _lane(self, pay_order_no: str) -> None:
        """Deliver one pay order's events, head after head, until none is due."""
        sent = 0
        claim = _Claim.NONE
        try:
            while not self._stopping:
                claim = await self._deliver_head(pay_order_no)
                if claim in (_Claim.SENT, _Claim.SENT_LAST):
                    sent += 1
                if claim is not _Claim.SENT:
                    break
        except DB_ERRORS as e:
            log.warning(
                "relay: delivery for %s interrupted by the database (%s): it will be sent again",
                pay_order_no,
                _one_line(e),
            )
            self._skipped[pay_order_no] = time.monotonic() + SKIP_S
        except Exception:
            log.exception("relay: delivery for %s failed", pay_order_no)
            self._skipped[pay_order_no] = time.monotonic() + SKIP_S
        finally:
            self._lanes.pop(pay_order_no, None)
            if claim is _Claim.NONE and sent == 0:
                self._skipped.setdefault(pay_order_no, time.monotonic() + SKIP_S)
            self._poke(scan=True)

    async def _deliver_head(self, pay_order_no: str) -> _Claim:
        assert self._pool is not None
        async with self._pool.acquire() as conn, _claiming(conn):
            row = await conn.fetchrow(SQL_CLAIM_HEAD, pay_order_no)
            if row is None:
                await conn.execute("ROLLBACK")
                return _Claim.NONE
            attempts = row["attempts"] + 1
            outcome, error = await self._post(feed.body(feed.render(row)))
            if outcome is Outcome.ACKNOWLEDGED:
                await conn.execute(SQL_DELIVERED_AND_COMMIT % (attempts, row["id"]))
            else:
                wait_s = self._config.backoff_s(attempts)
                await conn.execute(SQL_RETRY_LATER, row["id"], attempts, error, wait_s)
                await conn.execute("COMMIT")
                log.info(
                    "relay: %s (%s #%d of %s) not acknowledged (%s); attempt %d, next in %.1f s",
                    feed.event_id(row["id"]),
                    row["event_type"],
                    row["sequence"],
                    pay_order_no,
                    error,
                    attempts,
                    wait_s,
                )
        self.outcomes[outcome.value] += 1
        self._metrics.delivery(outcome)
        if outcome is Outcome.ACKNOWLEDGED:
            await self._endpoint_answered()
            return _Claim.SENT if row["more"] else _Claim.SENT_LAST
        self._endpoint_failed()
        return _Claim.FAILED

    async def _post(self, body: bytes) -> tuple[Outcome, str | None]:
        assert self._http is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_header([self._config.secret], int(time.time()), body),
        }
        try:
            async with self._http.post(self._config.url, data=body, headers=headers) as response:
                status = response.status
                answer = await response.read()
        except TimeoutError as e:
            return Outcome.TIMEOUT, f"no answer within {SEND_TIMEOUT_S:.0f} s ({type(e).__name__})"
        except aiohttp.ClientError as e:
            return Outcome.UNREACHABLE, _one_line(e)
        if 200 <= status < 300:
            return Outcome.ACKNOWLEDGED, None
        outcome = {4: Outcome.HTTP_4XX, 5: Outcome.HTTP_5XX}.get(status // 100, Outcome.HTTP_OTHER)
        text = " ".join(answer.decode("utf-8", "replace").split())[:200]
        return outcome, f"HTTP {status}" + (f": {text}" if text else "")

    # --- the endpoint's health ---------------------------------------------------------

    def _endpoint_failed(self) -> None:
        self._failures_in_a_row += 1
        if self._failures_in_a_row < DOWN_AFTER:
            return
        if not self._down:
            log.warning(
                "relay: %s looks down (%d failures in a row): one delivery at a time until it"
                " answers",
                self._config.url,
                self._failures_in_a_row,
            )
            self._down = True
            self._probes = 0
        # Failures of deliveries already in flight when it went down count as one probe.
        self._probe_at = time.monotonic() + self._config.backoff_s(max(self._probes, 1))

    async def _endpoint_answered(self) -> None:
        was_down = self._down
        self._failures_in_a_row = 0
        self._down = False
        if was_down:
            assert self._pool is not None
            done = await self._pool.execute(SQL_BRING_FORWARD)
            log.warning(
                "relay: %s answers again; %s waiting events brought forward",
                self._config.url,
                done.split()[-1],
            )
            self._poke(scan=True)

    # --- gauges ------------------------------------------------------------------------

    async def _gauges_forever(self) -> None:
        while True:
            try:
                assert self._pool is not None
                rec = await self._pool.fetchrow(SQL_BACKLOG, timeout=GAUGE_REFRESH_S)
                assert rec is not None
                self.backlog, self.oldest_undelivered_s = rec["backlog"], rec["oldest_s"]
                self._metrics.backlog(self.backlog, self.oldest_undelivered_s)
            except DB_ERRORS as e:
                log.info("relay: backlog gauges not refreshed (%s)", _one_line(e))
            await asyncio.sleep(GAUGE_REFRESH_S)


@contextlib.asynccontextmanager
async def _claiming(conn: Conn) -> AsyncIterator[None]:
    """A claim's transaction, BEGUN and COMMITted by hand so that the COMMIT rides with the
    UPDATE that records the outcome: three round trips per event (BEGIN, the claim, UPDATE
    + COMMIT) instead of four. The body commits or rolls back itself; an error or a
    cancellation rolls back here (and, if even that fails, when the pool takes the
    connection back), and the claim's row lock goes with it."""
    await conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        if not conn.is_closed() and conn.is_in_transaction():
            with contextlib.suppress(*DB_ERRORS):
                await conn.execute("ROLLBACK")
        raise


def _session_name(dsn: str, role: str) -> str:
    """The relay's sessions' ``application_name``: ``role``, after the name the DSN gives
    its process, if any (the local stack names each worker's: which replica's relay holds
    a claim then shows in ``pg_stat_activity``)."""
    given = dict(parse_qsl(urlsplit(dsn).query)).get("application_name")
    return f"{given}: {role}" if given else role


def _set_event(event: asyncio.Event, _conn: object) -> None:
    event.set()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_relay(
    settings: Settings, database_url: str, stop: asyncio.Event, *, meter: MetricMeter | None
) -> None:
    """Run the relay of ``settings`` until ``stop`` is set (the worker's entry)."""
    relay = Relay(database_url, RelayConfig.from_settings(settings), metrics=RelayMetrics(meter))
    await relay.run(stop)


async def _main(args: argparse.Namespace) -> None:
    from payorders.runtime import database_url

    settings = Settings()
    meter: MetricMeter | None = None
    if args.metrics_address:
        from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

        runtime = Runtime(
            telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=args.metrics_address))
        )
        meter = runtime.metric_meter
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_relay(settings, database_url(settings), stop, meter=meter)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m payorders.service.relay",
        description="Deliver order events to PAYORDERS_ORDER_EVENTS_URL (the worker runs one"
        " by itself when that is set).",
    )
    p.add_argument(
        "--metrics-address", default=None, help="IP:port to serve Prometheus /metrics at"
    )
    args = p.parse_args()
    logs.configure(logging.INFO)
    try:
        asyncio.run(_main(args))
    except ValueError as e:
        raise SystemExit(f"relay: {e}") from None


if __name__ == "__main__":
    main()

"""payorders: one entry point for the local stack, checkout, the gateway and operators.

Every command has ``--help``; commands that print data take ``--json``. Bad arguments get
a one-line error and exit 2, and change nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

from temporalio.service import RPCError

from payorders import logs
from payorders.core import domain, secrets
from payorders.core.models import ReconcileReport
from payorders.core.settings import Settings
from payorders.localstack import stackinfo
from payorders.pay_orders import connect
from payorders.runtime import with_stack_defaults
from payorders.tools.http_clients import (
    GatewayClient,
    ServiceClient,
    ServiceError,
    Unreachable,
    gateway_client,
)
from payorders.tools.table import pairs, render

if TYPE_CHECKING:
    from payorders.localstack.stack import GatewayKind

START_HINT = "start the local stack first: scripts/dev (or payorders dev)"


class CliError(Exception):
    """A one-line answer for the user; exit code 1 (2 for usage errors)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(_attach_dash_values(args, self), namespace)


def _attach_dash_values(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--expires-in -5m`` as ``--expires-in=-5m``.

    argparse takes a value that starts with '-' for an option (unless it looks like a
    negative number) and answers "expected one argument". A bad value deserves its own
    message instead, naming the rule: so a token after an option that takes a value is
    that value, unless it is itself one of the command's options (or starts with '--',
    which could be an abbreviated one).
    """
    options = parser._option_string_actions
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        action = options.get(token)
        nxt = args[i + 1] if i + 1 < len(args) else None
        if (
            action is not None
            and action.nargs is None  # exactly one value
            and nxt is not None
            and nxt.startswith("-")
            and not nxt.startswith("--")
            and nxt not in options
        ):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


# --- argument types --------------------------------------------------------------------


# Durations beyond this are out of any range we accept; clamped before timedelta overflows.
_DURATION_LIMIT_S = 10**9


def _duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``2d`` (or plain seconds); a sign is kept for the rules
    to refuse by name."""
    m = re.fullmatch(r"([-+]?)(\d+)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 90s, 15m, 1h or 2d)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(3)]
    seconds = min(int(m.group(2)) * unit, _DURATION_LIMIT_S)
    return timedelta(seconds=-seconds if m.group(1) == "-" else seconds)


def _window(text: str) -> timedelta:
    try:
        return domain.check_expires_in(_duration(text), "the payment window")
    except domain.InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _deadline(text: str) -> datetime:
    try:
        return domain.check_expires_at(_timestamp(text), now=datetime.now(UTC), what="the deadline")
    except domain.InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _amount(text: str) -> int:
    # A sign is accepted here so that the domain can say what is wrong with -3.
    if not re.fullmatch(r"[-+]?[0-9]+", text.strip()):
        raise argparse.ArgumentTypeError(
            f"not an amount: {text!r} (a whole number of minor units, e.g. 1999 for 19.99)"
        )
    try:
        return domain.check_amount(int(text))
    except domain.InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", text.strip()):
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (a whole number, 0 to 999999)")
    return int(text)


def _processes(what: str) -> Any:
    """An argparse type: how many processes of a kind a stack runs (1 to 16)."""

    def parse(text: str) -> int:
        try:
            return stackinfo.check_processes(what, int(text.strip()))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what}: {text!r} is not a whole number from 1 to {stackinfo.MAX_PROCESSES}"
            ) from None

    return parse


def _events_url(text: str) -> str:
    from payorders.localstack.stack import check_events_url

    try:
        return check_events_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--order-events-url ")) from None


def _secret(text: str) -> str:
    why = secrets.why_weak(text)
    if why is not None:
        raise argparse.ArgumentTypeError(f"the secret {why}")
    return text


def _currency(text: str) -> str:
    try:
        return domain.check_currency(text)
    except domain.InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _identifier(what: str) -> Any:
    def check(text: str) -> str:
        try:
            return domain.check_identifier(text, what)
        except domain.InvalidInput as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    check.__name__ = what
    return check


def _refund_no(text: str) -> str:
    try:
        return domain.check_refund_no(text)
    except domain.InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pay_order_no(text: str) -> str:
    if not text.startswith("po_"):
        raise argparse.ArgumentTypeError(f"not a pay order number: {text!r} (they look like po_…)")
    _identifier("pay order number")(text.removeprefix("po_"))
    return text


def _timestamp(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-11-27T11:00:00Z)"
        ) from None
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError("the time needs a zone, e.g. 2026-11-27T11:00:00Z")
    return ts


# --- connections -------------------------------------------------------------------------


GATEWAYS = ("sandbox", "stripe", "alipay", "wechatpay")


@dataclass
class Ctx:
    settings: Settings
    service: ServiceClient
    gateway: GatewayClient


def stack_settings(settings: Settings, *, gateway: str | None = None) -> Settings:
    """The settings of a client of the running stack: its addresses, and the gateway it
    runs (with Stripe: its Stripe API base and dev key), where the environment set none.

    Args:
        gateway: the gateway asked for (``--gateway``), over the environment's.

    Raises:
        CliError: the gateway asked for is not the one the running stack runs.
    """
    chosen = gateway or (settings.gateway if "gateway" in settings.model_fields_set else None)
    info = stackinfo.read(settings.data_dir)
    same_stack = info is not None and (
        "api_url" not in settings.model_fields_set or settings.api_url == info.api_url
    )
    if info is not None and same_stack and chosen is not None and chosen != info.gateway:
        raise CliError(
            f"the stack running in {settings.data_dir} runs the {info.gateway} gateway,"
            f" not {chosen}: start it with `payorders dev --gateway {chosen}`"
        )
    # The stack's addresses, gateway, wire proxy and dev-only key, where this shell set none.
    settings = with_stack_defaults(settings)
    updates: dict[str, Any] = {}
    if chosen is not None and settings.gateway != chosen:
        updates["gateway"] = chosen
    return Settings(**{**settings.model_dump(), **updates}) if updates else settings


@asynccontextmanager
async def connected(settings: Settings, *, gateway: str | None = None) -> AsyncIterator[Ctx]:
    """Clients of the service API and the gateway of the running stack (``gateway``: the
    one asked for, which must be the stack's)."""
    if stackinfo.read(settings.data_dir) is None and "api_url" not in settings.model_fields_set:
        raise CliError(f"no local stack is running in {settings.data_dir}; {START_HINT}")
    settings = stack_settings(settings, gateway=gateway)
    service = ServiceClient(settings)
    try:
        gateway_ = gateway_client(settings, service)
    except Unreachable as e:
        await service.aclose()
        raise CliError(f"{e}; {START_HINT}") from None
    try:
        yield Ctx(settings=settings, service=service, gateway=gateway_)
    except Unreachable as e:
        raise CliError(f"{e}; {START_HINT}") from None
    except ServiceError as e:
        if e.status == 422:
            raise domain.InvalidInput(e.message) from None
        if e.status == 401:
            hint = (
                "PAYORDERS_API_TOKEN is not set"
                if settings.api_token is None
                else "the service does not know PAYORDERS_API_TOKEN"
            )
            raise CliError(f"{e.message} ({hint}; the local stack prints its own)") from None
        raise CliError(e.message) from None
    finally:
        await service.aclose()
        await gateway_.aclose()


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# --- commands ----------------------------------------------------------------------------


async def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        doc = await c.service.create(
            order_no=args.order_no,
            amount=args.amount,
            currency=args.currency,
            expires_in_s=None if args.expires_in is None else int(args.expires_in.total_seconds()),
            expires_at=args.expires_at,
        )
        doc["ui"] = _ui(c, doc["pay_order_no"])
        _emit(args, doc, pairs(list(doc.items())))
    return 0


async def cmd_pay(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        order = await c.service.get(args.pay_order_no)
        capture = await c.gateway.pay(
            pay_order_no=order["pay_order_no"],
            amount=args.amount if args.amount is not None else order["amount"],
            currency=args.currency or order["currency"],
            txn_id=args.txn_id,
        )
        capture["notification"] = "the gateway sends its webhook to the service"
        _emit(args, capture, pairs(list(capture.items())))
    return 0


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        doc = await c.service.cancel(args.pay_order_no)
        doc["ui"] = _ui(c, args.pay_order_no)
        _emit(args, doc, pairs([("outcome", cancel_text(doc)), *doc.items()]))
    return 0


def cancel_text(doc: dict[str, Any]) -> str:
    """A cancel's answer as a person reads it."""
    if doc["status"] == "PAY_SUCCESS":
        return (
            "the gateway says it was paid already: the order succeeded"
            if doc["closed"]
            else "it had succeeded already: nothing changed"
        )
    if doc["closed"]:
        return "cancelled: the trade is closed at the gateway"
    if doc["status"] == "PAY_EXPIRED":
        return f"closed already ({doc['reason']}): nothing changed"
    return f"still {doc['status']}: its workflow is not running (reconciliation re-drives it)"


async def cmd_notify(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        doc = await c.service.send_webhook(
            pay_order_no=args.pay_order_no,
            txn_id=args.txn_id,
            amount=args.amount,
            currency=args.currency,
            paid_at=args.paid_at or datetime.now(UTC),
        )
        shown = notify_output(doc)
        _emit(args, shown, pairs([(NOTIFY_LABELS.get(k, k), v) for k, v in shown.items()]))
    return 0


NOTIFY_LABELS = {
    "event_duplicate": "webhook event seen before",
    "txn_already_recorded": "txn already recorded on the order",
}


def notify_output(doc: dict[str, Any]) -> dict[str, Any]:
    """The webhook's answer without ``duplicate``, the old name of ``event_duplicate``: a
    bare "duplicate" reads as if it were about the transaction."""
    return {k: v for k, v in doc.items() if k != "duplicate"}


def trade_text(ledger: dict[str, Any]) -> str:
    """The gateway's trade as a person reads it. The sandbox keeps no trade row until a
    capture pays it or a close closes it: until then the trade is open for payment."""
    state = ledger.get("trade_state")
    if state in (None, "OPEN"):
        return "open (not paid, not closed)"
    return str(state).lower()


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        order = await c.service.get(args.pay_order_no)
        ledger = await c.gateway.ledger(args.pay_order_no)
        data = {**order, "gateway": ledger, "ui": _ui(c, args.pay_order_no)}
        refunds = await _merchant_refunds_of(c, order)
        if refunds is not None:
            data["merchant_refunds"] = refunds
        fund = order["fund_identity"]
        wf = order.get("workflow") or {}
        text = [
            pairs(
                [
                    ("pay order", order["pay_order_no"]),
                    ("order", order["order_no"]),
                    (
                        "status",
                        order["status"] + (f" ({order['reason']})" if order.get("reason") else ""),
                    ),
                    ("amount", f"{order['amount']} {order['currency']}"),
                    ("expires at", order["expires_at"]),
                    ("paid / refunded", f"{order['paid_amount']} / {order['refunded_amount']}"),
                    (
                        "fund identity",
                        "holds"
                        if fund["holds"]
                        else f"not yet: {fund['in_flight']} in flight (paid - refunded ="
                        f" {fund['net']}, expected {fund['expected_net']})",
                    ),
                    (
                        "merchant refunds",
                        f"refunded {order['refunded_by_merchant']},"
                        f" {order['merchant_refund_in_flight']} in flight,"
                        f" refundable {order['refundable']}",
                    ),
                    ("lock version", order["lock_version"]),
                    ("workflow", order["workflow_status"] or "not found"),
                    (
                        "workflow's view",
                        f"{wf.get('status')}, {wf.get('refunds_in_flight')} refund(s) in flight,"
                        f" {wf.get('duplicate_notifications')} repeated notification(s) of a"
                        " known txn"
                        if wf
                        else "-",
                    ),
                    (
                        "gateway",
                        f"trade {trade_text(ledger)}, captured {ledger['captured']},"
                        f" refunded {ledger['refunded']} in {len(ledger['refunds'])} refund(s)",
                    ),
                    ("Temporal UI", data["ui"]),
                ]
            )
        ]
        if order["payments"]:
            text.append("")
            text.append(
                render(
                    ["txn", "amount", "settled", "refund reason", "refund", "attempts"],
                    [
                        [
                            p["txn_id"],
                            f"{p['amount']} {p['currency']}",
                            "yes" if p["settled"] else "no",
                            p["refund_reason"],
                            p["refund_status"],
                            p["refund_attempts"],
                        ]
                        for p in order["payments"]
                    ],
                )
            )
        if refunds:
            text.append("")
            text.append(
                render(
                    ["refund no", "amount", "status", "source", "reason", "gateway refund"],
                    [
                        [
                            r["refund_no"],
                            f"{r['amount']} {r['currency']}",
                            r["status"]
                            + (f" ({r['failure_reason']})" if r["failure_reason"] else ""),
                            r["source"],
                            r["reason"] or "-",
                            r["gateway_refund_id"] or "-",
                        ]
                        for r in refunds
                    ],
                )
            )
        _emit(args, data, "\n".join(text))
    return 0


async def _merchant_refunds_of(c: Ctx, order: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The pay order's merchant refunds; None when it cannot have any (never paid) or the
    token may not read them (a checkout-only token still sees the order itself)."""
    if order["status"] != domain.PayOrderStatus.PAY_SUCCESS.value:
        return None
    try:
        doc = await c.service.merchant_refunds(order["pay_order_no"])
    except ServiceError as e:
        if e.status == 403:
            return None
        raise
    refunds: list[dict[str, Any]] = doc["refunds"]
    return refunds


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    settings = with_stack_defaults(settings)
    try:
        client = await asyncio.wait_for(connect(settings), 10)
    except (RPCError, RuntimeError, TimeoutError, OSError) as e:
        raise CliError(
            f"cannot reach Temporal at {settings.temporal_address} ({e}); {START_HINT}"
        ) from None
    query = "WorkflowType = 'PayOrderWorkflow'"
    if args.status:
        query += f" AND PayOrderStatus = '{args.status}'"
    rows: list[dict[str, Any]] = []
    async for wf in client.list_workflows(query, limit=args.limit):
        attrs = wf.search_attributes
        rows.append(
            {
                "workflow_id": wf.id,
                "pay_order_status": (attrs.get("PayOrderStatus") or [None])[0],
                "order_no": (attrs.get("OrderNo") or [None])[0],
                "expires_at": (attrs.get("ExpiresAt") or [None])[0],
                "workflow_status": wf.status.name if wf.status else None,
            }
        )
    table = render(
        ["workflow", "status", "order", "expires at", "workflow status"],
        [list(r.values()) for r in rows],
    )
    _emit(args, rows, table + f"\n({len(rows)} shown; query: {query})")
    return 0


FAULT_FIELDS = {
    "fail_next_refunds": "fail_next_refunds",
    "timeout_after_success": "timeout_after_success_next",
    "delay_ms": "delay_ms",
    "webhook_delay_ms": "webhook_delay_ms",
    "webhook_duplicate": "webhook_duplicate_next",
    "webhook_drop": "webhook_drop_next",
    "webhook_reorder": "webhook_reorder_next",
}


async def cmd_fault(args: argparse.Namespace, settings: Settings) -> int:
    changes: dict[str, Any] = {
        field: getattr(args, arg)
        for arg, field in FAULT_FIELDS.items()
        if getattr(args, arg) is not None
    }
    if args.paid_on_close is not None:
        amount, currency = args.paid_on_close
        try:
            changes["paid_on_close_amount"] = _amount(amount)
            changes["paid_on_close_currency"] = _currency(currency)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"argument --paid-on-close: {e}") from None
    async with connected(settings) as c:
        if args.clear:
            await c.gateway.clear_faults(args.order)
        if changes:
            await c.gateway.set_faults(args.order or "*", **changes)
        faults = await c.gateway.faults()
        columns = ["scope", *FAULT_FIELDS.values(), "paid_on_close_amount"]
        _emit(
            args,
            faults,
            render(columns, [[f.get(k) for k in columns] for f in faults])
            if faults
            else "no faults set",
        )
    return 0


async def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from payorders.core import store
    from payorders.core.reconcile import ReconcileStore
    from payorders.runtime import StackNotRunning, database_url

    settings = with_stack_defaults(settings)
    try:
        pool = await store.create_pool(database_url(settings), min_size=1, max_size=2)
    except (StackNotRunning, OSError) as e:
        raise CliError(f"{e}; {START_HINT}") from None
    recon = ReconcileStore(pool)
    try:
        if args.history:
            runs = await recon.runs(args.limit)
            _emit(
                args,
                runs,
                render(
                    [
                        "run",
                        "started",
                        "checked",
                        "consistent",
                        "repaired",
                        "exceptions",
                        "in flight",
                    ],
                    [
                        [
                            r["run_id"],
                            f"{r['started_at']:%Y-%m-%d %H:%M:%S}",
                            r["checked"],
                            r["consistent"],
                            r["repaired"],
                            r["exceptions"],
                            r["money_in_flight"],
                        ]
                        for r in runs
                    ],
                )
                if runs
                else "no reconciliation has run yet",
            )
            return 0
        try:
            client = await asyncio.wait_for(connect(settings), 10)
        except (RPCError, RuntimeError, TimeoutError, OSError) as e:
            raise CliError(f"cannot reach Temporal ({e}); {START_HINT}") from None
        report = await client.execute_workflow(
            "ReconcileWorkflow",
            settings.reconcile_input(),
            id=f"payorders-reconcile-manual-{datetime.now(UTC):%Y%m%dT%H%M%S%f}",
            task_queue=settings.task_queue,
            result_type=ReconcileReport,
        )
        findings = await recon.findings(report.run_id)
        summary = [
            ("run", report.run_id),
            (
                "period",
                f"{report.period_start:%Y-%m-%d %H:%M} .. {report.period_end:%Y-%m-%d %H:%M}",
            ),
            ("checked", report.checked),
            ("consistent", report.consistent),
            ("repaired", report.repaired),
            ("exceptions (for a person)", report.exceptions),
            ("money in flight", f"{report.money_in_flight} in {report.in_flight_count} order(s)"),
        ]
        text = pairs(summary)
        if findings:
            text += "\n\n" + render(
                ["action", "kind", "pay order", "txn", "amount", "detail"],
                [
                    [
                        f["action"],
                        f["kind"],
                        f["pay_order_no"],
                        f["txn_id"],
                        f["amount"],
                        f["detail"],
                    ]
                    for f in findings
                ],
            )
        _emit(args, {"report": report.model_dump(mode="json"), "findings": findings}, text)
        return 0
    finally:
        await pool.close()


async def cmd_refund(args: argparse.Namespace, settings: Settings) -> int:
    """A merchant refund of a paid pay order, or (``--txn``) an operator's refund of money
    captured for a pay order we never had."""
    if args.txn is not None:
        if args.pay_order_no or args.amount is not None or args.refund_no or args.reason:
            raise argparse.ArgumentTypeError(
                "--txn refunds money without a pay order: give it alone, not with a pay"
                " order, --amount, --refund-no or --reason"
            )
        return await _operator_refund(args, settings)
    if not args.pay_order_no:
        raise argparse.ArgumentTypeError(
            "give PAY_ORDER_NO with --amount and --refund-no, or --txn TXN"
        )
    missing = [f for f, v in (("--amount", args.amount), ("--refund-no", args.refund_no)) if not v]
    if missing:
        raise argparse.ArgumentTypeError(
            f"a refund of {args.pay_order_no} needs {' and '.join(missing)}"
        )
    return await _merchant_refund(args, settings)


@dataclass(frozen=True)
class _RefundAsked:
    """How ``payorders refund`` reports one kind of refund: its statuses, how it reads, and
    where to look again."""

    pending: str
    succeeded: str
    failed: str
    text: Callable[[dict[str, Any]], str]
    refused: Callable[[dict[str, Any]], str]
    see_again: str


async def _refund(
    args: argparse.Namespace,
    settings: Settings,
    kind: _RefundAsked,
    ask: Callable[[Ctx], Awaitable[dict[str, Any]]],
    again: Callable[[Ctx], Awaitable[dict[str, Any]]],
) -> int:
    """Ask for a refund (idempotent), with ``--wait`` until it leaves ``pending``; exit 1
    when the gateway refused it, or it was not confirmed within ``--wait-s``."""
    async with connected(settings) as c:
        doc = await ask(c)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.wait_s
        while args.wait and doc["status"] == kind.pending and loop.time() < deadline:
            await asyncio.sleep(0.5)
            doc = {**await again(c), **({"created": doc["created"]} if "created" in doc else {})}
        _emit(args, doc, kind.text(doc))
    if doc["status"] == kind.failed:
        raise CliError(kind.refused(doc))
    if args.wait and doc["status"] != kind.succeeded:
        raise CliError(
            f"not confirmed within {args.wait_s} s; the refund goes on retrying"
            f" (see it again with: {kind.see_again})"
        )
    return 0


async def _merchant_refund(args: argparse.Namespace, settings: Settings) -> int:
    no, key = args.pay_order_no, args.refund_no
    status = domain.MerchantRefundStatus
    return await _refund(
        args,
        settings,
        _RefundAsked(
            pending=status.REFUNDING.value,
            succeeded=status.REFUND_SUCCESS.value,
            failed=status.REFUND_FAILED.value,
            text=merchant_refund_text,
            refused=lambda d: f"the gateway refused the refund {key}: {d['failure_reason']}",
            see_again=f"payorders status {no}",
        ),
        lambda c: c.service.merchant_refund(
            no, refund_no=key, amount=args.amount, reason=args.reason
        ),
        lambda c: c.service.get_merchant_refund(no, key),
    )


def merchant_refund_text(doc: dict[str, Any]) -> str:
    """A merchant refund as a person reads it."""
    asked = " (asked before: nothing more moved)" if doc.get("created") is False else ""
    rows: list[tuple[str, Any]] = [
        ("refund no", doc["refund_no"]),
        ("status", f"{doc['status']}{asked}"),
        ("amount", f"{doc['amount']} {doc['currency']}"),
        ("pay order", doc["pay_order_no"]),
    ]
    if doc.get("refundable_after") is not None:
        rows.append(("refundable after it", doc["refundable_after"]))
    rows += [
        ("reason", doc.get("reason") or "-"),
        ("gateway refund", doc.get("gateway_refund_id") or "-"),
    ]
    if doc.get("failure_reason"):
        rows.append(("refused because", doc["failure_reason"]))
    return pairs(rows)


async def _operator_refund(args: argparse.Namespace, settings: Settings) -> int:
    status = domain.RefundStatus
    return await _refund(
        args,
        settings,
        _RefundAsked(
            pending=status.PENDING.value,
            succeeded=status.SUCCEEDED.value,
            failed=status.REJECTED.value,
            text=_refund_text,
            refused=lambda d: (
                f"the gateway rejected the refund {d['refund_key']}: {d['last_error']}"
            ),
            see_again=f"payorders refund --txn {args.txn}",
        ),
        lambda c: c.service.operator_refund(args.txn),
        lambda c: c.service.get_operator_refund(args.txn),
    )


def _refund_text(doc: dict[str, Any]) -> str:
    asked = " (asked before: nothing more moved)" if doc.get("created") is False else ""
    return pairs(
        [
            ("refund key", doc["refund_key"]),
            ("status", f"{doc['status']}{asked}"),
            ("amount", f"{doc['amount']} {doc['currency']}"),
            ("txn", doc["txn_id"]),
            ("captured for", f"{doc['pay_order_no']} (a pay order we never had)"),
            ("attempts", doc["attempts"]),
            ("gateway refund", doc["gateway_refund_id"] or "-"),
            ("workflow", doc["workflow_id"]),
        ]
    )


async def cmd_torture(args: argparse.Namespace, settings: Settings) -> int:
    from payorders.tools.torture import ChaosPlan, run_chaos_torture, run_torture

    if args.chaos:
        # A private stack of its own: the gateway asked for, else the environment's.
        gateway = args.gateway or settings.gateway
        if gateway not in GATEWAYS:
            raise CliError(
                f"the local stack runs no {gateway} gateway (it runs {', '.join(GATEWAYS)})"
            )
        return await run_chaos_torture(
            ChaosPlan(
                worker_kills=args.worker_kills,
                api_kills=args.api_kills,
                relay_kills=args.relay_kills,
            ),
            gateway=cast("GatewayKind", gateway),
            workers=args.workers or 1,
            api_processes=args.api_processes or 1,
            orders=args.orders,
            expires_in_s=args.expires_in_s,
            seed=args.seed,
            settle_within_s=args.settle_within_s,
        )
    if args.workers is not None or args.api_processes is not None:
        raise CliError(
            "--workers and --api-processes size the private stack of --chaos; the running"
            " stack runs what it was started with (payorders dev --workers N --api-processes M)"
        )
    async with connected(settings, gateway=args.gateway) as c:
        return await run_torture(
            c.settings,
            orders=args.orders,
            expires_in_s=args.expires_in_s,
            seed=args.seed,
            settle_within_s=args.settle_within_s,
        )


def _ui(c: Ctx, pay_order_no: str) -> str:
    return c.settings.ui_link(domain.workflow_id_for(pay_order_no))


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from payorders.tools.demo import run_demo

    async with connected(settings, gateway=args.gateway) as c:
        return await run_demo(c.settings)


async def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from payorders.localstack.stack import DevOptions, DevStack, run_dev

    if args.data_dir is not None:
        settings = settings.model_copy(update={"data_dir": args.data_dir})
    options = DevOptions(
        temporal_port=args.temporal_port,
        ui_port=args.ui_port,
        api_port=args.api_port,
        gateway_port=args.gateway_port,
        worker_metrics_port=args.worker_metrics_port,
        stripe_port=args.stripe_port,
        orders_port=args.orders_port,
        order_events_url=args.order_events_url,
        order_events_secret=args.order_events_secret,
        gateway=args.gateway,
        workers=args.workers,
        api_processes=args.api_processes,
    )

    async def demo(stack: DevStack) -> int:
        from payorders.tools.demo import run_demo

        # The stack's own client settings: its addresses, tuning and gateway.
        return await run_demo(stack.client_settings())

    return await run_dev(settings, options, after_start=demo if args.demo else None)


# --- parser ------------------------------------------------------------------------------


def _scale_arguments(c: argparse.ArgumentParser, note: str, *, default: int | None) -> None:
    n = stackinfo.MAX_PROCESSES
    c.add_argument(
        "--workers",
        type=_processes("--workers"),
        default=default,
        help=f"{note}pay-order workers on the one task queue, each with an order-events relay"
        f" (1 to {n}, default 1; metrics on --worker-metrics-port and the ports after it)",
    )
    c.add_argument(
        "--api-processes",
        type=_processes("--api-processes"),
        default=default,
        help=f"{note}API processes serving the one API port (1 to {n}, default 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="payorders", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str, fn: Any, *, json_out: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(fn=fn)
        if json_out:
            c.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return c

    c = command(
        "dev",
        "run the whole local stack in the foreground (Ctrl-C stops it)",
        cmd_dev,
        json_out=False,
    )
    c.add_argument("--demo", action="store_true", help="run the demo once the stack is up")
    c.add_argument("--data-dir", type=Path, help="where the stack keeps its data (default: ./data)")
    c.add_argument("--temporal-port", type=_count, default=7233, help="Temporal gRPC port")
    c.add_argument("--ui-port", type=_count, default=8233, help="Temporal Web UI port")
    c.add_argument("--api-port", type=_count, default=8000, help="service API port")
    c.add_argument(
        "--gateway",
        choices=GATEWAYS,
        default="sandbox",
        help="the gateway: the sandbox's, localstripe behind the Stripe wire, the local"
        " Alipay or the local WeChat Pay (default sandbox)",
    )
    c.add_argument("--gateway-port", type=_count, default=8001, help="sandbox gateway port")
    c.add_argument(
        "--stripe-port",
        type=_count,
        default=8420,
        help="with --gateway stripe: the Stripe wire, the Stripe API the adapter is given"
        " (localstripe takes the next port, or a free one)",
    )
    c.add_argument(
        "--worker-metrics-port", type=_count, default=9464, help="the worker's Prometheus port"
    )
    c.add_argument(
        "--orders-port",
        type=_count,
        default=8002,
        help="the example order service, where the worker delivers the order events",
    )
    c.add_argument(
        "--order-events-url",
        type=_events_url,
        help="deliver the order events to your own receiver instead (http(s) URL; the example"
        " order service is then not started); one that does not answer is retried",
    )
    c.add_argument(
        "--order-events-secret",
        type=_secret,
        help="the secret the deliveries are signed with (default: the stack's generated one,"
        " printed in the banner)",
    )
    _scale_arguments(c, "", default=1)

    c = command("create", "checkout: create the pay order of an order (idempotent)", cmd_create)
    c.add_argument("--order-no", required=True, type=_identifier("order_no"))
    c.add_argument("--amount", required=True, type=_amount, help="minor units, e.g. 1999")
    c.add_argument("--currency", required=True, type=_currency, help="ISO 4217, e.g. USD")
    expiry = c.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in", type=_window, help="payment window, e.g. 15m, at most 7d (default 1h)"
    )
    expiry.add_argument(
        "--expires-at",
        type=_deadline,
        help="deadline, ISO 8601 with zone, e.g. 2026-12-01T11:00:00Z (at most 7 days away)",
    )

    c = command(
        "pay",
        "a customer pays at the gateway, which notifies us (Stripe: the checkout PaymentIntent"
        " with a test card while it is payable for the amount, else another PaymentIntent)",
        cmd_pay,
    )
    c.add_argument("pay_order_no", type=_pay_order_no)
    c.add_argument("--amount", type=_amount, help="default: the order's amount")
    c.add_argument("--currency", type=_currency, help="default: the order's currency")
    c.add_argument(
        "--txn-id",
        type=_identifier("txn_id"),
        help="the payment's key: the same again pays once (default: a new payment)",
    )

    c = command(
        "cancel",
        "checkout cancels a pay order: close it now (the trade first; already paid: it"
        " succeeds); idempotent",
        cmd_cancel,
    )
    c.add_argument("pay_order_no", type=_pay_order_no)

    c = command("notify", "the gateway adapter: report a payment notification by hand", cmd_notify)
    c.add_argument("pay_order_no", type=_pay_order_no)
    c.add_argument("--txn-id", required=True, type=_identifier("txn_id"))
    c.add_argument("--amount", required=True, type=_amount)
    c.add_argument("--currency", required=True, type=_currency)
    c.add_argument("--paid-at", type=_timestamp, help="ISO 8601 with zone (default: now)")

    c = command("status", "one pay order: rows, payments, refunds, workflow, gateway", cmd_status)
    c.add_argument("pay_order_no", type=_pay_order_no)

    c = command("list", "pay orders, through the PayOrderStatus search attribute", cmd_list)
    c.add_argument("--status", choices=[s.value for s in domain.PayOrderStatus])
    c.add_argument("--limit", type=_count, default=50)

    c = command(
        "fault",
        "set or show the gateway's faults (the sandbox's, or the Stripe wire's: on the wire"
        " between the adapter and Stripe)",
        cmd_fault,
    )
    c.add_argument("--order", type=_pay_order_no, help="only this pay order (default: every order)")
    c.add_argument("--fail-next-refunds", type=_count, metavar="N")
    c.add_argument(
        "--timeout-after-success",
        type=_count,
        metavar="N",
        help="refund, then withhold the answer from the next N callers",
    )
    c.add_argument("--delay-ms", type=_count, metavar="MS", help="slow every gateway call")
    c.add_argument("--webhook-delay-ms", type=_count, metavar="MS")
    c.add_argument(
        "--webhook-duplicate", type=_count, metavar="N", help="deliver the next N webhooks twice"
    )
    c.add_argument(
        "--webhook-drop",
        type=_count,
        metavar="N",
        help="lose the first delivery of the next N webhooks (the retry delivers)",
    )
    c.add_argument(
        "--webhook-reorder",
        type=_count,
        metavar="N",
        help="hold back the next N webhooks so later ones overtake them",
    )
    c.add_argument(
        "--paid-on-close",
        nargs=2,
        metavar=("AMOUNT", "CURRENCY"),
        help="a capture lands at the instant the trade is closed (Stripe: the PaymentIntent"
        " is paid for its own amount; AMOUNT and CURRENCY only arm the fault)",
    )
    c.add_argument("--clear", action="store_true", help="clear faults first")

    c = command("demo", "drive the running stack through every scenario", cmd_demo, json_out=False)
    c.add_argument(
        "--gateway",
        choices=GATEWAYS,
        help="the gateway the running stack must run (default: the stack's)",
    )

    c = command(
        "torture",
        "many orders, racing payments and faults; verify no money is lost",
        cmd_torture,
        json_out=False,
    )
    c.add_argument("--orders", type=_count, default=2000)
    c.add_argument("--expires-in-s", type=_count, default=8, help="each order's payment window")
    c.add_argument("--seed", type=_count, default=1)
    c.add_argument("--settle-within-s", type=_count, default=300)
    c.add_argument(
        "--chaos",
        action="store_true",
        help="on a private stack: kill workers (one at a time), an API process while"
        " webhooks arrive and a relay while it delivers, restart Temporal and PostgreSQL,"
        " stop the gateway for a while",
    )
    c.add_argument("--worker-kills", type=_count, default=3, help="with --chaos")
    c.add_argument("--api-kills", type=_count, default=1, help="with --chaos: API processes killed")
    c.add_argument(
        "--relay-kills",
        type=_count,
        default=1,
        help="with --chaos: workers killed while their relay delivers an order event",
    )
    _scale_arguments(c, "with --chaos: ", default=None)
    c.add_argument(
        "--gateway",
        choices=GATEWAYS,
        help="with --chaos: the gateway of the private stack (default PAYORDERS_GATEWAY, else"
        " sandbox); without: the gateway the running stack must run (default: the stack's)",
    )

    c = command("reconcile", "run one reconciliation now and print its report", cmd_reconcile)
    c.add_argument("--history", action="store_true", help="list past runs instead")
    c.add_argument("--limit", type=_count, default=20, help="how many past runs")

    c = command(
        "refund",
        "refund part or all of a paid pay order (PAY_ORDER_NO --amount --refund-no), or money"
        " the gateway captured for a pay order we never had (--txn); idempotent",
        cmd_refund,
    )
    c.add_argument("pay_order_no", nargs="?", type=_pay_order_no, metavar="PAY_ORDER_NO")
    c.add_argument("--amount", type=_amount, help="minor units, at most what is refundable")
    c.add_argument(
        "--refund-no",
        type=_refund_no,
        help="the shop's key for this refund: the same key again is the same refund",
    )
    c.add_argument("--reason", help="why, kept with the refund (e.g. returned: wrong size)")
    c.add_argument(
        "--txn",
        type=_identifier("txn_id"),
        help="instead of a pay order: the gateway's txn of money for a pay order we never had",
    )
    c.add_argument("--wait", action="store_true", help="wait until the gateway confirms it")
    c.add_argument("--wait-s", type=_count, default=120, help="how long --wait waits (default 120)")
    return p


async def execute(args: argparse.Namespace, settings: Settings) -> int:
    """Run a parsed command; its exit code, with a one-line error on stderr when refused."""
    try:
        code: int = await args.fn(args, settings)
    except CliError as e:
        print(f"payorders {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (argparse.ArgumentTypeError, domain.InvalidInput) as e:
        print(f"payorders {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings()
    logs.configure(logging.WARNING)  # e.g. asyncpg's pool while PostgreSQL restarts
    try:
        code = asyncio.run(execute(args, settings))
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the Temporal SDK's native threads can abort it after a
    # client was used (temporalio/sdk-python#300), turning a finished command into SIGABRT.
    os._exit(code)

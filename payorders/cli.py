"""payorders: one entry point for the local stack, checkout, the gateway and operators.

Every command has ``--help``; commands that print data take ``--json``. Bad arguments get
a one-line error and exit 2, and change nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from temporalio.client import Client
from temporalio.service import RPCError

from payorders import domain
from payorders.api import PayOrderConflict, PayOrders, UnknownPayOrder, connect
from payorders.customer import customer_pays
from payorders.runtime import (
    Resources,
    StackNotRunning,
    database_url,
    open_resources,
    with_stack_defaults,
)
from payorders.settings import Settings
from payorders.table import pairs, render

START_HINT = "start the local stack first: scripts/dev (or payorders dev)"


class CliError(Exception):
    """A one-line answer for the user; exit code 1 (2 for usage errors)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# --- argument types --------------------------------------------------------------------


def _duration(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 90s, 15m, 1h or 2d)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return timedelta(seconds=int(m.group(1)) * unit)


def _amount(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()):
        raise argparse.ArgumentTypeError(
            f"not an amount: {text!r} (a whole number of minor units, e.g. 1999 for 19.99)"
        )
    try:
        return domain.check_amount(int(text))
    except domain.InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", text.strip()):
        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return int(text)


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


def _pay_order_no(text: str) -> str:
    if not text.startswith("po_"):
        raise argparse.ArgumentTypeError(f"not a pay order number: {text!r} (they look like po_…)")
    _identifier("pay order number")(text.removeprefix("po_"))
    return text


def _timestamp(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError("the time needs a zone, e.g. 2026-11-27T11:00:00Z")
    return ts


# --- connections -------------------------------------------------------------------------


@dataclass
class Ctx:
    settings: Settings
    client: Client
    res: Resources
    api: PayOrders


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[Ctx]:
    settings = with_stack_defaults(settings)
    try:
        url = database_url(settings)
    except StackNotRunning as e:
        raise CliError(str(e)) from None
    try:
        client = await asyncio.wait_for(connect(settings), 10)
    except (RPCError, RuntimeError, TimeoutError, OSError) as e:
        raise CliError(
            f"cannot reach Temporal at {settings.temporal_address} ({e}); {START_HINT}"
        ) from None
    try:
        async with open_resources(settings, url) as res:
            yield Ctx(
                settings=settings,
                client=client,
                res=res,
                api=PayOrders(client, res.store, settings),
            )
    except StackNotRunning as e:
        raise CliError(f"{e}; {START_HINT}") from None


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# --- commands ----------------------------------------------------------------------------


async def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        try:
            started = await c.api.start_pay_order(
                order_no=args.order_no,
                amount=args.amount,
                currency=args.currency,
                expires_in=args.expires_in,
            )
        except PayOrderConflict as e:
            raise CliError(str(e)) from None
        data = {**asdict(started), "ui": c.api.ui_link(started.pay_order_no)}
        _emit(args, data, pairs(list(data.items())))
    return 0


async def cmd_pay(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        row = await c.res.store.get_pay_order(args.pay_order_no)
        if row is None:
            raise CliError(f"no pay order {args.pay_order_no}")
        amount = args.amount if args.amount is not None else row.amount
        currency = args.currency or row.currency
        cap, outcome = await customer_pays(
            c.api,
            c.res.sandbox,
            pay_order_no=row.pay_order_no,
            amount=amount,
            currency=currency,
            txn_id=args.txn_id,
        )
        data = {
            "pay_order_no": row.pay_order_no,
            "txn_id": cap.txn_id,
            "amount": amount,
            "currency": currency,
            "captured_at": cap.captured_at,
            "notification": outcome.value,
        }
        _emit(args, data, pairs(list(data.items())))
    return 0


async def cmd_notify(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        try:
            outcome = await c.api.notify_payment(
                pay_order_no=args.pay_order_no,
                txn_id=args.txn_id,
                amount=args.amount,
                currency=args.currency,
                paid_at=args.paid_at or datetime.now(UTC),
            )
        except UnknownPayOrder as e:
            raise CliError(str(e)) from None
        _emit(args, {"notification": outcome.value}, f"notification: {outcome.value}")
    return 0


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        try:
            details = await c.api.get_pay_order(args.pay_order_no)
        except UnknownPayOrder as e:
            raise CliError(str(e)) from None
        ledger = await c.res.sandbox.ledger_of(args.pay_order_no)
        row = details.row
        data = {
            "pay_order": row.model_dump(mode="json"),
            "payments": details.payments,
            "fund_identity": asdict(details.fund),
            "workflow": {
                "status": details.workflow_status,
                "view": None if details.view is None else details.view.model_dump(mode="json"),
            },
            "gateway": {
                "trade_state": ledger["trade_state"],
                "captured": ledger["captured"],
                "refunded": ledger["refunded"],
                "captures": [asdict(x) for x in ledger["captures"]],
                "refunds": [asdict(x) for x in ledger["refunds"]],
            },
            "ui": c.api.ui_link(row.pay_order_no),
        }
        fund = details.fund
        text = [
            pairs(
                [
                    ("pay order", row.pay_order_no),
                    ("order", row.order_no),
                    ("status", row.status.value),
                    ("amount", f"{row.amount} {row.currency}"),
                    ("expires at", row.expires_at.isoformat()),
                    ("paid / refunded", f"{row.paid_amount} / {row.refunded_amount}"),
                    (
                        "fund identity",
                        "holds"
                        if fund.holds
                        else f"not yet: {fund.in_flight} in flight (paid - refunded = {fund.net},"
                        f" expected {fund.expected_net})",
                    ),
                    ("lock version", row.lock_version),
                    ("workflow", details.workflow_status or "not found"),
                    (
                        "gateway",
                        f"trade {ledger['trade_state']}, captured {ledger['captured']},"
                        f" refunded {ledger['refunded']} in {len(ledger['refunds'])} refund(s)",
                    ),
                    ("Temporal UI", c.api.ui_link(row.pay_order_no)),
                ]
            )
        ]
        if details.payments:
            text.append("")
            text.append(
                render(
                    ["txn", "amount", "settled", "refund reason", "refund", "attempts"],
                    [
                        [
                            p["txn_id"],
                            f"{p['amount']} {p['currency'].strip()}",
                            "yes" if p["settled"] else "no",
                            p["refund_reason"],
                            p["refund_status"],
                            p["attempts"],
                        ]
                        for p in details.payments
                    ],
                )
            )
        _emit(args, data, "\n".join(text))
    return 0


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as c:
        query = "WorkflowType = 'PayOrderWorkflow'"
        if args.status:
            query += f" AND PayOrderStatus = '{args.status}'"
        rows: list[dict[str, Any]] = []
        async for wf in c.client.list_workflows(query, limit=args.limit):
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


async def cmd_fault(args: argparse.Namespace, settings: Settings) -> int:
    changes: dict[str, Any] = {}
    if args.fail_next_refunds is not None:
        changes["fail_next_refunds"] = args.fail_next_refunds
    if args.timeout_after_success is not None:
        changes["timeout_after_success_next"] = args.timeout_after_success
    if args.delay_ms is not None:
        changes["delay_ms"] = args.delay_ms
    if args.paid_on_close is not None:
        amount, currency = args.paid_on_close
        changes["paid_on_close_amount"] = _amount(amount)
        changes["paid_on_close_currency"] = _currency(currency)
    scope = args.order or "*"
    async with connected(settings) as c:
        sandbox = c.res.sandbox
        if args.clear:
            await sandbox.clear_faults(args.order)
        if changes:
            await sandbox.set_faults(scope, **changes)
        faults = await sandbox.list_faults()
        _emit(
            args,
            faults,
            render(
                [
                    "scope",
                    "fail next refunds",
                    "timeout after success",
                    "delay ms",
                    "paid on close",
                ],
                [
                    [
                        f["scope"],
                        f["fail_next_refunds"],
                        f["timeout_after_success_next"],
                        f["delay_ms"],
                        f"{f['paid_on_close_amount']} {f['paid_on_close_currency']}"
                        if f["paid_on_close_amount"]
                        else "",
                    ]
                    for f in faults
                ],
            )
            if faults
            else "no faults set",
        )
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from payorders.demo import run_demo

    async with connected(settings) as c:
        return await run_demo(c.api, c.res)


async def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from payorders.devstack import DevOptions, DevStack, run_dev

    if args.data_dir is not None:
        settings = settings.model_copy(update={"data_dir": args.data_dir})
    options = DevOptions(temporal_port=args.temporal_port, ui_port=args.ui_port)

    async def demo(stack: DevStack) -> int:
        from payorders.demo import run_demo

        # The stack has written its addresses and tuning to the data directory.
        async with connected(settings) as c:
            return await run_demo(c.api, c.res)

    return await run_dev(settings, options, after_start=demo if args.demo else None)


# --- parser ------------------------------------------------------------------------------


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

    c = command("create", "checkout: create the pay order of an order (idempotent)", cmd_create)
    c.add_argument("--order-no", required=True, type=_identifier("order_no"))
    c.add_argument("--amount", required=True, type=_amount, help="minor units, e.g. 1999")
    c.add_argument("--currency", required=True, type=_currency, help="ISO 4217, e.g. USD")
    c.add_argument("--expires-in", type=_duration, help="payment window, e.g. 15m (default 1h)")

    c = command("pay", "a customer pays at the sandbox gateway, which notifies us", cmd_pay)
    c.add_argument("pay_order_no", type=_pay_order_no)
    c.add_argument("--amount", type=_amount, help="default: the order's amount")
    c.add_argument("--currency", type=_currency, help="default: the order's currency")
    c.add_argument("--txn-id", type=_identifier("txn_id"), help="default: a new transaction")

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

    c = command("fault", "set or show the sandbox gateway's faults", cmd_fault)
    c.add_argument("--order", type=_pay_order_no, help="only this pay order (default: every order)")
    c.add_argument("--fail-next-refunds", type=_count, metavar="N")
    c.add_argument(
        "--timeout-after-success",
        type=_count,
        metavar="N",
        help="refund, then withhold the answer from the next N callers",
    )
    c.add_argument("--delay-ms", type=_count, metavar="MS")
    c.add_argument(
        "--paid-on-close",
        nargs=2,
        metavar=("AMOUNT", "CURRENCY"),
        help="a capture lands at the instant the trade is closed",
    )
    c.add_argument("--clear", action="store_true", help="clear faults first")

    command("demo", "drive the running stack through every scenario", cmd_demo, json_out=False)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings()
    try:
        code = asyncio.run(args.fn(args, settings))
    except CliError as e:
        print(f"payorders {args.command}: error: {e}", file=sys.stderr)
        code = 1
    except (argparse.ArgumentTypeError, domain.InvalidInput) as e:
        print(f"payorders {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)

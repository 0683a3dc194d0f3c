"""``payorders dev --order-events-url``: a shop's own receiver gets every order event of the
local stack, signed with its secret, also after it was down for a while; the example order
service is not started; a malformed URL or a weak secret is a one-line error."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from payorders.localstack import stackinfo

from ..event_receiver import EventReceiver
from .test_devstack import CLI, DevProcess, free_port

pytestmark = pytest.mark.slow

SHOP_SECRET = "shop-own-secret-" + "s" * 24


@pytest.fixture
async def receiver() -> AsyncIterator[EventReceiver]:
    r = EventReceiver(secret=SHOP_SECRET)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


async def cli_json(dev: DevProcess, *args: str) -> Any:
    # In a thread: the receiver answers on this test's event loop meanwhile.
    return await asyncio.to_thread(dev.cli_json, *args)


async def wait_status(dev: DevProcess, no: str, want: str, within: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while (status := await cli_json(dev, "status", no))["status"] != want:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.3)
    return status


async def test_every_event_reaches_the_shops_receiver_signed_with_its_secret(
    receiver: EventReceiver,
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="payorders-own-receiver-"))
    dev = DevProcess(data_dir=tmp / "data", temporal_port=free_port(), ui_port=free_port())
    try:
        extra = ("--order-events-url", receiver.url, "--order-events-secret", SHOP_SECRET)
        await asyncio.to_thread(dev.start, *extra)
        info = stackinfo.read(dev.data_dir)
        assert info is not None
        assert info.order_events_url == receiver.url and info.order_service_url is None
        assert info.secrets is not None
        assert info.secrets["PAYORDERS_ORDER_EVENTS_SECRET"] == SHOP_SECRET
        listening = {
            c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN
        }
        assert dev.orders_port not in listening, "the example order service was started"

        run = f"{int(time.time())}"
        paid, expired, cancelled, late = (f"{kind}-{run}" for kind in ("pd", "ex", "cx", "lt"))
        await cli_json(dev, "create", "--order-no", paid, "--amount", "1999", "--currency", "USD")
        await cli_json(dev, "pay", f"po_{paid}")
        await wait_status(dev, f"po_{paid}", "PAY_SUCCESS")
        first = await _events_of(receiver, f"po_{paid}", 1)

        # The shop's service goes down; what happens meanwhile waits at the relay.
        await receiver.stop()
        for no in (expired, late):
            await cli_json(
                dev, "create", "--order-no", no, "--amount", "500", "--currency", "EUR",
                "--expires-in", "2s",
            )  # fmt: skip
        await cli_json(
            dev, "create", "--order-no", cancelled, "--amount", "700", "--currency", "EUR"
        )
        await cli_json(dev, "cancel", f"po_{cancelled}")
        await wait_status(dev, f"po_{late}", "PAY_EXPIRED")
        await cli_json(dev, "pay", f"po_{late}")  # after its expiry: refunded
        await wait_status(dev, f"po_{expired}", "PAY_EXPIRED")
        deadline = time.monotonic() + 60
        while (await cli_json(dev, "status", f"po_{late}"))["refunded_amount"] != 500:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.3)
        down = len(receiver.requests)
        await asyncio.sleep(2)
        await receiver.start()

        got = {
            no: await _events_of(receiver, f"po_{no}", n)
            for no, n in ((expired, 1), (cancelled, 1), (late, 2))
        }
        assert [e["type"] for e in first] == ["pay_order.succeeded"]
        assert [(e["type"], e["data"]["reason"]) for e in got[expired]] == [
            ("pay_order.expired", "EXPIRED")
        ]
        assert [(e["type"], e["data"]["reason"]) for e in got[cancelled]] == [
            ("pay_order.expired", "CANCELLED")
        ]
        assert [e["type"] for e in got[late]] == ["pay_order.expired", "refund.succeeded"]
        assert got[late][1]["data"]["refund"]["amount"] == 500
        assert receiver.requests[down:], "nothing was delivered once the receiver was back"
        assert all(d.verified for d in receiver.requests), "a delivery not signed with our secret"
        assert receiver.violations == []

        banner = (await asyncio.to_thread(dev.stop)).split("payorders dev is up", 1)[1]
        assert f"order events     {receiver.url}" in banner
        assert f"export PAYORDERS_ORDER_EVENTS_SECRET='{SHOP_SECRET}'" in banner
        assert "order service " not in banner
    finally:
        if dev.proc is not None and dev.proc.poll() is None:
            dev.proc.kill()
            dev.proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def _events_of(receiver: EventReceiver, no: str, n: int, within: float = 60) -> list[Any]:
    """The first ``n`` acknowledged events of pay order ``no``, in sequence order."""
    deadline = time.monotonic() + within
    while True:
        mine = sorted(
            (e for e in receiver.acked.values() if e["pay_order_no"] == no),
            key=lambda e: e["sequence"],
        )
        if len(mine) >= n:
            return mine
        assert time.monotonic() < deadline, f"{no}: {len(mine)} of {n} events: {mine}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--order-events-url", "ftp://127.0.0.1/x"], "is not an http(s) URL with a host"),
        (["--order-events-url", "127.0.0.1:9000/events"], "is not an http(s) URL with a host"),
        (["--order-events-url", "http:///events"], "is not an http(s) URL with a host"),
        (["--order-events-url", "http://127.0.0.1:99999/x"], "is not an http(s) URL with a host"),
        (["--order-events-secret", "change-me"], "placeholder"),
        (["--order-events-secret", "short-secret"], "shorter than 24"),
    ],
)
def test_a_malformed_url_or_a_weak_secret_is_a_one_line_error(
    tmp_path: Path, args: list[str], says: str
) -> None:
    done = subprocess.run(
        [CLI, "dev", "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and args[0] in lines[0], done.stderr
    assert not (tmp_path / "data").exists(), "a refused start left a data directory"

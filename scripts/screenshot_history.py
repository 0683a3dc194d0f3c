"""Render one pay order's timeline in the Temporal UI to a PNG for the README.

Needs a running local stack (scripts/dev) and Debian's chromium (apt-get install chromium);
drives it with Playwright's Python package (no browser download: the system one is used).

    .venv/bin/python scripts/screenshot_history.py [WORKFLOW_ID] [OUT.png]

Without a workflow id it takes the newest demo order that expired and refunded a late
payment: the race and the refund in one picture.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from playwright.async_api import async_playwright

from payorders.core.settings import Settings
from payorders.pay_orders import connect
from payorders.runtime import with_stack_defaults

OUT = Path(__file__).resolve().parent.parent / "docs" / "pay-order-history.png"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def newest_late_order(settings: Settings) -> str:
    client = await connect(settings)
    query = "WorkflowType = 'PayOrderWorkflow' AND OrderNo STARTS_WITH 'demo-'"
    async for wf in client.list_workflows(query):
        if wf.id.endswith("-late-0"):
            return wf.id
    raise SystemExit("no demo order found: run the demo first (scripts/dev or payorders demo)")


async def main(argv: list[str]) -> None:
    settings = with_stack_defaults(Settings())
    workflow_id = argv[0] if argv else await newest_late_order(settings)
    out = Path(argv[1]) if len(argv) > 1 else OUT
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    url = settings.ui_link(workflow_id)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        # Tall enough for the whole timeline: the UI scrolls inside its own pane, so a
        # full-page shot stops at the viewport.
        page = await browser.new_page(viewport={"width": 1500, "height": 1400})
        await page.goto(url)
        heading = page.get_by_role("heading", name="Timeline", exact=True)
        await heading.wait_for(timeout=20_000)
        await page.get_by_text("create_pay_order").first.wait_for(timeout=20_000)
        await page.wait_for_timeout(2_000)  # let the timeline draw
        # Only the timeline: its heading's nearest ancestor that holds the drawing.
        timeline = await heading.evaluate_handle(
            "h => { let e = h; while (e && !e.querySelector('[class*=canvas]'))"
            " e = e.parentElement; return e; }"
        )
        element = timeline.as_element()
        if element is None:
            raise SystemExit("the UI's timeline was not found: has the UI changed?")
        out.parent.mkdir(exist_ok=True)
        await element.screenshot(path=str(out))
        await browser.close()
    print(f"{workflow_id} -> {out}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))

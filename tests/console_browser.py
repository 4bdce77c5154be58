"""Debian's chromium, headless, driven by Playwright for Python (no browser download): a browser for the
console tests, and what they share (screenshots, the no-sideways-scroll check, CSP violations)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def shots_dir(tmp: Path) -> Path:
    """Where screenshots go: $CONSOLE_SCREENSHOTS (CI keeps it as an artifact), else the test's tmp dir."""
    d = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


async def shot(page: Page, tmp: Path, name: str) -> None:
    await page.screenshot(path=str(shots_dir(tmp) / f"{name}.png"), full_page=True)


def watch_csp(page: Page) -> list[str]:
    """Collects every console message about a Content Security Policy violation (there must be none:
    htmx, its SSE extension and our script run under the policy as they are)."""
    seen: list[str] = []

    def on(msg: ConsoleMessage) -> None:
        if re.search(r"content security policy", msg.text, re.I):
            seen.append(msg.text)

    page.on("console", on)
    return seen


async def sideways_scroll(page: Page) -> int:
    """How many CSS pixels the page is wider than the viewport (0: no horizontal scroll)."""
    return int(await page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))

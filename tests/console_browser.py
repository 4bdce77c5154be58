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


ROOT = Path(__file__).resolve().parent.parent
#: The screenshots docs/operator.md shows: test screenshot name -> file under $CONSOLE_DOC_SHOTS (docs/img).
DOC_SHOTS = {
    "demo-granted-1280": "console-dashboard.png",
    "people-1280": "console-people.png",
    "import-report-1280": "console-import-report.png",
    "visitors-1280": "console-visitors.png",
    "doors-1280": "console-doors.png",
    "gateway-1280": "console-gateway.png",
    "key-rotation-pending-1280": "console-key-rotation.png",
}


def shots_dir(tmp: Path | None = None) -> Path:
    """Where every page's screenshot goes: $CONSOLE_SCREENSHOTS, else build/screenshots/ in the checkout
    (created here; CI keeps the folder as an artifact). `tmp` is not used (kept for the callers)."""
    d = Path(os.environ.get("CONSOLE_SCREENSHOTS") or ROOT / "build" / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


async def shot(page: Page, tmp: Path | None, name: str) -> None:
    """A full-page screenshot `<name>.png` in `shots_dir()`. With $CONSOLE_DOC_SHOTS set (docs/img), the
    pages docs/operator.md shows (`DOC_SHOTS`) are also written there: the viewport only, small PNGs."""
    await page.screenshot(path=str(shots_dir(tmp) / f"{name}.png"), full_page=True)
    docs = os.environ.get("CONSOLE_DOC_SHOTS")
    if docs and name in DOC_SHOTS:
        Path(docs).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(docs) / DOC_SHOTS[name]), full_page=False, animations="disabled",
                              caret="hide")  # fmt: skip


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


_CONTRAST_JS = """() => {
  const rgb = s => s.match(/[\\d.]+/g).slice(0, 4).map(Number);
  const f = c => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  const lum = ([r, g, b]) => 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  const bg = e => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor);
                    if (c.length < 4 || c[3] > 0) return c; } return [255, 255, 255]; };
  const worst = [];
  for (const e of document.querySelectorAll("body *")) {
    if (![...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
    const st = getComputedStyle(e);
    if (st.visibility === "hidden" || st.display === "none" || e.getClientRects().length === 0) continue;
    const a = lum(rgb(st.color)), b = lum(bg(e));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) worst.push(`${e.tagName} "${e.textContent.trim().slice(0, 30)}": ${ratio.toFixed(2)}`);
  }
  return worst;
}"""


async def low_contrast(page: Page) -> list[str]:
    """Text elements whose colour is below WCAG AA's 4.5:1 against their background."""
    out: list[str] = await page.evaluate(_CONTRAST_JS)
    return out

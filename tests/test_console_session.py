"""Session timeouts and CSRF in a real browser (Debian's chromium) against a running service (SQLite and
PostgreSQL for the idle timeout): a session in use outlives its idle timeout, and is sent to login after
that long unused, even with the live dashboard open (its polling and streams are not use); a session in
use still ends at its absolute limit; before the idle timeout a dialog warns (static session.js, no inline
script), "Stay signed in" extends the session through a CSRF-protected call, and unanswered the page goes to
the login; a page POST or an API write with a forged or missing CSRF token is
403 and changes nothing."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
from playwright.async_api import Page, expect

from cloud_bridge.service.config import ServiceConfig

from .console_browser import chromium, low_contrast, shot, sideways_scroll, watch_csp
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, Running, config, running
from .test_console_pages import api_as_root, setup_in_browser, sqlite


def with_sessions(cfg: ServiceConfig, *, idle_s: float, hours: float = 12.0) -> ServiceConfig:
    return msgspec.structs.replace(cfg, auth=msgspec.structs.replace(
        cfg.auth, session_idle_minutes=idle_s / 60, session_hours=hours))  # fmt: skip


async def at_login(page: Page, svc: Running, path: str) -> bool:
    await page.goto(f"{svc.url}{path}")
    return page.url.startswith(f"{svc.url}/login")


async def test_idle_session_is_sent_to_login_and_activity_keeps_it(db_url: str, tmp_path: Path) -> None:
    idle = 6.0
    cfg = with_sessions(config(db_url, tmp_path), idle_s=idle)
    async with running(cfg) as svc, chromium() as browser:
        page = await browser.new_page()
        await setup_in_browser(page, svc)
        # in use: a page every second, for twice the idle timeout; still logged in
        end = time.monotonic() + 2 * idle
        while time.monotonic() < end:
            assert not await at_login(page, svc, "/people")
            await asyncio.sleep(1.0)
        # the live dashboard left open (panels polled every 2 s, event streams): not activity
        await page.goto(f"{svc.url}/")
        await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        await page.wait_for_timeout(int((idle + 3) * 1000))
        assert await at_login(page, svc, "/people")
        assert page.url == f"{svc.url}/login?next=/people"
        r = await page.request.get(f"{svc.url}/api/v1/auth/me")
        assert r.status == 401  # the API refuses the ended session too
        # logging in again works, and goes back to the page asked for
        await page.get_by_label("Operator").fill("root")
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        await expect(page.get_by_role("heading", name="People")).to_be_visible()


async def test_a_session_in_use_ends_at_its_absolute_limit(tmp_path: Path) -> None:
    hours = 12.0 / 3600  # 12 s after the login, whatever happens
    cfg = with_sessions(config(sqlite(tmp_path), tmp_path), idle_s=6.0, hours=hours)
    async with running(cfg) as svc, chromium() as browser:
        page = await browser.new_page()
        await setup_in_browser(page, svc)
        start = time.monotonic()
        ended = None
        while time.monotonic() - start < 30:
            if await at_login(page, svc, "/people"):
                ended = time.monotonic() - start
                break
            await asyncio.sleep(1.0)
        assert ended is not None  # used every second, it ended all the same (at its 12 s, not at 30)


async def test_forged_or_missing_csrf_is_403_and_changes_nothing(tmp_path: Path) -> None:
    cfg = config(sqlite(tmp_path), tmp_path)
    async with running(cfg) as svc, chromium() as browser:
        page = await browser.new_page()
        await setup_in_browser(page, svc)
        form = {"id": "mallory", "name": "Mallory", "card": "4242", "active": "on"}
        for token in ("forged-token", None):
            body = dict(form) if token is None else {**form, "_csrf": token}
            r = await page.request.post(f"{svc.url}/people/new", form=body)
            assert r.status == 403, token
            assert "CSRF" in await r.text()
            r = await page.request.post(f"{svc.url}/api/v1/users", data={"id": "mallory"},
                                        headers={} if token is None else {"x-csrf-token": token})  # fmt: skip
            assert r.status == 403, token
        api = await api_as_root(svc)
        try:
            assert (await api.get("/api/v1/users/mallory")).status_code == 404
        finally:
            await api.aclose()


async def test_a_warning_before_the_idle_timeout_extends_the_session_or_goes_to_login(tmp_path: Path) -> None:
    idle = 9.0  # the warning comes a third of it (3 s) before the end
    cfg = with_sessions(config(sqlite(tmp_path), tmp_path), idle_s=idle)
    async with running(cfg) as svc, chromium() as browser:
        page = await browser.new_page(viewport={"width": 390, "height": 800})
        violations = watch_csp(page)
        await setup_in_browser(page, svc)
        await page.goto(f"{svc.url}/people")
        dialog = page.get_by_role("dialog", name="Still there?")
        await expect(dialog).to_be_hidden()
        await expect(dialog).to_be_visible(timeout=int(idle * 1000))
        await expect(dialog).to_contain_text("Your session ends in")
        n = int(await page.locator("#session-seconds").text_content() or "99")
        assert 0 < n <= 3
        assert await sideways_scroll(page) == 0
        assert await low_contrast(page) == []
        await shot(page, tmp_path, "session-warning-390")
        # the keyboard: the button has the focus; Enter extends the session (an authenticated POST)
        assert await page.evaluate("document.activeElement.id") == "session-stay"
        await page.keyboard.press("Enter")
        await expect(dialog).to_be_hidden()
        left = await (await page.request.get(f"{svc.url}/panels/session")).json()
        assert left["remaining"] > 3 * idle / 4 and left["extendable"] is True  # asking is not use
        # a forged or missing CSRF token: refused, the session not moved on
        for headers in ({"x-csrf-token": "forged"}, {}):
            r = await page.request.post(f"{svc.url}/session/extend", headers=headers)
            assert r.status == 403
        # unanswered, the warning comes again and the page goes to the login at the end
        await expect(dialog).to_be_visible(timeout=int(idle * 1000))
        await page.wait_for_url(f"{svc.url}/login?next=/people", timeout=int(idle * 1000))
        r = await page.request.get(f"{svc.url}/api/v1/auth/me")
        assert r.status == 401
        assert violations == []

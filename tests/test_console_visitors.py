"""The receptionist's visitors page (seed 004) and the reports page (seed 003) in Debian's chromium.

A receptionist (an operator whose permission group covers visitors, badge pools and groups only) signs a
visitor in with the location's badge and a cardholder group, the badge is granted at a real simulated gateway
on a real Mosquitto; signs the visitor out, the badge is then denied. On both databases. The reports page
shows the day's access requests and downloads them as CSV with formula cells neutralised."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
from pathlib import Path

from playwright.async_api import expect

from cloud_bridge.permissions import Action, ObjectType, PermissionGroup, grant
from cloud_bridge.service import site
from cloud_bridge.service.app import init_site
from cloud_bridge.service.database import Database

from .broker import broker  # noqa: F401
from .console_browser import chromium, low_contrast, shot, sideways_scroll, watch_csp
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, admin_client, config, running
from .test_console_pages import api_as_root, log_in, setup_in_browser, sqlite
from .test_operator_e2e import GW, SITE, agent_running, sock_dir, tap_card  # noqa: F401
from .test_service_e2e import _public_key
from .test_service_integ import add_operator, announce
from .test_service_reports import EVIL, at, store_events
from .test_service_reports import table as table_of

RECEPTION = PermissionGroup(id="reception", name="Reception", permissions=[
    grant(ObjectType.VISITOR, Action.CREATE, Action.READ, Action.UPDATE),
    grant(ObjectType.BADGE_POOL, Action.READ), grant(ObjectType.GROUP, Action.READ)])  # fmt: skip


async def test_a_receptionist_issues_a_badge_and_signs_the_visitor_out(
    broker: Mosquitto, db_url: str, tmp_path: Path, sock_dir: Path
) -> None:
    cfg = config(db_url, tmp_path)
    await init_site(cfg, site_id=SITE, admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    pub = await _public_key(db_url)
    async with (
        agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent,
        running(cfg, provisioning=True, init=False) as svc,
        chromium() as browser,
    ):
        db = Database(db_url)
        try:
            svc.setup_link = f"x#{await site.setup_code_for(db, 'root')}"
        finally:
            await db.close()
        admin = await admin_client(svc)
        async with asyncio.timeout(30):
            while not any(g["online"] for g in (await admin.get("/api/v1/gateways")).json()):
                await asyncio.sleep(0.1)
        # the administrator's part: a cardholder group on the door, the lobby's badge pool
        assert (await admin.put("/api/v1/groups/guests", json={"name": "Guests", "doors": [
            {"gateway": GW, "door": "door1"}]})).status_code == 200  # fmt: skip
        for card, name in ((7001, "V1"), (7002, "V2")):
            r = await admin.put(f"/api/v1/visitors/badges/{card}", json={"location": "lobby", "name": name,
                                                                          "type": "day"})  # fmt: skip
            assert r.status_code == 200, r.text
        await add_operator(db_url, cfg, "desk", RECEPTION)

        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        violations = watch_csp(page)
        await log_in(page, svc, "desk", PASSWORD)
        nav = page.get_by_role("navigation", name="Main")
        await expect(nav.get_by_role("link", name="Visitors")).to_be_visible()
        await expect(nav.get_by_role("link", name="People")).to_have_count(0)  # not a receptionist's
        await nav.get_by_role("link", name="Visitors").click()
        await expect(page.get_by_role("heading", name="Visitors", exact=True)).to_be_visible()

        await page.get_by_label("Visitor's name").fill("Grace Hopper")
        await page.get_by_label("Badge", exact=True).select_option(label="V1 (7001, day)")
        await page.get_by_label("Guests").check()
        await page.get_by_role("button", name="Sign in and issue the badge").click()
        status = page.get_by_role("status")
        await expect(status).to_contain_text("Grace Hopper is signed in with badge V1 (7001)", timeout=40_000)
        await expect(status).to_contain_text(f"{GW}: version")
        today = page.get_by_role("table", name="Visits of today")
        row = today.get_by_role("row", name="Grace Hopper")
        await expect(row).to_contain_text("on site")
        await expect(page.get_by_role("table", name="Badges in use and when they stop working")).to_contain_text(
            "V1 (7001)"
        )
        # the badge in use is no longer offered
        await expect(page.get_by_label("Badge", exact=True).locator("option")).to_have_text(["V2 (7002, day)"])
        await shot(page, tmp_path, "visitors-1280")
        assert await low_contrast(page) == []
        d = await tap_card(agent, 7001)
        assert d.granted, d

        await page.set_viewport_size({"width": 390, "height": 844})
        assert await sideways_scroll(page) == 0
        await shot(page, tmp_path, "visitors-390")
        await page.get_by_role("button", name="Sign out Grace Hopper").click()
        await expect(status).to_contain_text("Grace Hopper is signed out: badge 7001 revoked", timeout=40_000)
        await expect(status).to_contain_text(f"{GW}: version")
        await expect(today.get_by_role("row", name="Grace Hopper")).to_contain_text("signed out")
        assert (await tap_card(agent, 7001)).reason.value == "unknown_card"
        assert violations == []
        await page.close()
        await admin.aclose()


async def test_the_reports_page_shows_the_day_and_downloads_csv(tmp_path: Path) -> None:
    url = sqlite(tmp_path)
    cfg = config(url, tmp_path)
    async with running(cfg) as svc, chromium() as browser:
        await announce(url, "gw1", {"front": "Front"})
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        violations = watch_csp(page)
        await setup_in_browser(page, svc)
        admin = await api_as_root(svc)
        await admin.post("/api/v1/users", json={"id": "alice", "name": EVIL[0]})
        day = "2026-03-28"
        await store_events(
            url,
            [
                (at(day, "08:00"), "access.granted", "front", 11, "alice", "granted"),
                (at(day, "08:01"), "access.denied", "front", 99, None, "unknown_card"),
            ],
        )
        await page.get_by_role("navigation", name="Main").get_by_role("link", name="Reports").click()
        await page.get_by_label("Day").fill(day)
        await page.get_by_role("button", name="Show the report").click()
        await expect(page.get_by_role("status")).to_have_text(f"{day}: 1 granted, 1 denied.")
        table = page.get_by_role("table", name=f"Access requests on {day}")
        await expect(table.get_by_role("row")).to_have_count(3)
        await expect(table).to_contain_text(EVIL[0])  # shown as text, escaped
        await shot(page, tmp_path, "reports-1280")
        async with page.expect_download() as info:
            await page.get_by_role("link", name="Download CSV").click()
        dl = await info.value
        text = Path(await dl.path()).read_text()
        assert dl.suggested_filename == f"access-requests-{day}.csv"
        rows = table_of(text)
        assert rows[1][5:8] == ["alice", "'" + EVIL[0], "granted"] and rows[2][7] == "denied"
        # the rights of a person
        await page.get_by_label("Access rights for a person").check()
        await page.get_by_role("textbox", name="Person").fill("alice")
        await page.get_by_role("button", name="Show the report").click()
        await expect(page.get_by_role("status")).to_have_text("alice: 0 rights.")
        assert violations == []
        await admin.aclose()

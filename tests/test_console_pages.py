"""The web console in a real browser (Debian's chromium, headless, through Playwright) against a running
service on a real SQLite file: first-time setup, login (a wrong password refused), a group and a person
with a card added through the pages, seen in the list, deactivated; a read-only operator sees no add
button and a forged POST is refused; keyboard alone; a phone-sized screen; the CSP header."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import msgspec
from playwright.async_api import Browser, Page, expect

from cloud_bridge.permissions import Action, ObjectType, Operator, PermissionGroup, grant
from cloud_bridge.service import schema, site
from cloud_bridge.service.database import Database

from .console_browser import chromium, low_contrast, shot, sideways_scroll, watch_csp
from .service_harness import PASSWORD, Running, config, login, running


def sqlite(tmp: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp / 'site.db'}"


async def setup_in_browser(page: Page, svc: Running, link: str | None = None) -> None:
    """Open the setup link `serve --init` printed, set the password: logged in, on the dashboard."""
    await page.goto(link or svc.setup_link)
    await expect(page.get_by_label("Setup code")).not_to_have_value("")  # console.js took it from the link
    assert "#" not in page.url  # and dropped it from the address bar
    await page.get_by_label("New password").fill(PASSWORD)
    await page.get_by_label("The same password again").fill(PASSWORD)
    await page.get_by_role("button", name="Set password and log in").click()
    await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


async def root_setup_code(url: str) -> str:
    """A fresh one-time setup code for the site's first administrator, `root` (what `serve --init` prints)."""
    db = Database(url)
    try:
        return await site.setup_code_for(db, "root")
    finally:
        await db.close()


async def root_in_browser(browser: Browser, svc: Running, url: str) -> tuple[Page, list[str]]:
    """A 1280 x 900 page logged in as `root` through a fresh setup link, and the CSP violations it reports."""
    code = await root_setup_code(url)
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    violations = watch_csp(page)
    await setup_in_browser(page, svc, f"{svc.url}/setup#{code}")
    return page, violations


async def log_in(page: Page, svc: Running, operator: str, password: str) -> None:
    await page.goto(f"{svc.url}/login")
    await page.get_by_label("Operator").fill(operator)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()


async def api_as_root(svc: Running) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=svc.url, timeout=60)
    await login(client, "root", PASSWORD)
    return client


async def test_setup_login_add_a_person_with_a_card_list_and_deactivate(tmp_path: Path) -> None:
    cfg = config(sqlite(tmp_path), tmp_path)
    async with running(cfg) as svc, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        violations = watch_csp(page)
        r = await page.goto(f"{svc.url}/people")  # not logged in: to the login page
        assert r is not None and page.url.startswith(f"{svc.url}/login")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"

        await setup_in_browser(page, svc)
        await shot(page, tmp_path, "dashboard-1280")
        # the setup code worked once: the same link again is refused
        ctx2 = await browser.new_context()
        p2 = await ctx2.new_page()
        await p2.goto(svc.setup_link)
        await p2.get_by_label("New password").fill(PASSWORD + "x")
        await p2.get_by_label("The same password again").fill(PASSWORD + "x")
        await p2.get_by_role("button", name="Set password and log in").click()
        await expect(p2.get_by_role("alert")).to_contain_text("not valid")
        await ctx2.close()

        # log out, a wrong password is refused, the right one lets in
        await page.get_by_role("button", name="Log out").click()
        await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
        await log_in(page, svc, "root", "not the password")
        await expect(page.get_by_role("alert")).to_contain_text("Login failed")
        await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
        await log_in(page, svc, "root", PASSWORD)
        await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()

        # a group, through the groups page
        await page.get_by_role("link", name="Groups").click()
        await page.get_by_role("link", name="Add a group").click()
        await page.get_by_label("Id").fill("staff")
        await page.get_by_label("Name").fill("Staff")
        await page.get_by_label("Other doors").fill("gw1/door1")
        await page.get_by_role("button", name="Add group").click()
        await expect(page.get_by_role("status")).to_have_text("The group was added.")
        await expect(page.get_by_role("row", name="staff")).to_contain_text("gw1/door1")
        await shot(page, tmp_path, "groups-1280")

        # seed 001's add-user page: card ID, groups, activate, offline access
        await page.get_by_role("link", name="People").click()
        await page.get_by_role("link", name="Add a person").click()
        await page.get_by_label("Id", exact=False).first.fill("alice")
        await page.get_by_label("Name").fill("Alice Smith")
        await page.get_by_label("Card ID").fill("1001")
        await expect(page.get_by_label("Activate access control")).to_be_checked()  # the default
        await page.get_by_label("Offline access").check()
        await page.get_by_label("Staff").check()
        await shot(page, tmp_path, "person-form-1280")
        await page.get_by_role("button", name="Add person").click()
        await expect(page.get_by_role("status")).to_have_text("The person was added.")
        row = page.get_by_role("row", name="alice")
        await expect(row).to_contain_text("Alice Smith")
        await expect(row).to_contain_text("1001")
        await expect(row).to_contain_text("staff")
        await expect(row).to_contain_text("active")
        await expect(row).to_contain_text("offline access")

        api = await api_as_root(svc)
        u = (await api.get("/api/v1/users/alice")).json()
        assert u["cards"][0]["card"] == 1001 and u["groups"] == ["staff"] and u["active"] and u["offline_access"]

        # the same card for someone else: refused by the API, the page names the card field, nothing saved
        await page.get_by_role("link", name="Add a person").click()
        await page.get_by_label("Id", exact=False).first.fill("bob")
        await page.get_by_label("Card ID").fill("1001")
        await page.get_by_role("button", name="Add person").click()
        await expect(page.get_by_role("alert")).to_contain_text("card 1001 is already assigned to user 'alice'")
        await expect(page.get_by_label("Card ID")).to_have_attribute("aria-invalid", "true")
        await expect(page.get_by_label("Card ID")).to_have_value("1001")  # what was typed stays
        assert (await api.get("/api/v1/users/bob")).status_code == 404
        await page.get_by_label("Card ID").fill("12x")
        await page.get_by_role("button", name="Add person").click()
        await expect(page.locator("#card-error")).to_contain_text("Expected `int`")

        # search, then deactivate in the list (htmx swaps the row in place)
        await page.get_by_role("link", name="People").click()
        for i in range(30):
            assert (await api.post("/api/v1/users", json={"id": f"u{i:02d}", "name": f"Person {i}"})).status_code == 201
        await page.reload()
        await expect(page.get_by_role("link", name="Next page")).to_be_visible()  # 31 people, 25 a page
        await page.get_by_role("link", name="Next page").click()
        await expect(page.get_by_role("row", name="u29")).to_be_visible()
        await page.get_by_label("Search by id or name").fill("smith")
        await expect(page.get_by_role("row")).to_have_count(2)  # the header and alice
        await expect(page.get_by_role("row", name="alice")).to_be_visible()
        assert "q=smith" in page.url
        await page.get_by_role("button", name="Deactivate alice").click()
        await expect(page.get_by_role("row", name="alice")).to_contain_text("deactivated")
        await expect(page.get_by_role("button", name="Activate alice")).to_be_visible()
        assert (await api.get("/api/v1/users/alice")).json()["active"] is False
        await shot(page, tmp_path, "people-1280")

        # edit: the name changes, the card and groups stay
        await page.get_by_role("link", name="Edit alice").click()
        await expect(page.get_by_label("Card ID")).to_have_value("1001")
        await page.get_by_label("Name").fill("Alice Jones")
        await page.get_by_role("button", name="Save").click()
        await expect(page.get_by_role("status")).to_have_text("The changes were saved.")
        u = (await api.get("/api/v1/users/alice")).json()
        assert u["name"] == "Alice Jones" and [k["card"] for k in u["cards"]] == [1001] and u["groups"] == ["staff"]

        # every change went through the API: the audit log names the operator and the session
        audit = (await api.get("/api/v1/audit", params={"limit": 500})).json()["items"]
        mine = {(e["action"], e["object_id"]) for e in audit if e["actor"] == "root" and e["via"] == "session"}
        assert {
            ("group.create", "staff"),
            ("user.create", "alice"),
            ("user.update", "alice"),
            ("user.put", "alice"),
        } <= mine
        await api.aclose()
        assert violations == []
        await browser.close()


async def _add_operator(db_url: str, oid: str, groups: list[PermissionGroup]) -> str:
    """A permission group and an operator in it, through the data layer (no operators API yet)."""
    db = Database(db_url)
    try:
        async with db.write() as c:
            for g in groups:
                await c.execute(schema.permission_groups.insert().values(id=g.id, body=msgspec.json.encode(g)))
            await c.execute(schema.operators.insert().values(
                id=oid, body=msgspec.json.encode(Operator(id=oid, groups=[g.id for g in groups]))))  # fmt: skip
        return await site.setup_code_for(db, oid)
    finally:
        await db.close()


async def test_read_only_operator_sees_no_add_button_and_a_forged_post_is_refused(tmp_path: Path) -> None:
    cfg = config(sqlite(tmp_path), tmp_path)
    async with running(cfg) as svc, chromium() as browser:
        page = await browser.new_page()
        await setup_in_browser(page, svc)
        api = await api_as_root(svc)
        assert (await api.post("/api/v1/users", json={"id": "alice", "cards": [{"card": 1001}]})).status_code == 201
        reader = PermissionGroup(id="reader", permissions=[
            grant(ObjectType.USER, Action.READ), grant(ObjectType.GROUP, Action.READ),
            grant(ObjectType.GATEWAY, Action.READ), grant(ObjectType.CREDENTIAL, Action.READ)])  # fmt: skip
        code = await _add_operator(sqlite(tmp_path), "viewer", [reader])

        ctx = await browser.new_context()
        vp = await ctx.new_page()
        await setup_in_browser(vp, svc, f"{svc.url}/setup#{code}")
        await vp.get_by_role("link", name="People").click()
        await expect(vp.get_by_role("row", name="alice")).to_contain_text("1001")
        await expect(vp.get_by_role("link", name="Add a person")).to_have_count(0)
        await expect(vp.get_by_role("button", name="Deactivate alice")).to_have_count(0)
        await expect(vp.get_by_role("link", name="Edit alice")).to_have_count(0)
        await vp.get_by_role("link", name="Groups").click()
        await expect(vp.get_by_role("link", name="Add a group")).to_have_count(0)

        # forged: the viewer's own session and CSRF token, a POST the page never offered: the API refuses
        csrf = await vp.locator("form.logout input[name=_csrf]").input_value()
        forged = {"_csrf": csrf, "id": "mallory", "card": "666", "active": "on"}
        r = await vp.request.post(f"{svc.url}/people/new", form=forged)
        assert r.status == 403 and "no permission grants create on user" in await r.text()
        r = await vp.request.post(f"{svc.url}/people/alice/active", form={"_csrf": csrf, "active": "0"})
        assert r.status == 403
        # and without the CSRF token it is refused before anything else
        r = await vp.request.post(f"{svc.url}/people/new", form={k: v for k, v in forged.items() if k != "_csrf"})
        assert r.status == 403 and "CSRF" in await r.text()
        assert (await api.get("/api/v1/users/mallory")).status_code == 404
        assert (await api.get("/api/v1/users/alice")).json()["active"] is True
        denied = [e for e in (await api.get("/api/v1/audit", params={"limit": 500})).json()["items"]
                  if e["outcome"] == "denied" and e["actor"] == "viewer"]  # fmt: skip
        # the collection-wide refusal (create on user) names no object; the update names alice
        assert {(e["action"], e["object_id"]) for e in denied} >= {("user.create", "*"), ("user.update", "alice")}

        # a POST from a page of another site (no session cookie: SameSite=Strict) goes to the login
        await ctx.clear_cookies()
        r = await vp.request.post(f"{svc.url}/people/new", form=forged, max_redirects=0)
        assert r.status == 303 and r.headers["location"].startswith("/login")
        await ctx.close()
        await api.aclose()


async def test_keyboard_only_and_a_phone_sized_screen(tmp_path: Path) -> None:
    cfg = config(sqlite(tmp_path), tmp_path)
    async with running(cfg) as svc, chromium() as browser:
        api_page = await browser.new_page()
        await setup_in_browser(api_page, svc)
        api = await api_as_root(svc)
        assert (
            await api.put(
                "/api/v1/groups/staff",
                json={"name": "Staff", "doors": [{"gateway": "gw1", "door": "front-door-of-the-main-building"}]},
            )
        ).status_code == 200
        assert (
            await api.post(
                "/api/v1/users",
                json={
                    "id": "a-rather-long-identifier-from-the-identity-manager",
                    "name": "Someone With A Very Long Name Indeed",
                    "cards": [{"card": 123456789012}],
                    "groups": ["staff"],
                },
            )
        ).status_code == 201
        db = Database(sqlite(tmp_path))
        try:
            async with db.write() as c:
                await c.execute(
                    schema.gateways.insert(),
                    [
                        {
                            "id": "gw1",
                            "online": True,
                            "last_seen": time.time(),
                            "version": 3,
                            "acked": 3,
                            "software": "edge 0.1.0",
                        },
                        {
                            "id": "gw2",
                            "online": False,
                            "last_seen": time.time() - 3600,
                            "version": 4,
                            "acked": 2,
                            "software": "",
                        },
                    ],
                )
                await c.execute(
                    schema.doors.insert(),
                    [{"gateway": "gw1", "id": "front-door-of-the-main-building"}, {"gateway": "gw2", "id": "lab"}],
                )
        finally:
            await db.close()

        ctx = await browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
        page = await ctx.new_page()
        violations = watch_csp(page)
        # keyboard alone: the login form has the focus, Tab to the password, Enter submits
        await page.goto(f"{svc.url}/login")
        assert await page.evaluate("document.activeElement.id") == "operator"
        await page.keyboard.type("root")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "password"
        await page.keyboard.type(PASSWORD)
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        await expect(page.get_by_role("row", name="gw1")).to_contain_text("online")
        await expect(page.get_by_role("row", name="gw2")).to_contain_text("2 acknowledged, 4 planned")
        assert await sideways_scroll(page) == 0
        await shot(page, tmp_path, "dashboard-375")

        # the dashboard is live (SSE): gw1 goes offline without a reload
        db = Database(sqlite(tmp_path))
        try:
            async with db.write() as c:
                await c.execute(schema.gateways.update().where(schema.gateways.c.id == "gw1").values(online=False))
        finally:
            await db.close()
        await expect(page.get_by_role("row", name="gw1")).to_contain_text("offline", timeout=5000)

        # from the top of the page, Tab reaches the skip link first, then the menu in reading order
        order = []
        await page.goto(f"{svc.url}/people")
        for _ in range(20):  # the menu has 10 entries for an administrator
            await page.keyboard.press("Tab")
            order.append(await page.evaluate("(e => e.id || e.textContent.trim())(document.activeElement)"))
        assert order[:4] == ["Skip to content", "Dashboard", "People", "Groups"], order
        assert order.index("q") < order.index("add-person"), order
        assert await sideways_scroll(page) == 0
        await shot(page, tmp_path, "people-375")
        # Enter on "Add a person", then the form in order, filled and sent with the keyboard alone
        await page.focus("#add-person")
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name="Add a person")).to_be_visible()
        await page.keyboard.press("Tab")  # skip link
        fields = []
        for _ in range(24):
            await page.keyboard.press("Tab")
            fields.append(await page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
        want = ["id", "name", "card", "active", "offline_access", "group-staff", "Add person"]
        assert [f for f in fields if f in want] == want, fields
        await page.focus("#id")
        await page.keyboard.type("kb")
        await page.keyboard.press("Tab")
        await page.keyboard.type("Keyboard User")
        await page.keyboard.press("Tab")
        await page.keyboard.type("4242")
        await page.keyboard.press("Tab")  # activate: already checked
        await page.keyboard.press("Tab")
        await page.keyboard.press("Space")  # offline access
        await page.keyboard.press("Tab")
        await page.keyboard.press("Space")  # staff
        assert await sideways_scroll(page) == 0
        await shot(page, tmp_path, "person-form-375")
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("status")).to_have_text("The person was added.")
        u = (await api.get("/api/v1/users/kb")).json()
        assert u["offline_access"] and u["groups"] == ["staff"] and u["cards"][0]["card"] == 4242
        for path in ("/", "/people", "/groups", "/people/kb", "/people/new", "/groups/staff"):
            await page.goto(f"{svc.url}{path}")
            assert await sideways_scroll(page) == 0, path
            assert await low_contrast(page) == [], path
        await shot(page, tmp_path, "groups-375")
        assert violations == []
        await ctx.close()
        await api.aclose()
        await asyncio.sleep(0)

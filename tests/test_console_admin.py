"""The console's administration pages in Debian's chromium: the bulk import wizard (one bad row: the report
names it, nothing applied; then a good file whose people are granted at a simulated gateway on a real
Mosquitto), a permission group with a deny line (the page hides it, the API refuses it), the schedule editor
with holidays, a person's assignments with windows and effective access, delete, API tokens, the audit log."""

# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

import httpx
from playwright.async_api import Page, expect

from cloud_bridge.service.app import init_site

from .broker import broker  # noqa: F401
from .console_browser import chromium, shot, sideways_scroll, watch_csp
from .mosquitto import Mosquitto
from .service_harness import PASSWORD, config, running
from .test_console_pages import api_as_root, root_in_browser, setup_in_browser, sqlite
from .test_operator_e2e import GW, agent_running, sock_dir, tap_card  # noqa: F401
from .test_service_e2e import _public_key

BAD = "User id,Full name,Card ID,Access groups\nalice,Alice,1001,staff\nbob,Bob,12x,staff\n"
GOOD = "User id,Full name,Card ID,Access groups\nalice,Alice,1001,staff\nbob,Bob,1002,staff\n"


async def _upload(page: Page, svc_url: str, text: str) -> None:
    await page.goto(f"{svc_url}/import")
    await page.get_by_label("CSV file").set_input_files(
        files=[{"name": "people.csv", "mimeType": "text/csv", "buffer": text.encode()}])  # fmt: skip
    await page.get_by_role("button", name="Upload").click()
    await expect(page.get_by_role("heading", name="Status: uploaded, not checked yet")).to_be_visible()
    # the columns were recognised by their names
    await expect(page.get_by_label("Card ID")).to_have_value("Card ID")
    await expect(page.get_by_label("User id")).to_have_value("User id")


async def test_bulk_import_bad_row_then_good_file_granted_at_the_gateway(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path
) -> None:
    url = sqlite(tmp_path)
    cfg = config(url, tmp_path)
    await init_site(cfg, site_id="s1", admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    pub = await _public_key(url)
    async with (
        agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent,
        running(cfg, provisioning=True, init=False) as svc,
        chromium() as browser,
    ):
        page, violations = await root_in_browser(browser, svc, url)
        await expect(page.get_by_role("row", name=GW)).to_contain_text("online", timeout=30_000)
        api = await api_as_root(svc)
        assert (
            await api.put("/api/v1/groups/staff", json={"doors": [{"gateway": GW, "door": "door1"}]})
        ).status_code == 200

        await page.get_by_role("link", name="Import").click()
        await _upload(page, svc.url, BAD)
        await page.get_by_role("button", name="Check every row (dry-run)").click()
        status = page.locator("#import-status")
        await expect(status).to_contain_text("some rows are bad: nothing was applied", timeout=20_000)
        row = page.locator("#import-report tbody tr")
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text("3")  # the file's line
        await expect(row).to_contain_text("card")
        await expect(row).to_contain_text("Card ID")
        await expect(row).to_contain_text("card ID '12x' is not numeric")
        await expect(page.get_by_role("button", name="Import 2 people")).to_have_count(0)  # nothing to commit
        await shot(page, tmp_path, "import-report-1280")
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await sideways_scroll(page) == 0
        await shot(page, tmp_path, "import-report-390")
        await page.set_viewport_size({"width": 1280, "height": 900})
        assert (await api.get("/api/v1/users")).json()["items"] == []  # nothing applied

        await _upload(page, svc.url, GOOD)
        await page.get_by_role("button", name="Check every row (dry-run)").click()
        await expect(status).to_contain_text("every row is good", timeout=20_000)
        await page.get_by_role("button", name="Import 2 people").click()
        await expect(page.locator("#import-result")).to_contain_text(f"2 people imported. {GW}: version",
                                                                     timeout=60_000)  # fmt: skip
        await shot(page, tmp_path, "import-done-1280")
        d = await tap_card(agent, 1002)
        assert d.granted and d.user == "bob"
        assert violations == []
        await api.aclose()


async def test_permission_group_with_a_deny_line_hides_and_refuses(tmp_path: Path) -> None:
    cfg = config(sqlite(tmp_path), tmp_path)
    async with running(cfg) as svc, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        violations = watch_csp(page)
        await setup_in_browser(page, svc)
        api = await api_as_root(svc)
        assert (await api.post("/api/v1/users", json={"id": "alice", "cards": [{"card": 7}]})).status_code == 201

        # the line editor: grant user create/read/update/delete, deny user delete
        await page.get_by_role("link", name="Permissions").click()
        await page.get_by_role("link", name="Add a permission group").click()
        await page.get_by_label("Id").fill("clerks")
        await page.get_by_label("Name", exact=True).fill("Clerks")
        await page.get_by_label("Object type (line 1)").select_option("user")
        for a in ("create", "read", "update", "delete"):
            await page.get_by_label(f"{a} (line 1)", exact=True).check()
        await page.get_by_label("Grant or deny (line 2)").select_option("deny")
        await page.get_by_label("Object type (line 2)").select_option("user")
        await page.get_by_label("delete (line 2)", exact=True).check()
        await page.get_by_label("Your password").fill("not my password")
        await page.get_by_role("button", name="Add permission group").click()
        await expect(page.get_by_role("alert")).to_have_text("Your password was not right.")
        await expect(page.get_by_label("delete (line 2)", exact=True)).to_be_checked()  # the lines stay
        await page.get_by_label("Your password").fill(PASSWORD)
        await page.get_by_role("button", name="Add permission group").click()
        await expect(page.get_by_role("status")).to_have_text("The permission group was added.")
        await expect(page.get_by_role("row", name="clerks")).to_contain_text("deny user delete")
        await shot(page, tmp_path, "permission-groups-1280")

        await page.get_by_role("link", name="Operators").click()
        await page.get_by_role("link", name="Add an operator").click()
        await page.get_by_label("Id").fill("clerk")
        await page.get_by_label("clerks").check()
        await page.get_by_label("Your password").fill(PASSWORD)
        await page.get_by_role("button", name="Add operator").click()
        link = await page.locator("#setup-link").inner_text()
        assert "/setup#" in link

        ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
        clerk = await ctx.new_page()
        await setup_in_browser(clerk, svc, f"{svc.url}/setup#{link.partition('#')[2]}")
        await clerk.goto(f"{svc.url}/people")
        await expect(clerk.get_by_role("row", name="alice")).to_be_visible()
        await expect(clerk.get_by_role("link", name="Operators")).to_have_count(0)  # no operator rights
        await clerk.goto(f"{svc.url}/people/alice/access")
        await expect(clerk.get_by_role("heading", name="Access of alice")).to_be_visible()
        await expect(clerk.get_by_role("link", name="Delete alice")).to_have_count(0)  # hidden by the deny line
        await expect(clerk.get_by_role("button", name="Assign")).to_be_visible()  # update is granted
        # the API refuses it all the same: a forged request from the clerk's own session
        me = await clerk.request.get(f"{svc.url}/api/v1/auth/me")
        csrf = (await me.json())["csrf_token"]
        r = await clerk.request.delete(f"{svc.url}/api/v1/users/alice", headers={"x-csrf-token": csrf})
        assert r.status == 403 and (await r.json())["missing"]["action"] == "delete"
        r = await clerk.request.post(f"{svc.url}/people/alice/delete", form={"_csrf": csrf})
        assert r.status == 403
        assert (await api.get("/api/v1/users/alice")).status_code == 200
        await ctx.close()
        assert violations == []
        await api.aclose()


async def test_schedules_assignments_access_delete_tokens_and_audit_pages(tmp_path: Path) -> None:
    cfg = config(sqlite(tmp_path), tmp_path)
    async with running(cfg) as svc, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        violations = watch_csp(page)
        await setup_in_browser(page, svc)
        api = await api_as_root(svc)

        # the weekly editor with holidays: a bad interval names its day, nothing saved
        await page.get_by_role("link", name="Schedules").click()
        await page.get_by_role("link", name="Add a schedule").click()
        await page.get_by_label("Id", exact=True).fill("office")
        await page.get_by_label("Name", exact=True).fill("Office hours")
        for day in ("Monday", "Tuesday", "Wednesday", "Thursday"):
            await page.get_by_label(day, exact=True).fill("08:00-12:00, 13:00-18:00")
        await page.get_by_label("Friday", exact=True).fill("18:00-08:00")
        await page.get_by_label("Dates").fill("2026-12-24\n2026-12-25")
        await page.get_by_label("Open on holidays").fill("10:00-12:00")
        await page.get_by_role("button", name="Add schedule").click()
        await expect(page.get_by_role("alert")).to_contain_text("start 18:00 must be before end 08:00")
        await expect(page.get_by_label("Friday", exact=True)).to_have_attribute("aria-invalid", "true")
        assert (await api.get("/api/v1/schedules/office")).status_code == 404
        await page.get_by_label("Friday", exact=True).fill("08:00-16:00")
        await page.get_by_role("button", name="Add schedule").click()
        await expect(page.get_by_role("status")).to_have_text("The schedule was added.")
        await expect(page.get_by_role("row", name="office")).to_contain_text("Mon 08:00-12:00, 13:00-18:00")
        s = (await api.get("/api/v1/schedules/office")).json()
        assert len(s["intervals"]) == 9 and s["holidays"] == ["2026-12-24", "2026-12-25"]
        await shot(page, tmp_path, "schedules-1280")

        # a group limited by it, through the group form
        await page.get_by_role("link", name="Groups", exact=True).click()
        await page.get_by_role("link", name="Add a group").click()
        await page.get_by_label("Id", exact=True).fill("staff")
        await page.get_by_label("Schedule").select_option("office")
        await page.get_by_label("Other doors").fill("gw1/front\ngw2/gate")
        await page.get_by_role("button", name="Add group").click()
        await expect(page.get_by_role("row", name="staff")).to_contain_text("office")
        assert (await api.get("/api/v1/groups/staff")).json()["schedule"] == "office"
        assert (
            await api.put("/api/v1/groups/night", json={"doors": [{"gateway": "gw1", "door": "back"}]})
        ).status_code == 200
        assert (
            await api.post("/api/v1/users", json={"id": "alice", "cards": [{"card": 1001}], "groups": ["staff"]})
        ).status_code == 201

        # a person's assignments with a window, effective access, delete (card freed)
        await page.goto(f"{svc.url}/people")
        await page.get_by_role("link", name="Access of alice").click()
        access = page.locator("#access")
        await expect(access.get_by_role("row", name="gw1/front")).to_contain_text("Mon 08:00-12:00")
        await expect(access.get_by_role("row", name="gw2/gate")).to_contain_text("2 holiday(s): 10:00-12:00")
        await page.get_by_label("Add to group").select_option("night")
        await page.get_by_label("From").fill("2030-01-01T08:00")
        await page.get_by_label("Until").fill("2030-01-31T18:00")
        await page.get_by_role("button", name="Assign").click()
        await expect(page.get_by_role("status")).to_have_text("The assignment was added.")
        night = access.get_by_role("row", name="gw1/back")
        await expect(night).to_contain_text("2030-01-01 08:00:00")
        await expect(night).to_contain_text("not now")
        await shot(page, tmp_path, "person-access-1280")
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await sideways_scroll(page) == 0
        await page.set_viewport_size({"width": 1280, "height": 900})
        await page.get_by_role("link", name="Delete alice").click()
        await page.get_by_role("button", name="Delete alice now").click()
        await expect(page.get_by_role("status")).to_have_text("The person was deleted.")
        assert (await api.post("/api/v1/users", json={"id": "bob", "cards": [{"card": 1001}]})).status_code == 201

        # an API token: shown once, works, revoked
        await page.get_by_role("link", name="API tokens").click()
        await page.get_by_label("Name").fill("idm")
        await page.get_by_role("button", name="Create token").click()
        token = await page.locator("#new-token").inner_text()
        assert token.startswith("cbt_")
        r = await page.request.get(f"{svc.url}/api/v1/users", headers={"authorization": f"Bearer {token}"})
        assert r.status == 200
        await page.goto(f"{svc.url}/tokens")
        await expect(page.locator("#new-token")).to_have_count(0)  # never shown again
        await page.get_by_role("button", name="Revoke idm").click()
        await expect(page.get_by_role("row", name="idm")).to_contain_text("revoked")
        async with httpx.AsyncClient(base_url=svc.url) as t:
            assert (await t.get("/api/v1/users", headers={"authorization": f"Bearer {token}"})).status_code == 401

        # the audit log with a filter, and its CSV export
        await page.get_by_role("link", name="Audit log").click()
        await page.get_by_label("Action").fill("user.*")
        await page.get_by_role("button", name="Filter").click()
        rows = page.locator("#audit tbody tr")
        await expect(rows.first).to_contain_text("user.create")
        await expect(page.locator("#audit")).to_contain_text("user.delete")
        await expect(page.locator("#audit")).not_to_contain_text("schedule.create")
        async with page.expect_download() as dl:
            await page.get_by_role("link", name="Export CSV").click()
        path = await (await dl.value).path()
        text = Path(path).read_text()
        assert text.startswith("id,time_utc,actor") and "user.delete" in text and "schedule.create" not in text
        await shot(page, tmp_path, "audit-1280")
        assert violations == []
        await api.aclose()

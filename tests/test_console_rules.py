"""The console's "Areas & rules" page (issue 19) in Debian's chromium, on SQLite, with a simulated gateway on a
real Mosquitto: a bad area is refused with the field named and nothing stored, an area is added and edited
through the page (checked in the API), a door's hard anti-passback holds a user at the gateway (real pin
edges), and the page's reset lets the user through again (the gateway's answer shown, the audit log has it);
an operator who may only read gateways sees the rules without the forms, and the reset is refused to them."""

# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

from playwright.async_api import expect

from cloud_bridge.service.app import init_site

from .broker import broker  # noqa: F401
from .console_browser import chromium, shot, sideways_scroll, watch_csp
from .mosquitto import Mosquitto
from .service_harness import PASSWORD, config, running
from .test_console_pages import api_as_root, log_in, root_setup_code, setup_in_browser, sqlite
from .test_operator_e2e import GW, agent_running, sock_dir, tap_card  # noqa: F401
from .test_rules_agent import walk_through
from .test_service_e2e import _public_key
from .test_service_events_e2e import VIEWER, add_operator


async def test_area_added_and_edited_on_the_page_and_a_user_reset(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path
) -> None:
    url = sqlite(tmp_path)
    cfg = config(url, tmp_path)
    await init_site(cfg, site_id="s1", admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    pub = await _public_key(url)
    await add_operator(url, cfg, "guard", VIEWER)
    async with (
        agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent,
        running(cfg, provisioning=True, init=False) as svc,
        chromium() as browser,
    ):
        code = await root_setup_code(url)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        violations = watch_csp(page)
        r0 = await page.goto(f"{svc.url}/rules")  # not logged in: to the login page
        assert r0 is not None and page.url.startswith(f"{svc.url}/login")
        await setup_in_browser(page, svc, f"{svc.url}/setup#{code}")
        await expect(page.get_by_role("row", name=GW)).to_contain_text("online", timeout=30_000)
        api = await api_as_root(svc)
        assert (await api.put("/api/v1/groups/staff", json={"doors": [{"gateway": GW, "door": "door1"}]})
                ).status_code == 200  # fmt: skip
        assert (await api.post("/api/v1/users", json={"id": "alice", "cards": [{"card": 1001}],
                                                       "groups": ["staff"]})).status_code == 201  # fmt: skip

        await page.get_by_role("link", name="Areas & rules").click()
        await expect(page.get_by_role("heading", name="Areas & rules", exact=True)).to_be_visible()
        await expect(page.get_by_text("No areas yet.")).to_be_visible()
        # bad input: the API's refusal names the field, nothing stored, the form keeps what was typed
        await page.get_by_label("Area id").fill("building")
        await page.get_by_label("Anti-passback", exact=True).select_option("hard")
        await page.get_by_label("Occupancy max").fill("0")
        await page.get_by_role("button", name="Add area").click()
        await expect(page.locator("#form-errors")).to_contain_text("Occupancy max: Expected `int` >= 1")
        await expect(page.get_by_label("Occupancy max")).to_have_value("0")
        assert (await api.get("/api/v1/areas")).json() == []
        # a good area
        await page.get_by_label("Name", exact=True).fill("Main building")
        await page.get_by_label("Occupancy max").fill("10")
        await page.get_by_label("staff", exact=True).check()
        await page.get_by_role("button", name="Add area").click()
        await expect(page.get_by_role("status")).to_contain_text("Area building saved")
        row = page.get_by_role("row", name="Main building")
        await expect(row).to_contain_text("hard")
        await expect(row).to_contain_text("10")
        area = (await api.get("/api/v1/areas/building")).json()
        assert (area["name"], area["anti_passback"], area["max_occupancy"], area["exempt_groups"]) == (
            "Main building", "hard", 10, ["staff"])  # fmt: skip
        # edit: the form is filled from the area; staff no longer exempt, a nightly reset
        await page.get_by_role("link", name="Edit area building").click()
        await expect(page.get_by_role("heading", name="Edit area building")).to_be_visible()
        await expect(page.get_by_label("Occupancy max")).to_have_value("10")
        await expect(page.get_by_label("Anti-passback", exact=True)).to_have_value("hard")
        await page.get_by_label("staff", exact=True).uncheck()
        await page.get_by_label("Occupancy max").fill("20")
        await page.get_by_label("Nightly reset at").fill("03:00")
        await page.get_by_role("button", name="Save area").click()
        await expect(page.get_by_role("status")).to_contain_text("Area building saved")
        area = (await api.get("/api/v1/areas/building")).json()
        assert (area["max_occupancy"], area["exempt_groups"], area["reset_daily"]) == (20, [], "03:00")

        # the door leads into the area: listed on the page, enforced at the gateway
        r = await api.put(f"/api/v1/gateways/{GW}/doors/door1/rules", json={"to_area": "building"})
        assert r.status_code == 200, r.text
        r = await api.post("/api/v1/publish", params={"timeout": 30})
        assert isinstance(r.json()["gateways"][GW], int), r.text
        await page.goto(f"{svc.url}/rules")
        await expect(page.get_by_role("row", name=f"{GW}/door1")).to_contain_text("building")
        assert (await tap_card(agent, 1001)).granted
        await walk_through(agent.cfg, "door1")
        assert (await tap_card(agent, 1001)).reason.value == "anti_passback"

        # the reset of one user, from the page: the gateway's answer shown, the user passes again
        await page.get_by_label("User id").fill("alice")
        await page.get_by_role("button", name="Reset anti-passback").click()
        await expect(page.get_by_role("status")).to_contain_text(f"Anti-passback reset for user alice. {GW}: ok",
                                                                 timeout=30_000)  # fmt: skip
        assert (await tap_card(agent, 1001)).granted
        audit = (await api.get("/api/v1/audit", params={"action": "area.reset"})).json()["items"]
        assert audit and audit[0]["after"]["user"] == "alice" and audit[0]["outcome"] == "ok"
        await shot(page, tmp_path, "rules-1280")
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await sideways_scroll(page) == 0
        await shot(page, tmp_path, "rules-390")
        assert violations == []

        # read only: the rules shown, no forms; a reset sent all the same is the API's refusal, not audited
        guard = await (await browser.new_context()).new_page()
        await log_in(guard, svc, "guard", PASSWORD)
        await guard.get_by_role("link", name="Areas & rules").click()
        await expect(guard.get_by_role("row", name="Main building")).to_contain_text("hard")
        await expect(guard.get_by_role("row", name=f"{GW}/door1")).to_contain_text("building")
        for name in ("Add area", "Reset anti-passback"):
            await expect(guard.get_by_role("button", name=name)).to_have_count(0)
        await expect(guard.get_by_role("link", name="Edit area building")).to_have_count(0)
        token = (await (await guard.request.get(f"{svc.url}/api/v1/auth/me")).json())["csrf_token"]
        r2 = await guard.request.post(f"{svc.url}/rules/reset", form={"_csrf": token, "user": "alice"})
        assert r2.status == 403 and "update" in await r2.text()
        r2 = await guard.request.post(f"{svc.url}/rules/areas", form={"_csrf": token, "id": "x"})
        assert r2.status == 403
        r2 = await guard.request.post(f"{svc.url}/rules/reset", form={"user": "alice"})  # no CSRF token
        assert r2.status == 403
        assert len((await api.get("/api/v1/audit", params={"action": "area.reset"})).json()["items"]) == 1
        assert (await api.get("/api/v1/areas")).json()[0]["id"] == "building"
        await api.aclose()

"""The gateway detail page in a real browser (Debian's chromium), against a running service, a real Mosquitto
and the running simulated gateway: linked from the dashboard; its doors and readers from the birth, online,
software, rights versions, journal depth; the command key in step with the service's; "Test connection"
and "Refresh" are the signed rebirth command and show the gateway's answer (and its new birth); an
operator without publish permission sees neither and the API refuses both; the main pages at 390 and
1280 px without sideways scroll. On SQLite and PostgreSQL."""

# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

from playwright.async_api import expect
from sqlalchemy import select

from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.signing import fingerprint

from .broker import broker  # noqa: F401
from .console_browser import chromium, shot, sideways_scroll
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, config, running
from .test_console_admin import BAD, _upload
from .test_console_pages import api_as_root, log_in, root_in_browser
from .test_operator_e2e import GW, agent_running, sock_dir  # noqa: F401
from .test_service_events_e2e import VIEWER, add_operator, started


async def _audit(url: str, action: str) -> list[tuple[str, str, str]]:
    db = Database(url)
    try:
        async with db.read() as c:
            a = schema.audit_log
            rows = (await c.execute(select(a.c.actor, a.c.object_id, a.c.outcome).where(a.c.action == action))).all()
    finally:
        await db.close()
    return [tuple(r) for r in rows]


async def test_gateway_detail_page_test_connection_and_refresh(broker: Mosquitto, db_url: str, tmp_path: Path,
                                                              sock_dir: Path) -> None:  # fmt: skip
    url = db_url
    cfg = config(url, tmp_path)
    pub = await started(url, cfg, broker)
    await add_operator(url, cfg, "guard", VIEWER)
    async with (
        running(cfg, provisioning=True, init=False) as svc,
        agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub),
        chromium() as browser,
    ):
        page, violations = await root_in_browser(browser, svc, url)
        await expect(page.get_by_role("row", name=GW)).to_contain_text("online", timeout=30_000)

        # from the dashboard's gateway list to the gateway's page
        await page.get_by_role("link", name=GW, exact=True).click()
        await expect(page.get_by_role("heading", name=f"Gateway {GW}")).to_be_visible()
        status = page.locator("#gateway-status")
        await expect(status).to_contain_text("online")
        await expect(status).to_contain_text("acknowledged")
        await expect(status).to_contain_text("Journal depth")
        await expect(status).to_contain_text("plain MQTT (no TLS)")  # the test broker has no TLS; the birth says so
        await expect(status.locator("tr").nth(2)).not_to_contain_text("not reported")  # its software
        await expect(page.locator("#gwdoor-door1")).to_contain_text("door1")
        readers = page.locator("#gateway-readers tbody tr")
        assert await readers.count() >= 1
        key = page.locator("#gateway-key")
        fp = fingerprint(bytes.fromhex(pub))
        await expect(key).to_contain_text("in step")
        await expect(key.locator("tr").nth(1)).to_contain_text(fp)  # the gateway's key, from its birth
        await expect(key.locator("tr").nth(2)).to_contain_text(fp)  # the service's
        await expect(key).to_contain_text("none pending")

        # test connection: the signed rebirth command, the gateway's answer
        await page.get_by_role("button", name="Test connection").click()
        result = page.locator("#gateway-result")
        await expect(result).to_contain_text("Test connection: the gateway answered the signed command",
                                             timeout=30_000)  # fmt: skip
        await expect(result).to_contain_text(" ms")
        # refresh: the same command, and the birth it sends again
        await page.get_by_role("button", name="Refresh").click()
        await expect(result).to_contain_text("Refresh: the gateway answered the signed command", timeout=30_000)
        await expect(result).to_contain_text("announced itself again")
        await shot(page, tmp_path, "gateway-1280")
        assert await _audit(url, "gateway.test") == [("root", GW, "ok")]
        assert await _audit(url, "gateway.refresh") == [("root", GW, "ok")]

        # the main pages at a phone's width and a desktop's, with something in them: no sideways scroll
        api = await api_as_root(svc)
        try:
            r0 = await api.put("/api/v1/groups/staff", json={"name": "Staff at the front door",
                                                              "doors": [{"gateway": GW, "door": "door1"}]})  # fmt: skip
            assert r0.status_code == 200
            for i in range(5):
                r0 = await api.put(f"/api/v1/users/person-with-a-long-id-{i}", json={
                    "name": f"Person {i} with a rather long name", "groups": ["staff"],
                    "cards": [{"card": 900000 + i}]})  # fmt: skip
                assert r0.status_code == 200, r0.text
        finally:
            await api.aclose()
        await _upload(page, svc.url, BAD)
        await page.get_by_role("button", name="Check every row (dry-run)").click()
        await expect(page.locator("#import-status")).to_contain_text("some rows are bad", timeout=20_000)
        report = page.url.removeprefix(svc.url)
        for width in (390, 1280):
            await page.set_viewport_size({"width": width, "height": 800})
            for path in ("/", "/people", f"/gateways/{GW}", "/visitors", report, "/doors"):
                await page.goto(f"{svc.url}{path}")
                await page.wait_for_load_state("networkidle")
                assert await sideways_scroll(page) == 0, (path, width)
        await page.goto(f"{svc.url}/gateways/{GW}")
        await shot(page, tmp_path, "gateway-390")
        assert violations == []

        # an unknown gateway: the API's 404 on the page
        r = await page.goto(f"{svc.url}/gateways/nosuch")
        assert r is not None and r.status == 404

        # an operator without publish: the page, no buttons; the API refuses both all the same
        ctx = await browser.new_context()
        guard = await ctx.new_page()
        await log_in(guard, svc, "guard", PASSWORD)
        await guard.goto(f"{svc.url}/gateways/{GW}")
        await expect(guard.locator("#gateway-status")).to_contain_text("online")
        await expect(guard.get_by_role("button", name="Test connection")).to_have_count(0)
        await expect(guard.get_by_role("button", name="Refresh")).to_have_count(0)
        token = (await (await guard.request.get(f"{svc.url}/api/v1/auth/me")).json())["csrf_token"]
        r2 = await guard.request.post(f"{svc.url}/api/v1/gateways/{GW}/test", headers={"x-csrf-token": token})
        assert r2.status == 403 and "publish (rebirth) on gateway gw1" in (await r2.json())["detail"]
        r2 = await guard.request.post(f"{svc.url}/gateways/{GW}/refresh", form={"_csrf": token})
        assert r2.status == 403
        # a page POST without the session's CSRF token is refused before anything is sent
        r2 = await guard.request.post(f"{svc.url}/gateways/{GW}/test", form={"_csrf": "forged"})
        assert r2.status == 403
        assert ("guard", GW, "denied") in await _audit(url, "gateway.rebirth")  # the refusals are audited
        assert await _audit(url, "gateway.test") == [("root", GW, "ok")]  # nothing more was sent
        await ctx.close()
        await page.close()

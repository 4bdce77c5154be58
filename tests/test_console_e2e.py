"""End to end through the console: a person added with a card and a group in the browser, published from
the dashboard (the existing planner, signed with the site key), is granted at a real simulated gateway on a
real Mosquitto; deactivated in the browser and published again, the card is refused."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
from pathlib import Path

from playwright.async_api import expect

from cloud_bridge.service.app import init_site

from .broker import broker  # noqa: F401
from .console_browser import chromium, shot, watch_csp
from .mosquitto import Mosquitto
from .service_harness import config, running
from .test_console_pages import root_setup_code, setup_in_browser, sqlite
from .test_operator_e2e import GW, agent_running, sock_dir, tap_card  # noqa: F401
from .test_service_e2e import _public_key


async def test_a_person_added_in_the_console_is_granted_at_the_gateway(
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
        code = await root_setup_code(url)
        page = await browser.new_page()
        violations = watch_csp(page)
        await setup_in_browser(page, svc, f"{svc.url}/setup#{code}")
        # the gateway's birth shows on the dashboard on its own (SSE), with the door it announced
        row = page.get_by_role("row", name=GW)
        await expect(row).to_contain_text("online", timeout=30_000)
        await expect(row).to_contain_text("door1")

        # a group that opens the door the gateway announced (offered as a checkbox)
        await page.get_by_role("link", name="Groups").click()
        await page.get_by_role("link", name="Add a group").click()
        await page.get_by_label("Id").fill("staff")
        await page.get_by_label(f"{GW}/door1").check()
        await page.get_by_role("button", name="Add group").click()
        await expect(page.get_by_role("status")).to_have_text("The group was added.")

        await page.get_by_role("link", name="People").click()
        await page.get_by_role("link", name="Add a person").click()
        await page.get_by_label("Id", exact=False).first.fill("alice")
        await page.get_by_label("Card ID").fill("1001")
        await page.get_by_label("staff").check()
        await page.get_by_role("button", name="Add person").click()
        await expect(page.get_by_role("status")).to_have_text("The person was added.")

        await page.get_by_role("link", name="Dashboard").click()
        await page.get_by_role("button", name="Publish changes to the gateways").click()
        await expect(page.locator("#publish-result")).to_contain_text(f"{GW}: version", timeout=40_000)
        await shot(page, tmp_path, "dashboard-published-1280")
        d = await tap_card(agent, 1001)
        assert d.granted and d.user == "alice"

        # deactivated in the console: refused at the door after the next publish
        await page.get_by_role("link", name="People").click()
        await page.get_by_role("button", name="Deactivate alice").click()
        await expect(page.get_by_role("row", name="alice")).to_contain_text("deactivated")
        await page.get_by_role("link", name="Dashboard").click()
        await page.get_by_role("button", name="Publish changes to the gateways").click()
        await expect(page.locator("#publish-result")).to_contain_text(f"{GW}: version", timeout=40_000)
        assert (await tap_card(agent, 1001)).reason.value == "user_inactive"
        assert violations == []
        await page.close()
        await asyncio.sleep(0)

"""The doors, events and alarms pages in a real browser (Debian's chromium), against a running service, a real
Mosquitto and the running simulated gateway: unlock from the doors page (confirmation naming the door, the
signed command's answer shown) moves the gateway's relay; the door driven open without a grant raises a
forced alarm, acknowledged with a comment on the alarms page; the dashboard shows the doors and open
alarms; the events page filters and exports CSV; an operator without publish permission sees no "Unlock"
and the API refuses it."""

# ruff: noqa: F811

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from playwright.async_api import expect

from edge.sim.hands import set_contact

from .broker import broker  # noqa: F401
from .console_browser import chromium, shot, sideways_scroll
from .mosquitto import Mosquitto
from .service_harness import PASSWORD, config, running
from .test_console_pages import log_in, root_in_browser, sqlite
from .test_operator_e2e import GW, agent_running, sock_dir, tap_card  # noqa: F401
from .test_service_events_e2e import VIEWER, add_operator, started


async def test_doors_events_and_alarms_pages(broker: Mosquitto, tmp_path: Path, sock_dir: Path) -> None:
    url = sqlite(tmp_path)
    cfg = config(url, tmp_path)
    pub = await started(url, cfg, broker)
    await add_operator(url, cfg, "guard", VIEWER)
    async with (
        running(cfg, provisioning=True, init=False) as svc,
        agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent,
        chromium() as browser,
    ):
        page, violations = await root_in_browser(browser, svc, url)

        # the doors page: the door the gateway announced; unlock with a confirmation naming it
        await page.get_by_role("link", name="Doors", exact=True).click()
        row = page.locator(f"#door-{GW}-door1")
        await expect(row).to_contain_text("door1", timeout=30_000)
        await shot(page, tmp_path, "doors-1280")
        await row.get_by_role("link", name="Unlock door1").click()
        await expect(page.get_by_role("heading", name=f"Unlock door door1 on gateway {GW}?")).to_be_visible()
        await page.get_by_label("Unlock for (seconds)").fill("3")
        await page.get_by_role("button", name=f"Confirm: unlock door door1 on gateway {GW}").click()
        result = page.locator("#command-result")
        await expect(result).to_contain_text(f"Unlock door door1 on gateway {GW}: the gateway carried out the signed "
                                             "command", timeout=40_000)  # fmt: skip
        assert agent.doors["door1"].relay_energised  # the relay moved
        await expect(page.locator(f"#door-{GW}-door1")).to_contain_text("unlocked", timeout=15_000)
        await shot(page, tmp_path, "doors-unlocked-1280")

        # a door driven open without a grant: forced, an alarm on the dashboard and the alarms page
        await expect(page.locator(f"#door-{GW}-door1 td[data-label=Lock]")).to_have_text("locked", timeout=15_000)
        set_contact(agent, "door1", opened=True)
        await page.get_by_role("link", name="Dashboard").click()
        await expect(page.locator("#alarms-open")).to_contain_text(f"forced {GW}/door1", timeout=20_000)
        await expect(page.locator("#doors-live")).to_contain_text("forced open")
        await shot(page, tmp_path, "dashboard-alarm-1280")
        set_contact(agent, "door1", opened=False)
        await page.get_by_role("link", name="Alarms", exact=True).click()
        alarm_row = page.locator("#alarms-table tbody tr").filter(has_text="forced")
        await expect(alarm_row).to_have_count(1)
        await alarm_row.get_by_role("textbox").fill("Checked on camera: the wind")
        await alarm_row.get_by_role("button", name="Acknowledge").click()
        await expect(page.get_by_role("status")).to_have_text("The alarm was acknowledged.")
        await expect(alarm_row).to_contain_text("acknowledged by root")
        await expect(alarm_row).to_contain_text("Checked on camera: the wind")
        await shot(page, tmp_path, "alarms-1280")

        # a denied tap shows in the dashboard's live events (SSE), then on the events page, filtered; the CSV
        await page.get_by_role("link", name="Dashboard").click()
        await expect(page.locator("#live-events")).to_be_attached()
        await page.wait_for_timeout(500)  # the EventSource connects
        assert not (await tap_card(agent, 7777)).granted
        await expect(page.locator("#live-events")).to_contain_text("card 7777", timeout=15_000)
        await expect(page.locator("#live-events")).to_contain_text("access.denied")
        await page.get_by_role("link", name="Events", exact=True).click()
        await page.get_by_label("Kind (e.g. access.*, door.forced_open)").fill("access.*")
        await page.get_by_label("Result").select_option("denied")
        await page.get_by_role("button", name="Show").click()
        # the filter's GET has landed before any reload (a reload during that navigation loses the page)
        await expect(page).to_have_url(re.compile(r"/events\?.*result=denied"))
        filtered = page.url

        async def shown() -> None:
            await page.goto(filtered)
            await expect(page.locator("#events-table")).to_contain_text("card 7777", timeout=1_000)

        for _ in range(20):
            try:
                await shown()
                break
            except AssertionError:
                continue
        await expect(page.locator("#events-table")).to_contain_text("access.denied")
        await expect(page.locator("#events-table")).not_to_contain_text("door.forced_open")
        await shot(page, tmp_path, "events-1280")
        href = await page.locator("#csv").get_attribute("href")
        assert href is not None
        r = await page.request.get(f"{svc.url}{href}")
        assert r.ok and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(await r.text())))
        assert rows and all(x["type"] == "access.denied" for x in rows) and "7777" in {x["card"] for x in rows}
        await page.set_viewport_size({"width": 390, "height": 800})
        for path in ("/doors", "/events", "/alarms"):
            await page.goto(f"{svc.url}{path}")
            assert await sideways_scroll(page) == 0, path
        assert violations == []

        # an operator without publish: no unlock offered; the API refuses it all the same
        ctx = await browser.new_context()
        guard = await ctx.new_page()
        await log_in(guard, svc, "guard", PASSWORD)
        await guard.goto(f"{svc.url}/doors")
        await expect(guard.locator(f"#door-{GW}-door1")).to_contain_text("door1")
        await expect(guard.get_by_role("link", name="Unlock door1")).to_have_count(0)
        await expect(guard.get_by_role("link", name=f"Lock down gateway {GW}")).to_have_count(0)
        token = (await (await guard.request.get(f"{svc.url}/api/v1/auth/me")).json())["csrf_token"]
        r = await guard.request.post(f"{svc.url}/api/v1/doors/{GW}/door1/unlock", data={"seconds": 2},
                                     headers={"x-csrf-token": token})  # fmt: skip
        assert r.status == 403 and "publish (unlock) on door gw1/door1" in (await r.json())["detail"]
        # a forged form post to the page is refused by the API too
        r = await guard.request.post(f"{svc.url}/doors/{GW}/door1/unlock", form={"_csrf": token, "seconds": "2"})
        assert r.status == 403
        assert not agent.doors["door1"].relay_energised
        await ctx.close()
        await page.close()

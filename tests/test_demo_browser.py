"""The newcomer's flow, in a browser, against the real `cloud-bridge demo` process (README's first command):
open the printed setup link, choose the password, see the site and its gateway online; add a person with a
card in the demo's Staff group and publish; tap that card at the simulated door with the command the demo
printed, and see it granted in the dashboard's live events; Ctrl-C leaves nothing running."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
from playwright.async_api import expect

from cloud_bridge.service.demo import GATEWAY

from .console_browser import chromium, shot, sideways_scroll, watch_csp
from .test_demo import ROOT, demo, port_free, processes_using

pytestmark = pytest.mark.timeout(300)
PASSWORD = "the newcomer's first password"


async def test_newcomer_sees_the_site_adds_a_person_taps_and_sees_it_granted(tmp_path: Path) -> None:
    async with demo(tmp_path) as run:
        broker_port = int((await run.until(r"mosquitto on 127\.0\.0\.1:(\d+)"))[1])
        url = (await run.until(r"Console: +(http://127\.0\.0\.1:\d+)/login"))[1]
        setup = (await run.until(r"(http://127\.0\.0\.1:\d+/setup#\S+)"))[1]
        tap = await run.until(r"^\s+(\S+ --config \S+ sim tap --door (\S+) --card 1001)$")
        door = tap[2]
        await run.until("running; Ctrl-C stops everything")

        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            violations = watch_csp(page)
            # the printed one-time link: choose the password, logged in on the dashboard
            await page.goto(setup)
            await expect(page.get_by_label("Setup code")).not_to_have_value("")
            await page.get_by_label("New password").fill(PASSWORD)
            await page.get_by_label("The same password again").fill(PASSWORD)
            await page.get_by_role("button", name="Set password and log in").click()
            await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
            # the site: its name in the header, the gateway online with its doors
            await expect(page.locator("header .site")).to_contain_text("site")
            row = page.get_by_role("row", name=GATEWAY)
            await expect(row).to_contain_text("online", timeout=30_000)
            await expect(row).to_contain_text(door)
            await shot(page, tmp_path, "demo-dashboard-1280")

            # add a person: a card, the Staff group (opens the first door)
            await page.get_by_role("link", name="People").click()
            await page.get_by_role("link", name="Add a person").click()
            await page.get_by_label("Id", exact=False).first.fill("newcomer")
            await page.get_by_label("Name").fill("New Comer")
            await page.get_by_label("Card ID").fill("4711")
            await page.get_by_label("Staff").check()
            await page.get_by_role("button", name="Add person").click()
            await expect(page.get_by_role("status")).to_have_text("The person was added.")
            await page.get_by_role("link", name="Dashboard").click()
            await page.get_by_role("button", name="Publish changes to the gateways").click()
            await expect(page.locator("#publish-result")).to_contain_text(f"{GATEWAY}: version", timeout=60_000)
            await expect(page.locator("#live-events")).to_be_attached()
            await page.wait_for_timeout(500)  # the EventSource connects

            # tap the card at the simulated door: the command the demo printed, with the new card
            argv = shlex.split(tap[1])
            argv[-1] = "4711"
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            p = await asyncio.create_subprocess_exec(*argv, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE)  # fmt: skip
            out, err = await p.communicate()
            assert p.returncode == 0, err.decode()
            decision = json.loads(out)["decisions"][-1]
            assert decision["granted"] and decision["user"] == "newcomer", decision
            live = page.locator("#live-events li").filter(has_text="card 4711")
            await expect(live.first).to_contain_text("granted", timeout=15_000)
            await expect(live.first).to_contain_text("newcomer")
            await shot(page, tmp_path, "demo-granted-1280")
            await page.set_viewport_size({"width": 390, "height": 800})
            assert await sideways_scroll(page) == 0
            assert violations == []
            await page.close()

        http_port = int(url.rsplit(":", 1)[1])
        run.proc.send_signal(signal.SIGINT)  # Ctrl-C
        async with asyncio.timeout(60):
            code = await run.proc.wait()
        text = await run.rest()
        assert code == 0, text
        assert "demo: everything stopped" in text
    assert processes_using(run.dir) == []
    assert port_free(broker_port) and port_free(http_port)
    assert not re.search(r"Traceback", text), text

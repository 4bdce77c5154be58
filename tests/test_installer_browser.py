"""The installer page in Debian's chromium (Playwright), as an installer works at a door: first use with the
setup code, the status page, a card presented at the reader (its bits and formats appear on their own), the relay
pulsed from the doors page (the relay MockPin moves), the events, the config check. One screenshot per page
(docs/img/installer-*.png are these, regenerated with INSTALLER_SCREENSHOTS=docs/img)."""

from __future__ import annotations

import os
from pathlib import Path

from playwright.async_api import Page, expect

from edge.agent import Agent
from edge.config import parse_config
from edge.sim.hands import set_contact, tap

from .console_browser import chromium, shots_dir, sideways_scroll, watch_csp
from .mosquitto import free_port
from .test_installer import config_text, running, sock_dir  # noqa: F401

RELAY_DOOR1 = 17


async def _shot(page: Page, tmp: Path, name: str) -> None:
    target = os.environ.get("INSTALLER_SCREENSHOTS")
    d = Path(target) if target else shots_dir(tmp)
    d.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(d / f"installer-{name}.png"), full_page=True)


async def test_an_installer_sets_up_reads_a_card_and_pulses_the_relay(tmp_path: Path, sock_dir: Path) -> None:  # noqa: F811
    cfg = parse_config(config_text(tmp_path / "state", sock_dir / "control.sock", free_port()))
    base = f"http://127.0.0.1:{cfg.installer.port}"
    async with running(cfg) as agent, chromium() as browser:
        assert isinstance(agent, Agent)
        page = await browser.new_page(viewport={"width": 1100, "height": 800})
        violations = watch_csp(page)
        await page.goto(base + "/")
        await expect(page.get_by_role("heading", name="First use")).to_be_visible()
        await page.get_by_label("Setup code").fill("not-the-code")
        await page.get_by_label("Your name").fill("ina")
        await page.get_by_label("Password (at least").fill("correct horse 1")
        await page.get_by_label("Password again").fill("correct horse 1")
        await page.get_by_role("button", name="Create the account").click()
        await expect(page.get_by_role("alert")).to_contain_text("not valid")
        await page.get_by_label("Setup code").fill(agent.installer.accounts.setup_code)
        await page.get_by_label("Password (at least").fill("correct horse 1")
        await page.get_by_label("Password again").fill("correct horse 1")
        await page.get_by_role("button", name="Create the account").click()
        await expect(page.get_by_role("heading", name="Status")).to_be_visible()
        await expect(page.get_by_text("Log out ina (installer)")).to_be_visible()
        await expect(page.locator("#status")).to_contain_text("version 1")
        await _shot(page, tmp_path, "status")

        # present a card: the view fills in on its own (htmx polling), with the bits and the formats
        await page.get_by_role("link", name="Readers").click()
        await expect(page.get_by_text("No read yet")).to_be_visible()
        reader = next(r for r, d in agent.reader_door.items() if d == "door1")
        await tap(agent, reader, 1603, fmt="h10301", facility=118)
        await expect(page.locator("#reads")).to_contain_text("10111011000000110010000110", timeout=10_000)
        await expect(page.locator("#reads")).to_contain_text("denied: unknown_card")
        await tap(agent, reader, 1001)
        await expect(page.locator("#reads")).to_contain_text("granted", timeout=10_000)
        await _shot(page, tmp_path, "readers")

        # pulse the relay: the door shows UNLOCKED and the relay pin moved
        set_contact(agent, "door1", opened=False)
        await page.get_by_role("link", name="Doors").click()
        agent.doors["door1"].relock()
        states_before = len(agent.factory.pin(RELAY_DOOR1).states)
        await page.get_by_role("button", name="Pulse Door1").click()
        await expect(page.get_by_role("status")).to_contain_text("relay pulsed for 3 s")
        await expect(page.locator("#doors")).to_contain_text("UNLOCKED")
        assert [s.state for s in agent.factory.pin(RELAY_DOOR1).states[states_before:]][:1] == [True]
        await _shot(page, tmp_path, "doors")

        await page.get_by_role("link", name="Events").click()
        await expect(page.locator("#events-live")).to_contain_text("installer.action")
        await expect(page.locator("#events-live")).to_contain_text("unknown_card")
        await _shot(page, tmp_path, "events")

        await page.get_by_role("link", name="Config").click()
        await expect(page.get_by_text("OK: config parsed")).to_be_visible()
        await expect(page.get_by_role("cell", name="relay").first).to_be_visible()
        await _shot(page, tmp_path, "config")
        assert await sideways_scroll(page) == 0

        async with page.expect_download() as dl:
            await page.get_by_role("link", name="Status").click()
            await page.get_by_role("link", name="Download the diagnostics bundle").click()
        download = await dl.value
        assert download.suggested_filename == "edge-diagnostics-test-inst-test.zip"

        await page.get_by_role("button", name="Log out").click()
        await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
        assert violations == []

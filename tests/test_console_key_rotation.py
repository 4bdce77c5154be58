"""Site key rotation from the service (key_rotation.py) and the console's gateway page, against a running
service (SQLite and PostgreSQL for the API), a real Mosquitto and two running simulated gateways (real
agents, their key files on disk).

API: a rotation needs update on the site key and a fresh re-authentication (refused and audited otherwise);
start announces the new key signed with the old one (the gateways keep obeying the old key); commit waits
for every gateway unless forced; afterwards commands signed with the new key are obeyed and ones signed
with the old key refused; a gateway that was offline is moved over when it comes back; abort puts every
gateway back on the current key; no private key appears in the audit log or the service's log.
Browser: the gateway page shows each gateway's part and, for the operator allowed, the steps, each asking
for the password again; a wrong password changes nothing; a read-only operator sees no step.
"""

# ruff: noqa: F811

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.async_api import expect
from sqlalchemy import select

from cloud_bridge.link import KEY_FILE
from cloud_bridge.protocol import Unlock
from cloud_bridge.service import schema, site
from cloud_bridge.service.database import Database
from cloud_bridge.signing import fingerprint, load_key_state, public_bytes

from .broker import broker, cloud_peer  # noqa: F401
from .console_browser import chromium, low_contrast, shot, sideways_scroll
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSPHRASE, PASSWORD, config, login, running
from .test_console_pages import log_in, root_in_browser, sqlite
from .test_key_rotation import send_and_wait
from .test_operator_e2e import GW, SITE, agent_running, sock_dir  # noqa: F401
from .test_service_events_e2e import VIEWER, add_operator, setup_admin, started, until

GW2 = "gw2"


async def _meta(url: str, key: str) -> str | None:
    db = Database(url)
    try:
        async with db.read() as c:
            return await site.meta(c, key)
    finally:
        await db.close()


async def _audit(url: str) -> list[tuple[str, str, str, str, str]]:
    db = Database(url)
    try:
        async with db.read() as c:
            a = schema.audit_log
            rows = (await c.execute(select(a.c.actor, a.c.action, a.c.object_id, a.c.outcome, a.c.after)
                                    .where(a.c.action.like("site_key.%")).order_by(a.c.id))).all()  # fmt: skip
    finally:
        await db.close()
    return [(r[0], r[1], r[2], r[3], r[4] or "") for r in rows]


async def _online(client: httpx.AsyncClient, gw: str, want: bool = True) -> bool:
    r = await client.get(f"/api/v1/gateways/{gw}/link")
    return r.status_code == 200 and r.json()["online"] is want


async def _obeys(gw: str, broker: Mosquitto, key: Ed25519PrivateKey) -> tuple[bool, str]:
    """Send `gw` an unlock signed with `key` (once); (obeyed, error code)."""
    async with cloud_peer(broker, key, site=SITE, gw=gw, auto_ack=False) as peer:
        r = await send_and_wait(peer, peer.sign(Unlock(door="door1", seconds=1), operator="tester"))
    return r.ok, r.error.code if r.error is not None else ""


def _key(url_pem: str | None) -> Ed25519PrivateKey:
    assert url_pem is not None and "ENCRYPTED PRIVATE KEY" in url_pem  # stored like the site key: encrypted
    return site.decrypt_key(url_pem, PASSPHRASE)


async def test_rotation_through_the_api_with_a_gateway_offline_then_abort(
    broker: Mosquitto, db_url: str, tmp_path: Path, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = db_url
    cfg = config(url, tmp_path)
    pub = await started(url, cfg, broker)
    await add_operator(url, cfg, "guard", VIEWER)
    old = _key(await _meta(url, "site_key"))
    old_fp = fingerprint(public_bytes(old))
    s1, s2 = tmp_path / "gw1", tmp_path / "gw2"
    async with (
        running(cfg, provisioning=True, init=False) as svc,
        agent_running(broker, s1, sock_dir / "c1.sock", pub, gw=GW) as g1,
    ):
        root = await setup_admin(url, svc)
        guard = httpx.AsyncClient(base_url=svc.url, timeout=60)
        try:
            await login(guard, "guard", PASSWORD)
            async with agent_running(broker, s2, sock_dir / "c2.sock", pub, gw=GW2):
                await until(lambda: _online(root, GW2), what="gw2 online")
            await until(lambda: _online(root, GW2, False), what="gw2 offline")
            await until(lambda: _online(root, GW), what="gw1 online")

            # refused without a fresh password, and without the permission (even re-authenticated)
            r = await root.post("/api/v1/site-key/rotation", json={})
            assert r.status_code == 403 and "re-authentication needed" in r.json()["detail"]
            assert (await guard.post("/api/v1/auth/reauth", json={"password": PASSWORD})).status_code == 200
            r = await guard.post("/api/v1/site-key/rotation", json={})
            assert r.status_code == 403 and "update on site_key" in r.json()["detail"], r.text
            assert (await root.post("/api/v1/auth/reauth", json={"password": "wrong"})).status_code == 401
            r = await root.post("/api/v1/site-key/rotation/commit", json={})
            assert r.status_code == 403
            assert await _meta(url, "site_key_pending") is None  # nothing started

            # start: the new key stored encrypted; gw1 acknowledges and keeps obeying the old key
            assert (await root.post("/api/v1/auth/reauth", json={"password": PASSWORD})).status_code == 200
            r = await root.post("/api/v1/site-key/rotation", json={"timeout": 20})
            assert r.status_code == 200, r.text
            rot = r.json()["rotation"]
            new = _key(await _meta(url, "site_key_pending"))
            new_fp = fingerprint(public_bytes(new))
            assert (rot["state"], rot["old"], rot["new"]) == ("pending", old_fp, new_fp)
            assert rot["gateways"][GW]["state"] == "acknowledged"
            assert rot["gateways"][GW2]["state"] == "offline"
            st = load_key_state(s1 / KEY_FILE)
            assert st is not None and st.key == public_bytes(new).hex() and st.previous == public_bytes(old).hex()
            assert await _obeys(GW, broker, old) == (True, "")
            assert await _obeys(GW, broker, new) == (False, "bad_signature")
            r = await root.post(f"/api/v1/doors/{GW}/door1/unlock", json={"seconds": 1})
            assert r.status_code == 200 and r.json()["ok"], r.text  # the service still signs with the old key
            link = (await root.get(f"/api/v1/gateways/{GW}/link")).json()["key"]
            assert link["rotation"] == "pending" and link["rotation_gateway"] == "acknowledged"
            assert link["rotation_pending"] is True

            # commit waits for gw2 unless forced; a second start is refused
            r = await root.post("/api/v1/site-key/rotation", json={})
            assert r.status_code == 409 and "pending already" in r.json()["detail"]
            r = await root.post("/api/v1/site-key/rotation/commit", json={})
            assert r.status_code == 409 and GW2 in r.json()["detail"]
            r = await root.post("/api/v1/site-key/rotation/commit", json={"force": True, "timeout": 20})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["current"] == new_fp and out["rotation"]["state"] == "committed"
            assert out["rotation"]["gateways"][GW]["state"] == "moved"
            assert _key(await _meta(url, "site_key")).private_bytes_raw() == new.private_bytes_raw()
            assert _key(await _meta(url, "site_key_previous")).private_bytes_raw() == old.private_bytes_raw()
            assert await _meta(url, "site_key_pending") is None

            # after the rotation: the new key is obeyed, the old one refused; the service signs with the new
            assert await _obeys(GW, broker, new) == (True, "")
            assert await _obeys(GW, broker, old) == (False, "bad_signature")
            r = await root.post(f"/api/v1/doors/{GW}/door1/unlock", json={"seconds": 1})
            assert r.status_code == 200 and r.json()["ok"], r.text

            async def drained() -> bool:  # event acks are signed with the new key too: the journal empties
                return g1.journal is not None and g1.journal.depth == 0

            await until(drained, what="gw1's events acknowledged after the commit")
            r = await root.put("/api/v1/groups/staff", json={"name": "Staff", "doors": [{"gateway": GW,
                                                                                         "door": "door1"}]})
            assert r.status_code == 200, r.text
            r = await root.post("/api/v1/publish", params={"timeout": 30})
            assert r.status_code == 200 and isinstance(r.json()["gateways"][GW], int), r.text  # provisioning too

            # gw2 comes back holding the old key: moved over at its birth, then obeys the new key only
            async with agent_running(broker, s2, sock_dir / "c2.sock", pub, gw=GW2):

                async def moved() -> bool:
                    x = (await root.get("/api/v1/site-key/rotation")).json()["rotation"]["gateways"][GW2]
                    return bool(x["state"] == "moved")

                await until(moved, what="gw2 moved over")
                st2 = load_key_state(s2 / KEY_FILE)
                assert st2 is not None and st2.key == public_bytes(new).hex() and st2.previous is None
                assert await _obeys(GW2, broker, new) == (True, "")
                assert await _obeys(GW2, broker, old) == (False, "bad_signature")
                r = await root.post(f"/api/v1/doors/{GW2}/door1/unlock", json={"seconds": 1})
                assert r.status_code == 200 and r.json()["ok"], r.text

            await until(lambda: _online(root, GW2, False), what="gw2 offline again")

            # a second rotation with gw2 offline: it takes the pending key at its birth; then aborted, both
            # gateways go back to the current key only
            assert (await root.post("/api/v1/auth/reauth", json={"password": PASSWORD})).status_code == 200
            r = await root.post("/api/v1/site-key/rotation", json={"timeout": 20})
            assert r.status_code == 200, r.text
            third = _key(await _meta(url, "site_key_pending"))
            assert {g: x["state"] for g, x in r.json()["rotation"]["gateways"].items()} == {
                GW: "acknowledged", GW2: "offline"}  # fmt: skip
            async with agent_running(broker, s2, sock_dir / "c2.sock", pub, gw=GW2):

                async def acknowledged() -> bool:
                    x = (await root.get("/api/v1/site-key/rotation")).json()["rotation"]["gateways"][GW2]
                    return bool(x["state"] == "acknowledged")

                await until(acknowledged, what="gw2 took the pending key")
                ks = load_key_state(s2 / KEY_FILE)
                assert ks is not None and ks.key == public_bytes(third).hex() and ks.previous == public_bytes(new).hex()
                assert await _obeys(GW2, broker, new) == (True, "")  # still the current key until a commit
                r = await root.post("/api/v1/site-key/rotation/abort", json={"timeout": 20})
                assert r.status_code == 200, r.text
                assert {g: x["state"] for g, x in r.json()["rotation"]["gateways"].items()} == {
                    GW: "restored", GW2: "restored"}  # fmt: skip
                assert r.json()["current"] == new_fp and await _meta(url, "site_key_pending") is None
                for gw, state in ((GW, s1), (GW2, s2)):
                    ks = load_key_state(state / KEY_FILE)
                    assert ks is not None and ks.key == public_bytes(new).hex() and ks.previous is None
                    assert await _obeys(gw, broker, new) == (True, "")
                    assert await _obeys(gw, broker, third) == (False, "bad_signature")
                r = await root.post("/api/v1/site-key/rotation/abort", json={})
                assert r.status_code == 409
        finally:
            await guard.aclose()
            await root.aclose()

    # audited: each step by root, gw2's catch-up by the service, the refusal of guard
    rows = await _audit(url)
    steps = [(a, act, o) for a, act, _, o, _ in rows]
    assert ("guard", "site_key.update", "denied") in steps
    assert [x for x in steps if x[0] == "root"] == [
        ("root", "site_key.rotation_start", "ok"), ("root", "site_key.rotation_commit", "ok"),
        ("root", "site_key.rotation_start", "ok"), ("root", "site_key.rotation_abort", "ok")]  # fmt: skip
    assert any(act == "site_key.rotation_moved" and oid == GW2 for _, act, oid, _, _ in rows)
    assert any(act == "site_key.rotation_acknowledged" and oid == GW2 for _, act, oid, _, _ in rows)
    # no private key anywhere but the encrypted meta rows: not in the audit log, not in the service's log
    secrets = [k.private_bytes_raw().hex() for k in (old, new, third)]
    text = " ".join(r[4] for r in rows) + caplog.text
    assert "PRIVATE KEY" not in text and not any(s in text for s in secrets)
    assert new_fp in caplog.text  # the log names keys by fingerprint


async def _rotation_step(page: Any, label: str, password: str) -> None:
    form = page.locator("#rotation-actions form").filter(has=page.get_by_role("button", name=label))
    await form.get_by_label("Your password").fill(password)
    await form.get_by_role("button", name=label).click()


async def test_gateway_page_rotates_the_key_with_reauthentication(broker: Mosquitto, tmp_path: Path,
                                                                  sock_dir: Path) -> None:  # fmt: skip
    url = sqlite(tmp_path)
    cfg = config(url, tmp_path)
    pub = await started(url, cfg, broker)
    await add_operator(url, cfg, "guard", VIEWER)
    old = _key(await _meta(url, "site_key"))
    async with (
        running(cfg, provisioning=True, init=False) as svc,
        agent_running(broker, tmp_path / "gw1", sock_dir / "c1.sock", pub, gw=GW),
        chromium() as browser,
    ):
        page, violations = await root_in_browser(browser, svc, url)
        await expect(page.get_by_role("row", name=GW)).to_contain_text("online", timeout=30_000)
        await page.goto(f"{svc.url}/gateways/{GW}")
        await expect(page.locator("#rotation-summary")).to_contain_text("never rotated")
        actions = page.locator("#rotation-actions")
        await expect(actions.get_by_role("button")).to_have_count(1)

        # a wrong password: refused, nothing started
        await _rotation_step(page, "Start key rotation", "not my password")
        await expect(page.locator("#gateway-result")).to_contain_text("your password was not right")
        assert await _meta(url, "site_key_pending") is None

        await _rotation_step(page, "Start key rotation", PASSWORD)
        result = page.locator("#gateway-result")
        await expect(result).to_contain_text("Start key rotation: done", timeout=30_000)
        new = _key(await _meta(url, "site_key_pending"))
        await expect(page.locator("#rotation-summary")).to_contain_text("pending")
        await expect(page.locator(f"#rotation-{GW}")).to_contain_text("acknowledged")
        await expect(page.locator("#rotation-summary")).to_contain_text(fingerprint(public_bytes(new)))
        await expect(actions.get_by_role("button", name="Commit key rotation")).to_be_visible()
        await expect(actions.get_by_role("button", name="Abort key rotation")).to_be_visible()
        await page.locator("#rotation-h").scroll_into_view_if_needed()  # the doc's viewport shot shows it
        await shot(page, tmp_path, "key-rotation-pending-1280")

        # keyboard: the password field and its button are reached with Tab and the step runs with Enter
        commit_button = page.get_by_role("button", name="Commit key rotation")
        commit_form = page.locator("#rotation-actions form").filter(has=commit_button)
        await commit_form.get_by_label("Your password").focus()
        await page.keyboard.type(PASSWORD)
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Commit key rotation"
        await page.keyboard.press("Enter")
        await expect(result).to_contain_text("Commit key rotation: done", timeout=30_000)
        await expect(page.locator(f"#rotation-{GW}")).to_contain_text("moved")
        await expect(page.locator("#rotation-summary")).to_contain_text("committed")
        await expect(actions.get_by_role("button")).to_have_count(1)  # start again
        # the gateway's next birth names the new key: in step with the service again
        await page.get_by_role("button", name="Refresh").click()
        await expect(result).to_contain_text("announced itself again", timeout=30_000)
        fp = fingerprint(public_bytes(new))
        await expect(page.locator("#gateway-key")).to_contain_text("in step")
        await expect(page.locator("#gateway-key tr").nth(1)).to_contain_text(fp)
        assert await _obeys(GW, broker, new) == (True, "")
        assert await _obeys(GW, broker, old) == (False, "bad_signature")
        await shot(page, tmp_path, "key-rotation-committed-1280")
        for width in (390, 1280):
            await page.set_viewport_size({"width": width, "height": 800})
            await page.goto(f"{svc.url}/gateways/{GW}")
            assert await sideways_scroll(page) == 0, width
        await shot(page, tmp_path, "key-rotation-390")
        assert await low_contrast(page) == []
        assert violations == []

        # a read-only operator sees the status, no step; the page's POST is refused by the API
        ctx = await browser.new_context()
        guard = await ctx.new_page()
        await log_in(guard, svc, "guard", PASSWORD)
        await guard.goto(f"{svc.url}/gateways/{GW}")
        await expect(guard.locator("#rotation-summary")).to_contain_text("committed")
        await expect(guard.locator("#rotation-actions")).to_have_count(0)
        token = (await (await guard.request.get(f"{svc.url}/api/v1/auth/me")).json())["csrf_token"]
        r = await guard.request.post(f"{svc.url}/gateways/{GW}/key-rotation",
                                     form={"_csrf": token, "step": "start", "password": PASSWORD})  # fmt: skip
        assert r.status == 403
        r = await guard.request.post(f"{svc.url}/gateways/{GW}/key-rotation",
                                     form={"_csrf": "forged", "step": "start", "password": PASSWORD})  # fmt: skip
        assert r.status == 403
        assert await _meta(url, "site_key_pending") is None
        await ctx.close()

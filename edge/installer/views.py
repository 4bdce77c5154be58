"""What each installer page shows. The page runs on a thread of its own (edge/installer/__init__.py): the
`*_snapshot` functions (and `door_rows`, `reader_rows`, `oldest_unsent`) run on the agent's loop, called through
`AgentLoop`, and only copy (the typed status the agent builds in one call, the feed's deques); everything else
here (explaining frames, the config check, the zip, and the templates) runs on the page's thread, off the door
loop."""

from __future__ import annotations

import io
import json
import platform
import shutil
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from edge import __version__
from edge.agent.ports import GatewayPort
from edge.config import DEFAULT_FORMATS, OsdpReaderConfig, WiegandReaderConfig, check_files
from edge.errors import ConfigError
from edge.events import Event
from edge.feed import ReaderSeen
from edge.readers.events import CardRead, KeyPressed, PinEntry, ReaderFault, ReaderStatus
from edge.readers.formats import FormatTable
from edge.readers.osdp import OsdpReader

from .cardview import explain, frame_of, frame_of_fault

#: Journal event types counted as errors on the status page.
ERROR_TYPES = ("alarm.", "reader.fault", "security.")
DECISIONS = ("access.granted", "access.denied")


def when(ts: float | None, tz: Any) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M:%S")


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(rest.split()[0]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["AgentRSS"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _host(state_dir: Path) -> dict[str, Any]:
    try:
        du = shutil.disk_usage(state_dir)
        disk: dict[str, Any] = {"total": du.total, "free": du.free}
    except OSError as e:
        disk = {"error": str(e)}
    return {"disk": disk, "memory": _meminfo()}


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def status_snapshot(gw: GatewayPort) -> dict[str, Any]:
    """On the agent's loop: the typed status and the last errors (copies)."""
    cfg = gw.cfg
    errors = [e for e in reversed(gw.feed.events) if e.type.startswith(ERROR_TYPES) or
              (e.type == "system" and str(e.detail.get("event", "")).endswith("failed"))][:10]  # fmt: skip
    return {
        "st": gw.status(), "uptime_s": time.monotonic() - gw.started_mono, "errors": errors,
        "broker": f"{cfg.link.host}:{cfg.link.port}" if cfg.link.enabled else "link disabled",
        "python": platform.python_version(),
    }  # fmt: skip


async def oldest_unsent(gw: GatewayPort) -> Event | None:
    """On the agent's loop: the oldest event the cloud has not acknowledged (a read through aiosqlite's thread)."""
    journal = gw.journal
    if journal is None:
        return None
    try:
        first = await journal.read(0, 1)
    except Exception:  # a closing or failing journal: the page still shows the rest
        return None
    return first[0] if first else None


def host_info(state_dir: Path) -> dict[str, Any]:
    """On the page's thread: disk and memory."""
    return _host(state_dir)


def door_rows(gw: GatewayPort) -> list[dict[str, Any]]:
    rows = []
    st = gw.status()
    for door_id, ctl in gw.doors.items():
        ds = st.doors.get(door_id, {})
        io_ = ctl.io
        rows.append({
            "id": door_id, "name": ctl.door.name or door_id, "locked": ds.get("locked"),
            "relay": ds.get("relay_energised"), "contact": ds.get("contact", "none"),
            "rex": "wired" if io_.rex_pin is not None else "none", "mode": ds.get("mode"),
            "holds": ds.get("holds", []), "alarms": ds.get("alarms", []),
            "unlock_remaining_s": ds.get("unlock_remaining_s"),
        })  # fmt: skip
    return rows


def reader_formats(gw: GatewayPort, reader: str) -> FormatTable:
    r = gw.readers.get(reader)
    table = getattr(getattr(r, "assembler", None), "formats", None)
    if isinstance(table, FormatTable):
        return table
    for i, rc in enumerate(gw.cfg.readers):
        name = rc.name or f"{rc.door}.{'wiegand' if isinstance(rc, WiegandReaderConfig) else 'osdp'}{i}"
        if name == reader:
            return FormatTable(rc.formats, rc.extra_formats if isinstance(rc, WiegandReaderConfig) else ())
    return FormatTable(DEFAULT_FORMATS)


class ReadsSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    reads: list[ReaderSeen]
    decisions: list[Event]
    #: reader -> its formats (FormatTables are immutable: safe to use on the page's thread)
    formats: dict[str, Any]


def reads_snapshot(gw: GatewayPort, n: int = 20) -> ReadsSnapshot:
    """On the agent's loop: the last `n` reader events, the recent decisions, each reader's formats."""
    reads = list(gw.feed.reads)[-n:]
    decisions = [e for e in list(gw.feed.events)[-4 * n - 50 :] if e.type in DECISIONS]
    return ReadsSnapshot(reads=reads, decisions=decisions,
                         formats={r: reader_formats(gw, r) for r in {s.event.reader for s in reads}})  # fmt: skip


def read_rows(snap: ReadsSnapshot) -> list[dict[str, Any]]:
    """On the page's thread: the reader events newest first, each explained (a card read's frame against every
    format)."""
    rows = []
    for s in reversed(snap.reads):
        ev = s.event
        row: dict[str, Any] = {"ts": s.ts, "door": s.door, "reader": ev.reader, "kind": type(ev).__name__}
        if isinstance(ev, CardRead):
            table = snap.formats.get(ev.reader) or FormatTable(DEFAULT_FORMATS)
            frame = frame_of(ev, table)
            row.update(card=ev.card, facility=ev.facility, format=ev.format, nbits=ev.bits,
                       view=explain(*frame, table) if frame is not None else None)  # fmt: skip
            row["decision"] = next(
                (
                    e
                    for e in reversed(snap.decisions)
                    if e.reader == ev.reader and e.card == ev.card and e.ts >= s.ts - 1
                ),
                None,
            )
        elif isinstance(ev, KeyPressed):
            row["summary"] = f"key pressed: {ev.key}" if ev.key in ("*", "#") else "key pressed (a digit; never shown)"
        elif isinstance(ev, PinEntry):
            row["summary"] = f"PIN entered ({s.pin_digits} digits; the digits are never shown)"
        elif isinstance(ev, ReaderFault):
            row["summary"] = f"refused: {ev.kind}" + (f" ({ev.detail})" if ev.detail else "")
            row.update(refused=ev.kind, nbits=len(ev.bits) if ev.bits else None, bits=ev.bits or None)
            fault_frame = frame_of_fault(ev)
            row["view"] = None  # a fault without a frame (an OSDP handshake, a bad MAC): nothing to explain
            if fault_frame is not None:
                table = snap.formats.get(ev.reader) or FormatTable(DEFAULT_FORMATS)
                row["view"] = explain(*fault_frame, table)
        elif isinstance(ev, ReaderStatus):
            row["summary"] = f"{'online' if ev.online else 'OFFLINE'}" + (" secure" if ev.secure else "") + \
                (f" {ev.detail}" if ev.detail else "")  # fmt: skip
        else:
            row["summary"] = " ".join(f"{k}={v}" for k, v in msgspec.structs.asdict(ev).items() if k != "reader")
        rows.append(row)
    return rows


def events_snapshot(gw: GatewayPort, n: int) -> list[Event]:
    """On the agent's loop: the last `n` journal events, newest first."""
    events = list(gw.feed.events)[-n:]
    events.reverse()
    return events


def reader_rows(gw: GatewayPort) -> list[dict[str, Any]]:
    st = gw.status()
    rows = []
    for name, info in st.readers.items():
        r = gw.readers.get(name)
        row: dict[str, Any] = {"name": name, "door": info.door, "kind": info.kind, "online": info.online,
                               "formats": ", ".join(reader_formats(gw, name).names), "osdp": None}  # fmt: skip
        session = getattr(r, "session", None)
        if session is not None:  # an OSDP reader: what its session knows
            pdid = getattr(session, "pdid", None)
            pdcap = getattr(session, "pdcap", None)
            phase = getattr(session, "phase", None)
            row["osdp"] = {
                "address": getattr(session, "address", None), "phase": getattr(phase, "value", phase),
                "secure": getattr(session, "secure", None), "tamper": getattr(session, "tamper", None),
                "power_ok": getattr(session, "power_ok", None),
                "identity": msgspec.to_builtins(pdid) if pdid is not None else None,
                "capabilities": sorted(msgspec.to_builtins(pdcap).get("caps", {}).items()) if pdcap is not None
                else None,
            }  # fmt: skip
            rc = next((c for c in gw.cfg.readers if isinstance(c, OsdpReaderConfig) and c.port and
                       (c.name == name or name.startswith(f"{c.door}.osdp"))), None)  # fmt: skip
            if rc is not None:
                row["osdp"]["key"] = ("key file " + rc.key_file) if rc.key_file else \
                    ("install mode allowed" if rc.allow_install_mode else "none (plain)")  # fmt: skip
            row["osdp"]["pairable"] = rc is not None and rc.key_file is not None and isinstance(r, OsdpReader)
            row["osdp"]["pairing_until"] = r.install_armed_until() if isinstance(r, OsdpReader) else None
            row["osdp"]["detail"] = next((s.event.detail for s in reversed(gw.feed.reads) if s.event.reader == name
                                          and isinstance(s.event, ReaderStatus)), "")  # fmt: skip
        rows.append(row)
    return rows


#: How long the readers page's "Pair" action arms install mode.
PAIRING_S = 300.0


def arm_pairing(gw: GatewayPort, name: str, seconds: float = PAIRING_S) -> float:
    """On the agent's loop: arm install mode on the OSDP reader `name` whose key file is configured; returns
    the window's end (wall clock). KeyError: no such reader; ValueError (the message says why): not OSDP, no key
    file."""
    r = gw.readers[name]
    if not isinstance(r, OsdpReader):
        raise ValueError(f"reader {name} is a {r.kind} reader: pairing (install mode) is for OSDP readers only")
    row = next(x for x in reader_rows(gw) if x["name"] == name)
    if not (row["osdp"] or {}).get("pairable"):
        raise ValueError(f"reader {name}: pairing needs the reader's key_file in the config (the site key to install)")
    return r.arm_install_mode(seconds)


def _config_check(gw: GatewayPort) -> list[tuple[bool, str]]:
    """The checks of `edge check-config` that can run beside the agent (not the serial ports it holds)."""
    cfg, profile = gw.cfg, gw.profile
    out: list[tuple[bool, str]] = [(True, f"config parsed and validated (site {cfg.site.id}, gateway "
                                          f"{cfg.site.gateway}, profile {profile.name})")]  # fmt: skip
    for i, r in enumerate(cfg.readers):
        try:
            io_ = profile.door(r.door)
        except KeyError:
            out.append((False, f"readers[{i}].door: hardware profile {profile.name!r} has no door {r.door!r}"))
            continue
        if isinstance(r, WiegandReaderConfig) and (io_.reader_d0_pin is None or io_.reader_d1_pin is None):
            out.append((False, f"readers[{i}].door: door {r.door!r} has no reader_d0_pin/reader_d1_pin"))
        else:
            out.append((True, f"readers[{i}] ({r.door}): door and pins found"))
    try:
        check_files(cfg, ports=False)
        out.append((True, "files named by the config: present and readable"))
    except ConfigError as e:
        out.append((False, str(e)))
    return out


def config_view(gw: GatewayPort) -> dict[str, Any]:
    """On the page's thread (the config and the profile are immutable; the file checks read the disk)."""
    checks = _config_check(gw)
    pins = []
    for d in gw.profile.doors:
        for field in msgspec.structs.fields(d):
            value = getattr(d, field.name)
            if field.name.endswith("_pin") and value is not None:
                pins.append({"door": d.door, "what": field.name.removesuffix("_pin"), "gpio": value})
    return {"checks": checks, "pins": pins, "profile": gw.profile, "factory": gw.profile.factory}


def public_config(gw: GatewayPort) -> dict[str, Any]:
    """The config as data. It holds no secret (secrets are named, as systemd credentials or files); the
    names of credential files are kept, their contents never read here."""
    raw: dict[str, Any] = msgspec.to_builtins(gw.cfg)
    return raw


def diagnostics_snapshot(gw: GatewayPort) -> dict[str, Any]:
    """On the agent's loop: what goes into the bundle, as data."""
    st = msgspec.to_builtins(gw.status())
    if isinstance(st.get("installer"), dict):
        st["installer"]["setup_code"] = None  # a secret while valid
    return {"status": st, "events": [msgspec.to_builtins(e) for e in gw.feed.events], "config": public_config(gw),
            "profile": msgspec.to_builtins(gw.profile)}  # fmt: skip


def diagnostics_zip(snap: dict[str, Any]) -> bytes:
    """On the page's thread: a zip of config (no secrets), status, the recent journal events, versions, the
    hardware profile."""
    parts = {
        "config.json": json.dumps(snap["config"], indent=2, default=str),
        "status.json": json.dumps(snap["status"], indent=2, default=str),
        "journal.jsonl": "\n".join(json.dumps(e, default=str) for e in snap["events"]) + "\n",
        "versions.json": json.dumps(
            {
                "edge": __version__,
                "python": sys.version,
                "platform": platform.platform(),
                "machine": platform.machine(),
            },
            indent=2,
        ),
        "hardware.json": json.dumps(snap["profile"], indent=2, default=str),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in parts.items():
            z.writestr(name, text)
    return buf.getvalue()


__all__ = [
    "arm_pairing",
    "config_view",
    "diagnostics_snapshot",
    "diagnostics_zip",
    "door_rows",
    "events_snapshot",
    "host_info",
    "mib",
    "oldest_unsent",
    "read_rows",
    "reader_rows",
    "reads_snapshot",
    "status_snapshot",
    "when",
]

"""The systemd unit, read by systemd's own tools: `systemd-analyze verify` and `security`, sysusers and
tmpfiles into a scratch root, and the Python stack under the kernel's MemoryDenyWriteExecute.

The tools come from the Debian package `systemd` (installed by .ci/bootstrap). A missing tool FAILS these
tests: a unit that was never read by systemd is not known to be valid.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge.service"
SYSUSERS = ROOT / "systemd" / "edge.sysusers.conf"
TMPFILES = ROOT / "systemd" / "edge.tmpfiles.conf"


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/bin") / name) if p.exists()), None
    )
    assert path is not None, f"{name} not found: install the Debian package 'systemd' (sh .ci/bootstrap)"
    return path


def directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values, in order (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def staged_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as `edge.service` in a scratch directory, ExecStart pointing at an executable that exists
    here (verify checks the binary; /opt/edge/.venv/bin/edge exists only on an installed gateway). The
    arguments are kept."""
    text = UNIT.read_text() if text is None else text
    exec_lines = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    assert len(exec_lines) == 1
    args = exec_lines[0].removeprefix("ExecStart=").split(None, 1)[1:]
    staged = text.replace(exec_lines[0], " ".join([f"ExecStart={sys.executable}", "-m", "edge.cli", *args]))
    d = tmp_path / "units"
    d.mkdir(exist_ok=True)
    p = d / "edge.service"
    p.write_text(staged)
    return p


# Lines of `systemd-analyze verify` output that are tolerated, and only these:
#  * a line that names ANOTHER unit file (a path under /lib, /usr/lib or /etc/systemd, or "<name>.<type>:"
#    for a unit other than edge.service). verify loads the units ours depends on (network.target,
#    multi-user.target and their dependencies) from the host; in containers these distribution units can
#    draw warnings (e.g. about users or devices the container lacks). --recursive-errors=no already stops
#    their errors from failing the run; their text may still be printed.
# Anything else (every line naming edge.service or our file, any unknown key, bad value, missing binary,
# or a line we do not recognise) fails the test.
OTHER_UNIT = re.compile(
    r"^(?:/usr/lib/systemd/|/lib/systemd/|/etc/systemd/|/run/systemd/)\S*|^[\w@.\\-]+\.(?:service|socket|target|mount|slice|path|timer|device|scope):"
)


def verify(unit: Path) -> tuple[int, list[str]]:
    r = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    ours = [ln for ln in lines if "edge.service" in ln or str(unit.parent) in ln or not OTHER_UNIT.match(ln)]
    return r.returncode, ours


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    rc, ours = verify(staged_unit(tmp_path))
    assert ours == [], "systemd-analyze verify complained about the unit:\n" + "\n".join(ours)
    assert rc == 0


@pytest.mark.parametrize(
    ("mutation", "expect"),
    [
        (("WatchdogSec=10", "WatchdogSecc=10"), "Unknown key"),
        (("Type=notify", "Type=notifyy"), "Failed to parse service type"),
        (("RestrictAddressFamilies=AF_UNIX", "RestrictAddressFamilies=AF_BOGUS"), "AF_BOGUS"),
    ],
)
def test_verify_check_has_teeth(tmp_path: Path, mutation: tuple[str, str], expect: str) -> None:
    """The same check on a broken copy of the unit fails, so a clean result above means something."""
    text = UNIT.read_text()
    assert mutation[0] in text
    _, ours = verify(staged_unit(tmp_path, text.replace(mutation[0], mutation[1], 1)))
    assert any(expect in ln for ln in ours), ours


def test_the_documented_credential_line_verifies(tmp_path: Path) -> None:
    """docs/operations.md adds secrets with LoadCredentialEncrypted= lines in a drop-in."""
    line = "LoadCredentialEncrypted=door1.scbk:/etc/edge/credentials/door1.scbk.cred"
    assert line in UNIT.read_text()  # the example in the unit's comment
    text = UNIT.read_text().replace("\n[Install]", f"\n{line}\n\n[Install]", 1)
    rc, ours = verify(staged_unit(tmp_path, text))
    assert ours == [] and rc == 0, ours


def test_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    d = tmp_path / "raw"
    d.mkdir()
    (d / "edge.service").write_text(UNIT.read_text().replace("/opt/edge/.venv/bin/edge", str(d / "no-such-edge")))
    rc, ours = verify(d / "edge.service")
    assert rc != 0 and any("not executable" in ln for ln in ours), ours


def test_unit_has_the_required_settings() -> None:
    d = directives(UNIT.read_text())
    want = {
        "Service.Type": ["notify"],
        "Service.NotifyAccess": ["main"],
        "Service.WatchdogSec": ["10"],
        "Service.Restart": ["always"],
        "Service.RestartSec": ["2"],
        "Service.User": ["edge"],
        "Service.Group": ["edge"],
        "Service.SupplementaryGroups": ["gpio dialout"],
        "Service.StateDirectory": ["edge"],
        "Service.ConfigurationDirectory": ["edge"],
        "Service.RuntimeDirectory": ["edge"],
        "Service.ExecStart": ["/opt/edge/.venv/bin/edge --config /etc/edge/edge.toml run"],
        "Service.ProtectSystem": ["strict"],
        "Service.ProtectHome": ["yes"],
        "Service.PrivateTmp": ["yes"],
        "Service.NoNewPrivileges": ["yes"],
        "Service.ProtectKernelTunables": ["yes"],
        "Service.ProtectKernelModules": ["yes"],
        "Service.ProtectControlGroups": ["yes"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"],
        "Service.RestrictNamespaces": ["yes"],
        "Service.LockPersonality": ["yes"],
        "Service.MemoryDenyWriteExecute": ["yes"],
        "Service.SystemCallArchitectures": ["native"],
        "Service.DevicePolicy": ["closed"],
        "Service.KillSignal": ["SIGTERM"],
        "Service.CapabilityBoundingSet": [""],
        "Unit.StartLimitIntervalSec": ["0"],
    }
    for key, value in want.items():
        assert d.get(key) == value, key
    assert sorted(d["Service.DeviceAllow"]) == sorted(
        f"char-{n} rw" for n in ("gpiochip", "ttyUSB", "ttyACM", "ttyAMA", "ttyS")
    )
    assert "TimeoutStopSec" in " ".join(d)
    # Never ordered after time sync: the doors must work after a power cut with no network.
    assert "time-sync.target" not in " ".join(d.get("Unit.After", []) + d.get("Unit.Wants", []))
    # The config defaults match the directories systemd creates.
    from edge.config import ControlSection, StorageSection

    assert StorageSection().state_dir == "/var/lib/edge"
    assert ControlSection().socket.startswith("/run/edge/")


def test_security_exposure_stays_low(tmp_path: Path) -> None:
    r = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(staged_unit(tmp_path))],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for edge\.service: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout  # 1.9 "OK" at the time of writing; 10 is unprotected


def test_sysusers_and_tmpfiles_into_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "sysusers.d").mkdir(parents=True)
    (root / "etc" / "tmpfiles.d").mkdir(parents=True)
    shutil.copy(SYSUSERS, root / "etc" / "sysusers.d" / "edge.conf")
    shutil.copy(TMPFILES, root / "etc" / "tmpfiles.d" / "edge.conf")
    r = subprocess.run(
        [tool("systemd-sysusers"), f"--root={root}"], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    passwd = (root / "etc" / "passwd").read_text()
    group = (root / "etc" / "group").read_text()
    edge = next(ln for ln in passwd.splitlines() if ln.startswith("edge:")).split(":")
    assert edge[5] == "/var/lib/edge" and edge[6] == "/usr/sbin/nologin"
    assert edge[3] == next(ln for ln in group.splitlines() if ln.startswith("edge:")).split(":")[2]
    assert {ln.split(":")[0] for ln in group.splitlines()} >= {"edge", "gpio", "dialout"}
    # Member of no group but its own: device access comes from the unit's SupplementaryGroups only.
    assert all(ln.split(":")[3] == "" for ln in group.splitlines())
    r = subprocess.run(
        [tool("systemd-tmpfiles"), f"--root={root}", "--create"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    keys = root / "var" / "lib" / "edge" / "keys"
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    assert keys.stat().st_uid == int(edge[2])
    assert oct(keys.parent.stat().st_mode & 0o777) == "0o750"


MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print("NO_MDWE", ctypes.get_errno()); sys.exit(3)
    import asyncio, sqlite3, numpy as np, msgspec, aiosqlite, gpiozero, osdp
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from gpiozero.pins.mock import MockFactory
    from edge import agent, timetrust, sdnotify, metrics, decision, store, journal
    key = Ed25519PrivateKey.generate(); key.public_key().verify(key.sign(b"x"), b"x")
    assert int(np.arange(1000, dtype=np.int64).sum()) == 499500
    db = sqlite3.connect(":memory:"); db.execute("create table t (x)"); db.execute("insert into t values (1)")
    cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)  # a libffi closure
    assert cb(1) == 2
    f = MockFactory(); pin = f.pin(17); pin.drive_high(); assert pin.state
    async def main():
        await asyncio.sleep(0)
    asyncio.run(main())
    print("OK")
    """
)


def test_python_stack_runs_without_writable_executable_memory() -> None:
    """MemoryDenyWriteExecute=yes is safe for this stack: the same probe under the kernel's PR_SET_MDWE
    (what systemd >= 254 uses for it; older versions use an equivalent seccomp filter)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert hasattr(libc, "prctl")
    r = subprocess.run([sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=120, check=False)
    if r.returncode == 3 and r.stdout.startswith("NO_MDWE"):
        pytest.skip(f"kernel without PR_SET_MDWE (needs Linux >= 6.3): {r.stdout.strip()}")
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr

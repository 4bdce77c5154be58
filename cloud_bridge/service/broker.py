"""A local Mosquitto for `cloud-bridge demo` (and the tests): Debian's /usr/sbin/mosquitto with a generated
config, one listener on 127.0.0.1 only, plain MQTT, anonymous, no persistence.

Mosquitto cannot bind port 0, so a free loopback port is picked first (`free_port`). `config_text` is the
config both this module and tests/mosquitto.py write; `Broker` runs it as an asyncio subprocess.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import shutil
import signal
import socket
import sys
from pathlib import Path

from .errors import ServiceError

_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """preexec_fn for a child of a supervisor: SIGTERM when the supervisor dies (PR_SET_PDEATHSIG, Linux), so
    that a killed supervisor leaves no process behind."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (bound and released: another process could take it in between)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_given: set[int] = set()


def ephemeral_range(path: Path = EPHEMERAL_RANGE) -> tuple[int, int]:
    """The kernel's range for local ports of outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = path.read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def listen_port(*, floor: int = 10000, path: Path = EPHEMERAL_RANGE) -> int:
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range and never given before in this
    process: for a server that must restart on the same port while thousands of outgoing loopback connections
    exist (`free_port`'s kernel-chosen port is an ephemeral one, so one of those connections can take it as
    its local port while the server is down). Random in [floor, low end of the ephemeral range); checked by
    binding."""
    low = ephemeral_range(path)[0]
    if low <= floor:
        raise ServiceError(f"the kernel's ephemeral port range starts at {low} ({path}): no room below it for "
                           f"listening ports from {floor}; raise net.ipv4.ip_local_port_range's low end")  # fmt: skip
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(floor, low)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise ServiceError(f"no free TCP port on 127.0.0.1 in [{floor}, {low})")


def mosquitto_path() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise ServiceError("mosquitto is not installed: apt-get install mosquitto (sh .ci/bootstrap does)")
    return exe


def config_text(port: int, extra: str = "") -> str:
    """A listener on 127.0.0.1:`port` only, anonymous, nothing kept on disk, errors and warnings to stderr."""
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "max_queued_messages 100000",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # else Mosquitto drops to user mosquitto, who cannot read our folder
    return "\n".join(lines) + "\n" + extra + "\n"


async def wait_listening(host: str, port: int, proc: asyncio.subprocess.Process, *, what: str, log: Path,
                         timeout: float = 15.0) -> None:  # fmt: skip
    """Until `host:port` accepts a TCP connection; ServiceError (with the log's tail) if `proc` exits first."""
    async with asyncio.timeout(timeout):
        while True:
            if proc.returncode is not None:
                raise ServiceError(f"{what} exited ({proc.returncode}): {_tail(log)}")
            try:
                _r, w = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            w.close()
            await w.wait_closed()
            return


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:].strip() or "(nothing logged)"
    except OSError:
        return "(no log)"


class Broker:
    """`async with Broker(workdir) as b:` a Mosquitto on `b.host:b.port`, stopped (SIGTERM, then kill) on exit."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Broker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(config_text(self.port))
        with self.log.open("ab") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                mosquitto_path(), "-c", str(self.conf), stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                process_group=0, preexec_fn=die_with_parent)  # fmt: skip
        try:
            await wait_listening(self.host, self.port, self.proc, what="mosquitto", log=self.log)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            await stop_process(proc, timeout)


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Send `sig`, wait up to `timeout` s, then kill. Returns the exit status."""
    if proc.returncode is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode

"""sd_notify over a real AF_UNIX datagram socket bound by the test, as systemd binds NOTIFY_SOCKET.

The receiving socket has SO_TIMESTAMPNS on, so every datagram carries the kernel's time of arrival, which
for a local datagram socket is the moment the agent sent it; the gaps between pings are measured on those
stamps, not on when the test got round to reading them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.sdnotify import Heartbeat, Notifier, watchdog_task

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux, asm-generic value
TIMESPEC = struct.Struct("@ll")  # struct timespec {long tv_sec; long tv_nsec;}


class Listener:
    """systemd's side: a bound datagram socket that records (kernel time, message)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setblocking(False)
        self.got: list[tuple[float, str]] = []

    @property
    def env_value(self) -> str:
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def drain(self) -> None:
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(TIMESPEC.size))
            except BlockingIOError:
                return
            stamp = time.time()
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack(raw[: TIMESPEC.size])
                    stamp = sec + nsec / 1e9
            self.got.append((stamp, data.decode()))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self.drain)

    def messages(self) -> list[str]:
        return [m for _, m in self.got]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener() -> Iterator[Listener]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer, so use a short temp dir.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        lst = Listener(str(Path(d) / "notify"))
        yield lst
        lst.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    lst = Listener("\0edge-test-" + uuid.uuid4().hex)
    yield lst
    lst.close()


def test_no_socket_is_a_quiet_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready("up") is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None
    n.close()


def test_unsupported_socket_kind_is_ignored() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled


def test_ready_status_stopping_over_a_path_socket(path_listener: Listener) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value}) as n:
        assert n.ready("3 doors, rights version 7")
        assert n.status("link down")
        assert n.stopping()
    path_listener.drain()
    assert path_listener.messages() == [
        "READY=1\nSTATUS=3 doors, rights version 7",
        "STATUS=link down",
        "STOPPING=1",
    ]


def test_abstract_namespace_socket(abstract_listener: Listener) -> None:
    assert abstract_listener.env_value.startswith("@edge-test-")
    with Notifier.from_env({"NOTIFY_SOCKET": abstract_listener.env_value}) as n:
        assert n.ready()
        assert n.watchdog()
    abstract_listener.drain()
    assert abstract_listener.messages() == ["READY=1", "WATCHDOG=1"]


def test_status_text_cannot_inject_assignments(path_listener: Listener) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value}) as n:
        n.status("door front\nREADY=1\rX")
    path_listener.drain()
    assert path_listener.messages() == ["STATUS=door front READY=1 X"]


def test_send_to_a_vanished_socket_returns_false() -> None:
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        n = Notifier.from_env({"NOTIFY_SOCKET": str(Path(d) / "gone")})
        assert n.enabled
        assert n.ready() is False  # ENOENT is swallowed, not raised into the agent
        n.close()


def test_watchdog_interval_and_pid_check() -> None:
    me = str(os.getpid())
    assert Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "10000000"}).watchdog_interval() == 10.0
    assert (
        Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": me}).watchdog_interval()
        == 4.0
    )
    other = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval() is None  # for another process
    assert Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "nonsense"}).watchdog_interval() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "0"}).watchdog_interval() is None


def test_child_process_notifies_from_its_environment(path_listener: Listener) -> None:
    """What systemd does: start a process with NOTIFY_SOCKET in its environment and wait for READY=1."""
    code = "from edge.sdnotify import Notifier; n = Notifier.from_env(); n.ready('child up'); n.watchdog()"
    env = {**os.environ, "NOTIFY_SOCKET": path_listener.env_value}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    path_listener.drain()
    assert path_listener.messages() == ["READY=1\nSTATUS=child up", "WATCHDOG=1"]


async def test_watchdog_pings_periodically_and_stop_while_the_loop_is_blocked(abstract_listener: Listener) -> None:
    """WATCHDOG_USEC=200 ms: pings every 100 ms; a coroutine that blocks the loop for 1.2 s stops them."""
    loop = asyncio.get_running_loop()
    abstract_listener.attach(loop)
    env = {"NOTIFY_SOCKET": abstract_listener.env_value, "WATCHDOG_USEC": "200000"}
    notifier = Notifier.from_env(env)
    blocked: list[tuple[float, float]] = []

    try:
        async with asyncio.TaskGroup() as tg:
            wd = tg.create_task(watchdog_task(notifier, lambda: True), name="watchdog")
            await asyncio.sleep(0.6)
            # No await between the marks: this coroutine blocks the loop that runs the watchdog task.
            notifier.notify(X_MARK="before")
            start = time.time()
            time.sleep(1.2)  # noqa: TID251 - the point of the test: a stalled event loop
            blocked.append((start, time.time()))
            notifier.notify(X_MARK="after")
            await asyncio.sleep(0.6)
            wd.cancel()
    finally:
        loop.remove_reader(abstract_listener.sock.fileno())
        notifier.close()
    abstract_listener.drain()
    got = abstract_listener.got
    marks = [i for i, (_, m) in enumerate(got) if m.startswith("X_MARK=")]
    assert len(marks) == 2
    before = [t for t, m in got[: marks[0]] if m == "WATCHDOG=1"]
    after = [t for t, m in got[marks[1] :] if m == "WATCHDOG=1"]
    between = [m for _, m in got[marks[0] + 1 : marks[1]]]
    assert len(before) >= 2, got  # periodic while the loop runs (0.6 s at a 0.1 s period)
    assert len(after) >= 2, got  # and again once it runs again
    assert between == []  # nothing at all while the loop was blocked
    # The gap in the kernel's send stamps spans the whole stall: no ping was sent while the loop was blocked.
    (b_start, b_end) = blocked[0]
    gaps = [b - a for a, b in zip(before + after, (before + after)[1:], strict=False)]
    assert max(gaps) >= b_end - b_start - 0.01
    assert before[-1] <= b_start + 0.01 and after[0] >= b_end - 0.01


async def test_unhealthy_agent_withholds_pings(path_listener: Listener) -> None:
    """The loop keeps running but the health check fails (e.g. the tap path's tick is stale): no pings."""
    loop = asyncio.get_running_loop()
    path_listener.attach(loop)
    notifier = Notifier(path_listener.address)
    healthy = True
    ticks = 0
    try:
        async with asyncio.TaskGroup() as tg:
            wd = tg.create_task(watchdog_task(notifier, lambda: healthy, interval=0.05), name="watchdog")
            await asyncio.sleep(0.3)
            healthy = False
            notifier.notify(X_MARK="sick")
            for _ in range(8):  # the loop is alive all along
                await asyncio.sleep(0.05)
                ticks += 1
            healthy = True
            notifier.notify(X_MARK="well")
            await asyncio.sleep(0.3)
            wd.cancel()
    finally:
        loop.remove_reader(path_listener.sock.fileno())
        notifier.close()
    path_listener.drain()
    msgs = path_listener.messages()
    sick, well = msgs.index("X_MARK=sick"), msgs.index("X_MARK=well")
    assert ticks == 8
    assert "WATCHDOG=1" in msgs[:sick]
    assert msgs[sick + 1 : well] == []
    assert "WATCHDOG=1" in msgs[well + 1 :]


async def test_no_watchdog_configured_waits_for_ever() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@nobody-listens"})
    task = asyncio.create_task(watchdog_task(notifier, lambda: True))
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    notifier.close()


def test_heartbeat_goes_stale_on_a_fake_clock() -> None:
    now = [100.0]
    hb = Heartbeat(5.0, clock=lambda: now[0])
    assert hb()
    now[0] = 104.0
    assert hb.healthy()
    now[0] = 105.5
    assert not hb()
    hb.beat()
    assert hb() and hb.age() == 0.0

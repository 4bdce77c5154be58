"""`broker.listen_port`: the ports the bench's broker clusters listen on stay out of the kernel's ephemeral range
(a loopback connection's local port could otherwise take a killed node's port before it restarts)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cloud_bridge.service.broker import ServiceError, ephemeral_range, listen_port


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    low, high = ephemeral_range()
    assert 1024 < low <= high
    ports = [listen_port() for _ in range(200)]
    assert len(set(ports)) == 200
    assert all(10000 <= p < low for p in ports)
    for p in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_the_range_is_read_from_the_kernel_file(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("20000\t60999\n")
    assert ephemeral_range(f) == (20000, 60999)
    assert all(10000 <= listen_port(path=f) < 20000 for _ in range(50))


def test_a_port_in_use_is_not_given(tmp_path: Path) -> None:
    # a listener on the only two candidates but one: the free one is the answer, every time until given
    f = tmp_path / "range"
    for floor in range(10000, 30000, 2):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", floor))
                b.bind(("127.0.0.1", floor + 1))
            except OSError:
                continue
            b.close()
            f.write_text(f"{floor + 2} 60999\n")
            assert listen_port(floor=floor, path=f) == floor + 1
            return
    raise AssertionError("no two adjacent free ports below 30000")


def test_no_room_below_the_ephemeral_range_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("9000\t60999\n")
    with pytest.raises(ServiceError, match="ephemeral port range starts at 9000"):
        listen_port(path=f)

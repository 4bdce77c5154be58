"""A real NATS cluster for the tests and bench/fleet_cluster.py: N `nats-server` nodes on loopback, each with its
own name, client, route, MQTT and monitoring ports and JetStream folder (MQTT in NATS keeps its sessions and
QoS 1 messages in JetStream, which must be on: in a cluster, JetStream's meta group needs a majority). Started
and stopped by pid; `kill(i)` is a SIGKILL, `start_node(i)` restarts it on the same folder.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cloud_bridge.service.broker import listen_port

SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


@dataclass
class Node:
    name: str
    client: int
    route: int
    mqtt: int
    http: int
    data: Path
    proc: subprocess.Popen[bytes] | None = None


class NatsCluster:
    """`start()` N nodes and wait until every one has its routes and JetStream up; `kill(i)`, `start_node(i)`,
    `healthy()`, `stop()`. MQTT endpoints: `endpoints`."""

    host = "127.0.0.1"

    def __init__(self, nodes: int = 3, root: Path | None = None) -> None:
        if not Path(SERVER).exists():
            raise RuntimeError("NATS is not installed: apt-get install nats-server (sh .ci/bootstrap does)")
        self.root = root or Path(tempfile.mkdtemp(prefix="edge-nats-"))
        self.nodes = [Node(f"n{i}", listen_port(), listen_port(), listen_port(), listen_port(), self.root / f"n{i}")
                      for i in range(nodes)]  # fmt: skip

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, n.mqtt) for n in self.nodes]

    def _config(self, n: Node) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{m.route}" for m in self.nodes if m is not n)
        store = json.dumps(str(n.data / "js"))
        return f"""server_name: {n.name}
listen: 127.0.0.1:{n.client}
http: 127.0.0.1:{n.http}
max_payload: 1048576
jetstream {{
  store_dir: {store}
  max_memory_store: 256MB
  max_file_store: 2GB
}}
cluster {{
  name: acs
  listen: 127.0.0.1:{n.route}
  routes: [{routes}]
}}
mqtt {{
  listen: 127.0.0.1:{n.mqtt}
  ack_wait: "30s"
  max_ack_pending: 1000
  # the MQTT streams (sessions, QoS 1 messages, retained) on every node: NATS picks the replicas from the
  # servers it knows at the first MQTT connect, and chose 2 here at times; an R2 stream that loses one
  # node has no quorum and refuses every MQTT CONNECT until the node is back
  stream_replicas: 3
}}
"""

    @property
    def version(self) -> str:
        """`nats-server --version`'s number."""
        r = subprocess.run([SERVER, "--version"], capture_output=True, text=True, timeout=10, check=False)
        return (r.stdout or r.stderr).strip().rpartition("v")[2] or "unknown"

    def start(self, timeout: float = 60.0) -> None:
        for i in range(len(self.nodes)):
            self.start_node(i, wait=False)
        self.wait_healthy(timeout)

    def start_node(self, i: int, *, wait: bool = True, timeout: float = 60.0) -> None:
        n = self.nodes[i]
        n.data.mkdir(parents=True, exist_ok=True)
        conf = n.data / "nats.conf"
        conf.write_text(self._config(n))
        with (n.data / "nats.log").open("ab") as logf:
            n.proc = subprocess.Popen([SERVER, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        if wait:
            self.wait_healthy(timeout)

    def _get(self, n: Node, path: str) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{n.http}{path}", timeout=2) as r:
                out: dict[str, object] = json.loads(r.read())
                return out
        except (OSError, ValueError):
            return None

    def alive(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.proc is not None and n.proc.poll() is None]

    def healthy(self) -> bool:
        """Every node runs, has a route to every other and reports JetStream healthy (`/healthz?js-enabled`)."""
        if len(self.alive()) != len(self.nodes):
            return False
        for n in self.nodes:
            routez = self._get(n, "/routez")
            if routez is None or int(str(routez.get("num_routes", 0))) < len(self.nodes) - 1:
                return False
            h = self._get(n, "/healthz?js-enabled-only=true")
            if h is None or h.get("status") != "ok":
                return False
            jsz = self._get(n, "/jsz")
            if jsz is None or not isinstance(jsz.get("meta_cluster"), dict) or not jsz["meta_cluster"].get("leader"):
                return False
        return True

    def meta_leader(self) -> int | None:
        """The node that leads JetStream's meta group now (killing it is the hardest case for MQTT)."""
        for n in self.nodes:
            jsz = self._get(n, "/jsz")
            meta = jsz.get("meta_cluster") if jsz else None
            if isinstance(meta, dict) and meta.get("leader"):
                return next((i for i, m in enumerate(self.nodes) if m.name == meta["leader"]), None)
        return None

    def wait_healthy(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is not None and n.proc.returncode != -9:
                    raise RuntimeError(f"nats node {n.name} exited {n.proc.returncode}: {self.logs(n)}")
            if self.healthy():
                return time.monotonic() - t0
            time.sleep(0.25)  # noqa: TID251 - fixture setup, not in an event loop
        raise RuntimeError(f"nats cluster not healthy after {timeout:.0f} s: " +
                           " | ".join(self.logs(n) for n in self.nodes))  # fmt: skip

    def logs(self, n: Node) -> str:
        p = n.data / "nats.log"
        return p.read_text(errors="replace")[-1500:] if p.exists() else ""

    def kill(self, i: int) -> None:
        p = self.nodes[i].proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(15)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

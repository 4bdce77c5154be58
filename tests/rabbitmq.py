"""A real RabbitMQ cluster for the tests and bench/fleet_cluster.py: N nodes on loopback, each with its own node
name, ports, data folder and log; one epmd of our own on its own port (`ERL_EPMD_PORT`); one Erlang cookie in
a temp HOME. Everything is started by pid and stopped by pid (`stop()`), so nothing is left running.

Each node runs Debian's RabbitMQ 3.10 (`/usr/lib/rabbitmq/bin/rabbitmq-server`, not the root wrapper that
switches to the `rabbitmq` user) with the MQTT plugin, `mqtt.durable_queue_type = quorum` (a persistent MQTT
session's queue is replicated on every node) and the cluster formed by `classic_config` peer discovery.
`kill(i)` is a SIGKILL of node i's Erlang VM; `start_node(i)` starts it again on the same data folder (it
rejoins the cluster).

`RabbitCluster(..., chroot=Path("/opt/trixie"))` (or `EDGE_RABBITMQ_ROOT`) runs another RabbitMQ instead: the
one installed in a Debian root there (`sh bench/rabbitmq4-root.sh` makes one with Debian 13's RabbitMQ 4.0 and
Erlang 27, which bookworm cannot install beside its own), every node, epmd and CLI call run through
`chroot(8)` (same network, same pids: chroot execs the command), data folders under that root's /tmp.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cloud_bridge.service.broker import listen_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


@dataclass
class Node:
    name: str  # short node name (before the @)
    amqp: int
    mqtt: int
    dist: int
    data: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def full(self) -> str:
        return f"{self.name}@localhost"


class RabbitCluster:
    """`start()` N nodes and wait until the cluster lists them all running; `kill(i)`, `start_node(i)`,
    `healthy()`, `stop()`. MQTT endpoints: `endpoints` (host, port) per node."""

    host = "127.0.0.1"

    def __init__(
        self, nodes: int = 3, root: Path | None = None, *, chroot: Path | None = None, metadata_store: str = "mnesia"
    ) -> None:
        if metadata_store not in ("mnesia", "khepri"):
            raise ValueError(f"metadata_store: mnesia or khepri, not {metadata_store!r}")
        #: "khepri": the Raft-based metadata store (feature flag `khepri_db`, supported from RabbitMQ 4.0,
        #: the default from 4.2), switched on once the cluster has formed; it cannot be switched off again.
        self.metadata_store = metadata_store
        env_root = os.environ.get("EDGE_RABBITMQ_ROOT")
        self.chroot = chroot or (Path(env_root) if env_root else None)
        if self.chroot is not None:
            if not (self.chroot / SERVER.lstrip("/")).exists():
                raise RuntimeError(f"no RabbitMQ in {self.chroot}: sh bench/rabbitmq4-root.sh {self.chroot}")
            if not os.path.ismount(self.chroot / "proc"):  # the VM reads /proc (memory, os_mon)
                subprocess.run(["mount", "-t", "proc", "proc", str(self.chroot / "proc")], check=True)
            inside = Path(tempfile.mkdtemp(prefix="edge-rmq-", dir=self.chroot / "tmp"))
            if root is not None:  # the caller's folder names the data (logs) inside the root
                root.parent.mkdir(parents=True, exist_ok=True)
                root.symlink_to(inside)
            root = inside
        elif not Path(SERVER).exists():
            raise RuntimeError("RabbitMQ is not installed: apt-get install rabbitmq-server (sh .ci/bootstrap does)")
        self.root = root or Path(tempfile.mkdtemp(prefix="edge-rmq-"))
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex().upper())
        cookie.chmod(0o600)
        self.epmd_port = listen_port()
        self.epmd: subprocess.Popen[bytes] | None = None
        #: Why the last `healthy()` said no ("" when it said yes): what a timeout reports first.
        self.why_unhealthy = ""
        tag = os.urandom(3).hex()
        self.nodes = [
            Node(f"acs{tag}n{i}", listen_port(), listen_port(), listen_port(), self.root / f"n{i}")
            for i in range(nodes)
        ]

    def _inner(self, path: Path) -> str:
        """`path` as the broker sees it (inside the chroot, when there is one)."""
        return "/" + str(path.relative_to(self.chroot)) if self.chroot is not None else str(path)

    def _cmd(self, *argv: str) -> list[str]:
        return ["chroot", str(self.chroot), *argv] if self.chroot is not None else list(argv)

    @property
    def version(self) -> str:
        """The RabbitMQ version that runs (from its package's app file)."""
        base = (self.chroot or Path("/")) / "usr/lib/rabbitmq/lib"
        for app in sorted(base.glob("rabbitmq_server-*")):
            return app.name.removeprefix("rabbitmq_server-")
        return "unknown"

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, n.mqtt) for n in self.nodes]

    def _env(self, n: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=self._inner(self.home), ERL_EPMD_PORT=str(self.epmd_port), ERL_EPMD_ADDRESS="127.0.0.1")
        if n is not None:
            env.update(
                RABBITMQ_NODENAME=n.full,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(n.amqp),
                RABBITMQ_DIST_PORT=str(n.dist),
                RABBITMQ_MNESIA_BASE=self._inner(n.data / "mnesia"),
                RABBITMQ_LOG_BASE=self._inner(n.data / "log"),
                RABBITMQ_CONFIG_FILE=self._inner(n.data / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=self._inner(n.data / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=self._inner(n.data / "enabled_plugins"),
                RABBITMQ_PID_FILE=self._inner(n.data / "pid"),
                RABBITMQ_ENABLED_PLUGINS="rabbitmq_mqtt",
                RUNNING_UNDER_SYSTEMD="1",  # exec the VM (no shell in between): our pid is the node's
                # a small machine: fewer schedulers than cores would starve nothing, and no busy waiting
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none",
            )
        return env

    def _config(self, n: Node) -> str:
        peers = "\n".join(f"cluster_formation.classic_config.nodes.{i + 1} = {m.full}" for i, m in
                          enumerate(self.nodes))  # fmt: skip
        anonymous = ("anonymous_login_user = guest\nanonymous_login_pass = guest\n" if not self.version.startswith("3.")
                     else "mqtt.allow_anonymous = true\nmqtt.default_user = guest\nmqtt.default_pass = guest\n")
        return f"""listeners.tcp.default = 127.0.0.1:{n.amqp}
mqtt.listeners.tcp.default = 127.0.0.1:{n.mqtt}
{anonymous}mqtt.durable_queue_type = quorum
loopback_users = none
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.6
log.console = false
log.file.level = warning
cluster_formation.peer_discovery_backend = classic_config
{peers}
"""

    def start(self, timeout: float = 120.0) -> None:
        self.epmd = subprocess.Popen(self._cmd("epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for i in range(len(self.nodes)):
            self.start_node(i, wait=False)
        self.wait_healthy(timeout)
        if self.metadata_store == "khepri":
            if self.version.startswith("3."):
                raise RuntimeError(f"RabbitMQ {self.version}: Khepri is supported from 4.0 (--rabbitmq-root)")
            r = self.ctl(0, "enable_feature_flag", "--opt-in", "khepri_db", timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"enabling khepri_db failed ({r.returncode}): {(r.stdout + r.stderr)[-600:]}")
            self.wait_healthy(timeout)
            r = self.ctl(0, "eval", "rabbit_khepri:is_enabled().")
            if r.stdout.strip() != "true":
                raise RuntimeError(f"khepri_db enabled, yet rabbit_khepri:is_enabled() says {r.stdout + r.stderr!r}")

    def start_node(self, i: int, *, wait: bool = True, timeout: float = 120.0) -> None:
        n = self.nodes[i]
        n.data.mkdir(parents=True, exist_ok=True)
        (n.data / "rabbitmq.conf").write_text(self._config(n))
        (n.data / "advanced.config").write_text("[].\n")
        (n.data / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        with (n.data / "stdout.log").open("ab") as logf:
            n.proc = subprocess.Popen(self._cmd(SERVER), env=self._env(n), stdin=subprocess.DEVNULL, stdout=logf,
                                      stderr=logf, start_new_session=True)  # fmt: skip
        if wait:
            self.wait_healthy(timeout)

    def ctl(self, i: int, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._cmd(CTL, "-n", self.nodes[i].full, *args), env=self._env(), capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip

    def alive(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.proc is not None and n.proc.poll() is None]

    def healthy(self) -> bool:
        """Every node runs, listens for MQTT, and (asked through one of them, one CLI call: each starts an Erlang
        VM) sees every node running with its listeners up."""
        alive = self.alive()
        if len(alive) != len(self.nodes):
            self.why_unhealthy = f"nodes not running: {sorted(set(range(len(self.nodes))) - set(alive))}"
            return False
        for i, (h, p) in enumerate(self.endpoints):
            try:
                socket.create_connection((h, p), timeout=1).close()
            except OSError as e:
                self.why_unhealthy = f"node {i}: MQTT port {p} refuses connections ({e})"
                return False
        nodes = ", ".join(f"'{n.full}'" for n in self.nodes)
        running = "case erlang:function_exported(rabbit_nodes, list_running, 0) of true -> list_running; " \
                  "false -> all_running end"  # (3.10 has all_running; 4.x list_running)
        expr = (f"[{{N, lists:sort(rpc:call(N, rabbit_nodes, {running}, [])), "
                f"length(rpc:call(N, rabbit_networking, node_listeners, [N]))}} || N <- [{nodes}]].")  # fmt: skip
        try:
            r = self.ctl(0, "eval", expr, timeout=20)
        except subprocess.TimeoutExpired:
            self.why_unhealthy = "rabbitmqctl eval (cluster membership) took over 20 s"
            return False
        if r.returncode != 0:
            self.why_unhealthy = f"rabbitmqctl eval exited {r.returncode}: {(r.stdout + r.stderr)[-600:]}"
            return False
        # [{a@localhost,[a@localhost,b@localhost,...],3}, ...]: every node lists every node, and has listeners
        want = sorted(n.full for n in self.nodes)
        every = "[" + ",".join(want) + "]"
        compact = re.sub(r"\s+", "", r.stdout)
        ok = compact.count(every) == len(self.nodes) and not re.search(r",0\}", compact)
        self.why_unhealthy = "" if ok else f"not every node sees every node running with listeners: {compact[-600:]}"
        return ok

    def wait_healthy(self, timeout: float = 120.0) -> float:
        """Wait until `healthy()`; returns the seconds it took. Raises RuntimeError with the logs' tails."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is not None and n.proc.returncode not in (None, -9):
                    raise RuntimeError(f"rabbitmq node {n.full} exited {n.proc.returncode}: {self.logs(n)}")
            if self.healthy():
                return time.monotonic() - t0
            time.sleep(0.5)  # noqa: TID251 - fixture setup, not in an event loop
        raise RuntimeError(f"rabbitmq cluster not healthy after {timeout:.0f} s ({self.why_unhealthy}); logs: " +
                           " | ".join(self.logs(n) for n in self.nodes))  # fmt: skip

    def logs(self, n: Node) -> str:
        out = []
        for p in [n.data / "stdout.log", *sorted((n.data / "log").glob("*.log"))]:
            if p.exists():
                keep = 400 if p.name == "stdout.log" else 1500  # stdout: mostly the start banner
                out.append(f"{p.name}: {p.read_text(errors='replace')[-keep:]}")
        return "\n".join(out)

    def kill(self, i: int) -> None:
        """SIGKILL node i's Erlang VM (no shutdown: its connections just vanish)."""
        p = self.nodes[i].proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            self._reap_children(self.nodes[i])

    def stop(self) -> None:
        """Stop every node by pid (SIGTERM, then SIGKILL), then our epmd; remove the folders."""
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(30)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(10)
                self._reap_children(n)
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.terminate()
            self.epmd.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def _reap_children(self, n: Node) -> None:
        """The VM's helpers (erl_child_setup, inet_gethost) run in the node's own session: end that group."""
        p = n.proc
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

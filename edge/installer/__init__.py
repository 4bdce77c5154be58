"""The local installer page: a small Litestar app served by uvicorn inside the agent ([installer] enabled).

`async with Installer(cfg, gateway)` prepares it (accounts, the HTTPS certificate on a LAN address, the setup
code while no account exists: logged to the system journal and shown by `edge status`); `run()` serves it
until cancelled, as the agent's `installer` task. The listening socket is bound here (a port in use is an
`OSError` the agent's supervisor journals and retries, never uvicorn's `sys.exit`), and uvicorn's own
signal handling is left out: the agent owns SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Self

import uvicorn

from edge.agent.ports import GatewayPort
from edge.agent.status import InstallerInfo
from edge.config import Config

from .app import create_app
from .auth import Accounts
from .tls import ensure_certificate

log = logging.getLogger("edge.installer")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the agent handles SIGTERM/SIGINT
        yield


class Installer:
    def __init__(self, cfg: Config, gateway: GatewayPort) -> None:
        self.cfg = cfg
        self.section = cfg.installer
        self.gateway = gateway
        self.dir = cfg.state_dir / "installer"
        self.accounts = Accounts(self.dir, session_hours=self.section.session_hours,
                                 setup_code_hours=self.section.setup_code_hours)  # fmt: skip
        self.fingerprint: str | None = None
        self._tls: tuple[str, str] | None = None
        #: The port actually bound (the configured one; tests may ask for 0).
        self.port = self.section.port

    @property
    def url(self) -> str:
        scheme = "http" if self.section.loopback else "https"
        host = self.section.listen if ":" not in self.section.listen else f"[{self.section.listen}]"
        return f"{scheme}://{host}:{self.port}/"

    def info(self) -> InstallerInfo:
        return InstallerInfo(url=self.url, fingerprint=self.fingerprint, setup_code=self.accounts.setup_code)

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.accounts.load)
        if not self.section.loopback:
            cert, key, self.fingerprint = await asyncio.to_thread(
                ensure_certificate, self.dir, address=self.section.listen, name=self.cfg.site.gateway
            )
            self._tls = (str(cert), str(key))
            log.info("installer page certificate SHA-256 fingerprint %s", self.fingerprint)
        code = self.accounts.new_setup_code()
        if code is not None:
            # The system journal only (root and adm can read it), never the event journal sent to the cloud.
            log.warning("installer page %s: no account yet; one-time setup code %s (valid %.0f h; also shown by "
                        "`edge status`)", self.url, code, self.section.setup_code_hours)  # fmt: skip
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.section.listen else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.section.listen, self.section.port))
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def run(self) -> None:
        """Serve on a thread of its own (its own event loop): rendering a page never takes a turn of the agent's
        loop; the handlers read the agent's state through `AgentLoop` (copies made on its loop). The thread is not
        niced: it holds the GIL while it runs Python, and a niced holder preempted by other processes would keep
        the loop thread waiting for the GIL (priority inversion)."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        config = uvicorn.Config(
            create_app(self.gateway, self.accounts, loop), log_level="warning",
            access_log=False, lifespan="off", server_header=False, date_header=False, proxy_headers=False,
            timeout_keep_alive=5, limit_concurrency=32,
            ssl_certfile=self._tls[0] if self._tls else None, ssl_keyfile=self._tls[1] if self._tls else None,
        )  # fmt: skip
        server = _Server(config)
        failed: list[BaseException] = []
        ended = asyncio.Event()

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as e:  # handed to the agent's supervisor
                failed.append(e)
            finally:
                with contextlib.suppress(RuntimeError):  # the agent's loop is closed already
                    loop.call_soon_threadsafe(ended.set)

        thread = threading.Thread(target=serve, name="installer-http", daemon=True)
        log.info("installer page on %s", self.url)
        thread.start()
        try:
            await ended.wait()
            raise RuntimeError(f"the installer page stopped: {failed[0] if failed else 'no reason given'}")
        finally:
            server.should_exit = True
            await asyncio.to_thread(thread.join, 5.0)
            if thread.is_alive():
                server.force_exit = True
                await asyncio.to_thread(thread.join, 5.0)
            sock.close()


__all__ = ["Installer"]

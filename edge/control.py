"""The local control socket: `edge status` and the simulator's commands, as JSON lines over a Unix socket.

The socket is created with mode 0600 in the runtime directory. It answers the requests it has handlers for:
the agent registers status only; the simulator's requests (tap, door, rex) have handlers only when edge/cli.py
runs a simulated hardware profile and installs them (edge/sim/hands.py), so nothing on the socket can open a
real door.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import msgspec

log = logging.getLogger(__name__)


class StatusRequest(msgspec.Struct, tag="status", forbid_unknown_fields=True):
    pass


class TapRequest(msgspec.Struct, tag="tap", forbid_unknown_fields=True):
    door: str
    card: int
    format: str | None = None
    facility: int | None = None
    pin: str | None = None


class DoorRequest(msgspec.Struct, tag="door", forbid_unknown_fields=True):
    door: str
    action: Literal["open", "close"]


class RexRequest(msgspec.Struct, tag="rex", forbid_unknown_fields=True):
    door: str


Request = StatusRequest | TapRequest | DoorRequest | RexRequest


class Reply(msgspec.Struct, omit_defaults=True):
    ok: bool
    error: str | None = None
    #: A handler's result: a msgspec Struct (e.g. `edge.agent.AgentStatus`) or plain JSON values; decoded
    #: by `request` as plain JSON (dicts).
    result: Any = None


_req_dec = msgspec.json.Decoder(Request)
_rep_dec = msgspec.json.Decoder(Reply)
_enc = msgspec.json.Encoder()

#: A request handler: the request in, its result (anything msgspec encodes as JSON) out.
Handler = Callable[[Any], Awaitable[object]]


class ControlServer:
    def __init__(self, path: Path | str, handlers: dict[type, Handler]) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(_enc.encode(await self._handle(line)) + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> Reply:
        try:
            req = _req_dec.decode(line)
        except msgspec.DecodeError as e:
            return Reply(ok=False, error=f"bad request: {e}")
        handler = self.handlers.get(type(req))
        if handler is None:
            return Reply(ok=False, error=f"{type(req).__name__} is not available on this gateway")
        try:
            return Reply(ok=True, result=await handler(req))
        except (ValueError, KeyError, LookupError) as e:
            return Reply(ok=False, error=str(e))
        except Exception as e:  # report, never kill the agent for a bad request
            log.exception("control request failed")
            return Reply(ok=False, error=f"internal error: {e}")


async def request(path: Path | str, req: Request, *, wait_s: float = 10.0) -> Reply:
    """Send one request to a running agent and return its reply."""
    async with asyncio.timeout(wait_s):
        reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(_enc.encode(req) + b"\n")
        await writer.drain()
        async with asyncio.timeout(wait_s):
            line = await reader.readline()
        if not line:
            raise ConnectionError("agent closed the control connection")
        return _rep_dec.decode(line)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

"""The command gate: what the gateway acts on only once the site's signature says so.

`SiteKeys` holds the site's public key(s): the one configured (`link.command_key`) until a signed `RotateKey`
replaces it. The rotated key is stored in the state directory (`link-command-key.json`) before the ok is sent
and wins over the configured key on every later start; the fingerprint of the key in use is logged at start.
`SiteKeys.open` verifies every signed downlink envelope (change sets, manifests, rebirth, event acks).

`CommandGate` takes a command from its topic to its result: size, signature, target and times (`signing.check`),
the nonce (`NonceStore`: a replay gets the first result back in `original`), then the action through the
agent's `CommandHandler`; every command carried out is journalled (`command.executed`, a rotation as
`security.key_rotated` with both fingerprints), every refusal too (`security.command_rejected`, rate-limited).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud_bridge.protocol import (
    AreaMoves,
    Command,
    CommandResult,
    ErrorInfo,
    Lockdown,
    OsdpFirmwareChunk,
    ProtocolError,
    Provision,
    ReaderAction,
    RebirthAction,
    ResetAntiPassback,
    Resync,
    ResyncRequest,
    RotateKey,
    SetDoorMode,
    Signed,
    Unlock,
    decode_command,
    decode_command_body,
    decode_command_result,
    encode,
)
from cloud_bridge.settings import LinkConfig
from cloud_bridge.signing import (
    CommandRejected,
    KeyState,
    NonceStore,
    check,
    fingerprint,
    load_key_state,
    load_public_key,
    open_signed,
    save_key_state,
)
from cloud_bridge.topics import Leaf
from edge.errors import CommandFailed
from edge.events import COMMAND_EXECUTED, KEY_ROTATED, SECURITY_COMMAND_REJECTED

from .ports import CommandHandler, Outbox, Rights
from .reply import Replies, decode_off_loop, error_info

log = logging.getLogger("cloud_bridge.link")

#: The command key state in the link's state directory.
KEY_FILE = "link-command-key.json"


class SiteKeys:
    """The site's public key(s) this gateway verifies with."""

    def __init__(self, cfg: LinkConfig, configured: bytes, path: Path, clock: Callable[[], float]) -> None:
        load_public_key(configured)  # 32 bytes, or ValueError now
        self.cfg = cfg
        self.configured = bytes(configured)
        self.path = path
        self.clock = clock
        self.state = KeyState(key=self.configured.hex())
        self._verifiers: dict[bytes, Ed25519PublicKey] = {}

    async def load(self) -> None:
        stored = await asyncio.to_thread(load_key_state, self.path)
        if stored is None:
            log.info("command key %s (link.command_key)", fingerprint(self.configured))
            return
        self.state = stored
        now = self.clock()
        in_use = stored.in_use(now)
        log.info("command key %s (rotated by %s, stored in %s)%s", fingerprint(in_use), stored.request_id or "?",
                 self.path, "" if in_use == self.configured else
                 f"; the configured link.command_key {fingerprint(self.configured)} is superseded")  # fmt: skip
        if stored.pending(now):
            log.info("command key %s takes over at %s", fingerprint(bytes.fromhex(stored.key)), stored.not_before)

    def in_use(self) -> bytes:
        return self.state.in_use(self.clock())

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key commands must be signed with now."""
        return self.verifier(self.in_use())

    def verifier(self, raw: bytes) -> Ed25519PublicKey:
        v = self._verifiers.get(raw)
        if v is None:
            v = self._verifiers[raw] = load_public_key(raw)
        return v

    def open(self, msg: Signed) -> Provision:
        """Verify a signed envelope with the command key in use (and, while a rotation is pending, also the
        new one: the cloud signs provisioning with the key it just rotated to)."""
        now = self.clock()
        keys = [self.state.in_use(now)]
        if self.state.pending(now):
            keys.append(bytes.fromhex(self.state.key))
        err: CommandRejected | None = None
        for k in keys:
            try:
                return open_signed(msg, self.verifier(k), site=self.cfg.site, gateway=self.cfg.gateway)
            except CommandRejected as e:
                if e.code != "bad_signature":
                    raise
                err = e
        assert err is not None
        raise err

    async def store(self, nxt: KeyState) -> None:
        """Make `nxt` the key state, on disk first."""
        await asyncio.to_thread(save_key_state, self.path, nxt)
        self.state = nxt


class CommandGate:
    """Verifies, deduplicates and carries out cloud commands (`on_command` is the handler of the command topic)."""

    def __init__(self, cfg: LinkConfig, *, keys: SiteKeys, nonces: NonceStore, replies: Replies, outbox: Outbox,
                 rights: Rights, commands: CommandHandler, rebirth: Callable[[], Awaitable[None]],
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.cfg = cfg
        self.keys = keys
        self.nonces = nonces
        self.replies = replies
        self.outbox = outbox
        self.rights = rights
        self.commands = commands
        self.rebirth = rebirth
        self.clock = clock
        #: commands carried out beside the read loop (`runs_in_background`), by nonce: the link keeps reading
        #: (event acks, rights, other commands) while a reader's key rotation waits for its handshake
        self._background: dict[str, asyncio.Task[None]] = {}

    @staticmethod
    def runs_in_background(a: object) -> bool:
        """OSDP reader commands wait on a reader (a key rotation up to `rotate_timeout`, 15 s; an output's
        answer; the firmware's staged file read and hashed): they run as their own task, which publishes the
        result. The work itself belongs to the reader service (`edge.readers.osdp.remote`): a rotation or a
        transfer goes on, and is journalled, even if this wait is cancelled. Firmware chunks stay in line:
        they are quick, and must land in the order sent."""
        return isinstance(a, ReaderAction) and not isinstance(a, OsdpFirmwareChunk)

    @property
    def running(self) -> int:
        """Commands being carried out in the background now."""
        return len(self._background)

    async def close(self) -> None:
        """Stop waiting on the commands still running (their work goes on in its service; the result is not
        published: a resend of the command gets it from the nonce store once it is there, or is refused)."""
        tasks = list(self._background.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def on_command(self, payload: bytes) -> None:
        self.replies.stats["commands"] += 1
        original: CommandResult | None = None
        try:
            too_large = self.replies.too_large(payload)
            if too_large is not None:
                raise CommandRejected("too_large", too_large.message, request_id=await self.replies.peek(payload))
            try:
                signed = await decode_off_loop(decode_command, payload)
            except ProtocolError as e:
                try:
                    plain = await decode_off_loop(decode_command_body, payload)
                except ProtocolError:
                    raise CommandRejected("malformed", str(e), request_id=await self.replies.peek(payload)) from None
                raise CommandRejected(
                    "unsigned", "command is not signed", request_id=plain.request_id, operator=plain.operator
                ) from None
            try:
                cmd = check(
                    signed, self.keys.public_key, site=self.cfg.site, gateway=self.cfg.gateway, now=self.clock(),
                    skew_s=self.cfg.command_skew_s, max_ttl_s=self.cfg.command_max_ttl_s,
                )  # fmt: skip
            except CommandRejected as e:
                # name the request (read from the unverified body, only to echo it) so the cloud can match
                e.request_id = e.request_id or await self.replies.peek(signed.body)
                raise
            fresh, prior = await self.nonces.claim(cmd)
            if self.nonces.degraded:
                log.error("command %s: %s (replays refused from memory until restart)", cmd.request_id,
                          self.nonces.degraded)  # fmt: skip
            if not fresh:
                if cmd.nonce in self._background:
                    # the cloud resent a command still being carried out: its result follows when it is done
                    log.info("command %s: resent while it runs; its result follows", cmd.request_id)
                    return
                if prior is not None:
                    with contextlib.suppress(ProtocolError):
                        original = decode_command_result(prior)
                raise CommandRejected(
                    "replayed", "this command (nonce) was received before", request_id=cmd.request_id,
                    operator=cmd.operator,
                )  # fmt: skip
        except CommandRejected as e:
            self.replies.refused(Leaf.COMMAND, e.code, e.request_id, str(e), operator=e.operator,
                                 event=SECURITY_COMMAND_REJECTED)  # fmt: skip
            await self.replies.publish(
                Leaf.COMMAND_RESULT,
                CommandResult(
                    request_id=e.request_id, ok=False, error=ErrorInfo(code=e.code, message=str(e)), original=original
                ),
            )
            return
        if self.runs_in_background(cmd.command):
            task = asyncio.get_running_loop().create_task(self._carry_out(cmd), name=f"link.command[{cmd.request_id}]")
            self._background[cmd.nonce] = task
            task.add_done_callback(functools.partial(self._ran, cmd.nonce))
            return
        await self._carry_out(cmd)

    def _ran(self, nonce: str, task: asyncio.Task[None]) -> None:
        self._background.pop(nonce, None)
        if not task.cancelled() and task.exception() is not None:
            self.replies.stats["handler_errors"] += 1
            log.error("command in the background failed", exc_info=task.exception())

    async def _carry_out(self, cmd: Command) -> None:
        result = await self.execute(cmd)
        await self.nonces.set_result(cmd.nonce, encode(result, "msgpack"))
        await self.replies.publish(Leaf.COMMAND_RESULT, result)

    async def execute(self, cmd: Command) -> CommandResult:
        a = cmd.command
        action = type(a).__struct_config__.tag
        detail: dict[str, str | int | float | bool | None] = {"request_id": cmd.request_id, "action": str(action)}
        door: str | None = None
        out: dict[str, str | int | float | bool | None] = {}
        try:
            if isinstance(a, RotateKey):
                return await self.rotate(cmd, a)
            if isinstance(a, Unlock):
                door = a.door
                detail["seconds"] = a.seconds
                await self.commands.unlock(a.door, a.seconds)
            elif isinstance(a, SetDoorMode):
                door = a.door
                detail["mode"] = None if a.mode is None else a.mode.value
                await self.commands.set_door_mode(a.door, a.mode)
            elif isinstance(a, Lockdown):
                detail["active"] = a.active
                await self.commands.lockdown(a.active)
            elif isinstance(a, Resync):
                await self.commands.resync()
                await self.replies.publish(
                    Leaf.RIGHTS_REPLY, ResyncRequest(have=self.rights.version, reason="command", ref=cmd.request_id)
                )
            elif isinstance(a, RebirthAction):
                await self.rebirth()
            elif isinstance(a, ReaderAction):
                out = await self.commands.reader_command(a)
                detail.update(out)
            elif isinstance(a, ResetAntiPassback):
                detail.update(user=a.user, area=a.area)
                detail["forgotten"] = await self.commands.reset_anti_passback(a.user, a.area)
            elif isinstance(a, AreaMoves):  # the cloud's relay: frequent, and journalled by the gateway that saw it
                await self.commands.area_moves(a.moves)
                return CommandResult(request_id=cmd.request_id, ok=True)
        except CommandFailed as e:
            log.warning("command %s (%s) failed: %s", cmd.request_id, action, e)
            return CommandResult(request_id=cmd.request_id, ok=False, error=ErrorInfo(code=e.code, message=str(e)),
                                 detail=e.detail)  # fmt: skip
        except ValueError as e:
            log.warning("command %s (%s) failed: %s", cmd.request_id, action, e)
            return CommandResult(request_id=cmd.request_id, ok=False, error=ErrorInfo(code="invalid", message=str(e)))
        except Exception as e:
            log.exception("command %s (%s) failed", cmd.request_id, action)
            return CommandResult(request_id=cmd.request_id, ok=False, error=error_info(e))
        self.outbox.record(COMMAND_EXECUTED, door=door, user=cmd.operator, detail=detail)
        return CommandResult(request_id=cmd.request_id, ok=True, detail=out)

    async def rotate(self, cmd: Command, a: RotateKey) -> CommandResult:
        """Store the new key durably, then use it: the ok is only sent once it is on disk."""
        now = self.clock()
        old = self.keys.state.in_use(now)
        new = bytes.fromhex(a.new_public_key)
        detail: dict[str, str | int | float | bool | None] = {
            "request_id": cmd.request_id, "action": "rotate_key", "old": fingerprint(old), "new": fingerprint(new),
        }  # fmt: skip
        nxt = self.keys.state.rotated(new, not_before=a.not_before, now=now, request_id=cmd.request_id,
                                      operator=cmd.operator)  # fmt: skip
        if nxt is self.keys.state:
            detail["unchanged"] = True
            log.info("command key %s: rotation %s changes nothing", fingerprint(old), cmd.request_id)
            self.outbox.record(COMMAND_EXECUTED, user=cmd.operator, detail=detail)
            return CommandResult(request_id=cmd.request_id, ok=True)
        await self.keys.store(nxt)
        if nxt.pending(now):
            detail["not_before"] = nxt.not_before
        log.warning("command key rotated by %s (%s): %s -> %s%s", cmd.operator, cmd.request_id, fingerprint(old),
                    fingerprint(new), f" from {nxt.not_before}" if nxt.pending(now) else "")  # fmt: skip
        self.outbox.record(KEY_ROTATED, user=cmd.operator, detail=detail)
        return CommandResult(request_id=cmd.request_id, ok=True)

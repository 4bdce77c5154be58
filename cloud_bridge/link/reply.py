"""How every part of the link answers the cloud: `Replies` publishes on the current connection (nothing when
the link is down: the cloud resends until it sees an answer) and refuses messages (logged, journalled at a
bounded rate by `RefusalLog`, counted). `error_info` turns an exception into the `ErrorInfo` of a reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import aiomqtt

from cloud_bridge import mqtt
from cloud_bridge.protocol import ErrorInfo, ProtocolError, encode, peek_ref
from cloud_bridge.settings import LinkConfig
from cloud_bridge.topics import Leaf, Topics
from edge.errors import ChangeRejected, StoreError
from edge.events import SECURITY_MESSAGE_REJECTED

from .ports import Outbox

log = logging.getLogger("cloud_bridge.link")
_T = TypeVar("_T")
#: Messages this large or larger are checked and decoded in a worker thread, never on the loop thread.
OFF_LOOP_BYTES = 16384


async def decode_off_loop(decoder: Callable[[bytes], _T], payload: bytes) -> _T:
    """Decode with `decoder`; a large message off the loop thread, so that taps are not held up."""
    return decoder(payload) if len(payload) < OFF_LOOP_BYTES else await asyncio.to_thread(decoder, payload)



class RefusalLog:
    """Journals refused downlink messages and commands without letting a flood push real events out of
    the journal: the first refusal of each (topic, code) is journalled, later ones within `window_s` are
    only counted, and the next one after the window carries `detail.suppressed` (how many were not
    journalled). At most `max_keys` distinct keys are tracked (the rest share one)."""

    def __init__(self, window_s: float = 60.0, max_keys: int = 64) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self.total = 0

    def admit(self, leaf: str, code: str, now: float) -> int | None:
        """None: do not journal this one. Otherwise the number suppressed since the last journalled one."""
        self.total += 1
        key = (leaf, code)
        if key not in self._last and len(self._last) >= self.max_keys:
            key = ("*", "*")
        at, suppressed = self._last.get(key, (-1e18, 0))
        if now - at < self.window_s:
            self._last[key] = (at, suppressed + 1)
            return None
        self._last[key] = (now, 0)
        return suppressed


def error_info(e: BaseException) -> ErrorInfo:
    if isinstance(e, ChangeRejected):
        return ErrorInfo(code=e.code, message=str(e), path=e.path)
    if isinstance(e, ProtocolError):
        return ErrorInfo(code="malformed", message=str(e), path=e.path)
    if isinstance(e, StoreError):
        return ErrorInfo(code="storage", message=str(e))
    return ErrorInfo(code="internal", message=f"{type(e).__name__}: {e}")


class Replies:
    """The link's way out: the connection in use (`client`, set by `CloudLink` while connected), the
    counters every part adds to (`stats`), and the refusals."""

    def __init__(self, cfg: LinkConfig, topics: Topics, outbox: Outbox) -> None:
        self.cfg = cfg
        self.topics = topics
        self.outbox = outbox
        self.client: aiomqtt.Client | None = None
        self.refusals = RefusalLog(cfg.refusal_journal_s)
        self.stats: dict[str, int] = {"events_sent": 0, "batches_sent": 0, "resends": 0, "commands": 0,
                                      "refused": 0, "dropped": 0, "handler_errors": 0,
                                      "unexpected_topic": 0, "repeated_acks": 0,
                                      "ack_timeouts": 0}  # fmt: skip

    def _qos(self, leaf: Leaf) -> int:
        """`reply_qos` on rights/reply (the cloud resends until it sees the reply), QoS 1 elsewhere."""
        return self.cfg.reply_qos if leaf is Leaf.RIGHTS_REPLY else 1

    async def publish(self, leaf: Leaf, msg: Any, *, retain: bool = False) -> bool:
        """Publish a reply if the link is up; False when it is not (the cloud will ask again)."""
        client = self.client
        if client is None:
            return False
        try:
            await mqtt.publish(client, self.topics[leaf], encode(msg, self.cfg.encoding), retain=retain,
                               qos=self._qos(leaf))  # fmt: skip
        except aiomqtt.MqttError as e:
            log.info("reply on %s not sent: %s", leaf.value, e)
            return False
        return True

    async def publish_raw(self, leaf: Leaf, data: bytes) -> None:
        """Publish an encoded reply if the link is up (a stored answer sent again)."""
        client = self.client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await mqtt.publish(client, self.topics[leaf], data, qos=self._qos(leaf))

    async def peek(self, payload: bytes) -> str | None:
        """The request id of a refused message (read without trusting it, only to echo it). A large message is
        read off the loop thread (its depth check walks every item: 256 KiB of empty arrays is ~0.2 s of CPU,
        16 MB held the loop past the keepalive), one of more than 1 MiB (and 4 x `max_message_bytes`) not at
        all [tests/test_decoder_bounds.py]."""
        if len(payload) < OFF_LOOP_BYTES:
            return peek_ref(payload)
        if len(payload) > max(1 << 20, 4 * self.cfg.max_message_bytes):
            return None
        return await asyncio.to_thread(peek_ref, payload)

    def too_large(self, payload: bytes) -> ErrorInfo | None:
        if len(payload) > self.cfg.max_message_bytes:
            return ErrorInfo(
                code="too_large",
                message=f"message of {len(payload)} bytes exceeds max_message_bytes {self.cfg.max_message_bytes}",
            )
        return None

    def refused(self, leaf: Leaf, code: str, ref: str | None, message: str, *, operator: str | None = None,
                event: str | None = None) -> None:  # fmt: skip
        """Log and journal one refused message, rate-limited per (topic, code) so that a flood of forged
        messages cannot push real events out of the journal."""
        self.stats["refused"] += 1
        suppressed = self.refusals.admit(leaf.value, code, time.monotonic())
        if suppressed is None:
            return
        log.warning("%s message %s refused: %s (%s)%s", leaf.value, ref, code, message,
                    f"; {suppressed} more refusals not logged" if suppressed else "")  # fmt: skip
        detail: dict[str, str | int | float | bool | None] = {
            "topic": leaf.value, "request_id": ref, "message": message[:200],
        }  # fmt: skip
        if suppressed:
            detail["suppressed"] = suppressed
        self.outbox.record(event or SECURITY_MESSAGE_REJECTED, user=operator, reason=code, detail=detail)

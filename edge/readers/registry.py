"""Reader backends by name, as python-can's BACKENDS: the `driver` of a reader's config names its class.

`BACKENDS` maps a driver name to "module:Class", imported only when a config asks for it (an OSDP site never
loads the GPIO driver, a Wiegand-only one never loads the OSDP stack). `build_reader` makes the reader a config
entry describes, with every error a `ConfigError` that names the entry (``readers[1].door: ...``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.errors import ConfigError, EdgeError
from edge.readers.base import FeedbackPlayer, Reader, ReaderSink
from edge.readers.formats import FormatTable
from edge.secrets import SecretSource

if TYPE_CHECKING:
    from edge.config import Config, OsdpReaderConfig, ReaderConfig
    from edge.hw import HardwareProfile
    from edge.readers.osdp.keystore import KeyStore

#: Reader drivers by name: "module:Class" of a `Reader` subclass.
log = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {
    "wiegand": "edge.readers.wiegand.reader:WiegandReader",
    "osdp": "edge.readers.osdp.reader:OsdpReader",
    "virtual": "edge.readers.virtual:VirtualReader",
}


def backend(driver: str) -> Callable[..., Reader]:
    """The reader class `driver` names in `BACKENDS` (its keyword arguments are the driver's own); a
    `ConfigError` for an unknown name."""
    target = BACKENDS.get(driver)
    if target is None:
        raise ConfigError(f"driver: unknown reader driver {driver!r} (known: {', '.join(sorted(BACKENDS))})")
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Reader)):
        raise TypeError(f"reader backend {driver!r} ({target}) is not a Reader")
    return cls


def read_key(cfg: Config, rc: OsdpReaderConfig, where: str) -> str | None:
    """The reader's Secure Channel key (32 hex digits): the systemd credential `key_file` or, with
    storage.plaintext_secrets, the file `<state_dir>/keys/<key_file>`. Never logged."""
    if rc.key_file is None:
        return None
    src = SecretSource.from_env(plaintext=cfg.storage.plaintext_secrets)
    text = src.read(rc.key_file, f"{where}.key_file", plain_dir=cfg.key_store_dir)
    if len(text) != 32 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ConfigError(f"{where}.key_file: {rc.key_file} must hold 32 hex digits (the 128-bit SCBK)")
    return text


def key_store(cfg: Config, rc: OsdpReaderConfig) -> KeyStore | None:
    """Where a key rotation writes the reader's new key (`storage.key_store`): a systemd credential
    `<dir>/<key_file>.cred`, or with storage.plaintext_secrets the 0600 file `<dir>/<key_file>`."""
    from edge.readers.osdp.keystore import PlainKeyFile, SystemdCredential

    if rc.key_file is None or "/" in rc.key_file:
        return None  # no key, or a plain file named by its path: rotations are refused
    d = cfg.key_store_dir
    if cfg.storage.plaintext_secrets:
        return PlainKeyFile(d / rc.key_file)
    with_key = cfg.storage.key_store_with_key
    return SystemdCredential(rc.key_file, d, encrypt_args=() if with_key == "auto" else (f"--with-key={with_key}",))


def build_reader(
    rc: ReaderConfig,
    name: str,
    sink: ReaderSink,
    *,
    profile: HardwareProfile,
    factory: Any,
    cfg: Config,
    index: int = 0,
    indicator: FeedbackPlayer | None = None,
) -> Reader:
    """The reader `rc` describes. `indicator` plays a Wiegand reader's feedback (its door's LED/beeper
    lines: `DoorController.indicator`); an OSDP reader shows feedback on the reader itself."""
    from edge.config import OsdpReaderConfig, WiegandReaderConfig

    where = f"readers[{index}]"
    if isinstance(rc, WiegandReaderConfig):
        from edge.readers.wiegand.frame import FrameTiming, KeypadOptions

        try:
            io = profile.door(rc.door)
        except KeyError:
            raise ConfigError(f"{where}.door: hardware profile {profile.name!r} has no door {rc.door!r}") from None
        if io.reader_d0_pin is None or io.reader_d1_pin is None:
            raise ConfigError(f"{where}.door: door {rc.door!r} has no reader_d0_pin/reader_d1_pin in the profile")
        try:
            table = FormatTable(rc.formats, rc.extra_formats)
        except ConfigError as e:
            raise ConfigError(f"{where}.formats: {e}") from None
        # The door controller owns the reader's LED and beeper lines (it also shows door alarms on them).
        return backend("wiegand")(
            name, sink, d0=io.reader_d0_pin, d1=io.reader_d1_pin, formats=table,
            timing=FrameTiming(mode=rc.end_of_frame),
            keypad=KeypadOptions(enabled=rc.keypad, order=rc.keypad_order, timeout_s=rc.pin_timeout_s),
            indicator=indicator, pin_factory=factory,
        )  # fmt: skip
    if isinstance(rc, OsdpReaderConfig):
        store = key_store(cfg, rc)
        try:
            staged = store.staged() if store is not None else None  # a rotation the last run left open
        except EdgeError as e:
            # the doors must still work: start on the current key (the reader may be refused until fixed)
            log.error("%s.key_file: a key rotation was left open and its staged key cannot be read: %s", where, e)
            staged = None
        return backend("osdp")(
            name, sink, address=rc.address, secure=rc.secure, allow_install_mode=rc.allow_install_mode,
            allow_plaintext=rc.allow_plaintext, scbk=read_key(cfg, rc, where), formats=list(rc.formats),
            baudrate=rc.baud, direction=rc.direction, key_store=store,
            scbk_next=staged.hex() if staged is not None else None,
        )  # fmt: skip
    raise ConfigError(f"{where}.driver: unknown reader driver")


__all__ = ["BACKENDS", "backend", "build_reader", "key_store", "read_key"]

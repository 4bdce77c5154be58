"""Reader backends by name: builds the reader drivers a config asks for (the `driver` tag)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.errors import ConfigError
from edge.readers.base import Reader, ReaderSink
from edge.readers.formats import FormatTable
from edge.secrets import SecretSource

if TYPE_CHECKING:
    from edge.config import Config, OsdpReaderConfig, ReaderConfig
    from edge.hw import HardwareProfile


def read_key(cfg: Config, rc: OsdpReaderConfig, where: str) -> str | None:
    """The reader's Secure Channel key (32 hex digits): the systemd credential `key_file` or, with
    storage.plaintext_secrets, the file `<state_dir>/keys/<key_file>`. Never logged."""
    if rc.key_file is None:
        return None
    src = SecretSource.from_env(plaintext=cfg.storage.plaintext_secrets)
    text = src.read(rc.key_file, f"{where}.key_file", plain_dir=Path(cfg.storage.state_dir) / "keys")
    if len(text) != 32 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ConfigError(f"{where}.key_file: {rc.key_file} must hold 32 hex digits (the 128-bit SCBK)")
    return text


def build_reader(
    rc: ReaderConfig,
    name: str,
    sink: ReaderSink,
    *,
    profile: HardwareProfile,
    factory: Any,
    cfg: Config,
    index: int = 0,
) -> Reader:
    from edge.config import OsdpReaderConfig, WiegandReaderConfig

    where = f"readers[{index}]"
    if isinstance(rc, WiegandReaderConfig):
        from edge.readers.wiegand import FrameTiming, KeypadOptions, WiegandReader

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
        return WiegandReader(
            name, sink, d0=io.reader_d0_pin, d1=io.reader_d1_pin, formats=table,
            timing=FrameTiming(mode=rc.end_of_frame),
            keypad=KeypadOptions(enabled=rc.keypad, order=rc.keypad_order, timeout_s=rc.pin_timeout_s),
            pin_factory=factory,
        )  # fmt: skip
    if isinstance(rc, OsdpReaderConfig):
        from edge.readers.osdp import OsdpReader

        return OsdpReader(
            name, sink, address=rc.address, secure=rc.secure, allow_install_mode=rc.allow_install_mode,
            allow_plaintext=rc.allow_plaintext, scbk=read_key(cfg, rc, where), formats=list(rc.formats),
            baudrate=rc.baud, direction=rc.direction,
        )  # fmt: skip
    raise ConfigError(f"{where}.driver: unknown reader driver")

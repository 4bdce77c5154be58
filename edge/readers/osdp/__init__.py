"""OSDP (SIA OSDP v2.2 / IEC 60839-11-5) control panel for card readers on RS-485, with Secure Channel.

Import it absolutely (`edge.readers.osdp`): libosdp, used by the tests, installs a top-level `osdp` module.
"""

from .bus import OsdpBus
from .events import InputsChanged, OutputsChanged, PowerChanged, ReaderIoEvent, TamperChanged
from .keystore import KeyStore, KeyStoreError, PlainKeyFile, SystemdCredential
from .panel import FileTransferResult, KeyRotation, PdConfig, PdSession, Timing
from .reader import OsdpReader, ReaderRefused, osdp_bus
from .transport import TransportError

__all__ = [
    "FileTransferResult",
    "InputsChanged",
    "KeyRotation",
    "KeyStore",
    "KeyStoreError",
    "OsdpBus",
    "OsdpReader",
    "OutputsChanged",
    "PdConfig",
    "PdSession",
    "PlainKeyFile",
    "PowerChanged",
    "ReaderIoEvent",
    "ReaderRefused",
    "SystemdCredential",
    "TamperChanged",
    "Timing",
    "TransportError",
    "osdp_bus",
]

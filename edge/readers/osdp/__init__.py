"""OSDP (SIA OSDP v2.2 / IEC 60839-11-5) control panel for card readers on RS-485, with Secure Channel.

Import it absolutely (`edge.readers.osdp`): libosdp, used by the tests, installs a top-level `osdp` module.
"""

from .bus import OsdpBus
from .keystore import KeyStore, KeyStoreError, PlainKeyFile, SystemdCredential
from .panel import KeyRotation, PdConfig, PdSession, Timing
from .reader import OsdpReader, osdp_bus
from .transport import TransportError

__all__ = [
    "KeyRotation",
    "KeyStore",
    "KeyStoreError",
    "OsdpBus",
    "OsdpReader",
    "PdConfig",
    "PdSession",
    "PlainKeyFile",
    "SystemdCredential",
    "Timing",
    "TransportError",
    "osdp_bus",
]

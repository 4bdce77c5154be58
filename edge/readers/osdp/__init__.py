"""OSDP (SIA OSDP v2.2 / IEC 60839-11-5) control panel for card readers on RS-485, with Secure Channel.

Import it absolutely (`edge.readers.osdp`): libosdp, used by the tests, installs a top-level `osdp` module.
"""

from .bus import OsdpBus
from .panel import PdConfig, PdSession, Timing
from .reader import OsdpReader, osdp_bus
from .transport import TransportError

__all__ = ["OsdpBus", "OsdpReader", "PdConfig", "PdSession", "Timing", "TransportError", "osdp_bus"]

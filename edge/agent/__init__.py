"""The gateway agent (see edge/agent/agent.py): composition, the tap path, door modes, status."""

from .agent import Agent, run_agent
from .connectivity import Connectivity
from .modes import META_DOOR_MODES, DoorModes
from .status import AgentStatus, LinkStatus, ReaderInfo
from .tap import PIN_ROUNDS, PIN_WAIT_S, REVOKE_WITHIN_S, TapHandler, feedback_for, mask_card

__all__ = [
    "META_DOOR_MODES",
    "PIN_ROUNDS",
    "PIN_WAIT_S",
    "REVOKE_WITHIN_S",
    "Agent",
    "AgentStatus",
    "Connectivity",
    "DoorModes",
    "LinkStatus",
    "ReaderInfo",
    "TapHandler",
    "feedback_for",
    "mask_card",
    "run_agent",
]

"""Whether the cloud link is up, and since when it has been down: the offline age the decision's offline
policy and the rights age use.

The offline age is measured on the monotonic clock, so it does not jump when the agent's clock adopts a cloud
offset; `offline_since` reports it on the agent's clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime


class Connectivity:
    def __init__(self, clock: Callable[[], float], mono: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.mono = mono
        self.online = False
        #: Monotonic time the link went offline; None while online.
        self._offline_mono: float | None = mono()

    def set_online(self, online: bool) -> bool:
        """Record the link's state; True if it changed."""
        if online == self.online:
            return False
        self.online = online
        self._offline_mono = None if online else self.mono()
        return True

    def offline_before_start(self, last_online: float) -> None:
        """At start: the link was last up at `last_online` (agent clock), so the offline age starts there."""
        self._offline_mono = self.mono() - max(0.0, self.clock() - last_online)

    @property
    def offline_since(self) -> datetime | None:
        """When the link went offline, on the agent's clock now (None while online)."""
        if self.online or self._offline_mono is None:
            return None
        return datetime.fromtimestamp(max(0.0, self.clock() - (self.mono() - self._offline_mono)), UTC)

    def rights_age_s(self) -> float | None:
        """How long the rights have gone without a cloud connection (None while online)."""
        if self.online or self._offline_mono is None:
            return None
        return self.mono() - self._offline_mono

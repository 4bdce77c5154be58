"""One exception root for the edge package."""

from __future__ import annotations


class EdgeError(Exception):
    """Root of every error the edge agent raises on purpose."""


class ConfigError(EdgeError):
    """The configuration is invalid; the message names the key and what was expected."""


class ChangeRejected(EdgeError):
    """A change set or snapshot was refused as a whole; nothing of it was applied.

    `code` is one of: "bad_field", "unknown_reference", "duplicate_card", "version_gap", "stale",
    "too_large", "malformed".
    """

    def __init__(self, code: str, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.path = path


class VersionGap(ChangeRejected):
    def __init__(self, have: int, got_from: int) -> None:
        super().__init__(
            "version_gap", f"change set starts at version {got_from} but the gateway holds {have}"
        )
        self.have = have
        self.got_from = got_from


class StoreError(EdgeError):
    """The on-disk store failed (full disk, read-only file system, corruption)."""


class CommandFailed(EdgeError):
    """A cloud command was carried out as far as it could be and did not succeed (a reader refused, went
    offline, a key was not committed...). `code` goes into the command's result (`error.code`), `detail` too."""

    def __init__(self, code: str, message: str, *, detail: dict[str, str | int | float | bool | None] | None = None
                 ) -> None:  # fmt: skip
        super().__init__(message)
        self.code = code
        self.detail = detail or {}

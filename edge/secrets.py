"""Where the gateway's secrets come from: OSDP Secure Channel keys, the MQTT password, the TLS client key.

On a production gateway every secret is a **systemd credential**: stored encrypted at rest (`systemd-creds
encrypt`: AES-256-GCM under the host key in /var/lib/systemd/credential.secret, or the TPM2 where there is
one), and decrypted by systemd when the service starts into `$CREDENTIALS_DIRECTORY`, an in-memory file
system that only the service's user can read and that is gone when the service stops
(`LoadCredentialEncrypted=` in systemd/edge.service; docs/operations.md, "Secrets"). A secret named NAME
in the config is the credential NAME.

Plain secret files on disk are refused unless `storage.plaintext_secrets = true` (development, a board
without systemd 250): then NAME is a file (the OSDP keys: under `<state_dir>/keys/`), which must not be
readable by other users, and the agent logs that it uses one. Secrets are never logged, whatever the source.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


@dataclass(frozen=True, slots=True)
class SecretSource:
    """How secrets named in the config are found."""

    #: systemd's credentials directory for this service (None: not started by systemd with credentials)
    credentials_dir: Path | None
    #: whether a secret may be a plain file on disk
    plaintext: bool

    @staticmethod
    def from_env(*, plaintext: bool) -> SecretSource:
        d = os.environ.get(CREDENTIALS_ENV)
        return SecretSource(Path(d) if d else None, plaintext)

    def path(self, name: str, where: str, *, plain_dir: Path | None = None) -> Path:
        """The file that holds secret `name` (`where` names the config key in errors). A plain file's
        relative name is looked up in `plain_dir`."""
        if self.credentials_dir is not None and "/" not in name:
            cred = self.credentials_dir / name
            if cred.is_file():
                return cred
        if not self.plaintext:
            have = (f"{CREDENTIALS_ENV} has no credential {name!r}" if self.credentials_dir is not None
                    else f"{CREDENTIALS_ENV} is not set (not started by systemd with credentials)")  # fmt: skip
            raise ConfigError(
                f"{where}: secret {name!r} is not a systemd credential ({have}) and plain secret files are "
                "refused: encrypt it with systemd-creds (docs/operations.md, \"Secrets\") or set "
                "storage.plaintext_secrets = true"
            )
        p = Path(name)
        if not p.is_absolute() and plain_dir is not None:
            p = plain_dir / p
        try:
            mode = p.stat().st_mode
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {p}: {e.strerror}") from None
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise ConfigError(f"{where}: {p} is readable or writable by other users: chmod o-rwx {p}")
        log.warning("%s: secret read from the plain file %s (storage.plaintext_secrets = true)", where, p)
        return p

    def read(self, name: str, where: str, *, plain_dir: Path | None = None) -> str:
        """The secret `name` as text (stripped), from the credentials directory or, if allowed, a plain file."""
        p = self.path(name, where, plain_dir=plain_dir)
        try:
            return p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(f"{where}: cannot read {p}: {why}") from None

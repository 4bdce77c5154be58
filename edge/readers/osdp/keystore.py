"""Where a reader's Secure Channel key lives across a key rotation (the conventions of `edge.secrets`).

A rotation writes the new key *before* the reader is sent it, as a staged file next to the current one,
and makes it the current one only once the reader is secure on it (`commit`); a rotation the reader did
not take deletes it (`discard`). A gateway that stops in between finds the staged key at its next start
(`staged`) and the handshake tries both keys (`PdConfig.scbk_next`), so a reader is never left on a key
the gateway no longer has.

* `SystemdCredential`: production. The key is a systemd credential, encrypted with `systemd-creds encrypt
  --name=NAME` into `<directory>/NAME.cred` (the file `LoadCredentialEncrypted=NAME:...` names; systemd
  decrypts it into `$CREDENTIALS_DIRECTORY` at the next start), staged as `NAME.next.cred`.
* `PlainKeyFile`: `storage.plaintext_secrets = true` (development, boards without systemd): the key file
  under `<state_dir>/keys/`, staged as `NAME.next`, mode 0600.

The key goes to `systemd-creds` on stdin, never on a command line; no method logs it or puts it in an error.
Every method blocks (file system, a subprocess): call them off the event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from edge.errors import EdgeError


class KeyStoreError(EdgeError):
    """A key could not be written, read or moved (the message names the file, never the key)."""


class KeyStore(Protocol):
    def stage(self, key: bytes) -> None:
        """Write `key` as the staged next key (durably, before the reader is sent it)."""

    def staged(self) -> bytes | None:
        """The staged key of an unresolved rotation, if any."""

    def commit(self) -> None:
        """Make the staged key the current one (atomic)."""

    def discard(self) -> None:
        """Forget the staged key."""


def _key_from_text(text: str, where: Path) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 16:
        raise KeyStoreError(f"{where}: does not hold 32 hex digits (a 128-bit SCBK)")
    return key


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_dir(d: Path) -> None:
    """The key store's directory: made 0700 if missing (its files are 0600)."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    _private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class PlainKeyFile:
    """The key as 32 hex digits in a 0600 file (storage.plaintext_secrets)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.next = path.with_name(path.name + ".next")

    def __repr__(self) -> str:
        return f"PlainKeyFile({str(self.path)!r})"

    def stage(self, key: bytes) -> None:
        try:
            _write_private(self.next, key.hex().encode())
        except OSError as e:
            raise KeyStoreError(f"cannot write {self.next}: {e.strerror}") from None

    def staged(self) -> bytes | None:
        try:
            text = self.next.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise KeyStoreError(f"cannot read {self.next}: {e}") from None
        return _key_from_text(text, self.next)

    def commit(self) -> None:
        try:
            os.replace(self.next, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise KeyStoreError(f"cannot move {self.next} to {self.path}: {e.strerror}") from None

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.next.unlink()


class SystemdCredential:
    """The key as an encrypted systemd credential `<directory>/NAME.cred`."""

    def __init__(self, name: str, directory: Path, *, tool: str = "systemd-creds",
                 encrypt_args: Sequence[str] = ()) -> None:
        if "/" in name or not name:
            raise ValueError(f"credential name {name!r}: one file name")
        self.name = name
        self.path = directory / f"{name}.cred"
        self.next = directory / f"{name}.next.cred"
        self.tool = tool
        #: e.g. ("--with-key=tpm2",) on a board with a TPM2
        self.encrypt_args = tuple(encrypt_args)

    def __repr__(self) -> str:
        return f"SystemdCredential({self.name!r}, {str(self.path.parent)!r})"

    def _run(self, args: list[str], data: bytes | None, what: str) -> bytes:
        try:
            done = subprocess.run([self.tool, *args], input=data, capture_output=True, check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KeyStoreError(f"{what}: {self.tool}: {e}") from None
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise KeyStoreError(f"{what}: {self.tool} exited {done.returncode}: {err[-1] if err else ''}")
        return done.stdout

    def stage(self, key: bytes) -> None:
        try:
            _private_dir(self.next.parent)
        except OSError as e:
            raise KeyStoreError(f"cannot create {self.next.parent}: {e.strerror}") from None
        tmp = self.next.with_name(self.next.name + ".tmp")
        self._run(["encrypt", f"--name={self.name}", *self.encrypt_args, "-", str(tmp)], key.hex().encode(),
                  f"cannot write {self.next}")
        try:
            os.chmod(tmp, 0o600)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.next)
            _fsync_dir(self.next.parent)
        except OSError as e:
            raise KeyStoreError(f"cannot write {self.next}: {e.strerror}") from None

    def staged(self) -> bytes | None:
        if not self.next.exists():
            return None
        out = self._run(["decrypt", f"--name={self.name}", str(self.next), "-"], None, f"cannot read {self.next}")
        return _key_from_text(out.decode("ascii", "replace"), self.next)

    def commit(self) -> None:
        try:
            os.replace(self.next, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise KeyStoreError(f"cannot move {self.next} to {self.path}: {e.strerror}") from None

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.next.unlink()

"""A real PostgreSQL for the tests: a throw-away cluster, like tests/mosquitto.py does for Mosquitto.

`initdb` into a temp folder, `pg_ctl start` on a free loopback port with its unix socket in a short temp
folder (a socket path must stay under 108 bytes), fsync off. PostgreSQL refuses to run as root: as root the
server binaries run as the `postgres` user (`runuser -u postgres`, Debian's package creates the user) on
folders given to that user. Debian keeps the binaries in /usr/lib/postgresql/<version>/bin (not on PATH).

One cluster per test session (`postgres_server`); every test gets a fresh database (`db_url`, parametrised
over embedded SQLite and PostgreSQL, so every database test runs on both). Use in a test module:
`from .postgres import db_url, postgres_server  # noqa: F401`.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mosquitto import free_port

_names = itertools.count(1)


def bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    exe = shutil.which("initdb")
    if exe is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (sh .ci/bootstrap does)")
    return Path(exe).resolve().parent


class Postgres:
    """One cluster. `start()`, `stop()`, `create_database()`; connect on 127.0.0.1:`port` as `postgres`."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.sock = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = "postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for d in (self.root, self.sock):
                os.chown(d, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        r = subprocess.run([*self._as, *args], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr[-2000:]}{r.stdout[-500:]}\n{log}")

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8",
                  "--no-sync", "--no-instructions")  # fmt: skip
        opts = (f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories={self.sock} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")  # fmt: skip
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.sock, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """A fresh database; returns its SQLAlchemy URL (asyncpg driver)."""
        subprocess.run([str(self.bin / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
                       check=True, capture_output=True)  # fmt: skip
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    pg = Postgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: an SQLite file, or a new database on the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'service.db'}"
    pg: Postgres = request.getfixturevalue("postgres_server")
    return pg.create_database(f"t{os.getpid()}_{next(_names)}")

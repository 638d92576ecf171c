"""A throw-away PostgreSQL server for the traffic-store tests (imported by tests/test_traffic_*.py; holds no tests).

It uses the Debian ``postgresql`` package's ``initdb`` / ``pg_ctl`` (CI installs it: deploy/ci/install_tools.sh):
a cluster in a temporary folder, trust authentication, listening on 127.0.0.1 on a free port. As root (containers),
the server runs as the ``postgres`` user, because PostgreSQL refuses to run as root. Tests skip only when the
binaries are absent.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "postgres_bin", "require_postgres"]


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (newest Debian version first, then PATH), or None."""
    for folder in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    ):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def require_postgres() -> Path:
    folder = postgres_bin()
    if folder is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql; CI installs it)")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``with PostgresServer() as pg:`` a running server; ``pg.url`` is its SQLAlchemy URL; ``stop``/``start`` for
    outages."""

    def __init__(self) -> None:
        self.bin = require_postgres()
        self.root = Path(tempfile.mkdtemp(prefix="sdm-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
            self.user = "postgres"
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(argv)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def __enter__(self) -> PostgresServer:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        self.start()
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(
            f"PostgreSQL did not listen on {self.port}: {(self.root / 'log').read_text(errors='replace')}"
        )

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

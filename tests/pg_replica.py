"""A private Postgres primary and its streaming replica, for the read-replica tests.

``initdb`` makes a primary (``wal_level=replica``) in a temporary directory, on a free port;
``pg_basebackup -R`` copies it into a second directory set up as its standby, started on another
free port. Both are stopped (``-m immediate``) and their directories removed on exit, whatever
the test did. Postgres refuses to run as root: as root, the binaries run as the ``postgres``
user (``runuser``). About 1.5 s to start both.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.servers import free_port

# Trust on the loopback only (listen_addresses), no fsync: a throwaway server.
INITDB_OPTIONS = ("-U", "postgres", "--auth=trust", "-N")
# -R: write the standby's connection settings; stream the WAL written during the copy.
BASEBACKUP_OPTIONS = ("-R", "-X", "stream", "-c", "fast")


def postgres_bin() -> Path | None:
    """The directory of the newest installed Postgres server binaries (initdb, pg_ctl...)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class PostgresPair:
    """A running primary and its standby."""

    bin: Path
    root: Path
    primary_port: int
    replica_port: int

    def url(self, port: int, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"

    @property
    def primary_url(self) -> str:
        return self.url(self.primary_port)

    @property
    def replica_url(self) -> str:
        return self.url(self.replica_port)

    def pg_ctl(self, data: str, *args: str) -> None:
        """Run ``pg_ctl`` on one of the two data directories ("primary" or "replica")."""
        subprocess.run(
            [*_as_postgres_user(), str(self.bin / "pg_ctl"), "-D", str(self.root / data), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self, data: str, port: int, *options: str) -> None:
        settings = f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.pg_ctl(
            data,
            "-o",
            " ".join((settings, *options)),
            "-l",
            str(self.root / f"{data}.log"),
            "-w",
            "start",
        )

    def stop(self, data: str) -> None:
        """Stop one server now (no checkpoint: as if its host went away)."""
        if (self.root / data / "postmaster.pid").exists():
            self.pg_ctl(data, "-m", "immediate", "-w", "stop")

    def replica_start(self) -> None:
        self.start("replica", self.replica_port)

    async def wait_caught_up(self, timeout: float = 10) -> None:
        """Until the standby streams from the primary and has replayed everything the primary
        has written so far."""
        primary = await asyncpg.connect(host="127.0.0.1", port=self.primary_port, user="postgres")
        replica = await asyncpg.connect(host="127.0.0.1", port=self.replica_port, user="postgres")
        try:
            target = await primary.fetchval("SELECT pg_current_wal_lsn()")
            deadline = time.monotonic() + timeout
            while not await replica.fetchval(
                "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn AND EXISTS "
                "(SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
                target,
            ):
                assert time.monotonic() < deadline, "the replica did not catch up"
                await asyncio.sleep(0.02)
        finally:
            await primary.close()
            await replica.close()


@contextmanager
def streaming_replica() -> Iterator[PostgresPair]:
    """A primary and its streaming standby, each on a free port; removed on exit."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("Postgres server binaries (initdb, pg_ctl, pg_basebackup) are not installed")
    root = Path(tempfile.mkdtemp(prefix="modelgate-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    pair = PostgresPair(bin_dir, root, free_port(), free_port())
    try:
        user = _as_postgres_user()
        subprocess.run(
            [*user, str(bin_dir / "initdb"), "-D", str(root / "primary"), *INITDB_OPTIONS],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pair.start("primary", pair.primary_port, "-c wal_level=replica")
        subprocess.run(
            [
                *user,
                str(bin_dir / "pg_basebackup"),
                *("-h", "127.0.0.1", "-p", str(pair.primary_port), "-U", "postgres"),
                *("-D", str(root / "replica"), *BASEBACKUP_OPTIONS),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pair.replica_start()
        yield pair
    finally:
        for data in ("replica", "primary"):
            with suppress(subprocess.SubprocessError):
                pair.stop(data)
        shutil.rmtree(root, ignore_errors=True)

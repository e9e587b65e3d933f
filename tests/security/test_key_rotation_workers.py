"""SECURITY.md line 3 for rotation, across processes: both workers of a real server serve the old
and the new key during the grace, and refuse the old one on every worker from its end on."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import Backend, only_on
from tests.e2e import conftest as e2e_fixtures
from tests.e2e.servers import run_cli, serve
from tests.e2e.test_key_cache_workers import _fire, _until_both_workers

pytestmark = pytest.mark.e2e

# The end-to-end fixture (a fresh database, var/ and models for real server processes).
tour_environment = e2e_fixtures.tour_environment

# Long enough for a slow machine to start the CLI and see both workers serve both keys.
GRACE = 20


# Two workers need Postgres and Redis.
@only_on("postgres")
def test_rotated_key_is_refused_on_every_worker_once_the_grace_ends(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    """SECURITY.md line 3: a rotated key past its grace is 401 on both workers of a real
    server, although both had it cached; during the grace both keys work on both workers."""
    # The old key is fired at in rounds of 24 until both workers answer, three times over: the
    # default limit (100/minute) is not what is under test here.
    environment = {
        **tour_environment,
        "MODELGATE_LOG_LEVEL": "INFO",
        "MODELGATE_DEFAULT_RATE_LIMIT": "1000000/minute",
    }
    run_cli(environment, tmp_path, "db", "upgrade")
    tenant = json.loads(
        run_cli(environment, tmp_path, "tenants", "create", "--name", "rotating").stdout
    )
    old_key = run_cli(
        environment, tmp_path, "keys", "issue", "--tenant", tenant["id"]
    ).stdout.splitlines()[-1]
    (old,) = [
        json.loads(line)
        for line in run_cli(
            environment, tmp_path, "keys", "list", "--tenant", tenant["id"]
        ).stdout.splitlines()
    ]
    log_path = tmp_path / "server.log"
    with serve(environment, tmp_path, workers=2, log_path=log_path) as port:
        # Both workers serve the old key, so both hold it in their cache.
        assert len(_until_both_workers(port, old_key, log_path, 200)) == 2
        asked = time.monotonic()
        rotated = run_cli(
            environment, tmp_path, "keys", "rotate", old["id"], "--grace-seconds", str(GRACE)
        )
        new_key = rotated.stdout.splitlines()[-1]
        # The revocation is scheduled for `asked + GRACE` or later.
        assert len(_until_both_workers(port, new_key, log_path, 200)) == 2
        assert len(_until_both_workers(port, old_key, log_path, 200)) == 2
        assert time.monotonic() < asked + GRACE, "too slow to observe the grace"
        listed = {
            k["id"]: k
            for k in map(
                json.loads,
                run_cli(
                    environment, tmp_path, "keys", "list", "--tenant", tenant["id"]
                ).stdout.splitlines(),
            )
        }
        ends = datetime.fromisoformat(listed[old["id"]]["revoked_at"]).timestamp()
        # Keep both workers verifying the old key until just before the grace ends, so that a
        # cache trusting it for a full second would still serve it after the end: a round every
        # 0.1 s (the last within 0.6 s of the end) holds it as well as firing without a pause,
        # without taking a core from the rest of the run for the whole grace.
        while time.time() < ends - 0.5:
            statuses = asyncio.run(_fire(port, old_key, 8))
            if time.time() < ends:
                assert statuses == [200] * 8, statuses
            time.sleep(0.1)
        time.sleep(max(0.0, ends + 0.05 - time.time()))
        # From the end of the grace on (not a second later: the cache never outlives a
        # scheduled revocation), every request with the old key on every worker is 401.
        assert len(_until_both_workers(port, old_key, log_path, 401)) == 2
        assert len(_until_both_workers(port, new_key, log_path, 200)) == 2

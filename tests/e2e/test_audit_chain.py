"""``modelgate audit verify`` against real databases: it passes on a trail written by two
workers at once, and fails, naming the first bad event, on each kind of tampering committed by
someone with the database owner's rights."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import Backend, only_on
from tests.e2e.servers import run_cli, serve

pytestmark = pytest.mark.e2e

# Statements run with the append-only triggers off; each pair does the damage and undoes it.
TAMPERING = {
    "edited": (
        ["UPDATE audit_event SET actor = 'admin:mallory' WHERE id = 3"],
        ["UPDATE audit_event SET actor = 'cli' WHERE id = 3"],
        "audit chain broken at event 3: event 3 was edited",
    ),
    "deleted": (
        [
            "CREATE TABLE kept AS SELECT * FROM audit_event WHERE id = 3",
            "DELETE FROM audit_event WHERE id = 3",
        ],
        ["INSERT INTO audit_event SELECT * FROM kept", "DROP TABLE kept"],
        "audit chain broken at event 3: event 3 is missing",
    ),
    "reordered": (
        [
            "UPDATE audit_event SET id = -2 WHERE id = 2",
            "UPDATE audit_event SET id = 2 WHERE id = 3",
            "UPDATE audit_event SET id = 3 WHERE id = -2",
        ],
        [
            "UPDATE audit_event SET id = -2 WHERE id = 2",
            "UPDATE audit_event SET id = 2 WHERE id = 3",
            "UPDATE audit_event SET id = 3 WHERE id = -2",
        ],
        "audit chain broken at event 2: event 2 does not follow event 1",
    ),
    "cut-off": (
        [
            "CREATE TABLE kept AS SELECT * FROM audit_event WHERE id = 4",
            "DELETE FROM audit_event WHERE id = 4",
        ],
        ["INSERT INTO audit_event SELECT * FROM kept", "DROP TABLE kept"],
        "audit chain broken at event 4: the chain's recorded end is event 4",
    ),
}


def _as_owner(database_url: str) -> Callable[[list[str]], None]:
    """Run statements with the append-only triggers disabled, as the database's owner could."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":

        def run_sqlite(statements: list[str]) -> None:
            with closing(sqlite3.connect(str(url.database))) as connection:
                triggers = connection.execute(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
                ).fetchall()
                assert len(triggers) == 2, triggers
                for name, _ in triggers:
                    connection.execute(f"DROP TRIGGER {name}")
                for statement in statements:
                    connection.execute(statement)
                for _, sql in triggers:
                    connection.execute(sql)
                connection.commit()

        return run_sqlite

    async def run_postgres(statements: list[str]) -> None:
        connection = await asyncpg.connect(
            host=url.host, port=url.port or 5432, user=url.username, database=url.database
        )
        try:
            async with connection.transaction():
                await connection.execute("ALTER TABLE audit_event DISABLE TRIGGER USER")
                for statement in statements:
                    await connection.execute(statement)
                await connection.execute("ALTER TABLE audit_event ENABLE TRIGGER USER")
        finally:
            await connection.close()

    return lambda statements: asyncio.run(run_postgres(statements))


def test_audit_verify_names_the_first_bad_event_for_each_kind_of_tampering(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = tour_environment
    run_cli(environment, tmp_path, "db", "upgrade")
    for index in range(4):
        run_cli(environment, tmp_path, "tenants", "create", "--name", f"chained-{index}")
    intact = run_cli(environment, tmp_path, "audit", "verify")
    assert intact.stdout.startswith("audit chain intact: 4 events, head ")
    as_owner = _as_owner(environment["MODELGATE_DATABASE_URL"])
    for kind, (damage, repair, message) in TAMPERING.items():
        as_owner(damage)
        broken = run_cli(environment, tmp_path, "audit", "verify", check=False)
        assert broken.returncode == 1, kind
        assert broken.stderr.startswith(f"error: {message}"), (kind, broken.stderr)
        as_owner(repair)
        # Repaired, so that the next kind is the only damage.
        assert run_cli(environment, tmp_path, "audit", "verify").stdout == intact.stdout


async def _create_tenants(port: int, admin: str, first: int, count: int) -> list[int]:
    async def one(index: int) -> int:
        # A connection each, so that both workers take some.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v1") as client:
            response = await client.post(
                "/admin/tenants",
                json={"name": f"concurrent-{index}"},
                headers={"Authorization": f"Bearer {admin}"},
            )
            return response.status_code

    return list(await asyncio.gather(*[one(first + index) for index in range(count)]))


@only_on("postgres")
def test_two_workers_writing_at_once_never_fork_the_chain(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = {**tour_environment, "MODELGATE_LOG_LEVEL": "INFO"}
    run_cli(environment, tmp_path, "db", "upgrade")
    admin = run_cli(environment, tmp_path, "admin", "create-key", "--name", "ops").stdout
    admin = admin.strip().splitlines()[-1]
    log_path = tmp_path / "server.log"
    created = 0
    with serve(environment, tmp_path, workers=2, log_path=log_path) as port:
        # Rounds until both workers have written events (bounded).
        for _ in range(10):
            statuses = asyncio.run(_create_tenants(port, admin, created, 30))
            assert statuses == [201] * 30
            created += 30
            if len(_workers_that_answered(log_path, 201)) == 2:
                break
    assert len(_workers_that_answered(log_path, 201)) == 2, "one worker took every request"
    verified = run_cli(environment, tmp_path, "audit", "verify")
    assert verified.stdout.startswith(f"audit chain intact: {created + 1} events, head ")


def _workers_that_answered(log_path: Path, status: int) -> set[int]:
    workers = set()
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "request" and event.get("status") == status:
            workers.add(event["pid"])
    return workers

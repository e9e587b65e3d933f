"""A ``modelgate`` command on a database that was never migrated, or is behind, says so in one
line and names ``modelgate db upgrade``; on a database it cannot reach, it says that in one line
(no SQL error, no traceback)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy.engine import make_url

from api.cli import alembic_config
from tests.conftest import POSTGRES_URL
from tests.e2e.servers import BIN, free_port, run_cli

pytestmark = pytest.mark.e2e

# Commands that use the database, of several groups (all through api.cli.common).
COMMANDS = (
    ("models", "activate", "iris", "1"),
    ("admin", "create-key", "--name", "operator"),
    ("tenants", "create", "--name", "acme"),
    ("keys", "list", "--tenant", "00000000-0000-4000-8000-000000000000"),
)


def _environment(database_url: str, model_dir: Path, tmp_path: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MODELGATE_")}
    environment.update(
        {
            "PATH": f"{BIN}{os.pathsep}{environment.get('PATH', '')}",
            "MODELGATE_DATABASE_URL": database_url,
            "MODELGATE_MODEL_DIR": str(model_dir),
            "MODELGATE_VAR_DIR": str(tmp_path / "var"),
        }
    )
    return environment


def _assert_refused(
    result: subprocess.CompletedProcess[str], says: str, advice: str = "`modelgate db upgrade`"
) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert "sqlalche.me" not in output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert says in line
    assert advice in line
    return line


def test_commands_on_a_never_migrated_database_say_to_run_db_upgrade(
    empty_database: str, served_model_dir: Path, tmp_path: Path
) -> None:
    environment = _environment(empty_database, served_model_dir, tmp_path)

    for args in COMMANDS:
        _assert_refused(run_cli(environment, tmp_path, *args, check=False), "has no schema yet")

    # The advice works: once upgraded, the same command runs.
    run_cli(environment, tmp_path, "db", "upgrade")
    created = run_cli(environment, tmp_path, "tenants", "create", "--name", "acme")
    assert '"name":"acme"' in created.stdout


def test_commands_on_a_database_one_migration_behind_say_to_run_db_upgrade(
    empty_database: str, served_model_dir: Path, tmp_path: Path
) -> None:
    config = alembic_config(empty_database)
    command.upgrade(config, "head")
    command.downgrade(config, "-1")
    environment = _environment(empty_database, served_model_dir, tmp_path)

    # The two commands an operator tries first (each group's commands share the check).
    for args in COMMANDS[:2]:
        _assert_refused(run_cli(environment, tmp_path, *args, check=False), "schema is behind")


def test_commands_on_a_database_they_cannot_reach_say_so_in_one_line(
    services_problem: str | None, served_model_dir: Path, tmp_path: Path
) -> None:
    """Nothing listens on the port; the server refuses the user; the database does not exist."""
    if services_problem:
        pytest.skip(services_problem)
    server = make_url(POSTGRES_URL)
    unreachable = server.set(host="127.0.0.1", port=free_port())
    unknown_user = server.set(username="no_such_role", password="s3cret-password")
    unknown_database = server.set(database="no_such_database_here")
    for url, says in (
        (unreachable, "Connect call failed"),
        (unknown_user, 'role "no_such_role" does not exist'),
        (unknown_database, 'database "no_such_database_here" does not exist'),
    ):
        environment = _environment(
            url.render_as_string(hide_password=False), served_model_dir, tmp_path
        )
        for args in COMMANDS[1:3]:
            result = run_cli(environment, tmp_path, *args, check=False)
            line = _assert_refused(result, "the database cannot be reached", says)
            assert "s3cret-password" not in line

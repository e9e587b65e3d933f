"""A ``modelgate`` command on a database that was never migrated, or is behind, says so in one
line and names ``modelgate db upgrade`` (no SQL error, no traceback)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from alembic import command

from api.cli import alembic_config
from tests.e2e.servers import BIN, run_cli

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


def _assert_refused(result: subprocess.CompletedProcess[str], says: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert "sqlalche.me" not in output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert says in line
    assert "`modelgate db upgrade`" in line


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

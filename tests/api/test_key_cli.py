"""``modelgate keys list|revoke|rotate``: the same services and views as the HTTP routes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Select, select
from typer.testing import CliRunner, Result

from api.cli import app
from auth.db import create_engine, create_sessionmaker
from auth.identity.keys import MAX_ROTATION_GRACE_SECONDS, key_digest
from auth.models import ApiKey, AuditEvent, utcnow
from auth.settings import get_settings
from tests.conftest import Backend

PEPPER = "cli-test-pepper-" + "z" * 32


@pytest.fixture
def cli(backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """A runner whose commands use this module's database."""
    monkeypatch.setenv("MODELGATE_DATABASE_URL", backend.database_url)
    monkeypatch.setenv("MODELGATE_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MODELGATE_KEY_PEPPER", PEPPER)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def _run(cli: CliRunner, *args: str, code: int = 0) -> Result:
    result = cli.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def _tenant_with_key(cli: CliRunner) -> tuple[str, str]:
    tenant = json.loads(_run(cli, "tenants", "create", "--name", uuid.uuid4().hex).stdout)
    key = _run(cli, "keys", "issue", "--tenant", tenant["id"]).stdout.splitlines()[-1]
    return tenant["id"], key


def _list(cli: CliRunner, tenant_id: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in _run(cli, "keys", "list", "--tenant", tenant_id).stdout.splitlines()
    ]


def _query(database_url: str, statement: Select[Any]) -> list[Any]:
    """The rows ``statement`` selects, read on a fresh engine (the CLI's own is gone)."""

    async def query() -> list[Any]:
        engine = create_engine(database_url)
        try:
            async with create_sessionmaker(engine)() as session:
                return list((await session.scalars(statement)).all())
        finally:
            await engine.dispose()

    return asyncio.run(query())


def test_keys_list_prints_metadata_only(cli: CliRunner, backend: Backend) -> None:
    tenant_id, key = _tenant_with_key(cli)
    result = _run(cli, "keys", "list", "--tenant", tenant_id)
    (listed,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert listed["tenant_id"] == tenant_id
    assert listed["prefix"] == key[: len(listed["prefix"])]
    assert key not in result.output
    assert key_digest(PEPPER.encode(), key) not in result.output
    assert "digest" not in result.output
    unknown = _run(cli, "keys", "list", "--tenant", str(uuid.uuid4()), code=1)
    assert "tenant not found" in unknown.stderr
    assert "UUID" in _run(cli, "keys", "list", "--tenant", "nope", code=1).stderr


def test_keys_rotate_prints_the_new_key_last_and_schedules_the_old_ones_end(
    cli: CliRunner, backend: Backend
) -> None:
    tenant_id, old_key = _tenant_with_key(cli)
    (old,) = _list(cli, tenant_id)
    before = utcnow()
    result = _run(cli, "keys", "rotate", old["id"], "--grace-seconds", "120")
    lines = result.stdout.splitlines()
    new_key = lines[-1]
    assert new_key.startswith("mg_")
    assert new_key != old_key
    view = json.loads(lines[0])
    assert "key" not in view  # the secret is on the last line only
    assert view["rotated_from_id"] == old["id"]
    digest = key_digest(PEPPER.encode(), new_key)
    (row,) = _query(backend.database_url, select(ApiKey).where(ApiKey.digest == digest))
    assert str(row.id) == view["id"]
    listed = {k["id"]: k for k in _list(cli, tenant_id)}
    revoked_at = datetime.fromisoformat(listed[old["id"]]["revoked_at"])
    assert before + timedelta(seconds=119) <= revoked_at <= utcnow() + timedelta(seconds=120)
    assert listed[view["id"]]["revoked_at"] is None
    # Once rotated, the old key cannot be rotated again.
    again = _run(cli, "keys", "rotate", old["id"], code=1)
    assert "already rotated" in again.stderr
    (event,) = [
        e
        for e in _query(
            backend.database_url, select(AuditEvent).where(AuditEvent.action == "key.rotate")
        )
        if e.target_id == old["id"]
    ]
    assert event.actor == "cli"
    assert event.detail["new_id"] == view["id"]


@pytest.mark.parametrize("grace", ["-1", str(MAX_ROTATION_GRACE_SECONDS + 1), "soon"])
def test_keys_rotate_refuses_a_grace_out_of_bounds(
    cli: CliRunner, backend: Backend, grace: str
) -> None:
    tenant_id, _ = _tenant_with_key(cli)
    (old,) = _list(cli, tenant_id)
    _run(cli, "keys", "rotate", old["id"], "--grace-seconds", grace, code=2)
    (unchanged,) = _list(cli, tenant_id)
    assert unchanged["revoked_at"] is None


def test_keys_revoke_revokes_now_and_is_idempotent(cli: CliRunner, backend: Backend) -> None:
    tenant_id, key = _tenant_with_key(cli)
    (listed,) = _list(cli, tenant_id)
    output = _run(cli, "keys", "revoke", listed["id"]).stdout
    assert key not in output
    first = json.loads(output)
    assert datetime.fromisoformat(first["revoked_at"]) <= utcnow()
    second = json.loads(_run(cli, "keys", "revoke", listed["id"]).stdout)
    assert second["revoked_at"] == first["revoked_at"]
    rotate = _run(cli, "keys", "rotate", listed["id"], code=1)
    assert "revoked" in rotate.stderr
    missing = _run(cli, "keys", "revoke", str(uuid.uuid4()), code=1)
    assert "key not found" in missing.stderr


def test_tenants_and_plans_take_usage_alert_thresholds(cli: CliRunner, backend: Backend) -> None:
    plan = uuid.uuid4().hex
    created = json.loads(
        _run(cli, "plans", "create", "--name", plan, "--alert-thresholds", "75,25").stdout
    )
    assert created["usage_alert_thresholds"] == [25, 75]
    updated = json.loads(
        _run(cli, "plans", "update", created["id"], "--alert-thresholds", "90").stdout
    )
    assert updated["usage_alert_thresholds"] == [90]
    tenant = json.loads(
        _run(
            cli, "tenants", "create", "--name", plan, "--plan", plan, "--alert-thresholds", "10,60"
        ).stdout
    )
    assert tenant["usage_alert_thresholds"] == [10, 60]
    refused = _run(
        cli, "tenants", "create", "--name", "x" + plan, "--alert-thresholds", "a", code=1
    )
    assert "--alert-thresholds" in refused.stderr
    out_of_range = _run(
        cli, "tenants", "create", "--name", "y" + plan, "--alert-thresholds", "150", code=1
    )
    assert "usage_alert_thresholds" in out_of_range.stderr

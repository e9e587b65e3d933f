"""SECURITY.md line 20 on the error paths: every 5xx (and database refusal) this test can
provoke, with the database's own error message quoting a key's digest, leaves no key, digest
or secret in the log or the response."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.cli import upgrade_database
from auth.identity.keys import key_digest
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    bearer,
    create_admin_key,
    make_settings,
    running_app,
    unique,
    wrong_checksum,
)

# Each trigger refuses the write with a message that quotes the secret-derived column, as a
# driver's or server's error message may.
TRIGGERS = {
    "postgres": [
        "CREATE FUNCTION quote_digest() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused key with digest %', NEW.digest; END $$",
        "CREATE TRIGGER quote_digest BEFORE INSERT ON api_key "
        "FOR EACH ROW EXECUTE FUNCTION quote_digest()",
        "CREATE FUNCTION refuse_usage() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused usage of key %', NEW.api_key_id; END $$",
        "CREATE TRIGGER refuse_usage BEFORE INSERT ON usage_record "
        "FOR EACH ROW EXECUTE FUNCTION refuse_usage()",
    ],
    # SQLite's RAISE takes no expression; a JSON path error quotes the path it was given.
    "sqlite": [
        "CREATE TRIGGER quote_digest BEFORE INSERT ON api_key "
        "BEGIN SELECT json_extract('{}', NEW.digest); END",
        "CREATE TRIGGER refuse_usage BEFORE INSERT ON usage_record "
        "BEGIN SELECT json_extract('{}', NEW.api_key_id); END",
    ],
}


async def _execute(engine: AsyncEngine, statements: list[str]) -> None:
    async with engine.begin() as connection:
        for statement in statements:
            await connection.execute(text(statement))


async def test_error_paths_log_no_key_digest_or_secret(
    backend: Backend,
    empty_database: str,
    served_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """SECURITY.md line 20: the error paths log no credential, digest or secret."""
    await asyncio.to_thread(upgrade_database, empty_database)
    database = Backend(backend.name, empty_database, backend.redis_url)
    settings = make_settings(database, served_model_dir, tmp_path, log_level="DEBUG")
    secrets: list[str] = []
    async with running_app(settings, database) as app:
        pepper = app.state.secrets.key_pepper
        secrets += [pepper.decode(), app.state.secrets.jwt_secret.decode()]
        admin = await create_admin_key(app)
        secrets += [admin, key_digest(pepper, admin)]
        created = await app.client.post(
            "/api/v1/admin/tenants", json={"name": unique("logs")}, headers=bearer(admin)
        )
        tenant_id = created.json()["id"]
        issue = f"/api/v1/admin/tenants/{tenant_id}/keys"
        good = await app.client.post(issue, json={"name": "good"}, headers=bearer(admin))
        assert good.status_code == 201
        key = good.json()["key"]
        secrets += [key, key_digest(pepper, key)]

        await _execute(app.state.engine, TRIGGERS[backend.name])
        with caplog.at_level(logging.DEBUG):
            refused = await app.client.post(issue, json={"name": "refused"}, headers=bearer(admin))
            # An error raised inside the database that is no data, constraint or connection
            # error is a bug of ours: 500, and never the message.
            assert refused.status_code == 500, refused.text
            assert "digest" not in refused.text
            unbilled = await app.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )
            assert unbilled.status_code == 503, unbilled.text
            for credential in (wrong_checksum(key), key + "x", "mg_" + "a" * 40):
                refused_key = await app.client.post(
                    "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(credential)
                )
                assert refused_key.status_code == 401
                secrets.append(credential)
    # The app's own lines for these requests were captured (else the grep proves nothing).
    events = [record.getMessage() for record in caplog.records]
    assert any("request" in event for event in events), events[:5]
    assert any("usage flush failed" in event for event in events), events
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    logged += capfd.readouterr().err
    for secret in secrets:
        assert secret not in logged

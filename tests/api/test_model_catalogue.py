"""The model catalogue (auth.model_catalog) and the one publish step (api.model_catalogue), on
Postgres and SQLite: a version is recorded once with its audit event, recorded again with the
same manifest it changes nothing, with another it is refused; a publication whose store fails
leaves no version; workers read only what is new; GET /models/{name} shows each version's
source from the catalogue; a pinned version a replica does not have is fetched in the
background while its requests answer 503 with Retry-After."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, func, select

from api.model_catalogue import publish_version, sync_catalogue
from auth.model_catalog import VersionConflict, catalog_entry, new_entries, record_version
from auth.models import AuditEvent, ModelActivation, ModelVersion
from ml.manifest import MANIFEST_FILE
from ml.store import LocalStore, StoreError
from tests.conftest import (
    IRIS_SETOSA,
    TEST_ACTOR,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    running_app,
    unique,
)


def _manifest_text(served_model_dir: Path, name: str = "iris") -> str:
    """iris 1's manifest, renamed to ``name``."""
    document = json.loads((served_model_dir / "iris" / "1" / MANIFEST_FILE).read_text())
    document["name"] = name
    return json.dumps(document, indent=2)


async def _count(harness: Harness, statement: object) -> int:
    async with harness.sessionmaker() as session:
        return int(await session.scalar(statement))  # type: ignore[call-overload]


async def test_a_version_is_recorded_once_with_its_audit_event_and_is_immutable(
    harness: Harness, served_model_dir: Path
) -> None:
    name = unique("m")
    text = _manifest_text(served_model_dir, name)
    async with harness.sessionmaker() as session:
        entry, created = await record_version(
            session, TEST_ACTOR, name, "1", text, source_uri="s3://b/k", source_version="7"
        )
        await session.commit()
    assert created
    assert (entry.source_uri, entry.source_version, entry.registered_by) == (
        "s3://b/k",
        "7",
        "test",
    )

    # The same manifest, written differently: nothing changes, no second event.
    same = json.dumps(json.loads(text))
    async with harness.sessionmaker() as session:
        _, created = await record_version(session, TEST_ACTOR, name, "1", same)
        await session.commit()
    assert not created

    other = json.loads(text)
    other["metrics"] = {"accuracy": 0.5}
    async with harness.sessionmaker() as session:
        with pytest.raises(VersionConflict) as refused:
            await record_version(session, TEST_ACTOR, name, "1", json.dumps(other))
        await session.rollback()
    assert refused.value.status_code == 409

    async with harness.sessionmaker() as session:
        stored = await catalog_entry(session, name, "1")
    assert stored is not None
    assert stored.manifest == text
    events = select(func.count()).where(
        AuditEvent.action == "model.register", AuditEvent.target_id == name
    )
    assert await _count(harness, events) == 1


async def test_workers_read_only_the_versions_they_have_not_seen(
    harness: Harness, served_model_dir: Path
) -> None:
    names = [unique("m") for _ in range(2)]
    async with harness.sessionmaker() as session:
        for name in names:
            await record_version(
                session, TEST_ACTOR, name, "1", _manifest_text(served_model_dir, name)
            )
        await session.commit()
        everything = await new_entries(session, ())
        known = {entry.key for entry in everything if entry.name != names[1]}
        assert [entry.key for entry in await new_entries(session, known)] == [(names[1], "1")]


async def test_a_publication_whose_store_fails_leaves_no_version(
    harness: Harness, served_model_dir: Path, tmp_path: Path
) -> None:
    name = unique("m")
    staged = tmp_path / "staging" / name / "1"
    shutil.copytree(served_model_dir / "iris" / "1", staged)
    (staged / MANIFEST_FILE).write_text(_manifest_text(served_model_dir, name))
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the store's directory should be")

    async with harness.sessionmaker() as session:
        with pytest.raises(StoreError, match="could not be written to the model store"):
            await publish_version(
                session,
                LocalStore(blocked),
                staged,
                TEST_ACTOR,
                source_uri=None,
                source_version=None,
            )
        await session.rollback()
    rows = select(func.count()).select_from(ModelVersion).where(ModelVersion.name == name)
    assert await _count(harness, rows) == 0

    # The same staged version, to a store that works: published, with its audit event.
    store = LocalStore(tmp_path / "store")
    async with harness.sessionmaker() as session:
        manifest = await publish_version(
            session, store, staged, TEST_ACTOR, source_uri="file:///x.onnx", source_version=None
        )
        await session.commit()
    assert manifest.name == name
    assert store.has_version(name, "1")
    assert await _count(harness, rows) == 1


async def test_a_tampered_staged_version_is_not_published(
    harness: Harness, served_model_dir: Path, tmp_path: Path
) -> None:
    name = unique("m")
    staged = tmp_path / "staging" / name / "1"
    shutil.copytree(served_model_dir / "iris" / "1", staged)
    (staged / MANIFEST_FILE).write_text(_manifest_text(served_model_dir, name))
    (staged / "model.onnx").write_bytes(b"not the model")
    async with harness.sessionmaker() as session:
        with pytest.raises(Exception, match="does not match its manifest"):
            await publish_version(
                session,
                LocalStore(tmp_path / "store"),
                staged,
                TEST_ACTOR,
                source_uri=None,
                source_version=None,
            )
        await session.rollback()
    assert not LocalStore(tmp_path / "store").has_version(name, "1")


async def test_a_model_shows_each_versions_source_from_the_catalogue_to_operators_only(
    harness: Harness, client: httpx.AsyncClient, served_model_dir: Path
) -> None:
    _, key = await create_tenant_with_key(harness)
    admin_key = await create_admin_key(harness)
    before = (await client.get("/api/v1/models/iris", headers=bearer(admin_key))).json()
    assert (before["versions"][0]["source"], before["versions"][0]["source_version"]) == (
        None,
        None,
    )

    async with harness.sessionmaker() as session:
        await record_version(
            session,
            TEST_ACTOR,
            "iris",
            "1",
            _manifest_text(served_model_dir),
            source_uri="models:/iris/3",
            source_version="3",
        )
        await session.commit()
        # What the worker's once-a-second follower does.
        await sync_catalogue(harness.state.registry, session, harness.state.catalogue)
    described = (await client.get("/api/v1/models/iris", headers=bearer(admin_key))).json()
    [version] = described["versions"]
    assert (version["source"], version["source_version"], version["state"]) == (
        "models:/iris/3",
        "3",
        "ready",
    )
    # A tenant learns nothing of where the operator keeps its models.
    for path in ("/api/v1/models/iris", "/api/v1/models"):
        tenant_view = (await client.get(path, headers=bearer(key))).json()
        [model] = [tenant_view] if path.endswith("iris") else tenant_view["models"]
        assert [(v["source"], v["source_version"]) for v in model["versions"]] == [(None, None)]


async def test_a_pinned_version_not_on_this_replica_answers_503_then_is_served(
    harness: Harness, served_model_dir: Path, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    name = unique("m")
    staged = tmp_path / "staging" / name / "1"
    shutil.copytree(served_model_dir / "iris" / "1", staged)
    (staged / MANIFEST_FILE).write_text(_manifest_text(served_model_dir, name))
    async with harness.sessionmaker() as session:
        await publish_version(
            session, store, staged, TEST_ACTOR, source_uri=None, source_version=None
        )
        await session.commit()
    _, key = await create_tenant_with_key(harness)
    settings = make_settings(
        harness.backend,
        tmp_path / "empty-replica",
        tmp_path / "var",
        model_store=str(store.root),
    )
    async with running_app(settings, harness.backend) as replica:
        pinned = {"features": IRIS_SETOSA, "model": name, "model_version": "1"}
        first = await replica.client.post("/api/v1/predict", json=pinned, headers=bearer(key))
        assert first.status_code == 503, first.text
        assert first.headers["Retry-After"]
        assert "being fetched" in first.json()["detail"]
        deadline = time.monotonic() + 30
        while True:
            answer = await replica.client.post("/api/v1/predict", json=pinned, headers=bearer(key))
            if answer.status_code == 200:
                break
            assert answer.status_code == 503, answer.text
            assert time.monotonic() < deadline, "the pinned version was never fetched"
            await asyncio.sleep(0.05)
        assert answer.json()["model_version"] == "1"
    assert (tmp_path / "empty-replica" / name / "1" / MANIFEST_FILE).is_file()


async def test_the_activate_route_fetches_a_version_published_a_moment_ago(
    harness: Harness, served_model_dir: Path, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    name = unique("m")
    staged = tmp_path / "staging" / name / "1"
    shutil.copytree(served_model_dir / "iris" / "1", staged)
    (staged / MANIFEST_FILE).write_text(_manifest_text(served_model_dir, name))
    admin_key = await create_admin_key(harness)
    settings = make_settings(
        harness.backend, tmp_path / "empty-replica", tmp_path / "var", model_store=str(store.root)
    )
    async with running_app(settings, harness.backend) as replica:
        async with harness.sessionmaker() as session:
            await publish_version(
                session, store, staged, TEST_ACTOR, source_uri=None, source_version=None
            )
            await session.commit()
        activated = await replica.client.post(
            f"/api/v1/admin/models/{name}/activate",
            json={"version": "1"},
            headers=bearer(admin_key),
        )
        assert activated.status_code == 200, activated.text
        assert replica.state.registry.active_version(name) == "1"
        unknown = await replica.client.post(
            f"/api/v1/admin/models/{name}/activate",
            json={"version": "2"},
            headers=bearer(admin_key),
        )
        assert unknown.status_code == 404, unknown.text
    async with harness.sessionmaker() as session:
        await session.execute(delete(ModelActivation).where(ModelActivation.name == name))
        await session.commit()


async def test_a_source_uri_is_recorded_without_credentials_or_query(
    harness: Harness, served_model_dir: Path
) -> None:
    name = unique("m")
    async with harness.sessionmaker() as session:
        entry, _ = await record_version(
            session,
            TEST_ACTOR,
            name,
            "1",
            _manifest_text(served_model_dir, name),
            source_uri="https://user:hunter2@models.example/m.onnx?X-Amz-Signature=abc123#x",
        )
        await session.commit()
        stored = await catalog_entry(session, name, "1")
        event = await session.scalar(
            select(AuditEvent).where(
                AuditEvent.action == "model.register", AuditEvent.target_id == name
            )
        )
    assert entry.source_uri == "https://models.example/m.onnx"
    assert stored is not None
    assert stored.source_uri == "https://models.example/m.onnx"
    assert event is not None
    assert "hunter2" not in json.dumps(event.detail)
    assert "abc123" not in json.dumps(event.detail)

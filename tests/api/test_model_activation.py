"""The model lifecycle over HTTP: activation (audited, applied by every worker from the
database), pinning, no silent fallback, the periodic self-check, and each version's schema."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sqlalchemy import delete, select

from auth.db import create_engine, create_sessionmaker
from auth.model_activation import ActivationView, activate_version
from auth.models import AuditEvent, Event, ModelActivation
from ml.train import register_model
from tests.conftest import (
    IRIS_SETOSA,
    TEST_ACTOR,
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    running_app,
)
from tests.promises import PromisedDelay

PREDICT = "/api/v1/predict"


@pytest.fixture(scope="module")
def two_versions(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``iris`` 1 (the forest, active) and 2 (a logistic regression, registered, not active),
    both served by ONNX Runtime."""
    model_dir = tmp_path_factory.mktemp("two-versions") / "models"
    shutil.copytree(served_model_dir, model_dir)
    iris = load_iris()
    register_model(
        model_dir,
        "iris",
        LogisticRegression(max_iter=1000).fit(iris.data, iris.target),
        feature_names=list(iris.feature_names),
        class_names=list(iris.target_names),
        reference=iris.data,
        version="2",
        activate=False,
        metrics={"accuracy": 0.97},
    )
    return model_dir


@pytest.fixture
def models(two_versions: Path, tmp_path: Path) -> Path:
    """A private copy of the two versions that a test may tamper with."""
    copy = tmp_path / "models"
    shutil.copytree(two_versions, copy)
    return copy


@pytest_asyncio.fixture(autouse=True)
async def _no_activation_left_behind(backend: Backend) -> AsyncIterator[None]:
    """The module's database is shared by its tests: an activation one test records must not
    choose the version another test's app serves."""
    yield
    engine = create_engine(backend.database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(delete(ModelActivation))
    finally:
        await engine.dispose()


def _tamper(path: Path) -> bytes:
    original = path.read_bytes()
    path.write_bytes(original + b"tampered")
    return original


async def _served_version(app: Harness, key: str, **body: Any) -> httpx.Response:
    return await app.client.post(
        PREDICT, json={"features": IRIS_SETOSA, **body}, headers=bearer(key)
    )


async def _activate(app: Harness, admin: str, version: str, name: str = "iris") -> httpx.Response:
    return await app.client.post(
        f"/api/v1/admin/models/{name}/activate", json={"version": version}, headers=bearer(admin)
    )


async def _active_in_metrics(app: Harness) -> dict[str, float]:
    """modelgate_model_active_version of iris's versions, as /metrics reports it."""
    text = (await app.client.get("/metrics")).text
    prefix = 'modelgate_model_active_version{model="iris",version="'
    return {
        line[len(prefix) :].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


async def test_activation_switches_the_served_version_rolls_back_and_is_audited(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    async with running_app(make_settings(backend, models, tmp_path / "var"), backend) as app:
        admin = await create_admin_key(app)
        _, key = await create_tenant_with_key(app)
        assert (await _served_version(app, key)).json()["model_version"] == "1"

        activated = await _activate(app, admin, "2")
        assert activated.status_code == 200, activated.text
        body = activated.json()
        assert (body["name"], body["version"], body["previous_version"]) == ("iris", "2", None)
        assert body["activated_by"].startswith("admin:")
        assert (await _served_version(app, key)).json()["model_version"] == "2"
        assert await _active_in_metrics(app) == {"1": 0.0, "2": 1.0}

        rollback = await _activate(app, admin, "1")
        assert rollback.status_code == 200, rollback.text
        assert rollback.json()["previous_version"] == "2"
        assert (await _served_version(app, key)).json()["model_version"] == "1"
        assert await _active_in_metrics(app) == {"1": 1.0, "2": 0.0}

        async with app.sessionmaker() as session:
            events = (
                await session.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.action == "model.activate")
                    .order_by(AuditEvent.id)
                )
            ).all()
            row = await session.get(ModelActivation, "iris")
        assert [(e.target_type, e.target_id, e.detail) for e in events] == [
            ("model", "iris", {"version": "2", "previous_version": None}),
            ("model", "iris", {"version": "1", "previous_version": "2"}),
        ]
        assert all(e.actor == body["activated_by"] for e in events)
        assert row is not None
        assert row.version == "1"


async def test_unknown_invalid_or_broken_versions_are_refused_and_nothing_is_recorded(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    original = _tamper(models / "iris" / "2" / "model.onnx")
    async with running_app(make_settings(backend, models, tmp_path / "var"), backend) as app:
        admin = await create_admin_key(app)
        _, key = await create_tenant_with_key(app)
        assert (await _activate(app, admin, "9")).status_code == 404
        assert (await _activate(app, admin, "1", name="nope")).status_code == 404
        for version in ("../1", "0", "abc", "1/../2"):
            assert (await _activate(app, admin, version)).status_code == 422, version
        traversal = await app.client.post(
            "/api/v1/admin/models/..%2F..%2Fetc/activate",
            json={"version": "1"},
            headers=bearer(admin),
        )
        assert traversal.status_code in (404, 422)
        broken = await _activate(app, admin, "2")
        assert broken.status_code == 409, broken.text
        assert broken.headers["content-type"] == "application/problem+json"
        assert broken.json()["type"] == "version-unavailable"
        assert "does not match the SHA-256" in broken.json()["detail"]
        assert (await _activate(app, key, "1")).status_code == 403  # a tenant's key

        async with app.sessionmaker() as session:
            assert (await session.scalars(select(ModelActivation))).all() == []
            # The broken version, and only it, told the operator (an outgoing event).
            failures = (
                await session.scalars(
                    select(Event.payload).where(Event.type == "model.activation_failed")
                )
            ).all()
        assert [json.loads(p)["data"]["version"] for p in failures] == ["2"]
        assert (await _served_version(app, key)).json()["model_version"] == "1"

        # Once the file is restored, the same call activates it.
        (models / "iris" / "2" / "model.onnx").write_bytes(original)
        assert (await _activate(app, admin, "2")).status_code == 200
        assert (await _served_version(app, key)).json()["model_version"] == "2"


async def test_a_request_may_pin_a_version_other_than_the_active_one(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    async with running_app(make_settings(backend, models, tmp_path / "var"), backend) as app:
        _, key = await create_tenant_with_key(app)
        for pinned in ("1", "2"):
            response = await _served_version(app, key, model_version=pinned)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == pinned
        batch = await app.client.post(
            "/api/v1/predict/batch",
            json={"instances": [IRIS_SETOSA], "model_version": "2"},
            headers=bearer(key),
        )
        assert batch.json()["model_version"] == "2"
        assert (await _served_version(app, key, model_version="3")).status_code == 404


async def test_a_broken_active_version_is_refused_with_503_and_never_replaced(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    (models / "iris" / "ACTIVE").write_text("2\n")
    _tamper(models / "iris" / "2" / "model.onnx")
    async with running_app(make_settings(backend, models, tmp_path / "var"), backend) as app:
        _, key = await create_tenant_with_key(app)
        refused = await _served_version(app, key)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert "Retry-After" in refused.headers
        assert "model 'iris' is unavailable: its active version 2" in refused.json()["detail"]
        # Another healthy version, pinned, is still served.
        assert (await _served_version(app, key, model_version="1")).status_code == 200

        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 503
        [unavailable] = ready.json()["unavailable_models"]
        assert unavailable["model"] == "iris"
        assert unavailable["active_version"] == "2"
        assert "does not match the SHA-256" in unavailable["reason"]
        described = (await app.client.get("/api/v1/models/iris", headers=bearer(key))).json()
        assert described["active_version"] == "2"
        assert described["serving"] is False
        assert "does not match the SHA-256" in described["unavailable_reason"]

        # An operator activates version 1: served again, readiness recovers.
        admin = await create_admin_key(app)
        assert (await _activate(app, admin, "1")).status_code == 200
        assert (await _served_version(app, key)).json()["model_version"] == "1"
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 200
        assert ready.json()["unavailable_models"] == []


async def _until(check: Any, seconds: float) -> float:
    """Wait until ``await check()`` is true; fail after ``seconds``. Returns how long it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, "not within the time allowed"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_periodic_rehash_stops_serving_a_tampered_version_then_reloads_it_once_restored(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    settings = make_settings(backend, models, tmp_path / "var", model_check_interval_seconds=0.2)
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        assert (await _served_version(app, key)).status_code == 200
        original = _tamper(models / "iris" / "1" / "model.onnx")

        async def version_1_state() -> str:
            described = await app.client.get("/api/v1/models/iris", headers=bearer(key))
            [one] = [v for v in described.json()["versions"] if v["version"] == "1"]
            return str(one["state"])

        async def unhealthy() -> bool:
            return await version_1_state() == "unhealthy"

        await _until(unhealthy, 20)
        refused = await _served_version(app, key)
        assert refused.status_code == 503
        assert "iris" in refused.json()["detail"]
        assert (await _served_version(app, key, model_version="2")).status_code == 200
        ready = (await app.client.get("/api/v1/health/ready")).json()
        assert "iris/1" in ready["failed_model_versions"]
        assert ready["unavailable_models"][0]["model"] == "iris"

        async def operator_told() -> bool:
            async with app.sessionmaker() as session:
                told = await session.scalars(
                    select(Event.payload).where(Event.type == "model.unhealthy")
                )
                return [json.loads(p)["data"]["version"] for p in told] == ["1"]

        # Once, however many self-checks found it unhealthy since.
        await _until(operator_told, 5)
        await asyncio.sleep(0.5)
        assert await operator_told()

        (models / "iris" / "1" / "model.onnx").write_bytes(original)

        async def healthy() -> bool:
            return await version_1_state() == "ready"

        await _until(healthy, 20)
        assert (await _served_version(app, key)).json()["model_version"] == "1"


async def test_an_activation_recorded_elsewhere_reaches_this_worker_within_two_seconds(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    """As a CLI or another worker would: the record in the database, nothing else."""
    async with running_app(make_settings(backend, models, tmp_path / "var"), backend) as app:
        _, key = await create_tenant_with_key(app)
        assert (await _served_version(app, key)).json()["model_version"] == "1"
        async with app.sessionmaker() as session:
            await activate_version(session, TEST_ACTOR, "iris", "2")
            await session.commit()

        async def serves_version_2() -> bool:
            response = await _served_version(app, key)
            assert response.status_code == 200, response.text
            return bool(response.json()["model_version"] == "2")

        await PromisedDelay("activation", 2.0).until(serves_version_2)
        assert await _active_in_metrics(app) == {"1": 0.0, "2": 1.0}


async def test_an_activation_recorded_before_start_applies_from_the_first_request(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    engine = create_engine(backend.database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            await activate_version(session, TEST_ACTOR, "iris", "2")
            await session.commit()
    finally:
        await engine.dispose()
    async with running_app(make_settings(backend, models, tmp_path / "var"), backend) as app:
        _, key = await create_tenant_with_key(app)
        assert (await _served_version(app, key)).json()["model_version"] == "2"


async def test_models_route_publishes_each_version_s_input_schema_and_health(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    async with running_app(make_settings(backend, models, tmp_path / "var"), backend) as app:
        _, key = await create_tenant_with_key(app)
        described = (await app.client.get("/api/v1/models/iris", headers=bearer(key))).json()
    assert described["active_version"] == "1"
    assert described["serving"] is True
    assert described["unavailable_reason"] is None
    one, two = described["versions"]
    assert (one["active"], two["active"]) == (True, False)
    assert (one["state"], two["state"]) == ("ready", "ready")
    assert two["metrics"] == {"accuracy": 0.97}
    schema = two["input_schema"]
    assert schema["n_features"] == 4
    assert schema["feature_names"][0] == "sepal length (cm)"
    assert len(schema["input_range"]) == 4
    assert schema["training_range"][0] == {"min": 4.3, "max": 7.9}
    assert two["class_names"] == ["setosa", "versicolor", "virginica"]
    assert two["created_at"] is not None


async def _activations_of(app_or_sessions: Any, name: str) -> list[dict[str, Any]]:
    async with app_or_sessions() as session:
        events = (
            await session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action == "model.activate", AuditEvent.target_id == name)
                .order_by(AuditEvent.id)
            )
        ).all()
    return [dict(event.detail) for event in events]


async def test_two_first_activations_racing_both_record_in_turn(backend: Backend) -> None:
    """Two activations of a model that has no activation row yet, each in its own transaction,
    at once: both succeed (neither is refused on the row the other inserted), one after the
    other: the second names the first as the version it replaced, and the row holds the
    second's version."""
    name = f"racer-{uuid.uuid4().hex[:8]}"
    engine = create_engine(backend.database_url)
    sessions = create_sessionmaker(engine)

    async def activate(version: str) -> ActivationView:
        async with sessions() as session:
            view = await activate_version(session, TEST_ACTOR, name, version)
            await session.commit()
            return view

    try:
        views = await asyncio.gather(activate("1"), activate("2"))
        first, second = sorted(views, key=lambda view: view.previous_version is not None)
        assert first.previous_version is None
        assert second.previous_version == first.version
        async with sessions() as session:
            row = await session.get(ModelActivation, name)
        assert row is not None
        assert row.version == second.version
        assert await _activations_of(sessions, name) == [
            {"version": first.version, "previous_version": None},
            {"version": second.version, "previous_version": first.version},
        ]
    finally:
        await engine.dispose()


async def test_two_first_activations_racing_over_http_both_answer_200(
    backend: Backend, models: Path, tmp_path: Path
) -> None:
    """The same race through the route: two operators activate versions of a model never
    activated before at the same moment; both are answered 200, never 409 or 500, and the
    version served is the one recorded last."""
    async with running_app(make_settings(backend, models, tmp_path / "var"), backend) as app:
        admin = await create_admin_key(app)
        answers = await asyncio.gather(_activate(app, admin, "2"), _activate(app, admin, "1"))
        assert [answer.status_code for answer in answers] == [200, 200], [
            answer.text for answer in answers
        ]
        first, second = sorted(
            (answer.json() for answer in answers),
            key=lambda body: body["previous_version"] is not None,
        )
        assert first["previous_version"] is None
        assert second["previous_version"] == first["version"]
        async with app.sessionmaker() as session:
            row = await session.get(ModelActivation, "iris")
        assert row is not None
        assert row.version == second["version"]

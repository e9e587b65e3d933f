"""The signed model webhooks in one process (``api.routes.webhooks``): deliveries signed by the
senders' own code (the ``standardwebhooks`` library's ``Webhook.sign``, MLflow's own
``_generate_hmac_signature``) are accepted once, audited and handed to the deployer; anything
unsigned, badly signed, stale, replayed, oversize or unparseable is refused with a problem and
changes nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pydantic import ValidationError
from sqlalchemy import delete, func, select
from standardwebhooks.webhooks import Webhook

from api.webhooks.deploy import DeployOutcome, DeployQueue, DeployRequest
from auth.errors import ConfigurationError
from auth.model_activation import MODEL_NAME_PATTERN
from auth.models import AuditEvent, ModelActivation, WebhookDelivery
from auth.settings import MODEL_NAME_RE, Settings, check_production
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    running_app,
)

# MLflow's own signing, from the integration-test extra (.ci/run installs it; without it, a skip
# that MODELGATE_TEST_REQUIRE_SERVICES=1 turns into a failure).
_generate_hmac_signature = pytest.importorskip("mlflow.webhooks.delivery")._generate_hmac_signature

GENERIC = "/api/v1/admin/models/webhooks/generic"
MLFLOW = "/api/v1/admin/models/webhooks/mlflow"
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
MLFLOW_SECRET = "mlflow-shared-secret-0123456789"


class Recorder:
    """The app's own deployer, with every request it is given written down."""

    def __init__(self, deployer: Any) -> None:
        self.deployer = deployer
        self.requests: list[DeployRequest] = []

    async def deploy(self, request: DeployRequest) -> DeployOutcome:
        self.requests.append(request)
        outcome: DeployOutcome = await self.deployer.deploy(request)
        return outcome


@pytest.fixture(scope="module")
def candidate(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX model file outside the registry, as a team would publish one."""
    path = tmp_path_factory.mktemp("published") / "iris candidate.onnx"
    shutil.copyfile(served_model_dir / "iris" / "1" / "model.onnx", path)
    return path


@pytest_asyncio.fixture(loop_scope="session")
async def app(backend: Backend, served_model_dir: Path, tmp_path: Path) -> AsyncIterator[Harness]:
    """An app with both webhook secrets, on a private copy of the registry, its deployer
    recorded; the module's database is left without this test's deliveries and activations."""
    models = tmp_path / "models"
    shutil.copytree(served_model_dir, models)
    settings = make_settings(
        backend,
        models,
        tmp_path / "var",
        webhook_secret=SECRET,
        mlflow_webhook_secret=MLFLOW_SECRET,
        mlflow_model_names={"Fraud Model": "fraud"},
    )
    async with running_app(settings, backend) as running:
        running.state.deploys.deployer = Recorder(running.state.deploys.deployer)
        async with running.sessionmaker() as session:
            _AUDITED_BEFORE[id(running.state)] = int(
                await session.scalar(select(func.max(AuditEvent.id))) or 0
            )
        yield running
    async with running.sessionmaker() as session:
        await session.execute(delete(ModelActivation))
        await session.execute(delete(WebhookDelivery))
        await session.commit()


# The audit trail's last event id when each test's app started: the module's database (and its
# audit trail) is shared by the module's tests.
_AUDITED_BEFORE: dict[int, int] = {}


def recorded(app: Harness) -> list[DeployRequest]:
    deployer = app.state.deploys.deployer
    assert isinstance(deployer, Recorder)
    return deployer.requests


def signed_generic(
    payload: dict[str, Any] | bytes,
    *,
    secret: str = SECRET,
    msg_id: str | None = None,
    at: datetime | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A delivery as a Standard Webhooks sender makes it, with the library's own signature."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, at, body)
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
    return body, headers


def signed_mlflow(
    entity: str,
    action: str,
    data: dict[str, Any],
    *,
    secret: str = MLFLOW_SECRET,
    at: float | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A delivery as MLflow's server makes it (its envelope, and its own signing function)."""
    payload = json.dumps(
        {
            "entity": entity,
            "action": action,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": data,
        }
    )
    delivery_id = str(uuid.uuid4())
    timestamp = str(int(at if at is not None else time.time()))
    return payload.encode(), {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, timestamp, payload),
    }


async def post(app: Harness, path: str, delivery: tuple[bytes, dict[str, str]]) -> httpx.Response:
    body, headers = delivery
    return await app.client.post(path, content=body, headers=headers)


async def audited(app: Harness, action: str) -> list[dict[str, Any]]:
    async with app.sessionmaker() as session:
        events = await session.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == action)
            .where(AuditEvent.id > _AUDITED_BEFORE.get(id(app.state), 0))
            .order_by(AuditEvent.id)
        )
        return [{"actor": e.actor, "target": e.target_id, **e.detail} for e in events]


async def deliveries(app: Harness) -> int:
    async with app.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(WebhookDelivery)) or 0)


async def served_version(app: Harness, key: str) -> str:
    response = await app.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def test_the_settings_know_the_registry_name_pattern() -> None:
    assert f"^{MODEL_NAME_RE}$" == MODEL_NAME_PATTERN


def test_webhook_settings_are_checked_without_echoing_secrets(tmp_path: Path) -> None:
    """A Standard Webhooks secret that is not whsec_ and base64 of 24 to 64 bytes, or a served
    name that is not a model name, stops the settings; neither error shows the secret. In
    production the MLflow secret is at least 32 characters."""
    for bad in ("not-a-whsec-secret-at-all", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValidationError) as refused:
            Settings(_env_file=None, var_dir=tmp_path, webhook_secret=bad)  # type: ignore[call-arg]
        # What the CLI prints of a refused setting (never its input).
        assert bad not in " ".join(e["msg"] for e in refused.value.errors())
    with pytest.raises(ValidationError, match="not a valid model name"):
        Settings(_env_file=None, mlflow_model_names={"Churn": "churn model"})  # type: ignore[call-arg]
    weak = "m" * 20
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        var_dir=tmp_path,
        env="production",
        key_pepper="p" * 48,
        jwt_secret="j" * 48,
        mlflow_webhook_secret=weak,
    )
    with pytest.raises(ConfigurationError, match="MLFLOW_WEBHOOK_SECRET") as production:
        check_production(settings, workers=1)
    assert weak not in str(production.value)


async def test_a_signed_file_delivery_registers_and_activates_the_version(
    app: Harness, candidate: Path
) -> None:
    _, key = await create_tenant_with_key(app)
    assert await served_version(app, key) == "1"
    source = candidate.as_uri()
    response = await post(
        app,
        GENERIC,
        signed_generic({"name": "iris", "version": "2", "source": source, "activate": True}),
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert (accepted["name"], accepted["version"], accepted["activate"]) == ("iris", "2", True)
    await app.state.deploys.join()

    assert recorded(app) == [
        DeployRequest("iris", "2", source, True, accepted["delivery_id"], "generic")
    ]
    assert await served_version(app, key) == "2"
    (accept,) = await audited(app, "webhook.accept")
    assert (accept["actor"], accept["target"], accept["delivery_id"]) == (
        "webhook:generic",
        "iris",
        accepted["delivery_id"],
    )
    (deployed,) = await audited(app, "webhook.deploy")
    assert (deployed["outcome"], deployed["activated"]) == ("deployed", True)
    (activation,) = await audited(app, "model.activate")
    assert (activation["actor"], activation["version"]) == ("webhook:generic", "2")


async def test_a_delivery_without_activate_registers_and_leaves_the_active_version(
    app: Harness, candidate: Path
) -> None:
    _, key = await create_tenant_with_key(app)
    response = await post(
        app, GENERIC, signed_generic({"name": "iris", "version": "3", "source": candidate.as_uri()})
    )
    assert response.status_code == 202, response.text
    await app.state.deploys.join()
    assert (app.state.registry.model_dir / "iris" / "3" / "model.onnx").exists()
    assert await served_version(app, key) == "1"
    pinned = await app.client.post(
        "/api/v1/predict",
        json={"features": IRIS_SETOSA, "model_version": "3"},
        headers=bearer(key),
    )
    assert pinned.status_code == 200, pinned.text


def _refusals(candidate_uri: str) -> dict[str, tuple[tuple[bytes, dict[str, str]], int, str]]:
    good = {"name": "iris", "version": "4", "source": candidate_uri, "activate": True}
    now = datetime.now(UTC)
    body, headers = signed_generic(good)
    other_secret = "whsec_" + base64.b64encode(b"o" * 32).decode()
    cases: dict[str, tuple[tuple[bytes, dict[str, str]], int, str]] = {
        "another secret": (signed_generic(good, secret=other_secret), 401, "bad-signature"),
        "a tampered body": (
            (body.replace(b'"4"', b'"5"'), headers),
            401,
            "bad-signature",
        ),
        "no signature": (
            (body, {k: v for k, v in headers.items() if k != "webhook-signature"}),
            401,
            "missing-headers",
        ),
        "no id": (
            (body, {k: v for k, v in headers.items() if k != "webhook-id"}),
            401,
            "missing-headers",
        ),
        "no timestamp": (
            (body, {k: v for k, v in headers.items() if k != "webhook-timestamp"}),
            401,
            "missing-headers",
        ),
        "a timestamp that is not a number": (
            (body, {**headers, "webhook-timestamp": "1e9"}),
            401,
            "missing-headers",
        ),
        "six minutes old": (
            signed_generic(good, at=now - timedelta(minutes=6)),
            401,
            "stale-timestamp",
        ),
        "six minutes ahead": (
            signed_generic(good, at=now + timedelta(minutes=6)),
            401,
            "stale-timestamp",
        ),
        "garbage": (signed_generic(b"\xff\x00 not json"), 422, "unparseable"),
        "an unknown field": (signed_generic({**good, "tenant_id": "x"}), 422, "unparseable"),
        "an invalid model name": (
            signed_generic({**good, "name": "../etc"}),
            422,
            "unparseable",
        ),
        "oversize": (
            signed_generic({**good, "padding": "x" * 70_000}),
            413,
            "body-too-large",
        ),
    }
    return cases


async def test_refused_deliveries_change_nothing(app: Harness, candidate: Path) -> None:
    _, key = await create_tenant_with_key(app)
    for case, (delivery, status, reason) in _refusals(candidate.as_uri()).items():
        response = await post(app, GENERIC, delivery)
        assert response.status_code == status, (case, response.text)
        assert response.headers["content-type"] == "application/problem+json", case
        assert SECRET not in response.text
        refusals = await audited(app, "webhook.refuse")
        assert refusals[-1]["reason"] == reason, case
        assert refusals[-1]["source"] == "generic", case
    assert len(await audited(app, "webhook.refuse")) == len(_refusals(candidate.as_uri()))
    await app.state.deploys.join()
    assert recorded(app) == []
    assert await audited(app, "webhook.accept") == []
    assert await deliveries(app) == 0
    assert not (app.state.registry.model_dir / "iris" / "4").exists()
    assert await served_version(app, key) == "1"


async def test_a_replayed_delivery_is_refused_here_and_on_another_replica(
    app: Harness, backend: Backend, candidate: Path, tmp_path: Path
) -> None:
    delivery = signed_generic({"name": "iris", "version": "5", "source": candidate.as_uri()})
    first = await post(app, GENERIC, delivery)
    assert first.status_code == 202, first.text
    again = await post(app, GENERIC, delivery)
    assert again.status_code == 409, again.text
    assert again.json()["type"] == "webhook-replayed"
    # Another app instance on the same database: a second replica behind the balancer.
    settings = make_settings(
        backend, app.state.registry.model_dir, tmp_path / "other-var", webhook_secret=SECRET
    )
    async with running_app(settings, backend) as replica:
        other = Recorder(replica.state.deploys.deployer)
        replica.state.deploys.deployer = other
        refused = await post(replica, GENERIC, delivery)
        assert refused.status_code == 409, refused.text
        assert other.requests == []
    await app.state.deploys.join()
    assert [r.delivery_id for r in recorded(app)] == [first.json()["delivery_id"]]
    assert [e["reason"] for e in await audited(app, "webhook.refuse")] == ["replayed"] * 2


async def test_a_route_without_its_secret_is_not_found(harness: Harness) -> None:
    for path in (GENERIC, MLFLOW):
        response = await harness.client.post(path, content=b"{}", headers={"webhook-id": "x"})
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/problem+json"


async def test_mlflow_events_map_to_deploy_requests(app: Harness) -> None:
    created = await post(
        app,
        MLFLOW,
        signed_mlflow(
            "model_version",
            "created",
            {"name": "Fraud Model", "version": "7", "source": "runs:/abc/model", "tags": {}},
        ),
    )
    assert created.status_code == 202, created.text
    champion = await post(
        app,
        MLFLOW,
        signed_mlflow(
            "model_version_alias", "created", {"name": "churn", "alias": "champion", "version": "3"}
        ),
    )
    assert champion.status_code == 202, champion.text
    other_alias = await post(
        app,
        MLFLOW,
        signed_mlflow(
            "model_version_alias", "created", {"name": "churn", "alias": "shadow", "version": "4"}
        ),
    )
    tag = await post(
        app,
        MLFLOW,
        signed_mlflow(
            "model_version_tag", "set", {"name": "churn", "version": "4", "key": "k", "value": "v"}
        ),
    )
    for ignored in (other_alias, tag):
        assert ignored.status_code == 202, ignored.text
        assert ignored.json()["status"] == "ignored"
    await app.state.deploys.join()
    assert [(r.name, r.version, r.source_uri, r.activate, r.via) for r in recorded(app)] == [
        ("fraud", "7", "models:/Fraud Model/7", False, "mlflow"),
        ("churn", "3", "models:/churn/3", True, "mlflow"),
    ]
    outcomes = await audited(app, "webhook.deploy")
    # This app names no MLflow server: each pull is refused, saying which setting is missing,
    # and nothing changes.
    assert [o["outcome"] for o in outcomes] == ["refused", "refused"]
    assert all("MODELGATE_MLFLOW_TRACKING_URI" in o["detail"] for o in outcomes)


async def test_mlflow_refusals_change_nothing(app: Harness) -> None:
    data = {"name": "churn", "alias": "champion", "version": "3"}
    body, headers = signed_mlflow("model_version_alias", "created", data)
    cases = {
        "another secret": (
            signed_mlflow("model_version_alias", "created", data, secret="not-the-secret-at-all"),
            401,
            "bad-signature",
        ),
        "a tampered body": ((body.replace(b'"3"', b'"9"'), headers), 401, "bad-signature"),
        "no signature": (
            (body, {k: v for k, v in headers.items() if k != "X-MLflow-Signature"}),
            401,
            "missing-headers",
        ),
        "six minutes old": (
            signed_mlflow("model_version_alias", "created", data, at=time.time() - 360),
            401,
            "stale-timestamp",
        ),
        "six minutes ahead": (
            signed_mlflow("model_version_alias", "created", data, at=time.time() + 360),
            401,
            "stale-timestamp",
        ),
        "an unmapped name": (
            signed_mlflow(
                "model_version", "created", {"name": "Churn v2", "version": "1", "tags": {}}
            ),
            422,
            "unmapped-name",
        ),
        "data of the wrong shape": (
            signed_mlflow("model_version", "created", {"name": "churn", "version": "x"}),
            422,
            "unparseable",
        ),
    }
    for case, (delivery, status, reason) in cases.items():
        response = await post(app, MLFLOW, delivery)
        assert response.status_code == status, (case, response.text)
        assert (await audited(app, "webhook.refuse"))[-1]["reason"] == reason, case
    accepted = await post(app, MLFLOW, (body, headers))
    assert accepted.status_code == 202, accepted.text
    replayed = await post(app, MLFLOW, (body, headers))
    assert replayed.status_code == 409, replayed.text
    await app.state.deploys.join()
    assert len(recorded(app)) == 1
    assert await deliveries(app) == 1


async def test_failed_signatures_spend_the_address_failure_budget(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        backend,
        served_model_dir,
        tmp_path / "var",
        webhook_secret=SECRET,
        auth_failures_per_address="2/minute",
    )
    async with running_app(settings, backend) as app:
        before = len(await audited(app, "webhook.refuse"))
        # An address of its own: the budget lives in the shared Redis.
        transport = httpx.ASGITransport(
            app=app.client._transport.app,  # type: ignore[attr-defined]
            client=(f"10.{os.getpid() % 250}.{uuid.uuid4().int % 250}.7", 1234),
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            bad = signed_generic({"name": "iris", "version": "9", "source": "file:///x.onnx"})
            body, headers = bad
            headers = {**headers, "webhook-signature": "v1,AAAA"}
            statuses = [
                (await client.post(GENERIC, content=body, headers=headers)).status_code
                for _ in range(3)
            ]
        assert statuses == [401, 401, 429]
        # The throttled one is not audited: an anonymous flood writes no events past the budget.
        assert len(await audited(app, "webhook.refuse")) == before + 2


class Blocking:
    """A deployer that holds each request until released: the queue fills behind it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[DeployRequest] = []

    async def deploy(self, request: DeployRequest) -> DeployOutcome:
        self.started.append(request)
        await self.release.wait()
        return DeployOutcome("deployed", "released")


async def test_a_full_queue_refuses_and_a_shutdown_loses_nothing_silently(
    app: Harness, candidate: Path
) -> None:
    """The deploy queue is bounded: past its capacity a delivery is refused with 503 and
    Retry-After, audited, and not remembered (the sender's retry is taken later); at shutdown
    the job running and the job waiting are each logged and audited, not dropped."""
    blocking = Blocking()
    real = app.state.deploys
    app.state.deploys = DeployQueue(blocking, app.sessionmaker, capacity=1)
    app.state.deploys.start()
    try:
        answers = []
        for version in ("6", "7", "8"):
            delivery = signed_generic(
                {"name": "iris", "version": version, "source": candidate.as_uri()}
            )
            answers.append(await post(app, GENERIC, delivery))
            # Let the runner take the first job off the queue.
            await asyncio.sleep(0.05)
        assert [a.status_code for a in answers] == [202, 202, 503], answers[-1].text
        assert answers[-1].headers["retry-after"] == "30"
        assert (await audited(app, "webhook.refuse"))[-1]["reason"] == "queue-full"
        assert await deliveries(app) == 2
        assert [r.version for r in blocking.started] == ["6"]
        await app.state.deploys.close()
    finally:
        app.state.deploys = real
    outcomes = [(d["version"], d["outcome"]) for d in await audited(app, "webhook.deploy")]
    assert outcomes == [("6", "failed"), ("7", "not-run")]


async def test_accepted_delivery_ids_are_pruned_after_the_replay_window(
    app: Harness, candidate: Path
) -> None:
    """Ids received more than ten minutes ago (twice the skew) are deleted in bulk when a new
    delivery is accepted; younger ones are kept, so a replay within the window is still 409."""
    now = datetime.now(UTC)
    async with app.sessionmaker() as session:
        session.add_all(
            [
                WebhookDelivery(
                    source="generic", delivery_id="old", received_at=now - timedelta(minutes=11)
                ),
                WebhookDelivery(
                    source="generic", delivery_id="young", received_at=now - timedelta(minutes=9)
                ),
            ]
        )
        await session.commit()
    accepted = await post(
        app, GENERIC, signed_generic({"name": "iris", "version": "9", "source": candidate.as_uri()})
    )
    assert accepted.status_code == 202, accepted.text
    async with app.sessionmaker() as session:
        kept = set(await session.scalars(select(WebhookDelivery.delivery_id)))
    assert kept == {"young", accepted.json()["delivery_id"]}
    await app.state.deploys.join()

"""The model webhooks end to end: a real ``mlflow server`` (SQLite backend, its own webhook
delivery code) posting to a real ``modelgate serve``, and a Standard Webhooks sender (the
``standardwebhooks`` library) whose ``file://`` version two serving processes then answer with."""

from __future__ import annotations

import base64
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import run_cli, serve
from tests.model_sources import mlflow_server
from tests.promises import PromisedDelay

pytestmark = pytest.mark.e2e

# A real MLflow (server and client), from the integration-test extra that .ci/run installs.
MlflowClient = pytest.importorskip("mlflow").MlflowClient

MLFLOW_SECRET = "the-mlflow-webhook-secret-0123456789"
SECRET = "whsec_" + base64.b64encode(b"e2e-webhook-secret-bytes-32-long").decode()


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server for the module (tests/model_sources.py), allowed to
    deliver webhooks to loopback ``http://`` addresses."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def _admin_key(environment: dict[str, str], cwd: Path) -> str:
    return run_cli(environment, cwd, "admin", "create-key", "--name", "ops").stdout.split()[-1]


def _audit(port: int, admin: str, action: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"http://127.0.0.1:{port}/api/v1/admin/audit",
        params={"action": action, "limit": 100},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return sorted(events, key=lambda event: event["id"])


def _until(what: str, seconds: float, check: Any) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.1)


# One backend: MLflow's server is the slow part (its start), and dedupe across replicas is proved
# on both in tests/api/test_model_webhooks.py.
@only_on("postgres")
def test_an_mlflow_version_given_the_champion_alias_is_pulled_and_served_with_no_other_step(
    backend: Backend, mlflow_url: str, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    """A webhook created with MlflowClient().create_webhook, MLflow's test delivery, then a
    scikit-learn model logged (skops) and registered as a new version, and the champion alias
    set on it: MLflow's own deliveries are accepted, the version is pulled, published and
    activated, and modelgate serves it, with the source model's answers, within seconds. The
    same deliveries from a webhook holding another secret are refused as badly signed, and
    deploy nothing."""
    import mlflow
    import mlflow.sklearn
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    environment = {
        **tour_environment,
        "MODELGATE_MLFLOW_WEBHOOK_SECRET": MLFLOW_SECRET,
        "MODELGATE_MLFLOW_TRACKING_URI": mlflow_url,
        "MODELGATE_LOG_LEVEL": "INFO",
    }
    client = MlflowClient(mlflow_url)
    # Not a valid modelgate name: served under the one the mapping gives it.
    mlflow_name = f"Churn Model {uuid.uuid4().hex[:8]}"
    environment["MODELGATE_MLFLOW_MODEL_NAMES"] = json.dumps({mlflow_name: "churn"})
    iris = load_iris()
    logistic = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
    run_cli(environment, tmp_path, "db", "upgrade")
    tenant = json.loads(run_cli(environment, tmp_path, "tenants", "create", "--name", "t").stdout)
    key = run_cli(environment, tmp_path, "keys", "issue", "--tenant", tenant["id"]).stdout.split()
    log_path = tmp_path / "serve.log"
    with serve(environment, tmp_path, log_path=log_path) as port:
        admin = _admin_key(environment, tmp_path)
        url = f"http://127.0.0.1:{port}/api/v1/admin/models/webhooks/mlflow"
        events = ["model_version.created", "model_version_alias.created"]
        hook = client.create_webhook(
            name=f"modelgate-{uuid.uuid4().hex[:8]}", url=url, events=events, secret=MLFLOW_SECRET
        )
        impostor = client.create_webhook(
            name=f"impostor-{uuid.uuid4().hex[:8]}",
            url=url,
            events=events,
            secret="a-secret-modelgate-does-not-hold",
        )
        time.sleep(1.5)  # past MLFLOW_WEBHOOK_CACHE_TTL
        try:
            tested = client.test_webhook(hook.webhook_id)
            assert (tested.success, tested.response_status) == (True, 202), tested

            mlflow.set_tracking_uri(mlflow_url)
            try:
                with mlflow.start_run():
                    mlflow.sklearn.log_model(
                        logistic,
                        name="model",
                        serialization_format="skops",
                        registered_model_name=mlflow_name,
                        await_registration_for=0,
                        pip_requirements=["scikit-learn"],
                    )
            finally:
                mlflow.set_tracking_uri(None)
            [version] = client.search_model_versions(f"name = '{mlflow_name}'")
            client.set_registered_model_alias(mlflow_name, "champion", version.version)

            # MLflow delivers from a thread pool of its own, after answering its client; the
            # pull (download, conversion, checks) and the activation follow in the background.
            PromisedDelay("an MLflow champion served", 30).until_sync(
                lambda: _served(port, key[-1], "churn").status_code == 200
            )
            _until("three deployments", 30, lambda: len(_audit(port, admin, "webhook.deploy")) >= 3)
            _until("two refusals", 30, lambda: len(_audit(port, admin, "webhook.refuse")) >= 2)
        finally:
            client.delete_webhook(hook.webhook_id)
            client.delete_webhook(impostor.webhook_id)

        answer = _served(port, key[-1], "churn").json()
        assert answer["model_version"] == version.version
        [expected] = logistic.predict_proba([IRIS_SETOSA])
        assert answer["probability"] == pytest.approx(list(expected), abs=1e-5)

        deployed = {
            (d["model"], d["version"], d["source_uri"], d["activate"], d["outcome"])
            for d in (event["detail"] for event in _audit(port, admin, "webhook.deploy"))
        }
        source = f"models:/{mlflow_name}/{version.version}"
        # MLflow's example (example_model 1) does not exist there: refused, nothing changed.
        assert deployed == {
            ("example_model", "1", "models:/example_model/1", False, "refused"),
            ("churn", version.version, source, False, "deployed"),
            ("churn", version.version, source, True, "deployed"),
        }
        [pulled] = _audit(port, admin, "model.pull")
        assert (pulled["actor"], pulled["detail"]["source"]) == ("webhook:mlflow", source)
        [activated] = _audit(port, admin, "model.activate")
        assert (activated["actor"], activated["target_id"]) == ("webhook:mlflow", "churn")
        refused = _audit(port, admin, "webhook.refuse")
        assert [r["detail"]["reason"] for r in refused] == ["bad-signature", "bad-signature"]
        assert len(_audit(port, admin, "webhook.deploy")) == 3
    assert MLFLOW_SECRET not in log_path.read_text()


def _served(port: int, key: str, model: str) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/api/v1/predict",
        json={"features": IRIS_SETOSA, "model": model},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def _generic_delivery(payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    return body, {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(msg_id, now, body),
        "content-type": "application/json",
    }


def _served_version(port: int, key: str) -> str:
    response = httpx.post(
        f"http://127.0.0.1:{port}/api/v1/predict",
        json={"features": IRIS_SETOSA},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def test_a_signed_file_version_is_activated_and_served_by_both_servers(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    """A Standard Webhooks delivery to one server registers and activates an ONNX file; both
    servers then answer with it; the same delivery to the other server is a replay (409)."""
    environment = {**tour_environment, "MODELGATE_WEBHOOK_SECRET": SECRET}
    published = tmp_path / "published" / "iris-2.onnx"
    published.parent.mkdir()
    shutil.copyfile(Path(environment["MODELGATE_MODEL_DIR"]) / "iris/1/model.onnx", published)
    run_cli(environment, tmp_path, "db", "upgrade")
    tenant = json.loads(run_cli(environment, tmp_path, "tenants", "create", "--name", "t").stdout)
    key = run_cli(environment, tmp_path, "keys", "issue", "--tenant", tenant["id"]).stdout.split()
    with serve(environment, tmp_path) as first, serve(environment, tmp_path) as second:
        assert _served_version(first, key[-1]) == _served_version(second, key[-1]) == "1"
        body, headers = _generic_delivery(
            {"name": "iris", "version": "2", "source": published.as_uri(), "activate": True}
        )
        url = "/api/v1/admin/models/webhooks/generic"
        response = httpx.post(f"http://127.0.0.1:{first}{url}", content=body, headers=headers)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        for port in (first, second):
            PromisedDelay("a webhook's activation", 10).until_sync(
                lambda port=port: _served_version(port, key[-1]) == "2"  # type: ignore[misc]
            )
        replay = httpx.post(f"http://127.0.0.1:{second}{url}", content=body, headers=headers)
        assert replay.status_code == 409, replay.text
        assert replay.json()["type"] == "webhook-replayed"

"""``POST /admin/models/pull`` against real sources: MLflow's own tracking server (models
logged and registered with MLflow's client, pulled by version number and by alias), moto's S3
server (boto3, the standard credential chain), a local https server (a private CA trusted
through SSL_CERT_FILE) and a file. What is pulled must then serve, through the app, the answers
its source gives; what is refused must leave nothing behind."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sqlalchemy import select

from auth.models import AuditEvent
from tests.conftest import (
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    running_app,
    unique,
)
from tests.e2e.servers import moto_server
from tests.model_sources import (
    SLOW_SECONDS,
    https_file_server,
    mlflow_server,
    self_signed_certificate,
)

pytestmark = pytest.mark.e2e
# The extras .ci/run installs (s3, skops, mlflow, integration-test): without them this module is
# skipped, which MODELGATE_TEST_REQUIRE_SERVICES=1 turns into a failure.
for _module in ("boto3", "skops", "mlflow", "moto"):
    pytest.importorskip(_module)

PULL = "/api/v1/admin/models/pull"
BUCKET = "team-models"
REQUEST_TIMEOUT_SECONDS = 4.0
# Ten iris rows across the three classes: what the pulled versions and their sources answer.
ROWS = load_iris().data[::15]


def _onnx_default(estimator: Any) -> bytes:
    """The estimator as skl2onnx writes it by default: float32 input and a ZipMap output."""
    from skl2onnx import to_onnx

    return to_onnx(estimator, load_iris().data[:1].astype(np.float32)).SerializeToString()


def _onnx_answers(model: bytes, rows: np.ndarray) -> np.ndarray:
    """What the ONNX model itself answers (its ZipMap's dictionaries, in class order)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    _, maps = session.run(None, {session.get_inputs()[0].name: rows.astype(np.float32)})
    return np.array([[row[key] for key in sorted(row)] for row in maps])


@dataclass
class Logged:
    """What the module logged to MLflow, and what each of its versions answers on ROWS."""

    url: str
    answers: dict[str, np.ndarray]  # "models:/..." -> probabilities on ROWS
    pickle_sha256: str


@pytest.fixture(scope="module")
def mlflow_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    """A real MLflow server with, logged through MLflow's client: iris-skops 1 (a logistic
    regression) and 2 (a forest, alias champion), saved with skops; iris-onnx 1 and 2
    (alias champion), skl2onnx's default graphs; iris-pickle 1, saved with cloudpickle."""
    import mlflow
    import mlflow.onnx
    import mlflow.sklearn
    from mlflow import MlflowClient

    directory = tmp_path_factory.mktemp("mlflow")
    iris = load_iris()
    logistic = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
    forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(iris.data, iris.target)
    onnx_logistic, onnx_forest = _onnx_default(logistic), _onnx_default(forest)
    with mlflow_server(directory) as url:
        mlflow.set_tracking_uri(url)
        try:
            with mlflow.start_run():
                for estimator, name, form in (
                    (logistic, "iris-skops", "skops"),
                    (forest, "iris-skops", "skops"),
                    (logistic, "iris-pickle", "cloudpickle"),
                ):
                    mlflow.sklearn.log_model(
                        estimator,
                        name=name,
                        serialization_format=form,
                        registered_model_name=name,
                        await_registration_for=0,
                        # Given, so that MLflow does not load the model in a subprocess to
                        # find out (seconds per model).
                        pip_requirements=["scikit-learn"],
                        # MLflow reloads what it saved, and asks for the list; modelgate
                        # never reads it from the model (ml.sources.artifacts).
                        skops_trusted_types=["sklearn.tree._tree.Tree"]
                        if form == "skops"
                        else None,
                    )
                import onnx

                for graph in (onnx_logistic, onnx_forest):
                    mlflow.onnx.log_model(
                        onnx.load_from_string(graph),
                        name="iris-onnx",
                        registered_model_name="iris-onnx",
                        await_registration_for=0,
                        pip_requirements=["onnx", "onnxruntime"],
                    )
            client = MlflowClient()
            client.set_registered_model_alias("iris-skops", "champion", "2")
            client.set_registered_model_alias("iris-onnx", "champion", "2")
        finally:
            mlflow.set_tracking_uri(None)
        [pickled] = (directory / "artifacts").rglob("model.pkl")
        yield Logged(
            url=url,
            answers={
                "models:/iris-skops/1": logistic.predict_proba(ROWS),
                "models:/iris-skops@champion": forest.predict_proba(ROWS),
                "models:/iris-onnx/1": _onnx_answers(onnx_logistic, ROWS),
                "models:/iris-onnx@champion": _onnx_answers(onnx_forest, ROWS),
            },
            pickle_sha256=hashlib.sha256(pickled.read_bytes()).hexdigest(),
        )


@dataclass
class Files:
    """The artifacts the S3, https and file sources hold, and what they answer on ROWS."""

    directory: Path
    onnx: bytes
    onnx_answers: np.ndarray
    skops_answers: np.ndarray


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    import skops.io

    directory = tmp_path_factory.mktemp("files")
    iris = load_iris()
    logistic = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
    onnx = _onnx_default(logistic)
    (directory / "iris.onnx").write_bytes(onnx)
    skops.io.dump(logistic, directory / "iris.skops")
    return Files(directory, onnx, _onnx_answers(onnx, ROWS), logistic.predict_proba(ROWS))


@pytest.fixture(scope="module")
def s3_endpoint(files: Files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server holding the files under s3://team-models/models/, uploaded with their
    SHA-256 checksums; boto3 finds its (fake) credentials in the environment, the standard
    chain, never in a file of this machine."""
    import boto3

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_CONFIG_FILE", str(files.directory / "no-aws-config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(files.directory / "no-aws-credentials"))
        for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            patch.delenv(variable, raising=False)
        with moto_server() as endpoint:
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            for name in ("iris.onnx", "iris.skops"):
                client.put_object(
                    Bucket=BUCKET,
                    Key=f"models/{name}",
                    Body=(files.directory / name).read_bytes(),
                    ChecksumAlgorithm="SHA256",
                )
            yield endpoint


@pytest.fixture(scope="module")
def https_base(files: Files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The files over https, with a certificate of a private CA that the pull trusts through
    SSL_CERT_FILE (set for the module: OpenSSL reads it for each new context)."""
    certificate, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(certificate))
        with https_file_server(files.directory, certificate, key) as base:
            yield base


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def app(
    backend: Backend,
    served_model_dir: Path,
    mlflow_models: Logged,
    s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Harness]:
    model_dir = tmp_path_factory.mktemp("pulled") / "models"
    model_dir.mkdir()
    settings = make_settings(
        backend,
        model_dir,
        tmp_path_factory.mktemp("var"),
        mlflow_tracking_uri=mlflow_models.url,
        s3_endpoint_url=s3_endpoint,
        # Shorter than the https server's slow answers (SLOW_SECONDS): a pull outlives it.
        request_timeout_seconds=REQUEST_TIMEOUT_SECONDS,
    )
    async with running_app(settings, backend) as running:
        yield running


async def _pull(app: Harness, **body: Any) -> Any:
    admin = await create_admin_key(app)
    return await app.client.post(PULL, json=body, headers=bearer(admin))


async def _served(app: Harness, name: str, version: str) -> np.ndarray:
    """What modelgate answers for ROWS through /predict, pinned to the version."""
    _, key = await create_tenant_with_key(app)
    answers = []
    for row in ROWS:
        response = await app.client.post(
            "/api/v1/predict",
            json={"features": row.tolist(), "model": name, "model_version": version},
            headers=bearer(key),
        )
        assert response.status_code == 200, response.text
        answers.append(response.json()["probability"])
    return np.array(answers)


def _versions(app: Harness, name: str) -> list[str]:
    directory = app.state.settings.model_dir / name
    return (
        sorted(p.name for p in directory.iterdir() if p.name.isdigit())
        if directory.exists()
        else []
    )


async def _pull_events(app: Harness, name: str, action: str = "model.pull") -> list[AuditEvent]:
    async with app.sessionmaker() as session:
        return list(
            await session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action == action, AuditEvent.target_id == name)
                .order_by(AuditEvent.id)
            )
        )


async def test_mlflow_versions_pulled_by_number_and_by_alias_serve_their_sources_answers(
    app: Harness, mlflow_models: Logged
) -> None:
    expected_version = {"/1": "1", "@champion": "2"}
    for source, answers in mlflow_models.answers.items():
        name = unique("pulled")
        response = await _pull(app, source=source, name=name, activate=True)
        assert response.status_code == 200, (source, response.text)
        view = response.json()
        version = next(v for tail, v in expected_version.items() if source.endswith(tail))
        assert (view["version"], view["source"], view["source_version"]) == (
            version,
            source,
            version,
        ), source
        assert view["runtime"] == "onnx"
        assert view["artifact_kind"] == ("onnx" if "onnx" in source else "skops")
        assert view["activation"]["version"] == version
        served = await _served(app, name, version)
        tolerance = 1e-6
        assert np.abs(served - answers).max() <= tolerance, source
        assert np.array_equal(served.argmax(axis=1), answers.argmax(axis=1)), source
        [event] = await _pull_events(app, name)
        assert event.detail["source"] == source
        assert event.detail["unpickled"] is False
        manifest = app.state.settings.model_dir / name / version / "manifest.json"
        assert f'"source": "{source}"' in manifest.read_text()


async def test_a_pickle_is_refused_with_its_reason_unless_allowed_and_pinned(
    app: Harness, mlflow_models: Logged
) -> None:
    name = unique("pickled")
    refused = await _pull(app, source="models:/iris-pickle/1", name=name)
    assert refused.status_code == 409, refused.text
    assert "unpickling it runs whatever code it carries" in refused.json()["detail"]
    assert _versions(app, name) == []

    unpinned = await _pull(app, source="models:/iris-pickle/1", name=name, allow_pickle=True)
    assert unpinned.status_code == 422, unpinned.text
    assert _versions(app, name) == []

    accepted = await _pull(
        app,
        source="models:/iris-pickle/1",
        name=name,
        allow_pickle=True,
        sha256=mlflow_models.pickle_sha256,
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["artifact_kind"] == "pickle"
    [event] = await _pull_events(app, name)
    assert event.detail["unpickled"] is True
    assert event.detail["artifact_sha256"] == mlflow_models.pickle_sha256


async def test_a_digest_mismatch_is_refused_and_changes_nothing(
    app: Harness, mlflow_models: Logged, files: Files
) -> None:
    name = unique("mismatch")
    wrong = hashlib.sha256(b"another artifact").hexdigest()
    for source in (f"s3://{BUCKET}/models/iris.onnx", "models:/iris-skops/1"):
        response = await _pull(app, source=source, name=name, sha256=wrong, activate=True)
        assert response.status_code == 409, response.text
        assert "SHA-256 is not the one given" in response.json()["detail"]
    assert _versions(app, name) == []
    assert await _pull_events(app, name) == []
    assert name not in {info.name for info in app.state.registry.models()}
    # Each refusal is audited, with the source as recorded and the reason.
    refusals = await _pull_events(app, name, "model.pull_refused")
    assert [e.detail["source"] for e in refusals] == [
        f"s3://{BUCKET}/models/iris.onnx",
        "models:/iris-skops/1",
    ]
    assert all("SHA-256 is not the one given" in e.detail["reason"] for e in refusals)


async def test_s3_https_and_file_sources_are_pulled_and_serve_their_answers(
    app: Harness, files: Files, https_base: str
) -> None:
    digest = hashlib.sha256(files.onnx).hexdigest()
    skops_file = files.directory / "iris.skops"
    cases = [
        (f"s3://{BUCKET}/models/iris.onnx", None, files.onnx_answers),
        (f"s3://{BUCKET}/models/iris.skops", None, files.skops_answers),
        (f"{https_base}/iris.onnx", digest, files.onnx_answers),
        (skops_file.as_uri(), None, files.skops_answers),
    ]
    for source, sha256, answers in cases:
        name = unique("pulled")
        response = await _pull(app, source=source, name=name, sha256=sha256, activate=True)
        assert response.status_code == 200, (source, response.text)
        view = response.json()
        assert (view["version"], view["source"]) == ("1", source)
        if source.startswith("s3://"):
            assert view["source_version"]  # the object's ETag (the bucket is not versioned)
        served = await _served(app, name, "1")
        assert np.abs(served - answers).max() <= 1e-6, source


async def test_https_needs_a_digest_and_never_falls_back_to_plain_http(
    app: Harness, files: Files, https_base: str
) -> None:
    digest = hashlib.sha256(files.onnx).hexdigest()
    name = unique("refused")
    plain = https_base.replace("https://", "http://")
    for body, reason in (
        ({"source": f"{https_base}/iris.onnx"}, "needs --sha256"),
        ({"source": f"{plain}/iris.onnx", "sha256": digest}, "http:// is refused"),
        (
            {"source": f"{https_base}/redirect-to-http/iris.onnx", "sha256": digest},
            "redirects to another scheme",
        ),
    ):
        response = await _pull(app, name=name, **body)
        assert response.status_code == 409, response.text
        assert reason in response.json()["detail"]
    assert _versions(app, name) == []


@pytest.mark.parametrize(
    "body",
    [
        {"source": "s" * 2049, "name": "m"},
        {"source": "", "name": "m"},
        {"source": "/x.onnx", "name": "../m"},
        {"source": "/x.onnx", "name": "m", "version": "0"},
        {"source": "/x.onnx", "name": "m", "sha256": "A" * 64},
        {"source": "/x.onnx", "name": "m", "allow_pickle": True},
        {"source": "/x.onnx", "name": "m", "tenant_id": "x"},
    ],
)
async def test_a_pull_body_out_of_bounds_is_refused_before_anything_is_fetched(
    app: Harness, body: dict[str, Any]
) -> None:
    response = await _pull(app, **body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_a_pull_longer_than_the_request_deadline_is_answered_and_audited(
    app: Harness, files: Files, https_base: str
) -> None:
    assert SLOW_SECONDS > REQUEST_TIMEOUT_SECONDS
    name = unique("slow")
    response = await _pull(
        app,
        source=f"{https_base}/slow/iris.onnx",
        name=name,
        sha256=hashlib.sha256(files.onnx).hexdigest(),
    )
    assert response.status_code == 200, response.text
    assert _versions(app, name) == ["1"]
    assert len(await _pull_events(app, name)) == 1

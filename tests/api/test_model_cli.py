"""``modelgate models register|list|activate``: a file copied into the registry as a new
version, listed, and activated through the same audited record as the HTTP route."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import joblib
import pytest
import pytest_asyncio
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sqlalchemy import delete, select
from typer.testing import CliRunner, Result

from api.cli import app
from auth.db import create_engine, create_sessionmaker
from auth.models import AuditEvent, ModelActivation, ModelVersion
from auth.settings import get_settings
from ml.onnx_export import convert
from tests.conftest import Backend


@pytest.fixture
def models(served_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "registry" / "models"
    shutil.copytree(served_model_dir, copy)
    return copy


@pytest.fixture
def cli(
    backend: Backend, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CliRunner]:
    """A runner whose commands use this module's database and the test's registry."""
    monkeypatch.setenv("MODELGATE_DATABASE_URL", backend.database_url)
    monkeypatch.setenv("MODELGATE_MODEL_DIR", str(models))
    monkeypatch.setenv("MODELGATE_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


@pytest_asyncio.fixture(autouse=True)
async def _no_activation_or_version_left_behind(backend: Backend) -> AsyncIterator[None]:
    yield
    engine = create_engine(backend.database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(delete(ModelActivation))
            await connection.execute(delete(ModelVersion))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def logistic() -> LogisticRegression:
    iris = load_iris()
    return LogisticRegression(max_iter=1000).fit(iris.data, iris.target)


def _run(cli: CliRunner, *args: str, code: int = 0) -> Result:
    result = cli.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def _listed(cli: CliRunner) -> dict[str, dict[str, Any]]:
    lines = _run(cli, "models", "list").stdout.splitlines()
    return {document["name"]: document for document in map(json.loads, lines)}


def _tree(root: Path) -> list[str]:
    return sorted(str(path) for path in root.rglob("*"))


async def _query(database_url: str, statement: Any) -> list[Any]:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            return list((await session.scalars(statement)).all())
    finally:
        await engine.dispose()


def test_a_joblib_file_is_registered_listed_and_activated_with_an_audit_event(
    cli: CliRunner,
    backend: Backend,
    models: Path,
    tmp_path: Path,
    logistic: LogisticRegression,
) -> None:
    source = tmp_path / "candidate.joblib"
    joblib.dump(logistic, source)
    reference = tmp_path / "iris.csv"
    reference.write_text("\n".join(",".join(map(str, row)) for row in load_iris().data))

    registered = _run(
        cli,
        *("models", "register", str(source), "--name", "iris", "--version", "2"),
        *("--metrics", '{"accuracy": 0.97}', "--reference", str(reference)),
    )
    assert "registered iris version 2 (onnx)" in registered.stdout
    manifest = json.loads((models / "iris" / "2" / "manifest.json").read_text())
    assert manifest["metrics"] == {"accuracy": 0.97}
    assert manifest["class_names"] == ["0", "1", "2"]
    assert manifest["training_range"][0] == {"min": 4.3, "max": 7.9}
    assert "scikit-learn" in manifest["framework_versions"]

    listed = _listed(cli)["iris"]
    assert (listed["active_version"], listed["activated_in"]) == ("1", "registry")
    assert [v["version"] for v in listed["versions"]] == ["1", "2"]
    assert [v["state"] for v in listed["versions"]] == ["ready", "ready"]

    activated = json.loads(_run(cli, "models", "activate", "iris", "2").stdout)
    assert (activated["version"], activated["activated_by"]) == ("2", "cli")
    listed = _listed(cli)["iris"]
    assert (listed["active_version"], listed["activated_in"]) == ("2", "database")
    events = asyncio.run(
        _query(
            backend.database_url, select(AuditEvent).where(AuditEvent.action == "model.activate")
        )
    )
    assert [(e.actor, e.target_id, e.detail["version"]) for e in events] == [("cli", "iris", "2")]


@pytest.mark.parametrize(
    ("name", "version"),
    [("../escape", "2"), ("iris/../../escape", "2"), ("iris", "../2"), ("iris", "0"), (".x", "2")],
)
def test_register_refuses_a_name_or_version_outside_the_registry(
    cli: CliRunner,
    models: Path,
    tmp_path: Path,
    logistic: LogisticRegression,
    name: str,
    version: str,
) -> None:
    source = tmp_path / "candidate.joblib"
    joblib.dump(logistic, source)
    before = _tree(tmp_path)
    result = _run(
        cli, "models", "register", str(source), "--name", name, "--version", version, code=1
    )
    assert "--name" in result.stderr or "--version" in result.stderr
    assert _tree(tmp_path) == before


def test_an_onnx_file_is_registered_without_a_pickle(
    cli: CliRunner, models: Path, tmp_path: Path, logistic: LogisticRegression
) -> None:
    source = tmp_path / "candidate.onnx"
    source.write_bytes(convert(logistic, load_iris().data))
    _run(
        cli,
        *("models", "register", str(source), "--name", "flowers", "--version", "1"),
        *("--class-names", "setosa,versicolor,virginica"),
    )
    assert sorted(p.name for p in (models / "flowers" / "1").iterdir()) == [
        "manifest.json",
        "model.onnx",
    ]
    listed = _listed(cli)["flowers"]
    assert listed["versions"][0]["runtime"] == "onnx"
    assert listed["active_version"] == "1"  # the newest ready version: no ACTIVE file


def test_register_refuses_a_file_that_is_no_model_and_a_taken_version(
    cli: CliRunner, models: Path, tmp_path: Path, logistic: LogisticRegression
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    result = _run(cli, "models", "register", str(junk), "--name", "x", "--version", "1", code=1)
    assert "not registered" in result.stderr
    assert not (models / "x" / "1").exists()
    source = tmp_path / "candidate.joblib"
    joblib.dump(logistic, source)
    taken = _run(cli, "models", "register", str(source), "--name", "iris", "--version", "1", code=1)
    assert "already has a version 1" in taken.stderr


def test_activate_refuses_a_broken_or_unknown_version_and_records_nothing(
    cli: CliRunner, backend: Backend, models: Path
) -> None:
    onnx = models / "iris" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"tampered")
    broken = _run(cli, "models", "activate", "iris", "1", code=1)
    assert "not activated" in broken.stderr
    assert "does not match the SHA-256" in broken.stderr
    for name, version in (("iris", "9"), ("..", "1"), ("iris", "../1")):
        _run(cli, "models", "activate", name, version, code=1)
    assert asyncio.run(_query(backend.database_url, select(ModelActivation))) == []


def test_with_a_store_train_and_register_publish_to_it_and_import_refuses_another_copy(
    cli: CliRunner,
    backend: Backend,
    models: Path,
    tmp_path: Path,
    logistic: LogisticRegression,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registrations = select(AuditEvent).where(AuditEvent.action == "model.register")
    earlier = {event.id for event in asyncio.run(_query(backend.database_url, registrations))}
    store = tmp_path / "store"
    monkeypatch.setenv("MODELGATE_MODEL_STORE", f"file://{store}")
    get_settings.cache_clear()

    trained = _run(cli, "models", "train")
    assert "published iris version 1 to the model store" in trained.stdout
    assert (store / "iris" / "1" / "manifest.json").is_file()
    assert "already in the catalogue" in _run(cli, "models", "train", "--if-absent").stdout

    # This machine's own iris 1 (trained elsewhere: another manifest) is not the catalogue's.
    refused = _run(cli, "models", "import", code=1)
    assert "iris version 1: not imported" in refused.stderr
    assert "another manifest" in refused.stderr

    source = tmp_path / "candidate.joblib"
    joblib.dump(logistic, source)
    registered = _run(
        cli, *("models", "register", str(source), "--name", "flowers", "--version", "1")
    )
    assert "in the model store" in registered.stdout
    assert (store / "flowers" / "1" / "model.onnx").is_file()
    assert not (models / "flowers").exists()  # staged elsewhere: the model directory is a cache
    [flowers] = _listed(cli)["flowers"]["versions"]
    assert (flowers["state"], flowers["source"]) == ("catalogued", source.resolve().as_uri())
    again = _run(
        cli, *("models", "register", str(source), "--name", "flowers", "--version", "1"), code=1
    )
    assert "already has a version 1 in the catalogue" in again.stderr

    events = asyncio.run(_query(backend.database_url, registrations))
    assert sorted(
        (e.actor, e.target_id, e.detail["version"]) for e in events if e.id not in earlier
    ) == [
        ("cli", "flowers", "1"),
        ("cli", "iris", "1"),
    ]


def test_a_registration_the_store_refuses_is_not_published(
    cli: CliRunner,
    models: Path,
    tmp_path: Path,
    logistic: LogisticRegression,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocked = tmp_path / "store"
    blocked.write_text("a file where the store's directory should be")
    monkeypatch.setenv("MODELGATE_MODEL_STORE", str(blocked))
    get_settings.cache_clear()
    source = tmp_path / "candidate.joblib"
    joblib.dump(logistic, source)
    register = ("models", "register", str(source), "--name", "flowers", "--version", "1")

    refused = _run(cli, *register, code=1)
    assert "not published: the version could not be written to the model store" in refused.stderr
    assert "flowers" not in _listed(cli)  # no catalogue row: the version does not exist

    blocked.unlink()
    assert "in the model store" in _run(cli, *register).stdout


def test_pull_adds_and_activates_a_skops_file_with_an_audit_event(
    cli: CliRunner, backend: Backend, models: Path, tmp_path: Path, logistic: LogisticRegression
) -> None:
    skops_io = pytest.importorskip("skops.io")  # the skops extra, which .ci/run installs
    source = tmp_path / "candidate.skops"
    skops_io.dump(logistic, source)
    wrong = "0" * 64
    refused = _run(
        cli, "models", "pull", source.as_uri(), "--name", "iris", "--sha256", wrong, code=1
    )
    assert refused.stderr.startswith("error: the artifact's SHA-256 is not the one given")
    assert len(refused.stderr.splitlines()) == 1
    assert sorted(p.name for p in (models / "iris").iterdir() if p.name.isdigit()) == ["1"]

    pulled = json.loads(
        _run(cli, "models", "pull", str(source), "--name", "iris", "--activate").stdout
    )
    assert (pulled["version"], pulled["runtime"], pulled["artifact_kind"]) == ("2", "onnx", "skops")
    assert pulled["source"] == source.as_uri()
    assert pulled["activation"]["version"] == "2"
    listed = _listed(cli)["iris"]
    assert listed["active_version"] == "2"
    assert [v["source"] for v in listed["versions"]] == [None, source.as_uri()]
    taken = _run(cli, "models", "pull", str(source), "--name", "iris", "--version", "2", code=1)
    assert "already has a version 2" in taken.stderr
    # Neither refusal left anything behind: no version, no audit event.
    assert sorted(p.name for p in (models / "iris").iterdir()) == ["1", "2", "ACTIVE"]
    events = asyncio.run(
        _query(backend.database_url, select(AuditEvent).where(AuditEvent.action == "model.pull"))
    )
    assert [(e.actor, e.target_id, e.detail["version"]) for e in events] == [("cli", "iris", "2")]

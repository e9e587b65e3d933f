"""Replicas that share no disk: two ``modelgate serve`` processes, each with its own initially
empty model directory, one Postgres database and one S3 model store (a real moto_server). A
version registered through the CLI is served by both after ``models activate``, within a few
seconds; a corrupted local copy on one is fetched again from the store and served again; a
version pulled and activated through one replica is served by both; a version whose store copy
does not verify is refused at its activation, and the old version serves on, under load, with no
failed request."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
import skops.io as skops_io
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from ml.s3 import s3_client
from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import MOTO_CREDENTIALS, aws_environment, moto_server, run_cli, serve
from tests.parallel import quiet_from_here
from tests.promises import PromisedDelay

pytestmark = pytest.mark.e2e

# "Within a few seconds": the once-a-second catalogue and activation poll, plus the fetch from
# the store, the hash checks and the warm-up.
SERVED_SECONDS = 5.0


def _predict(port: int, key: str) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/api/v1/predict",
        json={"features": IRIS_SETOSA},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def _serves(port: int, key: str, version: str) -> bool:
    response = _predict(port, key)
    return response.status_code == 200 and response.json()["model_version"] == version


@contextmanager
def _steady_load(ports: tuple[int, ...], key: str) -> Iterator[list[tuple[int, str | None]]]:
    """Predictions on every port from a thread each, without pause, until the block ends: the
    (status, version) of every answer."""
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def drive(port: int) -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                response = client.post(
                    f"http://127.0.0.1:{port}/api/v1/predict",
                    json={"features": IRIS_SETOSA},
                    headers={"Authorization": f"Bearer {key}"},
                )
                ok = response.status_code == 200
                answers.append(
                    (response.status_code, response.json()["model_version"] if ok else None)
                )

    threads = [threading.Thread(target=drive, args=(port,)) for port in ports]
    for thread in threads:
        thread.start()
    try:
        yield answers
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def _refetches(port: int) -> float:
    """modelgate_model_fetches_total{model="iris", outcome="refetched"} on one server."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("modelgate_model_fetches_total{") and 'outcome="refetched"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@only_on("postgres")
def test_replicas_with_empty_disks_serve_a_registered_version_and_refetch_a_corrupt_copy(
    backend: Backend,
    tour_environment: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in MOTO_CREDENTIALS.items():
        monkeypatch.setenv(name, value)  # this process's own client (the bucket)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto_server() as endpoint:
        bucket = f"models-{uuid.uuid4().hex[:12]}"
        environment = aws_environment(tour_environment)
        environment.update(
            {
                "MODELGATE_MODEL_STORE": f"s3://{bucket}/prod",
                "MODELGATE_S3_ENDPOINT_URL": endpoint,
                # A corrupted copy is noticed within a second.
                "MODELGATE_MODEL_CHECK_INTERVAL_SECONDS": "1",
                "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            }
        )
        s3_client(endpoint).create_bucket(Bucket=bucket)

        # The operator's machine: the model directory with iris 1, imported into the catalogue
        # and the store, and activated.
        run_cli(environment, tmp_path, "db", "upgrade")
        imported = run_cli(environment, tmp_path, "models", "import")
        assert "iris version 1: imported" in imported.stdout
        run_cli(environment, tmp_path, "models", "activate", "iris", "1")
        tenant = json.loads(
            run_cli(
                environment,
                tmp_path,
                # Steady load below: the limit is not what is under test.
                *("tenants", "create", "--name", "t", "--rate-limit", "100000/minute"),
            ).stdout
        )
        key = run_cli(environment, tmp_path, "keys", "issue", "--tenant", tenant["id"])
        key_text = key.stdout.strip().splitlines()[-1]

        replicas = [tmp_path / "replica-a", tmp_path / "replica-b"]
        for model_dir in replicas:
            model_dir.mkdir()
        env_a = {**environment, "MODELGATE_MODEL_DIR": str(replicas[0])}
        env_b = {**environment, "MODELGATE_MODEL_DIR": str(replicas[1])}
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with serve(env_a, tmp_path / "a") as port_a, serve(env_b, tmp_path / "b") as port_b:
            # Each fetched the active version from the store when it started.
            assert _serves(port_a, key_text, "1")
            assert _serves(port_b, key_text, "1")
            quiet_from_here()

            iris = load_iris()
            source = tmp_path / "candidate.joblib"
            joblib.dump(LogisticRegression(max_iter=1000).fit(iris.data, iris.target), source)
            reference = tmp_path / "iris.csv"
            np.savetxt(reference, iris.data, delimiter=",")
            registered = run_cli(
                environment,
                tmp_path,
                *("models", "register", str(source), "--name", "iris", "--version", "2"),
                *("--reference", str(reference)),
            )
            assert "registered iris version 2 (onnx)" in registered.stdout
            assert "the model store s3://" in registered.stdout
            # Replica A's disk has version 1 (fetched when it started); 2 is only catalogued.
            listed = run_cli(env_a, tmp_path, "models", "list")
            versions = json.loads(listed.stdout)["versions"]
            assert [(v["version"], v["state"]) for v in versions] == [
                ("1", "ready"),
                ("2", "catalogued"),
            ]
            assert versions[1]["source"] == source.resolve().as_uri()

            run_cli(environment, tmp_path, "models", "activate", "iris", "2")
            for port in (port_a, port_b):
                PromisedDelay(
                    "version 2 on a replica with an empty disk", SERVED_SECONDS
                ).until_sync(lambda port=port: _serves(port, key_text, "2"))
            onnx = replicas[0] / "iris" / "2" / "model.onnx"
            good = onnx.read_bytes()
            assert (replicas[1] / "iris" / "2" / "model.onnx").read_bytes() == good

            # Replica A's copy is corrupted on its disk: its self-check notices, discards it
            # and fetches it again; it serves version 2 again, from the store's verified bytes.
            before = _refetches(port_a)
            corrupted = bytearray(good)
            corrupted[len(corrupted) // 2] ^= 0xFF
            onnx.write_bytes(bytes(corrupted))
            PromisedDelay("the corrupt copy fetched again", SERVED_SECONDS).until_sync(
                lambda: _refetches(port_a) > before and onnx.exists() and onnx.read_bytes() == good
            )
            for port in (port_a, port_b):
                assert _serves(port, key_text, "2")
            ready = httpx.get(f"http://127.0.0.1:{port_a}/api/v1/health/ready", timeout=10)
            assert ready.status_code == 200
            assert ready.json()["failed_model_versions"] == []

            # A version pulled through one replica (the admin pull route: a skops file, no
            # pickle) and activated by the same call is served by both: the other fetches it
            # from the store.
            admin = run_cli(environment, tmp_path, "admin", "create-key", "--name", "ops")
            admin_key = admin.stdout.strip().splitlines()[-1]
            candidate = tmp_path / "candidate.skops"
            skops_io.dump(
                LogisticRegression(C=0.5, max_iter=1000).fit(iris.data, iris.target), candidate
            )
            pulled = httpx.post(
                f"http://127.0.0.1:{port_a}/api/v1/admin/models/pull",
                json={
                    "source": candidate.as_uri(),
                    "name": "iris",
                    "version": "3",
                    "activate": True,
                },
                headers={"Authorization": f"Bearer {admin_key}"},
                timeout=120,
            )
            assert pulled.status_code == 200, pulled.text
            assert pulled.json()["activation"]["version"] == "3"
            for port in (port_a, port_b):
                PromisedDelay(
                    "a version pulled through the other replica", SERVED_SECONDS
                ).until_sync(lambda port=port: _serves(port, key_text, "3"))
            assert (replicas[1] / "iris" / "3" / "model.onnx").is_file()

            # Blue-green: version 4 is published, then its file in the store is replaced (a
            # bad upload, a tampered bucket). Its activation on a replica, under load on both,
            # is refused (the fetched bytes do not match the catalogue), nothing is recorded,
            # and version 3 goes on serving on both, with no failed request.
            run_cli(
                environment,
                tmp_path,
                *("models", "register", str(source), "--name", "iris", "--version", "4"),
                *("--reference", str(reference)),
            )
            s3_client(endpoint).put_object(
                Bucket=bucket, Key="prod/iris/4/model.onnx", Body=bytes(corrupted)
            )
            with _steady_load((port_a, port_b), key_text) as answers:
                refused = httpx.post(
                    f"http://127.0.0.1:{port_a}/api/v1/admin/models/iris/activate",
                    json={"version": "4"},
                    headers={"Authorization": f"Bearer {admin_key}"},
                    timeout=60,
                )
                time.sleep(2 * SERVED_SECONDS / 5)  # past the followers' next read
            assert refused.status_code == 409, refused.text
            assert refused.json()["type"] == "version-unavailable"
            assert "SHA-256" in refused.json()["detail"]
            assert len(answers) > 20
            assert set(answers) == {(200, "3")}, set(answers)
            for port in (port_a, port_b):
                assert _serves(port, key_text, "3")

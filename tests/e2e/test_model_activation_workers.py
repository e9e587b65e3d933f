"""Activation across processes: a version activated on one server (HTTP) or by the CLI is
served by every other worker within 2 seconds, and swapping versions back and forth under load
fails no request. Real ``modelgate serve`` processes sharing Postgres and Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from ml.train import register_model
from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import run_cli, serve
from tests.promises import PromisedDelay

pytestmark = pytest.mark.e2e

# The contract's promise.
ACTIVATION_SECONDS = 2.0


def _prepare(environment: dict[str, str], cwd: Path) -> tuple[str, str]:
    """The schema, ``iris`` version 2 registered through the CLI, an admin key and a tenant's
    key with room for a load test. Returns (admin key, tenant key)."""
    iris = load_iris()
    source = cwd / "candidate.joblib"
    joblib.dump(LogisticRegression(max_iter=1000).fit(iris.data, iris.target), source)
    reference = cwd / "iris.csv"
    np.savetxt(reference, iris.data, delimiter=",")
    run_cli(environment, cwd, "db", "upgrade")
    registered = run_cli(
        environment,
        cwd,
        *("models", "register", str(source), "--name", "iris", "--version", "2"),
        *("--reference", str(reference)),
    )
    assert "registered iris version 2 (onnx)" in registered.stdout
    admin = run_cli(environment, cwd, "admin", "create-key", "--name", "ops").stdout
    tenant = json.loads(
        run_cli(
            environment,
            cwd,
            "tenants",
            "create",
            "--name",
            "load",
            "--rate-limit",
            "1000000/minute",
        ).stdout
    )
    key = run_cli(environment, cwd, "keys", "issue", "--tenant", tenant["id"]).stdout
    return admin.strip().splitlines()[-1], key.strip().splitlines()[-1]


def _version(port: int, key: str) -> str:
    response = httpx.post(
        f"http://127.0.0.1:{port}/api/v1/predict",
        json={"features": IRIS_SETOSA},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def _activate(port: int, admin: str, version: str) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{port}/api/v1/admin/models/iris/activate",
        json={"version": version},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text


def _served_within(port: int, key: str, version: str, seconds: float) -> float:
    """Predict on ``port`` until ``version`` answers, within the promise of ``seconds`` as the
    tests measure one (``PromisedDelay``). Returns when it first answered."""
    delay = PromisedDelay(f"activation of version {version}", seconds)
    return delay.until_sync(lambda: _version(port, key) == version)


@only_on("postgres")
def test_an_activation_reaches_another_server_within_two_seconds(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    admin, key = _prepare(tour_environment, tmp_path)
    with serve(tour_environment, tmp_path) as first, serve(tour_environment, tmp_path) as second:
        assert _version(first, key) == _version(second, key) == "1"

        _activate(first, admin, "2")
        assert _version(first, key) == "2"  # the worker that answered: at once
        _served_within(second, key, "2", ACTIVATION_SECONDS)

        # Rollback by the CLI: the record alone reaches both servers.
        run_cli(tour_environment, tmp_path, "models", "activate", "iris", "1")
        for port in (first, second):
            _served_within(port, key, "1", ACTIVATION_SECONDS)
        listed = json.loads(run_cli(tour_environment, tmp_path, "models", "list").stdout)
        assert (listed["active_version"], listed["activated_in"]) == ("1", "database")


async def _load(port: int, key: str, clients: int, stop: asyncio.Event) -> list[tuple[int, Any]]:
    """``clients`` connections predicting as fast as they can until ``stop``; every answer's
    status and model version."""
    answers: list[tuple[int, Any]] = []

    async def client() -> None:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/api/v1",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ) as http:
            while not stop.is_set():
                try:
                    response = await http.post("/predict", json={"features": IRIS_SETOSA})
                except httpx.HTTPError as exc:
                    answers.append((0, type(exc).__name__))
                    continue
                version = response.json().get("model_version") if response.is_success else None
                answers.append((response.status_code, version or response.text[:200]))

    await asyncio.gather(*[client() for _ in range(clients)])
    return answers


@only_on("postgres")
def test_swapping_versions_under_load_fails_no_request(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    admin, key = _prepare(tour_environment, tmp_path)
    with serve(tour_environment, tmp_path, workers=2) as port:
        # Version 3 appears in the registry after both workers started: activating it loads it
        # on each worker while the load runs.
        iris = load_iris()
        register_model(
            Path(tour_environment["MODELGATE_MODEL_DIR"]),
            "iris",
            LogisticRegression(C=0.5, max_iter=1000).fit(iris.data, iris.target),
            feature_names=list(iris.feature_names),
            class_names=list(iris.target_names),
            reference=iris.data,
            version="3",
            activate=False,
        )

        async def scenario() -> tuple[list[tuple[int, Any]], PromisedDelay]:
            stop = asyncio.Event()
            load = asyncio.create_task(_load(port, key, clients=8, stop=stop))
            for version in ("2", "3", "1"):
                await asyncio.sleep(1.0)
                await asyncio.to_thread(_activate, port, admin, version)
                last = PromisedDelay("activation of version 1 on both workers", ACTIVATION_SECONDS)
                await asyncio.sleep(ACTIVATION_SECONDS + 0.5)
            stop.set()
            return await load, last

        answers, last = asyncio.run(scenario())
        final: list[Any] = []

        def only_version_1() -> bool:
            final[:] = [_version(port, key) for _ in range(20)]
            return final == ["1"] * 20

        last.until_sync(only_version_1)

    failed = [answer for answer in answers if not 200 <= answer[0] < 300]
    assert failed == [], failed[:5]
    served = {version for _, version in answers}
    assert served == {"1", "2", "3"}, served
    assert len(answers) > 100, len(answers)
    assert final == ["1"] * 20

"""The README's five-minute tour, verbatim, against a real ``modelgate serve`` process: on
Postgres + Redis with two workers, and on the embedded default (SQLite, in-process limiter)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Backend, new_postgres_database

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


def readme_tour() -> str:
    """The tour's shell block from README.md."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Five-minute tour", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "README.md has no tour block"
    return match.group(1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s")


@pytest.fixture
def tour_environment(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """Environment for the server and the tour: a fresh database, its own var/ and models."""
    models = tmp_path / "models"
    shutil.copytree(served_model_dir, models)
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("MODELGATE_")
    }
    environment.update(
        {
            "PATH": f"{BIN}{os.pathsep}{environment.get('PATH', '')}",
            "MODELGATE_MODEL_DIR": str(models),
            "MODELGATE_VAR_DIR": str(tmp_path / "var"),
            "MODELGATE_REDIS_URL": backend.redis_url,
            "MODELGATE_LOG_LEVEL": "WARNING",
        }
    )
    if backend.name == "postgres":
        with new_postgres_database() as url:
            environment["MODELGATE_DATABASE_URL"] = url
            yield environment
    else:
        environment["MODELGATE_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'tour.db'}"
        yield environment


def test_readme_tour_works_verbatim_against_a_real_server(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    port = _free_port()
    workers = "2" if backend.name == "postgres" else "1"
    server = subprocess.Popen(
        [str(BIN / "modelgate"), "serve", "--port", str(port), "--workers", workers],
        cwd=tmp_path,
        env=tour_environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/api/v1/health/ready", server)
        # The tour activates ROOT/.venv; here the interpreter running the tests plays it.
        script = readme_tour().replace("source .venv/bin/activate\n", "")
        script = script.replace("localhost:8000", f"127.0.0.1:{port}")
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=tour_environment,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        prediction = json.loads(lines[0])
        assert prediction["class_name"] == "setosa"
        batch = json.loads(lines[1])
        assert [p["class_name"] for p in batch["predictions"]] == [
            "setosa",
            "virginica",
            "versicolor",
        ]
        usage = json.loads(lines[2])
        assert usage["total_requests"] == 2
        assert usage["total_units"] == 4
        assert usage["quota"] == {"monthly_quota": 10000, "used": 4, "remaining": 9996}
        billing = list(csv.DictReader(io.StringIO("\n".join(lines[3:]))))
        assert len(billing) == 1
        assert billing[0]["tenant_name"] == "acme"
        assert billing[0]["tenant_id"] == usage["tenant_id"]
        assert (billing[0]["requests"], billing[0]["units"]) == ("2", "4")

        # The CLI's export has the same content as the HTTP one.
        month = billing[0]["date"][:7]
        exported = subprocess.run(
            [str(BIN / "modelgate"), "billing", "export", "--month", month],
            cwd=tmp_path,
            env=tour_environment,
            capture_output=True,
            text=True,
            check=True,
        )
        assert exported.stdout.strip().splitlines() == lines[3:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_cli_creates_tenants_and_keys_that_work(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    def modelgate(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "modelgate"), *args],
            cwd=tmp_path,
            env=tour_environment,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    modelgate("db", "upgrade")
    tenant = json.loads(modelgate("tenants", "create", "--name", "cli-co", "--monthly-quota", "3"))
    assert tenant["monthly_quota"] == 3
    key = modelgate("keys", "issue", "--tenant", tenant["id"], "--scopes", "predict")
    key = key.strip().splitlines()[-1]
    assert key.startswith("mg_")
    admin = modelgate("admin", "create-key", "--name", "root").strip().splitlines()[-1]
    assert admin.startswith("mg_")
    assert admin != key
    bad = subprocess.run(
        [str(BIN / "modelgate"), "keys", "issue", "--tenant", "nope"],
        cwd=tmp_path,
        env=tour_environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "UUID" in bad.stderr
    assert "Traceback" not in bad.stderr

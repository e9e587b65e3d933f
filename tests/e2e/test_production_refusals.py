"""``MODELGATE_ENV=production`` refuses to serve a weak configuration: the real ``modelgate
serve`` command exits non-zero with one line on stderr that names the setting to fix, and no
traceback. A strong configuration (several workers on Postgres and Redis) serves, and stops
cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Backend, is_product_setting, only_on
from tests.e2e.servers import BIN, free_port, hermetic_cwd, serve, wait_ready

pytestmark = pytest.mark.e2e

STRONG = "p" * 48
OTHER_STRONG = "j" * 48
GENERATED = "g" * 64


@pytest.fixture
def production(tmp_path: Path) -> dict[str, str]:
    """A production environment that passes every check with one worker: strong secrets, no
    CORS, the embedded database (nothing is migrated before the checks)."""
    environment = {k: v for k, v in os.environ.items() if not is_product_setting(k)}
    environment.update(
        {
            "MODELGATE_ENV": "production",
            "MODELGATE_KEY_PEPPER": STRONG,
            "MODELGATE_JWT_SECRET": OTHER_STRONG,
            "MODELGATE_VAR_DIR": str(tmp_path / "var"),
            "MODELGATE_MODEL_DIR": str(tmp_path / "models"),
            "MODELGATE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'refused.db'}",
        }
    )
    return environment


def _serve(
    environment: dict[str, str], cwd: Path, workers: int
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "modelgate"), "serve", "--port", str(free_port()), "--workers", str(workers)],
        cwd=hermetic_cwd(cwd),
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


REFUSALS = [
    pytest.param({"MODELGATE_KEY_PEPPER": None}, 1, "MODELGATE_KEY_PEPPER", id="missing-pepper"),
    pytest.param({"MODELGATE_JWT_SECRET": None}, 1, "MODELGATE_JWT_SECRET", id="missing-jwt"),
    pytest.param({"MODELGATE_KEY_PEPPER": "p" * 31}, 1, "MODELGATE_KEY_PEPPER", id="short-pepper"),
    pytest.param({"MODELGATE_JWT_SECRET": "short"}, 1, "MODELGATE_JWT_SECRET", id="short-jwt"),
    pytest.param(
        {"MODELGATE_JWT_PREVIOUS_SECRETS": f"{STRONG},old"},
        1,
        "MODELGATE_JWT_PREVIOUS_SECRETS",
        id="short-previous-jwt",
    ),
    pytest.param(
        {"MODELGATE_KEY_PEPPER": GENERATED}, 1, "MODELGATE_KEY_PEPPER", id="generated-pepper"
    ),
    pytest.param({"MODELGATE_CORS_ORIGINS": "*"}, 1, "MODELGATE_CORS_ORIGINS", id="cors-star"),
    pytest.param(
        {"MODELGATE_CORS_ORIGINS": "https://a.example, *"},
        1,
        "MODELGATE_CORS_ORIGINS",
        id="cors-star-among-others",
    ),
    pytest.param(
        {"MODELGATE_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/unused"},
        2,
        "MODELGATE_REDIS_URL",
        id="workers-without-redis",
    ),
    pytest.param(
        {"MODELGATE_REDIS_URL": "redis://127.0.0.1:6379/0"},
        2,
        "MODELGATE_DATABASE_URL",
        id="workers-on-sqlite",
    ),
    pytest.param(
        {"MODELGATE_DATABASE_READ_URL": "postgresql+asyncpg://reports:s3cret@replica/modelgate"},
        1,
        "MODELGATE_DATABASE_READ_URL",
        id="read-replica-of-sqlite",
    ),
    pytest.param({"MODELGATE_ENV": "prod"}, 1, "MODELGATE_ENV", id="unknown-environment"),
    pytest.param(
        {"MODELGATE_REQUEST_TIMEOUT_SECONDS": "0"},
        1,
        "MODELGATE_REQUEST_TIMEOUT_SECONDS",
        id="zero-request-timeout",
    ),
    pytest.param(
        {"MODELGATE_MAX_BODY_BYTES": "lots"}, 1, "MODELGATE_MAX_BODY_BYTES", id="bad-body-limit"
    ),
]


@pytest.mark.parametrize(("changes", "workers", "setting"), REFUSALS)
def test_production_serve_refuses_a_weak_configuration_in_one_line_naming_the_setting(
    production: dict[str, str],
    tmp_path: Path,
    changes: dict[str, str | None],
    workers: int,
    setting: str,
) -> None:
    environment = dict(production)
    for name, value in changes.items():
        if value is None:
            environment.pop(name)
        else:
            environment[name] = value
    if changes.get("MODELGATE_KEY_PEPPER") == GENERATED:
        # What a development run left in var/: the generated secret, reused in production.
        (tmp_path / "var").mkdir()
        (tmp_path / "var" / "key_pepper").write_text(GENERATED + "\n")

    result = _serve(environment, tmp_path, workers)

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    assert setting in lines[0], lines
    assert "Traceback" not in result.stderr + result.stdout
    for secret in (STRONG, OTHER_STRONG, GENERATED, "p" * 31, "s3cret"):
        assert secret not in result.stderr + result.stdout


def test_development_serves_what_production_refuses(
    production: dict[str, str], tmp_path: Path, served_model_dir: Path
) -> None:
    """The refusals are production's: the same weak settings start a development server."""
    environment = {
        **production,
        "MODELGATE_ENV": "development",
        "MODELGATE_KEY_PEPPER": "short",
        "MODELGATE_CORS_ORIGINS": "*",
        "MODELGATE_MODEL_DIR": str(served_model_dir),
    }
    with serve(environment, tmp_path) as port:
        assert port > 0


@only_on("postgres")
def test_production_serves_several_workers_on_postgres_and_redis_and_stops_cleanly(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = {
        **tour_environment,
        "MODELGATE_ENV": "production",
        "MODELGATE_KEY_PEPPER": STRONG,
        "MODELGATE_JWT_SECRET": OTHER_STRONG,
        "MODELGATE_CORS_ORIGINS": "https://console.example",
    }
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "modelgate"), "serve", "--port", str(port), "--workers", "2"],
        cwd=hermetic_cwd(tmp_path),
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/api/v1/health/ready", server)
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert server.returncode == 0, stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in stderr

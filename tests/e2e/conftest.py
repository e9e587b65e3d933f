"""Fixtures for end-to-end tests against real ``modelgate serve`` processes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Backend, new_postgres_database
from tests.e2e.servers import BIN


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
            # Every test's server sees 127.0.0.1, on a Redis shared by every test and run; tests
            # that fire failed credentials on purpose (revocation, the fuzzer's auth probes)
            # must not be throttled by each other. tests/e2e/test_edge_addresses.py sets its own.
            "MODELGATE_AUTH_FAILURES_PER_ADDRESS": "999999/minute",
        }
    )
    if backend.name == "postgres":
        with new_postgres_database() as url:
            environment["MODELGATE_DATABASE_URL"] = url
            yield environment
    else:
        environment["MODELGATE_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'tour.db'}"
        yield environment

"""Fixtures for end-to-end tests against real ``modelgate serve`` processes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Backend, new_postgres_database
from tests.e2e.servers import server_environment


@pytest.fixture
def tour_environment(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """Environment for the server and the tour: a fresh database, its own var/ and models."""
    models = tmp_path / "models"
    shutil.copytree(served_model_dir, models)

    def environment(database_url: str) -> dict[str, str]:
        return server_environment(
            database_url,
            backend.redis_url,
            models,
            tmp_path / "var",
            MODELGATE_LOG_LEVEL="WARNING",
            # Every test's server sees 127.0.0.1, on a Redis shared by every test and run; tests
            # that fire failed credentials on purpose (revocation, the fuzzer's auth probes)
            # must not be throttled by each other. tests/e2e/test_edge_addresses.py sets its own.
            MODELGATE_AUTH_FAILURES_PER_ADDRESS="999999/minute",
        )

    if backend.name == "postgres":
        with new_postgres_database() as url:
            yield environment(url)
    else:
        yield environment(f"sqlite+aiosqlite:///{tmp_path / 'tour.db'}")

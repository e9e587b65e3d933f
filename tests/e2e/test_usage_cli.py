"""``modelgate usage prune`` and ``usage rebuild-rollups`` from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.servers import run_cli

pytestmark = pytest.mark.e2e


def test_prune_needs_a_day_or_a_retention_setting(
    tour_environment: dict[str, str], tmp_path: Path
) -> None:
    run_cli(tour_environment, tmp_path, "db", "upgrade")
    refused = run_cli(tour_environment, tmp_path, "usage", "prune", check=False)
    assert refused.returncode == 1
    assert "give --before or set MODELGATE_USAGE_RETENTION_DAYS" in refused.stderr
    malformed = run_cli(
        tour_environment, tmp_path, "usage", "prune", "--before", "last week", check=False
    )
    assert malformed.returncode == 1
    assert "--before must be a day" in malformed.stderr
    pruned = run_cli(tour_environment, tmp_path, "usage", "prune", "--before", "2026-01-01")
    assert pruned.stdout.strip() == "deleted 0 usage records from before 2026-01-01"
    retained = run_cli(
        {**tour_environment, "MODELGATE_USAGE_RETENTION_DAYS": "400"}, tmp_path, "usage", "prune"
    )
    assert retained.stdout.startswith("deleted 0 usage records from before ")
    rebuilt = run_cli(tour_environment, tmp_path, "usage", "rebuild-rollups")
    assert rebuilt.stdout.strip() == "rebuilt 0 daily rollup rows from the usage records"

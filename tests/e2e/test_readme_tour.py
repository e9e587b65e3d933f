"""The README's five-minute tour, verbatim, against a real ``modelgate serve`` process: on
Postgres + Redis with two workers, and on the embedded default (SQLite, in-process limiter)."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Backend
from tests.e2e.servers import run_cli, serve

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def readme_tour() -> str:
    """The tour's shell block from README.md."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Five-minute tour", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "README.md has no tour block"
    return match.group(1)


def test_readme_tour_works_verbatim_against_a_real_server(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    workers = 2 if backend.name == "postgres" else 1
    with serve(tour_environment, tmp_path, workers) as port:
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
        assert len(prediction["probability"]) == 3
        batch = json.loads(lines[1])
        assert [p["class_name"] for p in batch["predictions"]] == [
            "setosa",
            "virginica",
            "versicolor",
        ]
        assert [p["prediction_id"] for p in batch["predictions"]] == [
            f"{batch['prediction_id']}-{index}" for index in range(3)
        ]
        info = json.loads(lines[2])
        assert (info["model_name"], info["model_type"]) == ("iris", "RandomForestClassifier")
        health = json.loads(lines[3])
        assert (health["status"], health["model_version"]) == ("ok", info["model_version"])
        usage = json.loads(lines[4])
        assert usage["total_requests"] == 2
        assert usage["total_units"] == 4
        assert usage["quota"] == {"monthly_quota": 10000, "used": 4, "remaining": 9996}
        by_token = json.loads(lines[5])
        assert by_token["class_name"] == "virginica"
        # The token minted from the revoked key fails; the rotated-in key works.
        assert lines[6:8] == ["401", "200"]
        trail = json.loads(lines[8])["events"]
        assert [(e["actor"], e["action"]) for e in trail] == [
            ("admin:ops", "key.revoke"),
            ("admin:ops", "key.rotate"),
            (f"tenant:{usage['tenant_id']}", "token.issue"),
            ("admin:ops", "key.issue"),
            ("admin:ops", "tenant.create"),
            ("cli", "admin_key.issue"),
        ]
        assert all(e["tenant_id"] == usage["tenant_id"] for e in trail[:5])
        assert trail[1]["detail"]["grace_seconds"] == 60
        assert [e["id"] for e in trail] == list(range(6, 0, -1))
        assert lines[9] == f"audit chain intact: 6 events, head {trail[0]['hash']}"
        assert json.loads(lines[10]) == {
            "intact": True,
            "events": 6,
            "head": trail[0]["hash"],
            "first_bad_id": None,
            "problem": None,
        }
        billing = list(csv.DictReader(io.StringIO("\n".join(lines[11:]))))
        assert len(billing) == 1
        assert billing[0]["tenant_name"] == "acme"
        assert billing[0]["tenant_id"] == usage["tenant_id"]
        assert (billing[0]["requests"], billing[0]["units"]) == ("3", "5")

        # The CLI's export has the same content as the HTTP one.
        month = billing[0]["date"][:7]
        exported = run_cli(tour_environment, tmp_path, "billing", "export", "--month", month)
        assert exported.stdout.strip().splitlines() == lines[11:]


def test_cli_creates_tenants_and_keys_that_work(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    def modelgate(*args: str) -> str:
        return run_cli(tour_environment, tmp_path, *args).stdout

    modelgate("db", "upgrade")
    tenant = json.loads(modelgate("tenants", "create", "--name", "cli-co", "--monthly-quota", "3"))
    assert tenant["monthly_quota"] == 3
    key = modelgate("keys", "issue", "--tenant", tenant["id"], "--scopes", "predict")
    key = key.strip().splitlines()[-1]
    assert key.startswith("mg_")
    admin = modelgate("admin", "create-key", "--name", "root").strip().splitlines()[-1]
    assert admin.startswith("mg_")
    assert admin != key
    bad = run_cli(tour_environment, tmp_path, "keys", "issue", "--tenant", "nope", check=False)
    assert bad.returncode == 1
    assert "UUID" in bad.stderr
    assert "Traceback" not in bad.stderr

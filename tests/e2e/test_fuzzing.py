"""The contract, proven by fuzzing: schemathesis, with all of its checks, over the whole OpenAPI
document, against a real server on each backend, with a tenant key and then an admin key. No
5xx, no undocumented status or content type, no ``Allow`` mismatch, no schema-valid request
refused (but for the rules tests/fuzz/schemathesis.toml names), no schema-invalid one accepted."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import Backend
from tests.e2e.servers import BIN, run_cli, serve

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).resolve().parents[1] / "fuzz" / "schemathesis.toml"
# Cases per operation and phase; with a fixed seed the run is the same every time. 20 (it was
# 40) halves the run's time; the coverage phase still sends every operation its boundary and
# invalid values, and each run must still test every operation of the document (_fuzz).
MAX_EXAMPLES = 20
SEED = 20261125


def _fuzz(url: str, key: str, workdir: Path) -> tuple[int, str]:
    """Run schemathesis in ``workdir`` (it keeps a cache there); returns the number of generated
    cases and its output."""
    result = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "--no-color",
            "--config-file",
            str(CONFIG),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {key}",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--report",
            "junit",
            "--report-junit-path",
            str(workdir / "junit.xml"),
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    failures = output.split("=== FAILURES ===", 1)[-1][:6000]
    assert result.returncode == 0, failures
    generated = re.search(r"(\d+) generated", output)
    assert generated, output[-2000:]
    # Every operation of the document was selected and tested.
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    assert selected, output[-2000:]
    assert tested, output[-2000:]
    assert selected.group(1) == selected.group(2) == tested.group(1), output[-2000:]
    return int(generated.group(1)), output


def _workdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_the_openapi_document_holds_under_fuzzing(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    # The fuzzer sends a few thousand requests a minute from one key: the limit is not what
    # is under test here (tests/api/test_rate_limits.py is).
    environment = {
        **tour_environment,
        "MODELGATE_DEFAULT_RATE_LIMIT": "1000000/minute",
        "MODELGATE_ADMIN_RATE_LIMIT": "1000000/minute",
    }
    with serve(environment, tmp_path) as port:
        url = f"http://127.0.0.1:{port}"
        admin = run_cli(environment, tmp_path, "admin", "create-key", "--name", "fuzz")
        admin_key = admin.stdout.strip().splitlines()[-1]
        tenant = json.loads(
            run_cli(environment, tmp_path, "tenants", "create", "--name", "fz").stdout
        )
        issued = run_cli(
            environment,
            tmp_path,
            "keys",
            "issue",
            "--tenant",
            tenant["id"],
            "--scopes",
            "predict,usage:read,keys:manage,webhooks:manage",
        )
        tenant_key = issued.stdout.strip().splitlines()[-1]
        # Both credentials work, so the fuzzer reaches the logic behind them.
        assert (
            httpx.get(
                f"{url}/api/v1/me", headers={"Authorization": f"Bearer {tenant_key}"}
            ).status_code
            == 200
        )
        assert (
            httpx.get(
                f"{url}/api/v1/admin/tenants", headers={"Authorization": f"Bearer {admin_key}"}
            ).status_code
            == 200
        )
        operations = sum(
            len(ops) for ops in httpx.get(f"{url}/openapi.json").json()["paths"].values()
        )
        # The tenant first: the admin's run may suspend or re-limit that tenant.
        counts = {
            who: _fuzz(url, key, _workdir(tmp_path / who))[0]
            for who, key in (("tenant", tenant_key), ("admin", admin_key))
        }
    assert operations >= 18
    assert all(count > 20 * operations for count in counts.values()), counts

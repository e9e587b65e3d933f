"""SECURITY.md line 20 over a whole story: the README's five-minute tour against a real server
(Postgres + Redis, two workers) logging at DEBUG leaves none of the secrets it created in the
logs, and each request's access line says who (tenant and key ids) did what (route template)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from auth.identity.keys import key_digest
from auth.settings import Settings, load_secrets
from tests.conftest import Backend, only_on
from tests.e2e.servers import access_lines, serve
from tests.e2e.test_readme_tour import readme_tour

pytestmark = pytest.mark.e2e

# What the tour keeps in shell variables, written out by a line appended to it.
SECRET_VARIABLES = ("ADMIN_KEY", "API_KEY", "NEW_KEY", "TOKEN")
ID_VARIABLES = ("TENANT_ID", "KEY_ID")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@only_on("postgres")
def test_readme_tour_logs_no_secret_and_names_tenant_key_and_route(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = {**tour_environment, "MODELGATE_LOG_LEVEL": "DEBUG"}
    server_log = tmp_path / "server.log"
    dump = tmp_path / "tour-variables.json"
    names = ", ".join(f'"{name}": "${name}"' for name in SECRET_VARIABLES + ID_VARIABLES)
    with serve(environment, tmp_path, workers=2, log_path=server_log) as port:
        script = readme_tour().replace("source .venv/bin/activate\n", "")
        script = script.replace("localhost:8000", f"127.0.0.1:{port}")
        script += f"\ncat > {dump} <<EOF\n{{{names}}}\nEOF\n"
        tour = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert tour.returncode == 0, tour.stderr
    variables = json.loads(dump.read_text())
    # Everything the servers and the tour's own `modelgate` commands logged.
    log = server_log.read_text() + tour.stderr

    secrets_ = load_secrets(Settings(_env_file=None, var_dir=tmp_path / "var"))  # type: ignore[call-arg]
    pepper, jwt_secret = secrets_.key_pepper, secrets_.jwt_secret
    keys = [variables[name] for name in ("ADMIN_KEY", "API_KEY", "NEW_KEY")]
    token = variables["TOKEN"]
    assert all(key.startswith("mg_") for key in keys)
    assert token.count(".") == 2
    secrets = [
        *keys,
        *(key[:-1] for key in keys),  # nor most of one
        *(key_digest(pepper, key) for key in keys),
        token,
        token.rsplit(".", 1)[1],  # the token's signature alone
        pepper.decode(),
        jwt_secret.decode(),
    ]
    for secret in secrets:
        assert secret not in log

    # The grep read real logs: every request of the tour has its access line, with its id, who
    # made it (ids only) and the route's template (never a path with an id in it).
    lines = access_lines(server_log.read_text())
    assert len(lines) >= 15, server_log.read_text()[-2000:]
    for line in lines:
        assert set(line) >= {"request_id", "method", "route", "status", "duration_ms"}, line
        assert not UUID.search(line["route"]), line
    tenant_id, key_id = variables["TENANT_ID"], variables["KEY_ID"]
    predictions = [line for line in lines if line["route"] == "/api/v1/predict"]
    assert [line["status"] for line in predictions] == [200, 200]
    # The key's own prediction and the one made with the token minted from it: the same key.
    assert all((p["tenant_id"], p["key_id"]) == (tenant_id, key_id) for p in predictions)
    (rotation,) = [line for line in lines if line["route"] == "/api/v1/admin/keys/{key_id}/rotate"]
    assert rotation["tenant_id"] is None  # an operator's key
    assert UUID.fullmatch(rotation["key_id"])
    assert rotation["key_id"] != key_id
    refused = [line for line in lines if line["route"] == "/api/v1/me" and line["status"] == 401]
    assert [(line["tenant_id"], line["key_id"]) for line in refused] == [(None, None)]

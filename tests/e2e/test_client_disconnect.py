"""A client that goes away before its answer, against a real ``modelgate serve``: the request is
logged and counted as 499 (never 500, nor the 422 of a body it did not finish), billed nothing
(no usage record, nothing against the quota), and its concurrency slot is given back
(api.http.disconnect).

Two ways of going: a body that stops halfway, and a prediction whose client leaves while its
inference runs. The inference is slowed in the server process by a ``sitecustomize`` on its
``PYTHONPATH`` that holds every prediction while a file says so (nothing in modelgate does)."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from tests.conftest import IRIS_SETOSA
from tests.e2e.servers import access_lines, run_cli, serve

pytestmark = pytest.mark.e2e

# Holds each prediction while <gate>/hold exists: says <gate>/entered, waits for <gate>/release.
GATE_SITECUSTOMIZE = """
import os

_gate = os.environ.get("TEST_INFERENCE_GATE")
if _gate:
    import asyncio
    import pathlib

    from ml import LoadedModel

    _root = pathlib.Path(_gate)
    _infer = LoadedModel.infer_async

    async def _gated(self, *args, **kwargs):
        if (_root / "hold").exists():
            (_root / "entered").touch()
            while not (_root / "release").exists():
                await asyncio.sleep(0.01)
        return await _infer(self, *args, **kwargs)

    LoadedModel.infer_async = _gated
"""
WAIT = 30  # seconds, for what the server does on its own; each wait ends as soon as it is done
PREDICT = "/api/v1/predict"


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what}")
        time.sleep(0.02)


def _predict_statuses(log: Path) -> list[int]:
    return [line["status"] for line in access_lines(log.read_text()) if line["route"] == PREDICT]


def _request(key: str, body: bytes, declared: int) -> bytes:
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: modelgate\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    )
    return head.encode() + body


# The units recorded, and the units counted against the quota (the only tenant's).
UNITS = (
    "SELECT coalesce(sum(units), 0) FROM usage_record",
    "SELECT coalesce(sum(units), 0) FROM monthly_usage",
)


async def _postgres_units(url: str) -> tuple[int, int]:
    parsed = make_url(url)
    connection = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )
    try:
        recorded, month = [int(await connection.fetchval(sql)) for sql in UNITS]
    finally:
        await connection.close()
    return recorded, month


def _units(environment: dict[str, str]) -> tuple[int, int]:
    """What the server's database holds: the units recorded and those against the quota."""
    url = environment["MODELGATE_DATABASE_URL"]
    if url.startswith("postgresql"):
        return asyncio.run(_postgres_units(url))
    database = make_url(url).database
    assert database is not None
    with sqlite3.connect(database) as connection:
        recorded, month = [int(connection.execute(sql).fetchone()[0]) for sql in UNITS]
    return recorded, month


def _requests_total(port: int, status: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "modelgate_http_requests_total"
        and sample.labels.get("route") == PREDICT
        and sample.labels.get("status") == status
    )


def _tenant_key(environment: dict[str, str], cwd: Path, port: int) -> str:
    """A new tenant's key that may have one request in flight at a time (a slot that is not
    given back would refuse the next)."""
    admin_key = run_cli(
        {**environment, "MODELGATE_LOG_LEVEL": "WARNING"},
        cwd,
        "admin",
        "create-key",
        "--name",
        "ops",
    ).stdout.splitlines()[-1]
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1/admin",
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=WAIT,
    ) as admin:
        tenant = admin.post("/tenants", json={"name": "gone"})
        assert tenant.status_code == 201, tenant.text
        key = admin.post(
            f"/tenants/{tenant.json()['id']}/keys", json={"name": "k", "max_in_flight": 1}
        )
        assert key.status_code == 201, key.text
    return str(key.json()["key"])


def test_a_client_that_goes_away_is_logged_and_counted_499_and_billed_nothing(
    tour_environment: dict[str, str], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GATE_SITECUSTOMIZE)
    gate = tmp_path / "gate"
    gate.mkdir()
    environment = {
        **tour_environment,
        "MODELGATE_LOG_LEVEL": "INFO",
        "PYTHONPATH": str(site),
        "TEST_INFERENCE_GATE": str(gate),
    }
    body = json.dumps({"features": IRIS_SETOSA}).encode()
    log = tmp_path / "server.log"
    with serve(environment, tmp_path, log_path=log) as port:
        key = _tenant_key(tour_environment, tmp_path, port)
        # 1. A body that stops halfway: the client closes while the server waits for the rest.
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(_request(key, body[:10], declared=len(body)))
            time.sleep(0.2)  # most likely while the server waits for the rest (sooner: the same)
        _wait_for(lambda: len(_predict_statuses(log)) == 1, "the first access line")

        # 2. A whole request whose client leaves while its inference runs.
        (gate / "hold").touch()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(_request(key, body, declared=len(body)))
            _wait_for((gate / "entered").exists, "the prediction to start")
        (gate / "hold").unlink()
        # The server sees the connection closed in milliseconds; a second is a wide margin.
        time.sleep(1)
        (gate / "release").touch()
        _wait_for(lambda: len(_predict_statuses(log)) == 2, "the second access line")

        assert _predict_statuses(log) == [499, 499]
        assert _requests_total(port, "499") == 2
        assert _requests_total(port, "500") == _requests_total(port, "422") == 0
        # Nothing billed; the slot is free again: the next prediction is served, and billed.
        assert _units(tour_environment) == (0, 0)
        served = httpx.post(
            f"http://127.0.0.1:{port}{PREDICT}",
            json={"features": IRIS_SETOSA},
            headers={"Authorization": f"Bearer {key}"},
            timeout=WAIT,
        )
        assert served.status_code == 200, served.text
    assert _units(tour_environment) == (1, 1)

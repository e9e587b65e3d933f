"""GET /metrics of a real ``modelgate serve --workers 2``: whichever worker answers the scrape,
the figures are the server's (both workers' summed); a killed worker's counts stay and its
gauges go; the metrics directory is the server's own and goes with it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import run_cli, serve

pytestmark = pytest.mark.e2e

PREDICT_LABELS = {"route": "/api/v1/predict", "method": "POST", "status": "200"}


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def _predictions_by_worker(directory: Path) -> dict[int, float]:
    """Each worker's own count of answered predictions, read from its file."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        total = 0.0
        for metric in MultiProcessCollector.merge([str(path)]):  # type: ignore[no-untyped-call]
            for sample in metric.samples:
                if sample.name == "modelgate_http_requests_total" and (
                    PREDICT_LABELS.items() <= sample.labels.items()
                ):
                    total += sample.value
        counts[pid] = total
    return counts


async def _predict(port: int, key: str, count: int) -> list[int]:
    """``count`` predictions at once, each on a connection of its own (so that the kernel hands
    them to whichever worker accepts first): one client that keeps no connection alive (a client
    each cost 17 ms of CPU)."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        timeout=30,
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:

        async def one() -> int:
            response = await client.post(
                "/api/v1/predict",
                json={"features": IRIS_SETOSA},
                headers={"Authorization": f"Bearer {key}"},
            )
            return response.status_code

        return await asyncio.gather(*[one() for _ in range(count)])


def _scrape(port: int) -> str:
    # A new connection each time: any worker may answer.
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def _environment(tour_environment: dict[str, str], parent: Path) -> dict[str, str]:
    return {
        **tour_environment,
        "PROMETHEUS_MULTIPROC_DIR": str(parent),
        # Hundreds of predictions from one key: the limit is not what is under test.
        "MODELGATE_DEFAULT_RATE_LIMIT": "1000000/minute",
    }


def _tenant_key(environment: dict[str, str], cwd: Path) -> str:
    """A tenant's key, made while the server runs (it migrated the database)."""
    tenant = json.loads(run_cli(environment, cwd, "tenants", "create", "--name", "metrics").stdout)
    issued = run_cli(environment, cwd, "keys", "issue", "--tenant", tenant["id"])
    return issued.stdout.strip().splitlines()[-1]


def _both_workers_answer(port: int, key: str, directory: Path) -> int:
    """Send predictions until each of the two workers has answered some; returns how many were
    sent (all of them 200)."""
    sent = 0
    for _ in range(30):
        statuses = asyncio.run(_predict(port, key, 16))
        assert set(statuses) == {200}, statuses
        sent += len(statuses)
        if sum(1 for count in _predictions_by_worker(directory).values() if count) >= 2:
            return sent
    raise AssertionError(f"one worker answered all {sent} predictions")


def _live_gauges(directory: Path, pid: int) -> list[str]:
    pattern = re.compile(rf"gauge_live[a-z]+_{pid}\.db")
    return [path.name for path in directory.iterdir() if pattern.fullmatch(path.name)]


# Several workers need the shared Redis limiter: the embedded default refuses them. One server
# for the whole story: each start of two workers costs tens of seconds on a loaded machine.
@only_on("postgres")
def test_two_workers_metrics_are_summed_and_a_killed_workers_counts_stay(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    parent = tmp_path / "metrics"
    environment = _environment(tour_environment, parent)
    with serve(environment, tmp_path, workers=2) as port:
        key = _tenant_key(environment, tmp_path)
        [directory] = list(parent.iterdir())
        sent = _both_workers_answer(port, key, directory)
        by_worker = _predictions_by_worker(directory)
        assert sum(by_worker.values()) == sent
        assert max(by_worker.values()) < sent  # neither worker answered all of them
        for _ in range(6):
            text = _scrape(port)
            assert _value(text, "modelgate_http_requests_total", **PREDICT_LABELS) == sent
            assert _value(text, "modelgate_predictions_total", model="iris") == sent
            assert _value(text, "modelgate_prediction_rows_total", model="iris") == sent
            assert _value(text, "modelgate_usage_flush_records_sum") == sent
            # Both workers serve the same version: the gauge says 1, not 2.
            assert _value(text, "modelgate_model_active_version", model="iris") == 1

        # A worker killed outright: uvicorn replaces it; its counts stay, its gauges go.
        victim = next(pid for pid, count in by_worker.items() if count)
        assert _live_gauges(directory, victim)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            text = _scrape(port)
            if not _live_gauges(directory, victim) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not _live_gauges(directory, victim), "the killed worker's gauges are still read"
        assert _value(text, "modelgate_http_requests_total", **PREDICT_LABELS) == sent
        assert _value(text, "modelgate_model_active_version", model="iris") == 1
        statuses = asyncio.run(_predict(port, key, 8))
        assert set(statuses) == {200}
        after = _scrape(port)
        assert _value(after, "modelgate_http_requests_total", **PREDICT_LABELS) == sent + 8
    # The directory was this run's alone: it goes with the server.
    assert not directory.exists()
    assert list(parent.iterdir()) == []

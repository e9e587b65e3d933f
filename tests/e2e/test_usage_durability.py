"""A worker killed with SIGKILL in the middle of traffic loses no billed request: on a real
two-worker server on Postgres, the units recorded for the tenant are never fewer than the units
of the 2xx responses the client received, and exceed them by at most the requests that were in
flight when the worker died (their records may have been committed before their answers were
lost)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import IRIS_SETOSA, Backend, only_on, recorded_units
from tests.e2e.servers import run_cli, serve, tenant_and_key
from tests.parallel import quiet_from_here

pytestmark = pytest.mark.e2e

CLIENTS = 24


def _worker_pids(log_path: Path) -> set[int]:
    pids = set()
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "request" and event.get("status") == 200:
            pids.add(event["pid"])
    return pids


async def _drive(port: int, key: str, log_path: Path) -> tuple[int, int, int]:
    """Predictions from CLIENTS connections; one worker is killed midway. Returns the 2xx
    count, the failed count, and how many requests were in flight at the kill."""
    ok = failed = 0
    in_flight = 0
    in_flight_at_kill = -1
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal ok, failed, in_flight
        # A new connection per request, so that both workers keep taking requests.
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/api/v1",
            timeout=10,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as http:
            while not stop.is_set():
                in_flight += 1
                try:
                    response = await http.post(
                        "/predict",
                        json={"features": IRIS_SETOSA},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                except httpx.HTTPError:
                    failed += 1
                else:
                    if response.status_code == 200:
                        ok += 1
                    else:
                        failed += 1
                finally:
                    in_flight -= 1

    tasks = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    deadline = time.monotonic() + 20
    # Until both workers have served (so the victim is busy), then kill one of them.
    while len(_worker_pids(log_path)) < 2:
        assert time.monotonic() < deadline, "only one worker served"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    victim = sorted(_worker_pids(log_path))[0]
    in_flight_at_kill = in_flight
    os.kill(victim, signal.SIGKILL)
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*tasks)
    assert ok > 0
    return ok, failed, in_flight_at_kill


@only_on("postgres")
def test_a_worker_killed_midway_loses_no_billed_request(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = {**tour_environment, "MODELGATE_LOG_LEVEL": "INFO"}
    run_cli(environment, tmp_path, "db", "upgrade")
    tenant_id, key_text = tenant_and_key(
        environment, tmp_path, "--name", "busy", "--rate-limit", "1000000/minute"
    )
    log_path = tmp_path / "server.log"
    with serve(environment, tmp_path, workers=2, log_path=log_path) as port:
        quiet_from_here()
        ok, failed, in_flight_at_kill = asyncio.run(_drive(port, key_text, log_path))
    recorded = asyncio.run(recorded_units(environment["MODELGATE_DATABASE_URL"], tenant_id))
    assert recorded >= ok, (recorded, ok)
    assert recorded - ok <= in_flight_at_kill, (recorded, ok, failed, in_flight_at_kill)

"""Plans on two real ``modelgate serve`` processes sharing Postgres and Redis: a plan change
reaches both within a second, the plan's quota refuses a batch whole wherever it lands, and a
model outside the plan answers on both exactly as an unknown model does."""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IRIS_SETOSA, IRIS_VIRGINICA, only_on, recorded_units
from tests.e2e.servers import run_cli, serve, tenant_and_key
from tests.parallel import quiet_from_here
from tests.promises import PromisedDelay

pytestmark = pytest.mark.e2e


def _cli(environment: dict[str, str], cwd: Path, *args: str) -> str:
    return run_cli(environment, cwd, *args).stdout


def _last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def _tenant_key(environment: dict[str, str], cwd: Path, name: str, plan: str) -> tuple[str, str]:
    return tenant_and_key(environment, cwd, "--name", name, "--plan", plan)


async def _burst(ports: list[int], key: str, count: int) -> list[int]:
    """``count`` concurrent predictions with ``key``, alternating between the processes; a 429
    must be the concurrency limit's."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(index: int) -> int:
            port = ports[index % len(ports)]
            response = await client.post(
                f"http://127.0.0.1:{port}/api/v1/predict",
                json={"features": IRIS_SETOSA},
                headers=headers,
            )
            if response.status_code == 429:
                assert response.json()["type"].endswith("concurrency-limit-exceeded")
                assert response.headers["retry-after"] == "1"
            return response.status_code

        return list(await asyncio.gather(*(one(index) for index in range(count))))


def _shape(response: httpx.Response) -> tuple[int, str, dict[str, Any]]:
    body = {k: v for k, v in response.json().items() if k != "request_id"}
    return response.status_code, response.headers["content-type"], body


@only_on("postgres")
def test_plans_hold_across_two_serving_processes(
    tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = tour_environment
    _cli(environment, tmp_path, "db", "upgrade")
    admin = _last_line(_cli(environment, tmp_path, "admin", "create-key", "--name", "ops"))
    metered = json.loads(
        _cli(
            environment,
            tmp_path,
            "plans",
            "create",
            "--name",
            "metered",
            "--rate-limits",
            "100/minute",
            "--monthly-quota",
            "3",
            "--price-per-1000-units",
            "2000",
        )
    )
    _cli(environment, tmp_path, "plans", "create", "--name", "wine-only", "--models", "wine")
    _cli(
        environment, tmp_path, "plans", "create", "--name", "one-at-a-time", "--max-in-flight", "1"
    )
    listed = _cli(environment, tmp_path, "plans", "list").splitlines()
    assert {json.loads(line)["name"] for line in listed} >= {"metered", "wine-only", "standard"}
    quota_tenant, quota_key = _tenant_key(environment, tmp_path, "quota", "metered")
    _, outsider_key = _tenant_key(environment, tmp_path, "outsider", "wine-only")
    _, serial_key = _tenant_key(environment, tmp_path, "serial", "one-at-a-time")

    with ExitStack() as stack:
        ports = [stack.enter_context(serve(environment, tmp_path)) for _ in range(2)]
        quiet_from_here()
        clients = [
            stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1"))
            for port in ports
        ]

        def me(client: httpx.Client) -> dict[str, Any]:
            response = client.get("/me", headers={"Authorization": f"Bearer {quota_key}"})
            assert response.status_code == 200, response.text
            limits: dict[str, Any] = response.json()["limits"]
            return limits

        # The quota refuses a batch whole, whichever process it reaches.
        auth = {"Authorization": f"Bearer {quota_key}"}
        pair = {"instances": [IRIS_SETOSA, IRIS_VIRGINICA]}
        assert clients[0].post("/predict/batch", json=pair, headers=auth).status_code == 200
        refused = clients[1].post("/predict/batch", json=pair, headers=auth)
        assert refused.status_code == 429, refused.text
        assert refused.json()["type"].endswith("quota-exceeded")
        single = clients[1].post("/predict", json={"features": IRIS_SETOSA}, headers=auth)
        assert single.status_code == 200, single.text
        assert (
            clients[0].post("/predict", json={"features": IRIS_SETOSA}, headers=auth).status_code
            == 429
        )
        assert asyncio.run(recorded_units(environment["MODELGATE_DATABASE_URL"], quota_tenant)) == 3

        # A model outside the plan is, on both processes, a model that does not exist.
        outsider = {"Authorization": f"Bearer {outsider_key}"}
        for client in clients:
            outside = client.post(
                "/predict", json={"features": IRIS_SETOSA, "model": "iris"}, headers=outsider
            )
            unknown = client.post(
                "/predict", json={"features": IRIS_SETOSA, "model": "nothing"}, headers=outsider
            )
            assert outside.status_code == 404
            assert _shape(outside) == _shape(unknown)
            assert client.get("/models", headers=outsider).json()["models"] == []

        # The plan's max_in_flight: a burst over both processes is partly refused at once (429,
        # never queued, never a 5xx), and once it is over the key is served again.
        statuses = asyncio.run(_burst(ports, serial_key, 40))
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 1
        assert statuses.count(429) >= 1, "40 concurrent requests never met max_in_flight=1"
        serial = {"Authorization": f"Bearer {serial_key}"}
        after = clients[0].post("/predict", json={"features": IRIS_SETOSA}, headers=serial)
        assert after.status_code == 200, after.text

        # A plan change reaches both processes within a second (each has the key cached).
        assert [me(client)["rate_limit"] for client in clients] == ["100/minute"] * 2
        changed = clients[0].patch(
            f"/admin/plans/{metered['id']}",
            json={"rate_limits": "7/second;500/hour", "monthly_quota": 10},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert changed.status_code == 200, changed.text
        delay = PromisedDelay("plan change on both processes", 1.0)
        pending = set(range(len(clients)))

        def changed_everywhere() -> bool:
            for index in sorted(pending):
                limits = me(clients[index])
                if limits["rate_limit"] == "7/second;500/hour":
                    assert limits["monthly_quota"] == 10
                    pending.discard(index)
            return not pending

        # Every poll counts against the key's 100 a minute: 10 a second for up to 5 s.
        delay.until_sync(changed_everywhere, every=0.2)
        # The raised quota applies at once too.
        assert (
            clients[1].post("/predict", json={"features": IRIS_SETOSA}, headers=auth).status_code
            == 200
        )

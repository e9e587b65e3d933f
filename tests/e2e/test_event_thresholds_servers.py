"""Usage-threshold events on real ``modelgate serve`` processes sharing Postgres (issue 22): 200
concurrent predictions from several keys against a quota of 100, spread over two servers, send
exactly one ``usage.threshold`` per threshold and one ``quota.exhausted``, signed so that the
``standardwebhooks`` library verifies them; and an event committed by a server killed with
SIGKILL before it could deliver is delivered by the next one."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from auth.events.secrets import new_secret
from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import run_cli, serve
from tests.events.receiver import Receiver, running_receiver

pytestmark = pytest.mark.e2e

SCOPES = "predict,usage:read,webhooks:manage"


def _tenant_with_endpoint(
    environment: dict[str, str], cwd: Path, receiver: Receiver, quota: int, keys: int
) -> tuple[str, list[str], str]:
    """A tenant with ``quota`` units, ``keys`` keys and an endpoint for the usage events; its
    id, the keys and the endpoint's secret."""
    tenant = json.loads(
        run_cli(
            environment,
            cwd,
            "tenants",
            "create",
            "--name",
            "thresholds",
            "--monthly-quota",
            str(quota),
            "--rate-limit",
            "1000000/minute",
        ).stdout
    )
    issued = [
        run_cli(environment, cwd, "keys", "issue", "--tenant", tenant["id"], "--scopes", SCOPES)
        .stdout.strip()
        .splitlines()[-1]
        for _ in range(keys)
    ]
    endpoint = json.loads(
        run_cli(
            environment,
            cwd,
            "webhooks",
            "add",
            "--tenant",
            tenant["id"],
            "--url",
            receiver.url,
            "--events",
            "usage.threshold,quota.exhausted",
        ).stdout
    )
    return tenant["id"], issued, endpoint["secret"]


async def _predict_concurrently(ports: list[int], keys: list[str], count: int) -> list[int]:
    """``count`` single-row predictions at once, round-robin over the servers and keys."""
    clients = [
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30) for port in ports
    ]
    pairs = itertools.cycle(itertools.product(clients, keys))
    try:
        answers = await asyncio.gather(
            *(
                client.post(
                    "/predict",
                    json={"features": IRIS_SETOSA},
                    headers={"Authorization": f"Bearer {key}"},
                )
                for client, key in itertools.islice(pairs, count)
            )
        )
    finally:
        for client in clients:
            await client.aclose()
    return [answer.status_code for answer in answers]


def _verified(secret: str, receiver: Receiver) -> list[dict[str, Any]]:
    bodies = []
    for request in receiver.snapshot():
        bodies.append(Webhook(secret).verify(request.body, request.headers))
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(request.body, request.headers)
    return bodies


def _environment(tour_environment: dict[str, str]) -> dict[str, str]:
    return {
        **tour_environment,
        "MODELGATE_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
        "MODELGATE_EVENT_DISPATCH_INTERVAL_SECONDS": "0.1",
    }


@only_on("postgres")
def test_two_servers_send_each_threshold_and_the_exhaustion_once(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = _environment(tour_environment)
    run_cli(environment, tmp_path, "db", "upgrade")
    with running_receiver() as receiver:
        _, keys, secret = _tenant_with_endpoint(environment, tmp_path, receiver, 100, 4)
        with (
            serve(environment, tmp_path, log_path=tmp_path / "a.log") as first,
            serve(environment, tmp_path, log_path=tmp_path / "b.log") as second,
        ):
            statuses = asyncio.run(_predict_concurrently([first, second], keys, 200))
            assert sorted(statuses) == [200] * 100 + [429] * 100
            receiver.wait_for(5)
            time.sleep(1.0)  # long enough for a duplicate to arrive, if one were sent
        bodies = _verified(secret, receiver)
    thresholds = sorted(b["data"]["threshold"] for b in bodies if b["type"] == "usage.threshold")
    assert thresholds == [50, 80, 90, 100]
    assert [b["type"] for b in bodies].count("quota.exhausted") == 1
    assert len(bodies) == 5
    assert len({r.headers["webhook-id"] for r in receiver.snapshot()}) == 5


async def _event_count(database_url: str, tenant_id: str) -> int:
    url = make_url(database_url)
    connection = await asyncpg.connect(
        user=url.username,
        password=url.password,
        host=url.host,
        port=url.port,
        database=url.database,
    )
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM event WHERE tenant_id = $1::uuid", tenant_id
            )
        )
    finally:
        await connection.close()


@only_on("postgres")
def test_an_event_committed_before_a_sigkill_is_delivered_after_restart(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = _environment(tour_environment)
    run_cli(environment, tmp_path, "db", "upgrade")
    with running_receiver() as receiver:
        tenant_id, keys, secret = _tenant_with_endpoint(environment, tmp_path, receiver, 2, 1)
        # This server's dispatcher looks once at start, then not for a minute: the event the
        # prediction commits waits in the outbox when the server is killed.
        asleep = {
            **environment,
            "MODELGATE_EVENT_DISPATCH_INTERVAL_SECONDS": "60",
            "MODELGATE_LOG_LEVEL": "INFO",
        }
        log_path = tmp_path / "killed.log"
        with serve(asleep, tmp_path, log_path=log_path) as port:
            time.sleep(0.5)  # past the dispatcher's first look
            statuses = asyncio.run(_predict_concurrently([port], keys, 1))
            assert statuses == [200]
            assert asyncio.run(_event_count(environment["MODELGATE_DATABASE_URL"], tenant_id)) == 1
            # Committed and not delivered when the worker dies.
            assert receiver.snapshot() == []
            victims = _worker_pids(log_path)
            assert victims, "no worker answered"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
        # Delivered by whichever comes next: a worker the supervisor started again, or the
        # server started afresh.
        with serve(environment, tmp_path):
            receiver.wait_for(1)
            time.sleep(0.5)
        bodies = _verified(secret, receiver)
    assert [(b["type"], b["data"]["threshold"]) for b in bodies] == [("usage.threshold", 50)]


def _worker_pids(log_path: Path) -> set[int]:
    """The processes that answered requests, from the server's access log."""
    pids = set()
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "request":
            pids.add(int(event["pid"]))
    return pids

"""Redis with failover (``MODELGATE_REDIS_URL=redis+sentinel://...``): a real master, its
replica and three Sentinels, two ``modelgate serve`` processes under load, and the master killed
with SIGKILL. Every answer is a 2xx or a 503 (never a 500); 2xx are back for good within the
failover time plus a second; a 20-per-minute key never gets more than 20 in the minute across
the switch; every 2xx is billed; readiness says Redis is unavailable during the failover and
the metrics count the 503s. The checks lost with the old master are measured."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from auth.idempotency import InFlightClaims
from auth.identity.failure_throttle import FailureBudget
from auth.limits.limiter import RateLimiter
from auth.redis_connection import connect_redis
from tests.conftest import IRIS_SETOSA, Backend, make_settings, only_on, recorded_units
from tests.e2e.redis_instances import Sentinels, redis_sentinels
from tests.e2e.servers import run_cli, serve, tenant_and_key
from tests.parallel import quiet_from_here

pytestmark = pytest.mark.e2e

LOAD_LIMIT, TWENTY_LIMIT = "100000/minute", "20/minute"
KILL_AFTER = 2.0  # seconds of load before the master is killed
RUN_AFTER_FAILOVER = 3.0  # seconds of load once the Sentinels promoted the replica


@dataclass(frozen=True)
class Answer:
    sent: float  # monotonic
    answered: float
    status: int


@dataclass
class Run:
    load: list[Answer] = field(default_factory=list)
    twenty: list[Answer] = field(default_factory=list)
    # (monotonic time, status, the readiness body's "redis" check) of each readiness probe
    ready: list[tuple[float, int, str]] = field(default_factory=list)
    # 503s refused for the rate limiter's dependency, per metrics scrape during the failover
    scraped_503: list[float] = field(default_factory=list)
    killed: float = 0.0
    promoted: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def _cli(environment: dict[str, str], cwd: Path, *args: str) -> str:
    return run_cli(environment, cwd, *args).stdout


def _key_of_plan(environment: dict[str, str], cwd: Path, limits: str) -> tuple[str, str]:
    """A new tenant on a new plan with ``limits`` (and a concurrency limit, so that its set of
    requests in flight is on Redis too): (tenant id, API key)."""
    plan = f"p-{uuid.uuid4().hex[:8]}"
    _cli(
        environment,
        cwd,
        *("plans", "create", "--name", plan, "--rate-limits", limits, "--max-in-flight", "100"),
    )
    return tenant_and_key(environment, cwd, "--name", plan, "--plan", plan)


def _rejected_503(metrics_text: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "modelgate_rejections":
            return sum(
                s.value
                for s in family.samples
                if s.name.endswith("_total") and s.labels.get("status") == "503"
            )
    return 0.0


async def _scenario(group: Sentinels, ports: tuple[int, int], load: str, twenty: str) -> Run:
    run = Run()
    client = httpx.AsyncClient(timeout=10)

    async def predict(port: int, key: str) -> Answer:
        sent = time.monotonic()
        response = await client.post(
            f"http://127.0.0.1:{port}/api/v1/predict",
            json={"features": IRIS_SETOSA},
            headers={"Authorization": f"Bearer {key}"},
        )
        return Answer(sent, time.monotonic(), response.status_code)

    async def load_loop(port: int) -> None:
        while not run.stop.is_set():
            run.load.append(await predict(port, load))

    async def twenty_loop() -> None:
        index = 0
        while not run.stop.is_set():
            run.twenty.append(await predict(ports[index % 2], twenty))
            index += 1
            await asyncio.sleep(0.15)

    async def readiness_loop() -> None:
        while not run.stop.is_set():
            for port in ports:
                response = await client.get(f"http://127.0.0.1:{port}/api/v1/health/ready")
                run.ready.append(
                    (time.monotonic(), response.status_code, response.json()["checks"]["redis"])
                )
            await asyncio.sleep(0.1)

    async def failover() -> None:
        await asyncio.sleep(KILL_AFTER)
        old = group.master.port
        run.killed = time.monotonic()
        group.master.kill()
        while await asyncio.to_thread(group.master_port) == old:
            await asyncio.sleep(0.05)
        run.promoted = time.monotonic()
        await asyncio.sleep(RUN_AFTER_FAILOVER)
        run.stop.set()

    async def metrics_loop() -> None:
        # The metrics answer during the failover (they need no Redis) and count its 503s.
        while not run.stop.is_set():
            if run.killed:
                texts = [
                    (await client.get(f"http://127.0.0.1:{port}/metrics")).text for port in ports
                ]
                run.scraped_503.append(sum(_rejected_503(text) for text in texts))
            await asyncio.sleep(0.5)

    try:
        await asyncio.gather(
            failover(),
            twenty_loop(),
            readiness_loop(),
            metrics_loop(),
            *(load_loop(port) for port in ports for _ in range(3)),
        )
    finally:
        await client.aclose()
    return run


def _counted(group: Sentinels, limit: str) -> int:
    """The entries of the moving window of the (only) key with ``limit`` on the master the
    Sentinels now name: the checks Redis still remembers."""
    amount, per = limit.split("/")
    master = next(i for i in (group.master, group.replica) if i.port == group.master_port())
    client = master.client()
    (name,) = list(client.scan_iter(match=f"LIMITS:LIMITER/mg:key/{{*}}/{amount}/1/{per}"))
    return int(client.llen(name))


@only_on("postgres")
def test_a_master_killed_under_load_fails_over_without_a_500_or_an_overrun(
    backend: Backend,
    tour_environment: dict[str, str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The figures measured (failover time, first 2xx after the kill, checks lost) are in the
    test report's ``redis_failover`` user property (``--junitxml`` writes it out)."""

    def prepare() -> list[tuple[str, str]]:
        # The database and keys need no Redis: made while the Sentinels find each other.
        _cli(tour_environment, tmp_path, "db", "upgrade")
        with ThreadPoolExecutor(2) as pool:
            return list(
                pool.map(
                    lambda limit: _key_of_plan(tour_environment, tmp_path, limit),
                    (LOAD_LIMIT, TWENTY_LIMIT),
                )
            )

    with ThreadPoolExecutor(1) as pool:
        prepared = pool.submit(prepare)
        with redis_sentinels(tmp_path / "redis") as group:
            (load_tenant, load_key), (twenty_tenant, twenty_key) = prepared.result()
            environment = {
                **tour_environment,
                "MODELGATE_REDIS_URL": group.url,
                "MODELGATE_PREDICTION_CACHE_TTL_SECONDS": "60",
            }
            with serve(environment, tmp_path) as first, serve(environment, tmp_path) as second:
                quiet_from_here()
                run = asyncio.run(_scenario(group, (first, second), load_key, twenty_key))
                load_counted = _counted(group, LOAD_LIMIT)
                twenty_counted = _counted(group, TWENTY_LIMIT)
    # The servers stopped (and wrote their usage): every 2xx is billed.
    load_served = sum(1 for a in run.load if a.status == 200)
    twenty_served = sum(1 for a in run.twenty if a.status == 200)
    database = environment["MODELGATE_DATABASE_URL"]
    assert asyncio.run(recorded_units(database, load_tenant)) == load_served
    assert asyncio.run(recorded_units(database, twenty_tenant)) == twenty_served

    failover_seconds = run.promoted - run.killed
    # 2xx or 503, never a 500 (the 20-per-minute key: 429 once its minute is spent).
    assert {a.status for a in run.load} <= {200, 503}, {a.status for a in run.load}
    assert {a.status for a in run.twenty} <= {200, 429, 503}
    assert any(a.status == 503 for a in run.load), "the kill was not felt"
    # Back for good within the failover time plus a second: every request sent from then on
    # is served (and there were some).
    back_by = run.promoted + 1.0
    after = [a for a in run.load if a.sent >= back_by]
    assert after
    assert all(a.status == 200 for a in after), [
        (round(a.sent - run.killed, 2), a.status) for a in run.load if a.status != 200
    ]
    # The 20-per-minute key (the run lasts well under a minute): never more than 20, some
    # served before the kill and some after the switch.
    assert twenty_served <= 20, twenty_served
    assert any(a.status == 200 and a.answered < run.killed for a in run.twenty)
    assert any(a.status == 200 and a.sent > run.promoted for a in run.twenty)
    # Readiness: ready before the kill, unready for Redis during the failover, ready after.
    assert all(s == 200 for t, s, _ in run.ready if t < run.killed)
    assert any(s == 503 and redis == "unavailable" for t, s, redis in run.ready if t > run.killed)
    assert all(s == 200 for t, s, _ in run.ready if t > back_by)
    # The metrics answered during the failover and counted its 503s.
    assert run.scraped_503
    assert run.scraped_503[-1] > 0
    # What the old master took with it: checks answered 2xx but missing on the new master (a
    # lost check can only under-count; negative: checks counted whose answer the kill lost).
    # Measured, not asserted (the limit above is); documented in docs/operations.md.
    lost = {
        "load": load_served - load_counted,
        "twenty": twenty_served - twenty_counted,
    }
    resumed = min(a.answered for a in run.load if a.sent > run.killed and a.status == 200)
    request.node.user_properties.append(
        (
            "redis_failover",
            {
                "promoted_after_seconds": round(failover_seconds, 2),
                "first_2xx_after_seconds": round(resumed - run.killed, 2),
                "served": {"load": load_served, "twenty": twenty_served},
                "checks_lost": lost,
            },
        )
    )


@only_on("postgres")  # the backend with Redis
async def test_a_hung_sentinel_costs_a_timeout_not_a_hang(backend: Backend, tmp_path: Path) -> None:
    """The Sentinels' own connections are bounded by MODELGATE_REDIS_TIMEOUT_SECONDS too: with
    the first Sentinel of the URL stopped (its port still accepts connections), a check asks
    the next one within the timeout instead of waiting (5 s without). The failure budgets and
    the Idempotency-Key claims work through the same connection."""
    with redis_sentinels(tmp_path / "redis", failover_ready=False) as group:
        settings = make_settings(
            backend, tmp_path, tmp_path, redis_url=group.url, redis_timeout_seconds=0.5
        )
        connection = connect_redis(settings)
        limiter = RateLimiter(settings, connection.storage)
        try:
            with group.sentinels[0].paused():
                started = time.monotonic()
                async with asyncio.timeout(10):
                    status = await limiter.hit(f"hung-{uuid.uuid4()}", TWENTY_LIMIT)
                assert time.monotonic() - started < 3
            assert status.remaining == 19
            # The other users of the one connection: a failure budget, the Idempotency-Key claims.
            budget = FailureBudget(connection.storage, "2/minute", f"mg:test:{uuid.uuid4()}")
            assert [await budget.spend("203.0.113.9") for _ in range(2)] == [False, True]
            claims = InFlightClaims(connection.client, 30)
            token = await claims.claim(b"scope")
            assert token is not None
            assert await claims.claim(b"scope") is None
            await claims.release(b"scope", token)
            assert await claims.claim(b"scope") is not None
        finally:
            await connection.close()
        # Closing closes the connections to the Sentinels too, not only the master's.
        for sentinel_client in connection.storage.bridge.sentinel.sentinels:
            pool = sentinel_client.connection_pool
            assert not any(c.is_connected for c in pool._available_connections), pool

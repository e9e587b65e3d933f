"""Redis Cluster (``MODELGATE_REDIS_URL=redis+cluster://...``) on a real three-master cluster:
all of one API key's Redis keys (every limit's counters, its requests in flight) share a hash
slot, so that a key with several limits and a concurrency limit is checked by one script, and
exactly, across processes; the prediction cache is shared through the cluster."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from auth.idempotency import InFlightClaims
from auth.identity.failure_throttle import FailureBudget
from auth.limits.concurrency import ConcurrencyLimiter, ConcurrencyLimitExceeded, Slot
from auth.limits.limiter import KeyRateLimitExceeded, RateLimiter
from auth.limits.policy import parse_rate_limits
from auth.redis_connection import connect_redis
from tests.conftest import IRIS_SETOSA, Backend, make_settings, only_on
from tests.e2e.redis_instances import Instance, cluster_url, redis_cluster
from tests.e2e.servers import run_cli, serve

pytestmark = pytest.mark.e2e

STACKED = "30/second;25/minute"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Instance]]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


def _slots_of_keys(nodes: list[Instance], pattern: str) -> dict[str, int]:
    """Every key matching ``pattern`` on any node, and its hash slot."""
    found: dict[str, int] = {}
    for node in nodes:
        client = node.client()
        for name in client.scan_iter(match=pattern):
            found[name.decode()] = int(client.cluster("keyslot", name))
    return found


@only_on("postgres")  # the backend with Redis
@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter", "fixed-window"])
async def test_several_limits_and_the_concurrency_limit_are_exact_on_a_cluster(
    backend: Backend, tmp_path: Path, cluster: list[Instance], strategy: str
) -> None:
    """Two limiters with their own cluster clients, as two processes have: a key with two limits
    and at most 3 requests in flight gets exactly the tighter limit's 25, never a 503; its
    slots are counted once for both; all of its keys are in one slot."""
    settings = make_settings(
        backend, tmp_path, tmp_path, redis_url=cluster_url(cluster), rate_limit_strategy=strategy
    )
    first, second = RateLimiter(settings), RateLimiter(settings)
    processes = [
        (first, ConcurrencyLimiter(first, 60.0)),
        (second, ConcurrencyLimiter(second, 60.0)),
    ]
    key_id = f"cluster-{uuid.uuid4()}"
    assert len(parse_rate_limits(STACKED).items) == 2

    async def hit(process: int, slot_limit: int = 1000) -> Slot:
        limiter, concurrency = processes[process]
        slot = concurrency.slot(key_id, slot_limit)
        await limiter.hit(key_id, STACKED, slot=slot)
        return slot

    try:
        served = 0
        for index in range(40):
            try:
                await (await hit(index % 2)).release()
                served += 1
            except KeyRateLimitExceeded:
                pass
        assert served == 25
        keys = _slots_of_keys(cluster, f"*{key_id}*")
        # Both limits' counters (and the set of requests in flight) exist, in one slot.
        assert len(keys) >= 2, keys
        assert len(set(keys.values())) == 1, keys

        # The concurrency limit, with another key (this one's minute is spent).
        key_id = f"cluster-in-flight-{uuid.uuid4()}"
        held = [await hit(0, 3), await hit(1, 3), await hit(0, 3)]
        for process in (0, 1):
            with pytest.raises(ConcurrencyLimitExceeded):
                await hit(process, 3)
        await held[1].release()
        held[1] = await hit(1, 3)
        with pytest.raises(ConcurrencyLimitExceeded):
            await hit(0, 3)
        for slot in held:
            await slot.release()
        assert len(set(_slots_of_keys(cluster, f"*{key_id}*").values())) == 1
    finally:
        await first.close()
        await second.close()


def _cli(environment: dict[str, str], cwd: Path, *args: str) -> str:
    return run_cli(environment, cwd, *args).stdout


async def _predict(port: int, key: str, features: list[float]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"http://127.0.0.1:{port}/api/v1/predict",
            json={"features": features},
            headers={"Authorization": f"Bearer {key}"},
        )


async def _burst(ports: tuple[int, int], key: str, count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=10) as client:

        async def one(index: int) -> int:
            response = await client.post(
                f"http://127.0.0.1:{ports[index % 2]}/api/v1/predict",
                json={"features": IRIS_SETOSA},
                headers={"Authorization": f"Bearer {key}"},
            )
            return response.status_code

        return await asyncio.gather(*[one(i) for i in range(count)])


@only_on("postgres")
def test_two_servers_on_a_cluster_limit_exactly_and_share_the_cache(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path, cluster: list[Instance]
) -> None:
    """Two ``modelgate serve`` processes on the cluster: one process answers from the cache an
    answer the other computed; a key of a plan with two limits and a concurrency limit gets
    exactly its minute's 25 (the rest 429, no 503)."""
    environment = {
        **tour_environment,
        "MODELGATE_REDIS_URL": cluster_url(cluster),
        "MODELGATE_PREDICTION_CACHE_TTL_SECONDS": "60",
    }
    _cli(environment, tmp_path, "db", "upgrade")
    plan = f"cluster-{uuid.uuid4().hex[:8]}"
    _cli(
        environment,
        tmp_path,
        *("plans", "create", "--name", plan, "--rate-limits", STACKED, "--max-in-flight", "50"),
    )
    tenant = json.loads(
        _cli(environment, tmp_path, "tenants", "create", "--name", "c", "--plan", plan)
    )
    key = _cli(environment, tmp_path, "keys", "issue", "--tenant", tenant["id"]).splitlines()[-1]
    with serve(environment, tmp_path) as first, serve(environment, tmp_path) as second:
        # The cache first: an answer computed by one process is served by the other.
        features = [5.0, 3.4, 1.5, 0.2]
        computed = asyncio.run(_predict(first, key, features))
        reused = asyncio.run(_predict(second, key, features))
        assert computed.status_code == reused.status_code == 200
        assert computed.json()["cached"] is False
        assert reused.json()["cached"] is True
        assert reused.json()["prediction"] == computed.json()["prediction"]
        # Then the limits: 23 of the minute's 25 are left (a cached answer is billed and
        # counted all the same), whichever process takes the request.
        statuses: list[int] = []
        for _ in range(4):
            statuses += asyncio.run(_burst((first, second), key, 10))
        assert sorted(statuses) == [200] * 23 + [429] * 17, statuses
    # The cache's entries are on the cluster.
    assert _slots_of_keys(cluster, "mg:pc:*")


def test_a_cluster_refuses_keys_of_two_slots_in_one_script(cluster: list[Instance]) -> None:
    """Why the hash tags: without them a key's limits land in different slots, and Redis
    Cluster refuses the script that touches them (the 503 of every request of such a key)."""
    client = redis.RedisCluster(host="127.0.0.1", port=cluster[0].port)
    try:
        untagged = ["LIMITS:LIMITER/mg:key/k/30/1/second", "LIMITS:LIMITER/mg:key/k/25/1/minute"]
        tagged = ["LIMITS:LIMITER/mg:key/{k}/30/1/second", "LIMITS:LIMITER/mg:key/{k}/25/1/minute"]
        assert client.keyslot(untagged[0]) != client.keyslot(untagged[1])
        assert client.keyslot(tagged[0]) == client.keyslot(tagged[1])
        with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
            client.eval("return 1", 2, *untagged)
        assert client.eval("return 1", 2, *tagged) == 1
    finally:
        client.close()


@only_on("postgres")
async def test_the_other_redis_users_work_on_a_cluster(
    backend: Backend, tmp_path: Path, cluster: list[Instance]
) -> None:
    """Through the one connection (``auth.redis_connection``): the failure budgets (a script
    per address), the Idempotency-Key claims (SET NX and a compare-and-delete script) and the
    rate limiter again after every node forgot its script (SCRIPT FLUSH: a restarted node)."""
    settings = make_settings(backend, tmp_path, tmp_path, redis_url=cluster_url(cluster))
    connection = connect_redis(settings)
    limiter = RateLimiter(settings, connection.storage)
    try:
        budget = FailureBudget(connection.storage, "3/minute", f"mg:test:{uuid.uuid4()}")
        assert [await budget.spend("203.0.113.9") for _ in range(3)] == [False, False, True]
        assert await budget.retry_after("203.0.113.9") is not None
        assert await budget.retry_after("203.0.113.10") is None

        claims = InFlightClaims(connection.client, 30)
        scope = uuid.uuid4().bytes
        token = await claims.claim(scope)
        assert token is not None
        assert await claims.claim(scope) is None
        await claims.release(scope, token)
        assert await claims.claim(scope) is not None

        key_id = f"flushed-{uuid.uuid4()}"
        await limiter.hit(key_id, STACKED)
        for node in cluster:
            node.client().script_flush()
        status = await limiter.hit(key_id, STACKED)
        assert status.remaining == 23
    finally:
        await connection.close()

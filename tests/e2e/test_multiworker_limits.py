"""SECURITY.md line 13 across processes: one key's limits hold exactly over two workers, and over
two separate server processes, sharing Redis, whatever socket address or X-Forwarded-For its
requests come with; another key behind the same addresses is unaffected; several limits stop at
the tightest; the concurrency limit is counted once for every process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import create_async_engine

from auth.limits.concurrency import ConcurrencyLimiter, ConcurrencyLimitExceeded, Slot
from auth.limits.limiter import RateLimiter
from auth.models import Tenant
from tests.conftest import IRIS_SETOSA, Backend, make_settings, only_on
from tests.e2e.servers import run_cli, serve

pytestmark = pytest.mark.e2e


def _cli(environment: dict[str, str], cwd: Path, *args: str) -> str:
    return run_cli(environment, cwd, *args).stdout


# Loopback addresses the requests are sent from (all of 127.0.0.0/8 is local on Linux): the
# server sees several socket addresses as well as several X-Forwarded-For values.
SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


async def _fire(port: int, key: str, count: int) -> list[int]:
    """``count`` concurrent predictions with ``key``, spread over the source addresses, each
    claiming another origin in X-Forwarded-For."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}/api/v1",
                    transport=httpx.AsyncHTTPTransport(local_address=source),
                )
            )
            for source in SOURCES
        ]

        async def one(index: int) -> int:
            headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": f"10.0.0.{index}"}
            response = await clients[index % len(clients)].post(
                "/predict", json={"features": IRIS_SETOSA}, headers=headers
            )
            return response.status_code

        return await asyncio.gather(*[one(i) for i in range(count)])


# Several workers need the shared Redis limiter: the embedded default refuses them.
@only_on("postgres")
def test_rate_limit_is_exact_across_two_workers(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    _cli(tour_environment, tmp_path, "db", "upgrade")
    tenant = json.loads(
        _cli(
            tour_environment,
            tmp_path,
            "tenants",
            "create",
            "--name",
            "limited",
            "--rate-limit",
            "10/minute",
        )
    )
    keys = [
        _cli(tour_environment, tmp_path, "keys", "issue", "--tenant", tenant["id"])
        .strip()
        .splitlines()[-1]
        for _ in range(2)
    ]
    with serve(tour_environment, tmp_path, workers=2) as port:
        # One key from three socket addresses and thirty claimed origins: one limit.
        statuses = asyncio.run(_fire(port, keys[0], 30))
        assert statuses.count(200) == 10, statuses
        assert statuses.count(429) == 20
        # Another key from the very same addresses and claimed origins: its own limit.
        other = asyncio.run(_fire(port, keys[1], 12))
        assert sorted(other) == [200] * 10 + [429] * 2, other


def _set_rate_limit(environment: dict[str, str], tenant_id: str, rate_limits: str) -> None:
    """Store a limit string on the tenant's row, as the plan system will (several limits, or a
    window of several seconds, which the API's one-limit field does not take)."""

    async def run() -> None:
        engine = create_async_engine(environment["MODELGATE_DATABASE_URL"])
        try:
            async with engine.begin() as connection:
                await connection.execute(
                    update(Tenant)
                    .where(Tenant.id == uuid.UUID(tenant_id))
                    .values(rate_limit=rate_limits)
                )
        finally:
            await engine.dispose()

    asyncio.run(run())


def _tenant_with_keys(
    environment: dict[str, str], cwd: Path, rate_limits: str, keys: int = 1
) -> list[str]:
    tenant = json.loads(_cli(environment, cwd, "tenants", "create", "--name", f"t-{uuid.uuid4()}"))
    _set_rate_limit(environment, tenant["id"], rate_limits)
    return [
        _cli(environment, cwd, "keys", "issue", "--tenant", tenant["id"]).strip().splitlines()[-1]
        for _ in range(keys)
    ]


async def _round(ports: tuple[int, int], key: str, count: int) -> list[tuple[int, int]]:
    """``count`` concurrent predictions with ``key``, alternating between the two servers;
    (port, status) of each."""
    async with httpx.AsyncClient(timeout=10) as client:

        async def one(index: int) -> tuple[int, int]:
            port = ports[index % 2]
            response = await client.post(
                f"http://127.0.0.1:{port}/api/v1/predict",
                json={"features": IRIS_SETOSA},
                headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": f"10.0.0.{index}"},
            )
            return port, response.status_code

        return await asyncio.gather(*[one(i) for i in range(count)])


async def _rounds(
    ports: tuple[int, int], key: str, rounds: int, per_round: int, pause: float = 0.0
) -> list[tuple[int, int]]:
    answers: list[tuple[int, int]] = []
    for index in range(rounds):
        if index and pause:
            await asyncio.sleep(pause)
        answers.extend(await _round(ports, key, per_round))
    return answers


def _served(answers: list[tuple[int, int]]) -> int:
    return sum(1 for _, status in answers if status == 200)


@contextlib.contextmanager
def _two_servers(environment: dict[str, str], cwd: Path) -> Iterator[tuple[int, int]]:
    """Two separate ``modelgate serve`` processes (one worker each) on their own ports, sharing
    the database and Redis."""
    with serve(environment, cwd) as first, serve(environment, cwd) as second:
        assert first != second
        yield first, second


@only_on("postgres")
def test_limits_hold_exactly_across_two_separate_server_processes(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    _cli(tour_environment, tmp_path, "db", "upgrade")
    limited, other = _tenant_with_keys(tour_environment, tmp_path, "20/minute", keys=2)
    (stacked,) = _tenant_with_keys(tour_environment, tmp_path, "10/second;25/minute")
    with _two_servers(tour_environment, tmp_path) as ports:
        # 60 rapid requests, ten at a time, half to each process: exactly 20 served.
        answers = asyncio.run(_rounds(ports, limited, rounds=6, per_round=10))
        assert _served(answers) == 20, answers
        assert sorted(status for _, status in answers) == [200] * 20 + [429] * 40
        # Both processes served some of them: the count is shared, not per process.
        per_port = {port: sum(1 for p, s in answers if p == port and s == 200) for port in ports}
        assert all(per_port.values()), per_port
        # Another key of the same tenant: its own 20.
        assert _served(asyncio.run(_rounds(ports, other, rounds=3, per_round=10))) == 20

        # "10/second;25/minute": bursts of 12 two seconds apart. The second refuses 2 of each;
        # those refusals cost the minute nothing, so the third burst gets the minute's last 5.
        bursts = []
        for index in range(4):
            if index:
                time.sleep(2.05)
            bursts.append(_served(asyncio.run(_round(ports, stacked, 12))))
        assert bursts == [10, 10, 5, 0], bursts


# Where a window ends, a limit must not let a second burst through on top of the first. The
# default strategy, the moving window, is exact by construction: no 2-second span holds more
# than 10. The sliding window counter weighs the previous window by how much of it is left and
# rounds down, so a burst a few tenths of a second after the edge got one request more here
# (11), never the 19 or 20 a fixed window lets through.
@only_on("postgres")
@pytest.mark.parametrize(("strategy", "most"), [(None, 10), ("sliding-window-counter", 11)])
def test_no_burst_across_a_window_edge_over_two_processes(
    backend: Backend,
    tour_environment: dict[str, str],
    tmp_path: Path,
    strategy: str | None,
    most: int,
) -> None:
    _cli(tour_environment, tmp_path, "db", "upgrade")
    (key,) = _tenant_with_keys(tour_environment, tmp_path, "10 per 2 seconds")
    # None: the default strategy, which must be exact (the moving window).
    environment = dict(tour_environment)
    if strategy is not None:
        environment["MODELGATE_RATE_LIMIT_STRATEGY"] = strategy
    with _two_servers(environment, tmp_path) as ports:

        async def scenario() -> tuple[int, int, int]:
            opening = _served(await _round(ports, key, 1))
            await asyncio.sleep(1.75)
            before = _served(await _round(ports, key, 12))
            await asyncio.sleep(0.35)  # past the edge of the window the opening request opened
            after = _served(await _round(ports, key, 12))
            return opening, before, after

        opening, before, after = asyncio.run(scenario())
    assert opening == 1
    assert opening + before <= 10  # within the first window
    assert before + after <= most, (before, after)  # within 0.4 s of each other
    assert before >= 8  # the limit was used up before the edge, so the test means something


@only_on("postgres")
async def test_max_in_flight_holds_across_processes_sharing_redis(
    backend: Backend, tmp_path: Path
) -> None:
    """Two limiters, each with its own Redis client, as two processes have: the key's slots are
    counted once for both (taken with the rate-limit check, as a request takes them); a slot a
    dead process never gave back is dropped after the slot TTL."""
    settings = make_settings(backend, tmp_path, tmp_path, concurrency_slot_ttl_seconds=1.0)
    first, second = RateLimiter(settings), RateLimiter(settings)
    processes = [(first, ConcurrencyLimiter(first, 1.0)), (second, ConcurrencyLimiter(second, 1.0))]
    key_id = f"in-flight-{uuid.uuid4()}"

    async def acquire(process: int) -> Slot:
        limiter, concurrency = processes[process]
        slot = concurrency.slot(key_id, 3)
        await limiter.hit(key_id, "1000/minute", slot=slot)
        return slot

    try:
        held = [await acquire(0), await acquire(1)]
        held.append(await acquire(0))
        for process in (0, 1):
            with pytest.raises(ConcurrencyLimitExceeded):
                await acquire(process)
        await held[1].release()
        await held[1].release()  # twice: given back once
        replacement = await acquire(0)
        with pytest.raises(ConcurrencyLimitExceeded):
            await acquire(1)
        # The first process dies holding its slots (nothing releases them): after the TTL
        # the other process may use them.
        del held, replacement
        await asyncio.sleep(1.1)
        survivors = [await acquire(1) for _ in range(3)]
        with pytest.raises(ConcurrencyLimitExceeded):
            await acquire(1)
        for slot in survivors:
            await slot.release()
    finally:
        await first.close()
        await second.close()

"""Fixtures of the API tests that more than one module uses."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from limits.aio import strategies as limits_strategies
from limits.aio.storage import memory as limits_memory

from auth.limits import limiter as limiter_module
from auth.limits.limiter import RateLimiter
from tests.conftest import Backend


class LimiterClock:
    """The clock the rate limiters of this process see, moved only by the test.

    It is ``time.time()`` as ``auth.limits.limiter`` reads it (the moving window's timestamps,
    on Redis too) and as limits' in-memory storage and strategies read it. On Redis the fixed
    window and the sliding window counter measure time by their keys' TTLs, in Redis's own
    clock: moving this clock ages the keys of the ids given by as much, so that every strategy
    sees the same time pass. Real time passes as well, but a burst's checks reach Redis in one
    pipeline, and the margins the tests leave (a minute either side of an hour's window's edge)
    are far more than a loaded machine adds: no outcome depends on the machine's speed. Starts
    on a whole hour, where limits' in-memory sliding windows begin (and so every minute's and
    second's)."""

    def __init__(self, redis_url: str) -> None:
        self.now = float(math.ceil(time.time() / 3600) * 3600)
        self._redis_url = redis_url

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        # Everything else (monotonic, for the limiter's outage bookkeeping) is the real clock's.
        return getattr(time, name)

    async def advance(self, seconds: float, *ids: str) -> None:
        """Move the clock on; on Redis, age the limiter keys of ``ids`` as much."""
        self.now += seconds
        if not self._redis_url:
            return
        aged = int(seconds * 1000)
        async with redis_asyncio.Redis.from_url(self._redis_url) as client:
            for counted in ids:
                async for name in client.scan_iter(match=f"*{counted}*"):
                    ttl = await client.pttl(name)
                    if 0 < ttl <= aged:
                        await client.delete(name)
                    elif ttl > aged:
                        await client.pexpire(name, ttl - aged)


@pytest.fixture
def limiter_clock(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> LimiterClock:
    """The rate limiters' clock, in the test's hands (``LimiterClock``)."""
    clock = LimiterClock(backend.redis_url)
    for module in (limiter_module, limits_memory, limits_strategies):
        monkeypatch.setattr(module, "time", clock)
    return clock


def pipelines_sent(limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the pipelines ``limiter`` sends to Redis from now on, one entry each."""
    assert limiter._redis is not None
    pipelined = limiter._redis.pipeline
    sent: list[int] = []
    execute = pipelined._execute

    async def counting(batch: list[Any]) -> list[Any]:
        sent.append(len(batch))
        return await execute(batch)

    monkeypatch.setattr(pipelined, "_execute", counting)
    return sent

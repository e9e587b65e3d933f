"""Leased permits (auth.limits.leases): a worker spends a block of a busy key's permits without a
round trip, and no span or window ever admits more than the limit across workers. Here two
limiters sharing the real Redis stand for two workers, on the test's clock (``limiter_clock``);
tests/e2e/test_multiworker_limits.py proves the same across two real worker processes, one of
them killed holding a lease."""

from __future__ import annotations

import asyncio
import bisect
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from auth.limits.leases import lease_terms
from auth.limits.limiter import KeyRateLimitExceeded, RateLimiter
from auth.limits.policy import parse_rate_limits
from tests.api.conftest import LimiterClock, pipelines_sent
from tests.conftest import Backend, make_settings, only_on

LIMIT, AMOUNT, WINDOW = "300/minute", 300, 60
# The largest block of a 300/minute key: 1/50 of it.
BLOCK = 6


async def _fire(workers: list[RateLimiter], key_id: str, count: int) -> int:
    """``count`` concurrent checks spread over the workers; how many were admitted."""

    async def one(index: int) -> bool:
        try:
            await workers[index % len(workers)].hit(key_id, LIMIT)
        except KeyRateLimitExceeded:
            return False
        return True

    return sum(await asyncio.gather(*[one(i) for i in range(count)]))


async def _workers(backend: Backend, tmp_path: Path, **overrides: Any) -> list[RateLimiter]:
    assert backend.redis_url, "only on the backend with Redis (only_on)"
    settings = make_settings(backend, tmp_path, tmp_path, **overrides)
    return [RateLimiter(settings), RateLimiter(settings)]


def _held(worker: RateLimiter, key_id: str) -> int:
    """The permits ``worker`` holds for the key, leased and not yet spent."""
    return worker._leases._lease(key_id, parse_rate_limits(LIMIT)).left


def test_only_busy_keys_of_long_windows_are_leased() -> None:
    """Under 100 per window, or a window under a minute, or a block under 2: every request is
    checked in Redis; otherwise a block is at most 1/50 of the smallest limit and the setting."""
    assert lease_terms(parse_rate_limits("99/minute"), 64) is None
    assert lease_terms(parse_rate_limits("100000/second"), 64) is None
    assert lease_terms(parse_rate_limits("10/second;100000/hour"), 64) is None
    assert lease_terms(parse_rate_limits("300/minute"), 0) is None
    terms = lease_terms(parse_rate_limits(LIMIT), 64)
    assert terms is not None
    assert (terms.max_block, terms.lifetime) == (BLOCK, 1)
    terms = lease_terms(parse_rate_limits("1000000/minute;5000/hour"), 64)
    assert terms is not None
    assert terms.max_block == 64


@only_on("postgres")  # the backend with Redis
async def test_a_burst_of_a_busy_key_takes_its_blocks_in_one_round_trip(
    backend: Backend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limiter_clock: LimiterClock,
) -> None:
    """20 concurrent requests of a fresh key ask for blocks of 1, 2, 4, 8 and 16, in one
    pipeline; the 11 permits left over serve the next 11 requests with no round trip. (On the
    test's clock: a loaded machine taking a second over it must not lapse the lease.)"""
    limiter = RateLimiter(make_settings(backend, tmp_path, tmp_path))
    sent = pipelines_sent(limiter, monkeypatch)
    key_id = f"busy-{uuid.uuid4()}"
    try:
        await asyncio.gather(*[limiter.hit(key_id, "1000/minute") for _ in range(20)])
        assert sent == [5]
        for _ in range(11):
            status = await limiter.hit(key_id, "1000/minute")
        assert sent == [5]
        # Every permit leased is counted in Redis: 31 of 1000, none of them left.
        assert status.remaining == 1000 - 31
        await limiter.hit(key_id, "1000/minute")
        assert len(sent) == 2
    finally:
        await limiter.close()


@only_on("postgres")  # the backend with Redis
async def test_two_workers_leasing_admit_the_limit_and_at_most_a_block_each_less(
    backend: Backend, tmp_path: Path
) -> None:
    """Waves of concurrent requests over two workers until the key is refused: never more than
    the limit, and no fewer than the limit less a block held by each worker."""
    workers = await _workers(backend, tmp_path)
    key_id = f"waves-{uuid.uuid4()}"
    try:
        admitted = 0
        for wave in range(12):
            admitted += await _fire(workers, key_id, 16 + wave * 8)
        assert AMOUNT - 2 * BLOCK <= admitted <= AMOUNT, admitted
    finally:
        for worker in workers:
            await worker.close()


@only_on("postgres")  # the backend with Redis
async def test_no_span_of_a_window_admits_more_than_the_limit_across_two_workers(
    backend: Backend, tmp_path: Path, limiter_clock: LimiterClock
) -> None:
    """Four minutes of the test's clock in irregular steps, bursts of 0 to 60 requests over two
    workers (the moving window, the default): every span of 60 s, wherever it starts, holds at
    most 300 admitted requests, timed when each was admitted, however the leases fell; and the
    key is served again once its permits age out (it is not refused for good)."""
    workers = await _workers(backend, tmp_path)
    key_id = f"spans-{uuid.uuid4()}"
    rng = random.Random(21)  # noqa: S311 (a reproducible schedule, not a secret)
    admitted_at: list[float] = []
    end = limiter_clock.now + 4 * WINDOW
    try:
        while limiter_clock.now < end:
            burst = rng.choice((0, 1, 3, 8, 20, 60))
            admitted = await _fire(workers, key_id, burst)
            admitted_at.extend([limiter_clock.now] * admitted)
            await limiter_clock.advance(rng.choice((0.05, 0.3, 0.7, 1.1, 2.5, 7.0)), key_id)
    finally:
        for worker in workers:
            await worker.close()
    assert _busiest_span(admitted_at) <= AMOUNT
    # Four minutes of a limit that is reached within each: most of four windows' worth served.
    assert len(admitted_at) >= 3 * AMOUNT, len(admitted_at)


@only_on("postgres")  # the backend with Redis
async def test_permits_left_in_a_lease_are_not_spent_past_it(
    backend: Backend, tmp_path: Path, limiter_clock: LimiterClock
) -> None:
    """A worker holds a lease with permits left when its window is filled; past the window's
    end it must not spend them (counted in the old window), so the next window admits at most
    the limit."""
    first, second = await _workers(backend, tmp_path)
    key_id = f"lapse-{uuid.uuid4()}"
    try:
        # The first worker's lease grows to a block with permits left over.
        await asyncio.gather(*[first.hit(key_id, LIMIT) for _ in range(8)])
        held = _held(first, key_id)
        assert held > 0
        # The second fills the window (keeping what its last lease left, if anything).
        filled = 0
        for _ in range(10):
            filled += await _fire([second], key_id, 60)
        assert filled + _held(second, key_id) == AMOUNT - 8 - held
        await limiter_clock.advance(WINDOW + 1.5, key_id)
        again = 0
        for _ in range(10):
            again += await _fire([first, second], key_id, 60)
        assert again <= AMOUNT, (again, held)
    finally:
        await first.close()
        await second.close()


async def _counted(backend: Backend, key_id: str) -> int:
    """The permits Redis counts for the key's window (its moving window's entries)."""
    assert backend.redis_url
    async with redis_asyncio.Redis.from_url(backend.redis_url) as client:
        names = [name async for name in client.scan_iter(match=f"*{{{key_id}}}*")]
        assert len(names) == 1, names
        return int(await client.llen(names[0]))


@only_on("postgres")  # the backend with Redis
async def test_what_a_lease_leaves_unspent_is_given_back_when_it_lapses_or_the_worker_stops(
    backend: Backend, tmp_path: Path
) -> None:
    """A burst leaves permits leased and unspent: Redis counts them until the lease lapses
    (1 s), then only the requests served; likewise when the worker stops before the lapse."""
    lapsing, stopping = await _workers(backend, tmp_path)
    lapsing_key, stopping_key = f"lapse-{uuid.uuid4()}", f"stop-{uuid.uuid4()}"
    try:
        assert await _fire([lapsing], lapsing_key, 8) == 8
        held = _held(lapsing, lapsing_key)
        assert held > 0
        assert await _counted(backend, lapsing_key) == 8 + held
        await asyncio.sleep(1.3)
        assert await _counted(backend, lapsing_key) == 8
        assert _held(lapsing, lapsing_key) == 0

        assert await _fire([stopping], stopping_key, 8) == 8
        assert await _counted(backend, stopping_key) == 8 + _held(stopping, stopping_key) > 8
    finally:
        await lapsing.close()
        await stopping.close()
    assert await _counted(backend, stopping_key) == 8


@only_on("postgres")  # the backend with Redis
@pytest.mark.parametrize("strategy", ["sliding-window-counter", "fixed-window"])
async def test_other_strategies_check_every_request_in_redis(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """Only the moving window is leased: on the others every request is its own check."""
    limiter = RateLimiter(make_settings(backend, tmp_path, tmp_path, rate_limit_strategy=strategy))
    sent = pipelines_sent(limiter, monkeypatch)
    try:
        await limiter.hit(f"k-{uuid.uuid4()}", LIMIT)
        key_id = f"each-{uuid.uuid4()}"
        await asyncio.gather(*[limiter.hit(key_id, LIMIT) for _ in range(20)])
        assert sent == [1, 20]
    finally:
        await limiter.close()


def _busiest_span(admitted_at: list[float]) -> int:
    """The most requests admitted within any span of a window's length (both ends included, as
    the moving window counts)."""
    times = sorted(admitted_at)
    return max(
        bisect.bisect_right(times, start + WINDOW) - bisect.bisect_left(times, start)
        for start in times
    )


@only_on("postgres")  # the backend with Redis
async def test_a_lease_spent_late_in_its_life_counts_from_when_it_was_spent(
    backend: Backend, tmp_path: Path, limiter_clock: LimiterClock
) -> None:
    """A lease taken at 0 s and spent at 0.9 s, the window filled then: at 60.5 s the window
    that ends then still holds the permits spent at 0.9 s, so nothing more is admitted until
    they age out (a lease counted from when it was granted would let a burst through here)."""
    first, second = await _workers(backend, tmp_path)
    key_id = f"late-{uuid.uuid4()}"
    admitted_at: list[float] = []
    start = limiter_clock.now
    try:
        admitted_at += [limiter_clock.now] * await _fire([first], key_id, 8)
        held = _held(first, key_id)
        assert held > 0
        await limiter_clock.advance(0.9, key_id)
        admitted_at += [limiter_clock.now] * await _fire([first], key_id, held)
        assert _held(first, key_id) == 0
        for _ in range(10):
            admitted_at += [limiter_clock.now] * await _fire([second], key_id, 60)
        assert len(admitted_at) >= AMOUNT - BLOCK
        await limiter_clock.advance(start + WINDOW + 0.5 - limiter_clock.now, key_id)
        admitted_at += [limiter_clock.now] * await _fire([second], key_id, 60)
    finally:
        await first.close()
        await second.close()
    assert _busiest_span(admitted_at) <= AMOUNT

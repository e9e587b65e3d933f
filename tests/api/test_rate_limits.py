"""Per-key rate limits (SECURITY.md line 13, in one process). Claims that a limit is per key
are proved with requests from varying socket addresses and X-Forwarded-For values."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from limits.aio import strategies as limits_strategies
from limits.aio.storage import MemoryStorage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from sqlalchemy import func, select

from auth.errors import DependencyUnavailable
from auth.limits.limiter import (
    KeyRateLimitExceeded,
    RateLimiter,
    _sliding_window_stats,
    parse_rate_limit,
)
from auth.models import UsageRecord
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    only_on,
)


@asynccontextmanager
async def _client_from(harness: Harness, host: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the same app whose requests come from the socket address ``host``."""
    app = harness.client._transport.app  # type: ignore[attr-defined]
    transport = httpx.ASGITransport(app=app, client=(host, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def _predict_from(
    harness: Harness, key: str, host: str, forwarded_for: str
) -> httpx.Response:
    async with _client_from(harness, host) as client:
        return await client.post(
            "/api/v1/predict",
            json={"features": IRIS_SETOSA},
            headers={**bearer(key), "X-Forwarded-For": forwarded_for},
        )


async def test_one_key_behind_many_addresses_shares_one_limit(harness: Harness) -> None:
    """A limit keyed on the socket address or on X-Forwarded-For would let every request of
    this key through: each one comes from another address and claims another origin."""
    _, key = await create_tenant_with_key(harness, rate_limit="3/minute")
    responses = [
        await _predict_from(harness, key, f"192.0.2.{i}", f"203.0.113.{i}") for i in range(1, 5)
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
    limited = responses[-1]
    assert limited.json()["type"] == "rate-limited"
    assert limited.json()["detail"] == "rate limit exceeded: 3 per 1 minute"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Limit"] == "3"
    assert int(limited.headers["X-RateLimit-Reset"]) > 0


async def test_two_keys_behind_one_address_have_their_own_limits(harness: Harness) -> None:
    """A limit keyed on the address (socket or X-Forwarded-For) would refuse the second key: it
    arrives from exactly where the first one used up its budget."""
    _, first = await create_tenant_with_key(harness, rate_limit="3/minute")
    _, second = await create_tenant_with_key(harness, rate_limit="3/minute")
    address, forwarded_for = "192.0.2.77", "203.0.113.77"
    used = [(await _predict_from(harness, first, address, forwarded_for)) for _ in range(4)]
    assert [r.status_code for r in used] == [200, 200, 200, 429]
    fresh = [(await _predict_from(harness, second, address, forwarded_for)) for _ in range(4)]
    assert [r.status_code for r in fresh] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in fresh] == ["2", "1", "0", "0"]


async def test_rate_limited_requests_are_not_billed(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, rate_limit="1/minute")
    await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    for _ in range(3):
        limited = await harness.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert limited.status_code == 429
    async with harness.sessionmaker() as session:
        count = await session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant.id)
        )
    assert count == 1


async def _burst(limiter: RateLimiter, key_id: str, count: int) -> int:
    """Fire ``count`` concurrent checks; how many were allowed."""

    async def one() -> bool:
        try:
            await limiter.hit(key_id, "10/second")
        except KeyRateLimitExceeded:
            return False
        return True

    return sum(await asyncio.gather(*[one() for _ in range(count)]))


@pytest.mark.parametrize(
    ("strategy", "exact"),
    [("sliding-window-counter", True), ("moving-window", True), ("fixed-window", False)],
)
async def test_no_burst_at_a_window_edge(
    backend: Backend, tmp_path: Path, strategy: str, exact: bool
) -> None:
    """One request opens the window, the limit is filled just before it ends and tried again
    just after: an exact strategy keeps any second at about the limit (10), a fixed window lets
    nearly twice the limit through in 0.15 s, which is why it is not the default."""
    settings = make_settings(backend, tmp_path, tmp_path, rate_limit_strategy=strategy)
    limiter = RateLimiter(settings)
    key_id = f"edge-{uuid.uuid4()}"
    try:
        opening = await _burst(limiter, key_id, 1)
        await asyncio.sleep(0.9)
        before = await _burst(limiter, key_id, 10)
        await asyncio.sleep(0.15)
        after = await _burst(limiter, key_id, 10)
    finally:
        await limiter.close()
    assert opening == 1
    assert before >= 9  # the opening request may already count less in a sliding window
    # before + after were allowed within 0.15 s, well inside one second.
    if exact:
        assert before + after <= 11, (before, after)
    else:
        assert before + after >= 18, (before, after)


async def test_rate_limit_headers_come_from_the_same_answer(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness, rate_limit="5/minute")
    remaining = []
    for i in range(5):
        sent = time.time()
        # From another address each time: the headers follow the key, not the client.
        response = await _predict_from(harness, key, f"198.51.100.{i}", f"203.0.113.{i}")
        assert response.status_code == 200
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
        # Later than the request (not "now"), within the minute.
        assert sent < int(response.headers["X-RateLimit-Reset"]) <= time.time() + 61
    assert remaining == [4, 3, 2, 1, 0]


class _ScriptReply:
    """Stands in for limits' redis-py bridge, so that its own code turns a raw reply of the
    sliding-window script into the figures its strategy works from."""

    def __init__(self, window: object) -> None:
        self.window = window

    def prefixed_key(self, key: str) -> str:
        return key

    async def lua_sliding_window(self, _keys: object, _args: object) -> object:
        return self.window


@pytest.mark.parametrize("limit", ["10/second", "7/minute", "100/hour"])
@pytest.mark.parametrize(
    "window",
    [
        None,
        [],
        [0, -2, 0, -2],
        [3, 400, 0, -2],
        [0, -2, 4, 900],
        [3, 400, 5, 950],
        [3, 600, 5, 950],
        [1, 700, 0, -2],
        [1, 250, 1, 750],
        [2, 1000, 0, -1],
        [10, 999, 10, 1000],
        [7, 59_000, 3, 1_500],
    ],
)
async def test_sliding_window_figures_are_those_of_limits(
    monkeypatch: pytest.MonkeyPatch, limit: str, window: list[int] | None
) -> None:
    """The X-RateLimit-Remaining and -Reset a Redis check reports, computed from the script's
    reply, are what limits' own SlidingWindowCounterRateLimiter reports for the same reply."""
    item = parse_rate_limit(limit)
    now = 1_700_000_000.25
    monkeypatch.setattr(limits_strategies.time, "time", lambda: now)
    figures = await RedispyBridge.get_sliding_window(
        _ScriptReply(window),  # type: ignore[arg-type]
        "previous",
        "current",
        item.get_expiry(),
    )
    storage = MemoryStorage()

    async def get_sliding_window(_key: str, _expiry: int) -> tuple[int, float, int, float]:
        return figures

    monkeypatch.setattr(storage, "get_sliding_window", get_sliding_window)
    expected = await SlidingWindowCounterRateLimiter(storage).get_window_stats(item, "k")
    ours = _sliding_window_stats(item, window, now)
    assert ours.remaining == expected.remaining
    assert ours.reset_time == pytest.approx(expected.reset_time, abs=1e-6)


@only_on("postgres")  # the backend with Redis
async def test_concurrent_checks_share_one_redis_round_trip(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks of requests that arrive together go to Redis in one pipeline, and each
    request gets its own answer back."""
    limiter = RateLimiter(make_settings(backend, tmp_path, tmp_path))
    pipelined = limiter._redis
    assert pipelined is not None
    sent: list[int] = []
    execute = pipelined._execute

    async def counting(batch: list[Any]) -> list[Any]:
        sent.append(len(batch))
        return await execute(batch)

    monkeypatch.setattr(pipelined, "_execute", counting)
    key_id = f"together-{uuid.uuid4()}"
    try:
        statuses = await asyncio.gather(*[limiter.hit(key_id, "100/minute") for _ in range(20)])
        assert sent == [20]
        assert sorted(status.remaining for status in statuses) == list(range(80, 100))
        # The next turn of the event loop is a pipeline of its own.
        assert (await limiter.hit(key_id, "100/minute")).remaining == 79
        assert sent == [20, 1]
    finally:
        await limiter.close()


async def _redis_limiter(backend: Backend, tmp_path: Path, **overrides: Any) -> RateLimiter:
    assert backend.redis_url, "only on the backend with Redis (only_on)"
    return RateLimiter(make_settings(backend, tmp_path, tmp_path, **overrides))


@only_on("postgres")  # the backend with Redis
async def test_a_request_gone_from_a_pipeline_leaves_the_others_answered(
    backend: Backend, tmp_path: Path
) -> None:
    limiter = await _redis_limiter(backend, tmp_path)
    key_id = f"gone-{uuid.uuid4()}"
    try:
        checks = [asyncio.ensure_future(limiter.hit(key_id, "100/minute")) for _ in range(5)]
        await asyncio.sleep(0)  # every check is queued for the same pipeline, not yet sent
        checks[0].cancel()
        async with asyncio.timeout(5):
            answered = await asyncio.gather(*checks[1:])
        assert checks[0].cancelled()
        # The cancelled check was still sent (and counted): four answers among 95..98.
        assert sorted(status.remaining for status in answered) == [95, 96, 97, 98]
    finally:
        await limiter.close()


@only_on("postgres")  # the backend with Redis
async def test_a_failing_check_fails_its_request_only(backend: Backend, tmp_path: Path) -> None:
    """One key's script fails inside a pipeline (its Redis key holds the wrong type): that
    request fails closed, the other requests of the same pipeline are answered."""
    limiter = await _redis_limiter(backend, tmp_path)
    broken, fine = f"broken-{uuid.uuid4()}", f"fine-{uuid.uuid4()}"
    item = parse_rate_limit("100/minute")
    with redis.Redis.from_url(backend.redis_url) as client:
        for name in limiter._redis_keys(item, broken):
            client.hset(name, "not", "a counter")
    try:
        async with asyncio.timeout(5):
            results = await asyncio.gather(
                limiter.hit(fine, "100/minute"),
                limiter.hit(broken, "100/minute"),
                limiter.hit(fine, "100/minute"),
                return_exceptions=True,
            )
        assert isinstance(results[1], DependencyUnavailable), results
        assert sorted(r.remaining for r in (results[0], results[2])) == [98, 99], results
    finally:
        with redis.Redis.from_url(backend.redis_url) as client:
            client.delete(*limiter._redis_keys(item, broken))
        await limiter.close()


@only_on("postgres")  # the backend with Redis
@pytest.mark.parametrize("strategy", ["sliding-window-counter", "moving-window", "fixed-window"])
async def test_redis_headers_report_the_window_of_the_check(
    backend: Backend, tmp_path: Path, strategy: str
) -> None:
    """On Redis, each strategy's X-RateLimit-Remaining is what limits' own window statistics
    say right after the check, and X-RateLimit-Reset is when the window the first check opened
    ends: a whole minute after it (not "now", which the first check of a sliding window
    used to report)."""
    limiter = await _redis_limiter(backend, tmp_path, rate_limit_strategy=strategy)
    key_id = f"figures-{uuid.uuid4()}"
    item = parse_rate_limit("3/minute")
    try:
        remaining = []
        opened = time.time()
        for _ in range(3):
            status = await limiter.hit(key_id, "3/minute")
            expected = await limiter._strategy.get_window_stats(item, "mg:key", key_id)
            assert status.limit == 3
            assert status.remaining == expected.remaining
            assert opened + 59 <= status.reset_at <= time.time() + 60.5, status
            remaining.append(status.remaining)
        assert remaining == [2, 1, 0]
        with pytest.raises(KeyRateLimitExceeded) as refused:
            await limiter.hit(key_id, "3/minute")
        assert refused.value.status.remaining == 0
        assert 58 <= refused.value.status.retry_after <= 60
    finally:
        await limiter.close()


def test_a_sliding_window_opened_by_the_check_resets_a_window_later() -> None:
    """The one reply where the figures differ from limits' formula on purpose: the check that
    opens a window reads its counter's TTL at exactly twice the window (see
    ``_sliding_window_stats``)."""
    for limit, ttl_ms in (("10/second", 2_000), ("7/minute", 120_000)):
        item = parse_rate_limit(limit)
        stats = _sliding_window_stats(item, [0, -2, 1, ttl_ms], 1_000.0)
        assert stats.reset_time == 1_000.0 + item.get_expiry()
        assert stats.remaining == item.amount - 1

"""Per-key rate limits (SECURITY.md line 13, in one process). Claims that a limit is per key
are proved with requests from varying socket addresses and X-Forwarded-For values."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis
import redis.asyncio as redis_asyncio
from fastapi import FastAPI
from limits import RateLimitItem
from limits.aio import strategies as limits_strategies
from limits.aio.storage import MemoryStorage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from api.http.deps import AnyCredential, PredictScope
from auth.errors import ConfigurationError, DependencyUnavailable, InvalidRequest
from auth.identity.authn import AuthSubject
from auth.limits.concurrency import ConcurrencyLimiter
from auth.limits.limiter import KeyRateLimitExceeded, RateLimiter
from auth.limits.policy import parse_rate_limits
from auth.limits.redis_checks import sliding_window_stats
from auth.models import ApiKey, Tenant, UsageRecord
from auth.redis_connection import hash_tag
from auth.settings import Settings
from tests.api.conftest import LimiterClock, pipelines_sent
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    only_on,
    running_app,
    update_key,
)


def one_limit(value: str) -> RateLimitItem:
    """The one limit a string holds, as the limiter reads it (parse_rate_limits)."""
    (item,) = parse_rate_limits(value).items
    return item


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


async def _burst(limiter: RateLimiter, key_id: str, count: int, limit: str = "10/second") -> int:
    """Fire ``count`` concurrent checks; how many were allowed."""

    async def one() -> bool:
        try:
            await limiter.hit(key_id, limit)
        except KeyRateLimitExceeded:
            return False
        return True

    return sum(await asyncio.gather(*[one() for _ in range(count)]))


# A window's edge, an hour after the opening request, approached and passed by a minute: the
# limit is filled a minute before the edge and tried again a minute after it, two minutes apart.
EDGE_LIMIT = "10/hour"
BEFORE_THE_EDGE, PAST_THE_EDGE = 3600 - 60, 120


@pytest.mark.parametrize(
    ("strategy", "figures"),
    [("sliding-window-counter", (9, 1)), ("moving-window", (9, 1)), ("fixed-window", (9, 10))],
)
async def test_no_burst_at_a_window_edge(
    backend: Backend,
    tmp_path: Path,
    limiter_clock: LimiterClock,
    strategy: str,
    figures: tuple[int, int],
) -> None:
    """One request opens the window, the limit is filled just before it ends and tried again
    just after: an exact strategy keeps any window's length at about the limit (10), a fixed
    window lets nearly twice the limit through in two minutes, which is why it is not the
    default. The limiter's clock is the test's (``limiter_clock``)."""
    settings = make_settings(backend, tmp_path, tmp_path, rate_limit_strategy=strategy)
    limiter = RateLimiter(settings)
    key_id = f"edge-{uuid.uuid4()}"
    try:
        opening = await _burst(limiter, key_id, 1, EDGE_LIMIT)
        await limiter_clock.advance(BEFORE_THE_EDGE, key_id)
        before = await _burst(limiter, key_id, 10, EDGE_LIMIT)
        await limiter_clock.advance(PAST_THE_EDGE, key_id)
        after = await _burst(limiter, key_id, 10, EDGE_LIMIT)
    finally:
        await limiter.close()
    assert opening == 1
    assert before >= 9  # the opening request may already count less in a sliding window
    # before + after were allowed within two minutes, well inside one hour.
    if strategy != "fixed-window":
        assert before + after <= 11, (before, after)
    else:
        assert before + after >= 18, (before, after)
    assert (before, after) == figures


async def test_the_default_strategy_is_the_moving_window(harness: Harness) -> None:
    """The exact strategy is the default (auth.settings), and the app's limiter uses it."""
    assert Settings.model_fields["rate_limit_strategy"].default == "moving-window"
    assert harness.state.rate_limiter.strategy_name == "moving-window"


async def test_the_app_refuses_a_second_burst_just_past_a_window_edge(
    harness: Harness, limiter_clock: LimiterClock
) -> None:
    """Through the app, on its default strategy: a key's limit (10 an hour) filled a minute
    before its window ends is still full a minute after: of a second burst of 10, one request
    (the opening one's place) is served, not ten as in a fixed window's new window."""
    tenant, key = await create_tenant_with_key(harness, rate_limit=EDGE_LIMIT)
    async with harness.sessionmaker() as session:
        key_id = str(await session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tenant.id)))

    async def burst(count: int) -> list[int]:
        responses = await asyncio.gather(
            *[
                harness.client.post(
                    "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
                )
                for _ in range(count)
            ]
        )
        assert {r.status_code for r in responses} <= {200, 429}, [r.text for r in responses]
        return [r.status_code for r in responses]

    assert await burst(1) == [200]
    await limiter_clock.advance(BEFORE_THE_EDGE, key_id)
    before = await burst(10)
    await limiter_clock.advance(PAST_THE_EDGE, key_id)
    after = await burst(10)
    assert (before.count(200), after.count(200)) == (9, 1), (before, after)


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
    item = one_limit(limit)
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
    ours = sliding_window_stats(item, window, now)
    assert ours.remaining == expected.remaining
    assert ours.reset_time == pytest.approx(expected.reset_time, abs=1e-6)


@only_on("postgres")  # the backend with Redis
async def test_concurrent_checks_share_one_redis_round_trip(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks of requests that arrive together go to Redis in one pipeline, and each
    request gets its own answer back (the per-request check: leases off, as for a key they do
    not serve; leased permits: test_a_burst_of_a_busy_key_takes_its_blocks_in_one_round_trip)."""
    limiter = RateLimiter(make_settings(backend, tmp_path, tmp_path, rate_limit_lease_max=0))
    sent = pipelines_sent(limiter, monkeypatch)
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
    # The per-request check (leases off): each answer is its own check's.
    limiter = await _redis_limiter(backend, tmp_path, rate_limit_lease_max=0)
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
    item = one_limit("100/minute")
    checks = limiter._redis
    assert checks is not None
    with redis.Redis.from_url(backend.redis_url) as client:
        for name in checks.keys_for(item, broken):
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
            client.delete(*checks.keys_for(item, broken))
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
    item = one_limit("3/minute")
    # limits' own statistics, read from the keys the check wrote: the key id as a hash tag, and
    # (sliding window) the window keys named as auth.limits.redis_checks names them.
    storage: Any = limiter.storage
    storage._current_window_key = lambda key: key
    storage._previous_window_key = lambda key: key + "/-1"
    assert limiter._redis is not None
    named = limiter._redis.keys_for(item, key_id)
    try:
        remaining = []
        opened = time.time()
        for _ in range(3):
            status = await limiter.hit(key_id, "3/minute")
            expected = await limiter._strategy.get_window_stats(item, "mg:key", hash_tag(key_id))
            assert await client_exists(limiter, named)
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


async def client_exists(limiter: RateLimiter, names: list[str]) -> bool:
    """Whether the check wrote the keys it is said to use (the current window's at least)."""
    return bool(await limiter.client.exists(names[-1]))


def test_a_sliding_window_opened_by_the_check_resets_a_window_later() -> None:
    """The one reply where the figures differ from limits' formula on purpose: the check that
    opens a window reads its counter's TTL at exactly twice the window (see
    ``sliding_window_stats``)."""
    for limit, ttl_ms in (("10/second", 2_000), ("7/minute", 120_000)):
        item = one_limit(limit)
        stats = sliding_window_stats(item, [0, -2, 1, ttl_ms], 1_000.0)
        assert stats.reset_time == 1_000.0 + item.get_expiry()
        assert stats.remaining == item.amount - 1


# --- Several limits per key, the headers, the admin limit, the concurrency limit, refusals ---


async def set_tenant_limits(harness: Harness, tenant_id: uuid.UUID, rate_limits: str) -> None:
    """Give a tenant a limit string as the plan system stores it (several limits, ";"), behind
    the API, whose own field takes one limit."""
    async with harness.sessionmaker() as session:
        await session.execute(
            update(Tenant).where(Tenant.id == tenant_id).values(rate_limit=rate_limits)
        )
        await session.commit()


async def _hits(limiter: RateLimiter, key_id: str, limits: str, count: int) -> int:
    """``count`` concurrent checks against ``limits``; how many were allowed."""

    async def one() -> bool:
        try:
            await limiter.hit(key_id, limits)
        except KeyRateLimitExceeded:
            return False
        return True

    return sum(await asyncio.gather(*[one() for _ in range(count)]))


@pytest.mark.parametrize("strategy", ["sliding-window-counter", "moving-window", "fixed-window"])
async def test_a_request_one_limit_refuses_costs_the_others_nothing(
    backend: Backend, tmp_path: Path, limiter_clock: LimiterClock, strategy: str
) -> None:
    """ "3/second;7/minute": three bursts of five, each in a second of its own. The per-second
    limit refuses two of each burst; had those refusals counted against the minute, the third
    burst would get 1 request through (3 + 2 counted, twice), not the 1 it gets as the minute's
    last (3 + 3 + 1 = 7). On the test's clock, which starts on a whole minute: the bursts fall
    in one minute's window (across a minute's edge the sliding window counter weighs the
    previous minute in, and the figures change)."""
    limiter = RateLimiter(make_settings(backend, tmp_path, tmp_path, rate_limit_strategy=strategy))
    key_id = f"multi-{uuid.uuid4()}"
    try:
        allowed = []
        for burst in range(3):
            if burst:
                # Past the whole previous second and the one before it (a sliding window
                # weighs the previous one in).
                await limiter_clock.advance(2.05, key_id)
            allowed.append(await _hits(limiter, key_id, "3/second;7/minute", 5))
        assert allowed == [3, 3, 1], allowed
        with pytest.raises(KeyRateLimitExceeded) as refused:
            await limiter.hit(key_id, "3/second;7/minute")
        # The minute is what refuses now, and what the headers report.
        assert refused.value.status.name == "1m"
        assert refused.value.status.limit == 7
        # Seconds away (when the minute frees a request), not the second's reset.
        assert refused.value.status.retry_after > 2
    finally:
        await limiter.close()


@only_on("postgres")  # the backend with Redis
async def test_several_limits_are_checked_in_one_redis_round_trip(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RateLimiter(make_settings(backend, tmp_path, tmp_path))
    sent = pipelines_sent(limiter, monkeypatch)
    try:
        status = await limiter.hit(f"one-trip-{uuid.uuid4()}", "10/second;100/minute;1000/hour")
        assert sent == [1]
        assert status.policy is not None
        assert len(status.policy.items) == 3
    finally:
        await limiter.close()


def test_a_limit_dominated_by_another_of_the_same_window_is_dropped() -> None:
    policy = parse_rate_limits("10/minute; 5/minute; 100/hour; 7 per 1 minute")
    assert [str(item) for item in policy.items] == ["5 per 1 minute", "100 per 1 hour"]
    assert policy.header == '"1m";q=5;w=60, "1h";q=100;w=3600'
    assert parse_rate_limits("10 per 2 seconds;1/day").header == '"2s";q=10;w=2, "1d";q=1;w=86400'


@pytest.mark.parametrize(
    "value",
    [
        "",
        "many",
        "0/second",
        f"{10**9 + 1}/second",
        "1/second;2/minute;3/hour;4/day;5/month;6/year",
        "1/second;" * 40,
    ],
)
def test_a_limit_string_out_of_bounds_is_refused(value: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_rate_limits(value)


async def _predict(harness: Harness, key: str) -> httpx.Response:
    return await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )


@pytest.mark.parametrize(
    ("limits", "policy", "reported"),
    [
        # the fewest remaining: the second's 1, not the minute's 4
        ("2/second;5/minute", '"1s";q=2;w=1, "1m";q=5;w=60', ("2", "1", '"1s";r=1;t=1')),
        # the fewest remaining: the hour's 2, not the minute's 4
        ("5/minute;3/hour", '"1m";q=5;w=60, "1h";q=3;w=3600', ("3", "2", '"1h";r=2;t=3600')),
        # as many remaining: the one that resets latest
        ("3/minute;3/hour", '"1m";q=3;w=60, "1h";q=3;w=3600', ("3", "2", '"1h";r=2;t=3600')),
    ],
)
async def test_headers_list_every_policy_and_report_the_tightest(
    harness: Harness, limits: str, policy: str, reported: tuple[str, str, str]
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    await set_tenant_limits(harness, tenant.id, limits)
    response = await _predict(harness, key)
    assert response.status_code == 200, response.text
    assert response.headers["RateLimit-Policy"] == policy
    limit, remaining, ratelimit = reported
    assert response.headers["X-RateLimit-Limit"] == limit
    assert response.headers["X-RateLimit-Remaining"] == remaining
    name, r, t = ratelimit.split(";")
    got_name, got_r, got_t = response.headers["RateLimit"].split(";")
    assert (got_name, got_r) == (name, r)
    # Seconds until that limit frees a request: within its window (limits' in-memory sliding
    # window aligns its windows to the clock, so not always the whole window on a first hit).
    assert 1 <= int(got_t.removeprefix("t=")) <= int(t.removeprefix("t="))
    reset_in = int(response.headers["X-RateLimit-Reset"]) - time.time()
    assert reset_in <= int(t.removeprefix("t=")) + 1


async def test_a_refusal_reports_the_limit_that_refused_and_retry_after_agrees(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    await set_tenant_limits(harness, tenant.id, "2/minute;100/hour")
    statuses = [(await _predict(harness, key)).status_code for _ in range(2)]
    assert statuses == [200, 200]
    refused = await _predict(harness, key)
    assert refused.status_code == 429
    assert refused.json()["type"] == "rate-limited"
    assert refused.headers["X-RateLimit-Limit"] == "2"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    name, r, t = refused.headers["RateLimit"].split(";")
    assert (name, r) == ('"1m"', "r=0")
    # The draft: RateLimit's reset and Retry-After name the same moment.
    assert t == f"t={refused.headers['Retry-After']}"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


# The app of the tests below: small admin and login limits, and routes that hold a request in
# flight until the test lets it go, or fail.
ADMIN_LIMIT = "3/minute"
TENANT_DEFAULT = "50/minute"


def _add_test_routes(app: FastAPI) -> None:
    gates: dict[str, asyncio.Event] = {}
    app.state.gates = gates

    @app.get("/test/hold")
    async def hold(gate: str, subject: AnyCredential) -> dict[str, str]:
        await gates.setdefault(gate, asyncio.Event()).wait()
        return {"key": subject.limit_id}

    @app.get("/test/fail")
    async def fail(subject: AnyCredential) -> dict[str, str]:
        raise RuntimeError("a route that fails after the slot was taken")

    @app.get("/test/unbilled")
    async def unbilled(subject: PredictScope) -> dict[str, str]:
        return {"served": "without a usage record"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def limits_app(
    backend: Backend, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    settings = make_settings(
        backend,
        served_model_dir,
        tmp_path_factory.mktemp("var"),
        admin_rate_limit=ADMIN_LIMIT,
        default_rate_limit=TENANT_DEFAULT,
        login_failures_per_address="2/minute",
    )
    async with running_app(settings, backend, customize=_add_test_routes) as running:
        yield running


@pytest.fixture
def in_flight_limits(limits_app: Harness, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """max_in_flight per key id, set the way the plan system will set it: on the subject the
    authenticator returns (until plans fill it, nothing else does)."""
    limits: dict[str, int] = {}
    authenticate = limits_app.state.authenticator.authenticate

    async def with_limits(credential: str, address: Any = None) -> AuthSubject:
        subject = await authenticate(credential, address)
        return dataclasses.replace(subject, max_in_flight=limits.get(subject.limit_id))

    monkeypatch.setattr(limits_app.state.authenticator, "authenticate", with_limits)
    return limits


async def _key_with_in_flight_limit(
    app: Harness, limits: dict[str, int], max_in_flight: int
) -> tuple[str, str]:
    """A new tenant key whose requests in flight are bounded; (its id, the key)."""
    _, key = await create_tenant_with_key(app)
    me = await app.client.get("/api/v1/me", headers=bearer(key))
    key_id = str(me.json()["key"]["id"])
    limits[key_id] = max_in_flight
    return key_id, key


async def _slots_held(app: Harness, key_id: str) -> int:
    """Slots held for the key: on Redis, the entries of its set; else this process's count."""
    if app.backend.redis_url:
        with redis.Redis.from_url(app.backend.redis_url) as client:
            return int(client.zcard(f"mg:inflight:{{{key_id}}}"))
    return app.state.concurrency.held(key_id)


def _gates(app: Harness) -> dict[str, asyncio.Event]:
    gates: dict[str, asyncio.Event] = app.client._transport.app.state.gates  # type: ignore[attr-defined]
    return gates


async def _hold(
    app: Harness, key: str, key_id: str
) -> tuple[asyncio.Event, asyncio.Task[httpx.Response]]:
    """Send a request of ``key`` that stays in flight until the returned event is set; returns
    once it holds its slot."""
    gate = uuid.uuid4().hex
    event = _gates(app).setdefault(gate, asyncio.Event())
    before = await _slots_held(app, key_id)
    task = asyncio.ensure_future(
        app.client.get("/test/hold", params={"gate": gate}, headers=bearer(key))
    )
    for _ in range(500):
        if await _slots_held(app, key_id) > before or task.done():
            break
        await asyncio.sleep(0.01)
    assert not task.done(), (await task).text
    return event, task


async def test_a_request_beyond_max_in_flight_is_refused_at_once_then_admitted_once_a_slot_frees(
    limits_app: Harness, in_flight_limits: dict[str, int]
) -> None:
    key_id, key = await _key_with_in_flight_limit(limits_app, in_flight_limits, 1)
    event, held = await _hold(limits_app, key, key_id)
    started = time.monotonic()
    refused = await limits_app.client.get("/api/v1/me", headers=bearer(key))
    assert time.monotonic() - started < 1.0  # refused, not queued behind the held request
    assert refused.status_code == 429, refused.text
    assert refused.json()["type"] == "concurrency-limit-exceeded"
    assert refused.headers["Retry-After"] == "1"
    # Another key is not held back by this one's requests.
    _, other = await create_tenant_with_key(limits_app)
    assert (await limits_app.client.get("/api/v1/me", headers=bearer(other))).status_code == 200
    event.set()
    assert (await held).status_code == 200
    assert await _slots_held(limits_app, key_id) == 0
    admitted = await limits_app.client.get("/api/v1/me", headers=bearer(key))
    assert admitted.status_code == 200, admitted.text
    assert await _slots_held(limits_app, key_id) == 0


async def test_a_slot_is_released_exactly_once_when_the_route_fails(
    limits_app: Harness, in_flight_limits: dict[str, int]
) -> None:
    """With room for two: one request held, one that fails (500) after taking its slot. Had the
    failure kept its slot, the next request would be refused; had it been released twice, the
    held request's slot would be given back too and a third request would be admitted."""
    key_id, key = await _key_with_in_flight_limit(limits_app, in_flight_limits, 2)
    event, held = await _hold(limits_app, key, key_id)
    failed = await limits_app.client.get("/test/fail", headers=bearer(key))
    assert failed.status_code == 500
    assert await _slots_held(limits_app, key_id) == 1
    second_event, second = await _hold(limits_app, key, key_id)
    assert await _slots_held(limits_app, key_id) == 2
    third = await limits_app.client.get("/api/v1/me", headers=bearer(key))
    assert third.status_code == 429
    assert third.json()["type"] == "concurrency-limit-exceeded"
    event.set()
    second_event.set()
    assert [(await held).status_code, (await second).status_code] == [200, 200]
    assert await _slots_held(limits_app, key_id) == 0


async def test_a_slot_is_released_when_the_client_goes_away(
    limits_app: Harness, in_flight_limits: dict[str, int]
) -> None:
    key_id, key = await _key_with_in_flight_limit(limits_app, in_flight_limits, 1)
    _, held = await _hold(limits_app, key, key_id)
    held.cancel()  # the client disconnects while the request is in flight
    with contextlib.suppress(asyncio.CancelledError):
        await held
    # Given back at once, but a loaded machine may take its time: up to 5 s.
    for _ in range(500):
        if await _slots_held(limits_app, key_id) == 0:
            break
        await asyncio.sleep(0.01)
    assert await _slots_held(limits_app, key_id) == 0
    admitted = await limits_app.client.get("/api/v1/me", headers=bearer(key))
    assert admitted.status_code == 200, admitted.text


async def test_no_max_in_flight_means_no_slot(limits_app: Harness) -> None:
    _, key = await create_tenant_with_key(limits_app)
    me = await limits_app.client.get("/api/v1/me", headers=bearer(key))
    assert me.status_code == 200
    assert await _slots_held(limits_app, str(me.json()["key"]["id"])) == 0


@contextlib.contextmanager
def redis_round_trips(app: Harness, key_id: str) -> Iterator[list[list[str]]]:
    """The round trips the app's Redis client makes meanwhile about ``key_id`` (its rate-limit
    counters or its slots: the failure throttle's, by address, are left out), each as the
    commands it carried: a pipeline is one round trip, whatever it holds."""
    trips: list[list[str]] = []
    client = app.state.rate_limiter.client
    execute_command = client.execute_command
    pipeline_execute = redis_asyncio.client.Pipeline.execute

    def about_key(args: tuple[Any, ...]) -> bool:
        return any(key_id in str(arg) for arg in args)

    async def one_command(*args: Any, **options: Any) -> Any:
        if about_key(args):
            trips.append([str(args[0])])
        return await execute_command(*args, **options)

    async def one_pipeline(pipeline: Any, *args: Any, **options: Any) -> Any:
        commands = [command[0] for command in pipeline.command_stack]
        if any(about_key(command) for command in commands):
            trips.append([str(command[0]) for command in commands])
        return await pipeline_execute(pipeline, *args, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client, "execute_command", one_command)
        patch.setattr(redis_asyncio.client.Pipeline, "execute", one_pipeline)
        yield trips


@only_on("postgres")  # the backend with Redis
async def test_max_in_flight_costs_one_redis_round_trip_more_than_no_bound(
    limits_app: Harness, in_flight_limits: dict[str, int]
) -> None:
    """The slot is taken in the rate-limit check's own script and round trip (one EVALSHA in
    one pipeline), and given back with one ZREM: a key with max_in_flight costs Redis two round
    trips per request, one without it one."""
    bounded_id, bounded = await _key_with_in_flight_limit(limits_app, in_flight_limits, 2)
    _, free = await create_tenant_with_key(limits_app)
    me = await limits_app.client.get("/api/v1/me", headers=bearer(free))
    free_id = str(me.json()["key"]["id"])
    with redis_round_trips(limits_app, bounded_id) as trips:
        response = await limits_app.client.get("/api/v1/me", headers=bearer(bounded))
    assert response.status_code == 200, response.text
    assert trips == [["EVALSHA"], ["ZREM"]]
    with redis_round_trips(limits_app, free_id) as trips:
        response = await limits_app.client.get("/api/v1/me", headers=bearer(free))
    assert response.status_code == 200, response.text
    assert trips == [["EVALSHA"]]
    # A request refused for its slot costs the one round trip, and none of the rate limit.
    event, held = await _hold(limits_app, bounded, bounded_id)
    second_event, second = await _hold(limits_app, bounded, bounded_id)
    with redis_round_trips(limits_app, bounded_id) as trips:
        refused = await limits_app.client.get("/api/v1/me", headers=bearer(bounded))
    assert refused.status_code == 429
    assert refused.json()["type"] == "concurrency-limit-exceeded"
    assert trips == [["EVALSHA"]]
    event.set()
    second_event.set()
    assert [(await held).status_code, (await second).status_code] == [200, 200]
    after = await limits_app.client.get("/api/v1/me", headers=bearer(bounded))
    # The bounded key's requests: /me twice, the two held, this one; not the refused one.
    assert int(after.headers["X-RateLimit-Remaining"]) == int(TENANT_DEFAULT.split("/")[0]) - 5


async def test_a_request_the_rate_limit_refuses_holds_no_slot(
    backend: Backend, tmp_path: Path
) -> None:
    """On Redis and in memory alike: refused by its rate limit, a request holds no slot (the
    script never adds it; in memory it is given back at once), without waiting for the
    request's release, so a key at its rate limit never fills its max_in_flight."""
    limiter = RateLimiter(make_settings(backend, tmp_path, tmp_path))
    concurrency = ConcurrencyLimiter(limiter, 60.0)
    key_id = f"refused-slot-{uuid.uuid4()}"

    async def held() -> int:
        if backend.redis_url:
            with redis.Redis.from_url(backend.redis_url) as client:
                return int(client.zcard(f"mg:inflight:{{{key_id}}}"))
        return concurrency.held(key_id)

    try:
        first = concurrency.slot(key_id, 2)
        await limiter.hit(key_id, "1/minute", slot=first)
        assert await held() == 1
        for _ in range(3):
            with pytest.raises(KeyRateLimitExceeded):
                await limiter.hit(key_id, "1/minute", slot=concurrency.slot(key_id, 2))
            assert await held() == 1
        await first.release()
        assert await held() == 0
    finally:
        await limiter.close()


@only_on("postgres")  # the backend with Redis
async def test_max_in_flight_holds_across_two_apps_sharing_redis(
    limits_app: Harness, served_model_dir: Path, tmp_path: Path
) -> None:
    """Two app instances on one Redis and one database: a key's max_in_flight (its own, as an
    operator sets it) counts the requests in flight on both together."""
    settings = make_settings(
        limits_app.backend,
        served_model_dir,
        tmp_path,
        admin_rate_limit=ADMIN_LIMIT,
        default_rate_limit=TENANT_DEFAULT,
    )
    async with running_app(settings, limits_app.backend, customize=_add_test_routes) as other:
        _, key = await create_tenant_with_key(limits_app)
        await update_key(limits_app, key, max_in_flight=2)
        me = await other.client.get("/api/v1/me", headers=bearer(key))
        assert me.json()["limits"]["max_in_flight"] == 2
        key_id = str(me.json()["key"]["id"])
        first_event, first = await _hold(limits_app, key, key_id)
        second_event, second = await _hold(other, key, key_id)
        for app in (limits_app, other):
            refused = await app.client.get("/api/v1/me", headers=bearer(key))
            assert refused.status_code == 429, refused.text
            assert refused.json()["type"] == "concurrency-limit-exceeded"
        second_event.set()
        assert (await second).status_code == 200
        third_event, third = await _hold(limits_app, key, key_id)
        refused = await other.client.get("/api/v1/me", headers=bearer(key))
        assert refused.status_code == 429, refused.text
        first_event.set()
        third_event.set()
        assert [(await first).status_code, (await third).status_code] == [200, 200]
        assert await _slots_held(limits_app, key_id) == 0
        assert (await other.client.get("/api/v1/me", headers=bearer(key))).status_code == 200


async def test_an_admin_credential_without_limits_gets_the_admin_limit(
    limits_app: Harness,
) -> None:
    admin = await create_admin_key(limits_app)
    statuses = []
    for _ in range(4):
        response = await limits_app.client.get("/api/v1/admin/tenants", headers=bearer(admin))
        statuses.append(response.status_code)
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["RateLimit-Policy"] == '"1m";q=3;w=60'
    assert statuses == [200, 200, 200, 429]
    # A tenant's key without a limit of its own still gets the tenants' default.
    _, key = await create_tenant_with_key(limits_app)
    response = await limits_app.client.get("/api/v1/me", headers=bearer(key))
    assert response.headers["X-RateLimit-Limit"] == "50"


async def test_every_429_and_503_carries_retry_after(limits_app: Harness) -> None:
    """Rate limit, monthly quota, login throttle, a billable answer without its usage record
    (the middleware's own 503); the concurrency limit, Redis and database outages are proved
    above and in tests/security."""
    answers: dict[str, httpx.Response] = {}
    tenant, key = await create_tenant_with_key(limits_app)
    await set_tenant_limits(limits_app, tenant.id, "1/minute")
    await _predict(limits_app, key)
    answers["rate-limited"] = await _predict(limits_app, key)
    _, broke = await create_tenant_with_key(limits_app, monthly_quota=0)
    answers["quota-exceeded"] = await _predict(limits_app, broke)
    for _ in range(3):
        answers["login-throttled"] = await limits_app.client.post(
            "/api/v1/auth/token",
            data={"grant_type": "client_credentials", "client_secret": "mg_not-a-key"},
        )
    _, fresh = await create_tenant_with_key(limits_app)
    answers["service-unavailable"] = await limits_app.client.get(
        "/test/unbilled", headers=bearer(fresh)
    )
    for problem_type, response in answers.items():
        assert response.status_code in (429, 503), (problem_type, response.text)
        assert response.json()["type"] == problem_type
        assert int(response.headers["Retry-After"]) >= 1, problem_type


async def _refusals(harness: Harness) -> dict[tuple[int, str], float]:
    """``modelgate_rejections_total`` by status and reason, as ``/metrics`` reports it."""
    response = await harness.client.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (int(sample.labels["status"]), sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "modelgate_rejections_total"
    }


async def test_refusals_are_counted_in_process_by_status_and_type(limits_app: Harness) -> None:
    before = await _refusals(limits_app)
    tenant, key = await create_tenant_with_key(limits_app)
    await set_tenant_limits(limits_app, tenant.id, "1/minute")
    assert (await _predict(limits_app, key)).status_code == 200
    assert (await _predict(limits_app, key)).status_code == 429
    assert (await _predict(limits_app, key)).status_code == 429
    assert (await limits_app.client.get("/api/v1/me", headers=bearer("mg_nope"))).status_code == 401
    _, other = await create_tenant_with_key(limits_app)
    forbidden = await limits_app.client.get("/api/v1/admin/tenants", headers=bearer(other))
    assert forbidden.status_code == 403
    after = await _refusals(limits_app)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert delta == {
        (429, "rate-limited"): 2,
        (401, "unauthenticated"): 1,
        (403, forbidden.json()["type"]): 1,
    }
    # Refusals bill nothing and write nothing.
    async with limits_app.sessionmaker() as session:
        rows = await session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant.id)
        )
    assert rows == 1


async def test_an_invalid_stored_limit_gets_the_default_not_an_error(limits_app: Harness) -> None:
    """A limit string written behind the API's back that does not parse is the operator's to
    fix: the client is served under the default, never answered 422 or 500."""
    tenant, key = await create_tenant_with_key(limits_app)
    await set_tenant_limits(limits_app, tenant.id, "1/second;" * 6)
    response = await _predict(limits_app, key)
    assert response.status_code == 200, response.text
    assert response.headers["X-RateLimit-Limit"] == "50"


@pytest.mark.parametrize(
    "setting", ["default_rate_limit", "admin_rate_limit", "fallback_rate_limit"]
)
def test_an_invalid_limit_setting_stops_the_process(
    backend: Backend, tmp_path: Path, setting: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"MODELGATE_{setting.upper()}"):
        RateLimiter(make_settings(backend, tmp_path, tmp_path, **{setting: "0/minute"}))


async def test_browsers_may_read_the_rate_limit_headers(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        backend, served_model_dir, tmp_path, cors_origins="https://console.example"
    )
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        response = await app.client.get(
            "/api/v1/me", headers={**bearer(key), "Origin": "https://console.example"}
        )
    assert response.status_code == 200
    exposed = {
        h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")
    }
    assert {"ratelimit-policy", "ratelimit", "retry-after", "x-ratelimit-remaining"} <= exposed

"""The per-process key cache (SECURITY.md line 3): no database round trip in the steady state,
yet nothing is trusted for longer than 1 second, past its expiry, or after a failure."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from auth.errors import Unauthenticated
from auth.identity.authn import KeyAuthenticator
from auth.identity.keys import DISPLAY_PREFIX_LENGTH, generate_key, key_digest
from auth.models import ApiKey, Tenant, utcnow
from tests.conftest import (
    IRIS_SETOSA,
    Harness,
    bearer,
    create_tenant_with_key,
    refused_within,
    update_key,
)


class CountingSessions:
    """A sessionmaker that counts the sessions (database lookups) it hands out."""

    def __init__(self, sessionmaker: Any) -> None:
        self._sessionmaker = sessionmaker
        self.opened = 0

    def __call__(self) -> Any:
        self.opened += 1
        return self._sessionmaker()


def _authenticator(harness: Harness, **options: Any) -> tuple[KeyAuthenticator, CountingSessions]:
    sessions = CountingSessions(harness.sessionmaker)
    pepper = harness.state.secrets.key_pepper
    return KeyAuthenticator(sessions, pepper, **options), sessions  # type: ignore[arg-type]


async def test_steady_state_costs_no_database_round_trip(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    authenticator, sessions = _authenticator(harness)
    # Concurrent misses of one key share a single lookup.
    await asyncio.gather(*[authenticator.authenticate(key) for _ in range(20)])
    for _ in range(100):
        await authenticator.authenticate(key)
    assert sessions.opened == 1


async def test_cached_key_is_looked_up_again_after_the_ttl(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    authenticator, sessions = _authenticator(harness, cache_ttl=0.2)
    await authenticator.authenticate(key)
    await asyncio.sleep(0.25)
    await authenticator.authenticate(key)
    assert sessions.opened == 2


async def test_failures_are_never_cached(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    key = generate_key()
    authenticator, sessions = _authenticator(harness)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(key)
    assert sessions.opened == 3
    # The same key becomes valid: it is accepted at once, not after a negative entry expires.
    async with harness.sessionmaker() as session:
        session.add(
            ApiKey(
                tenant_id=tenant.id,
                name="late",
                display_prefix=key[:DISPLAY_PREFIX_LENGTH],
                digest=key_digest(harness.state.secrets.key_pepper, key),
                scopes="predict",
            )
        )
        await session.commit()
    subject = await authenticator.authenticate(key)
    assert subject.tenant is not None
    assert subject.tenant.id == tenant.id


async def test_cache_never_outlives_the_keys_expiry(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    await update_key(harness, key, expires_at=utcnow() + timedelta(seconds=0.4))
    authenticator, _ = _authenticator(harness, cache_ttl=1.0)
    await authenticator.authenticate(key)
    await asyncio.sleep(0.45)
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(key)


async def test_cache_is_bounded(harness: Harness) -> None:
    authenticator, _ = _authenticator(harness, cache_size=2)
    keys = [(await create_tenant_with_key(harness))[1] for _ in range(3)]
    for key in keys:
        await authenticator.authenticate(key)
    assert len(authenticator._cache) == 2


async def test_suspending_the_tenant_takes_effect_within_a_second(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    warm = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert warm.status_code == 200  # the key is now cached by the app's authenticator
    async with harness.sessionmaker() as session:
        await session.execute(
            update(Tenant).where(Tenant.id == tenant.id).values(status="suspended")
        )
        await session.commit()
    await refused_within(harness, key, promised=1.0)


async def test_default_cache_trusts_a_key_for_at_most_one_second(harness: Harness) -> None:
    """The contract's 1 second is the default too, not only the setting's bound."""
    _, key = await create_tenant_with_key(harness)
    sessions = CountingSessions(harness.sessionmaker)
    authenticator = KeyAuthenticator(sessions, harness.state.secrets.key_pepper)  # type: ignore[arg-type]
    await authenticator.authenticate(key)
    await asyncio.sleep(1.05)
    await authenticator.authenticate(key)
    assert sessions.opened == 2  # looked up again after one second


async def test_a_key_expiring_later_is_cached_like_any_other(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    await update_key(harness, key, expires_at=utcnow() + timedelta(minutes=10))
    authenticator, sessions = _authenticator(harness)
    for _ in range(50):
        await authenticator.authenticate(key)
    assert sessions.opened == 1


class GatedSessions(CountingSessions):
    """Sessions that open only once the gate is set: a lookup that is still in flight."""

    def __init__(self, sessionmaker: Any) -> None:
        super().__init__(sessionmaker)
        self.gate = asyncio.Event()

    def __call__(self) -> Any:
        self.opened += 1
        sessionmaker, gate = self._sessionmaker, self.gate

        class _Gated:
            async def __aenter__(self) -> Any:
                await gate.wait()
                self.session = sessionmaker()
                return await self.session.__aenter__()

            async def __aexit__(self, *exc: object) -> Any:
                return await self.session.__aexit__(*exc)

        return _Gated()


async def test_a_lookup_whose_caller_went_away_is_not_trusted_later(harness: Harness) -> None:
    """The request that started a lookup is cancelled (its client hung up) while the lookup is
    in flight: the lookup finishes for nobody, and it must not become a shortcut that later
    requests share past the cache's time, after the key is revoked."""
    _, key = await create_tenant_with_key(harness)
    sessions = GatedSessions(harness.sessionmaker)
    pepper = harness.state.secrets.key_pepper
    authenticator = KeyAuthenticator(sessions, pepper, cache_ttl=0.2)  # type: ignore[arg-type]
    caller = asyncio.ensure_future(authenticator.authenticate(key))
    await asyncio.sleep(0.05)  # the lookup waits at the gate
    caller.cancel()
    sessions.gate.set()
    await asyncio.sleep(0.05)  # the lookup completes, unobserved
    assert caller.cancelled()
    await update_key(harness, key, revoked_at=utcnow())
    await asyncio.sleep(0.25)
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(key)
    assert sessions.opened == 2

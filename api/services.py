"""The long-lived components one server process holds, built in the app's lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.inference.cache import PredictionCache
from auth.identity.authn import KeyAuthenticator
from auth.identity.key_activity import KeyActivity
from auth.identity.login_throttle import LoginThrottle
from auth.identity.tokens import TokenConfig
from auth.limits.concurrency import ConcurrencyLimiter
from auth.limits.limiter import RateLimiter
from auth.settings import Secrets, Settings
from auth.usage.writer import UsageWriter
from ml import ModelRegistry
from ml.batching import DIRECT, BatchPolicy


@dataclass
class AppState:
    """Everything a request may need beyond itself; stored on ``app.state.modelgate``."""

    settings: Settings
    secrets: Secrets
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    authenticator: KeyAuthenticator
    rate_limiter: RateLimiter
    # Each key's requests in flight (AuthSubject.max_in_flight), on the rate limiter's Redis.
    concurrency: ConcurrencyLimiter
    registry: ModelRegistry
    usage_writer: UsageWriter
    key_activity: KeyActivity
    tokens: TokenConfig
    login_throttle: LoginThrottle
    started_at: float = field(default_factory=time.monotonic)
    # How scikit-learn calls are micro-batched (ml.batching).
    batching: BatchPolicy = DIRECT
    # None when MODELGATE_PREDICTION_CACHE_TTL_SECONDS is 0; its hits and misses in .stats.
    prediction_cache: PredictionCache | None = None

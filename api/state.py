"""The long-lived components one server process holds, built in the app's lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from auth.identity.authn import KeyAuthenticator
from auth.identity.key_activity import KeyActivity
from auth.identity.login_throttle import LoginThrottle
from auth.identity.tokens import TokenConfig
from auth.limits.limiter import RateLimiter
from auth.settings import Secrets, Settings
from auth.usage_writer import UsageWriter
from ml import ModelRegistry


@dataclass
class AppState:
    """Everything a request may need beyond itself; stored on ``app.state.modelgate``."""

    settings: Settings
    secrets: Secrets
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    authenticator: KeyAuthenticator
    rate_limiter: RateLimiter
    registry: ModelRegistry
    usage_writer: UsageWriter
    key_activity: KeyActivity
    tokens: TokenConfig
    login_throttle: LoginThrottle
    started_at: float = field(default_factory=time.monotonic)

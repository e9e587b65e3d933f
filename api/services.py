"""The long-lived components one server process holds, and the one place that builds them.

:meth:`AppState.build` is the composition root: it creates each component once, from the
settings and the secrets, and hands each one what it uses, in the open. Among them the process's
one Redis connection (``auth.redis_connection``), shared by the rate limiter, the failure and
login throttles, the concurrency limiter (through the rate limiter, whose failure mode it
follows) and the prediction cache. :meth:`AppState.start` loads the models and starts the
background work; :meth:`AppState.close` stops it all, pending usage committed before the engine
goes away. The app's lifespan (``api.app``) calls these three and nothing else of them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.events.dispatcher import RETRY_SCHEDULE, Dispatcher
from api.inference.cache import PredictionCache, build_prediction_cache
from api.model_catalogue import model_store, sync_catalogue
from api.observability import metrics
from api.server.activations import apply_activations, check_models_periodically, follow_activations
from api.webhooks.deploy import DeployQueue
from api.webhooks.deployer import PullDeployer
from auth.db import create_engine, create_sessionmaker
from auth.events.expiry import sweep_key_expiry_periodically
from auth.events.secrets import SecretBox
from auth.idempotency import AnswerLookups, InFlightClaims, prune_answers_periodically
from auth.identity.authn import KeyAuthenticator
from auth.identity.failure_throttle import CredentialThrottle
from auth.identity.key_activity import KeyActivity
from auth.identity.login_throttle import LoginThrottle
from auth.identity.tokens import TokenConfig, prune_tokens_periodically, token_config
from auth.limits.concurrency import ConcurrencyLimiter
from auth.limits.limiter import RateLimiter
from auth.model_catalog import CatalogEntry, CatalogKey
from auth.read_replica import ReadReplica
from auth.redis_connection import RedisConnection, connect_redis
from auth.settings import Secrets, Settings
from auth.usage.writer import UsageWriter
from ml import ModelRegistry
from ml.batching import DIRECT, BatchPolicy

logger = structlog.get_logger(__name__)


@dataclass
class AppState:
    """Everything a request may need beyond itself; stored on ``app.state.modelgate``."""

    settings: Settings
    # Out of the repr: Secrets' own repr shows the key material.
    secrets: Secrets = field(repr=False)
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    # Redis (or, without MODELGATE_REDIS_URL, memory) for every component below that counts.
    redis: RedisConnection
    authenticator: KeyAuthenticator
    rate_limiter: RateLimiter
    # Each key's requests in flight (AuthSubject.max_in_flight), on the rate limiter's client:
    # the one Redis client.
    concurrency: ConcurrencyLimiter
    registry: ModelRegistry
    usage_writer: UsageWriter
    # The Idempotency-Keys with a request in flight (on Redis when set; api.http.idempotency).
    idempotency_claims: InFlightClaims
    # Their stored answers, looked up in one statement per event-loop turn.
    idempotent_answers: AnswerLookups
    key_activity: KeyActivity
    tokens: TokenConfig
    login_throttle: LoginThrottle
    # The model webhooks' failure budget per client address: the same budget (and Redis keys)
    # as failed API keys and JWTs, so a bad signature costs what a bad key does.
    webhook_throttle: CredentialThrottle
    # Deploy requests from the model webhooks, run one at a time in the background.
    deploys: DeployQueue
    # Outgoing events: the endpoints' signing secrets (sealed under the pepper) and the
    # dispatcher that delivers the outbox.
    event_secrets: SecretBox = field(repr=False)
    dispatcher: Dispatcher = field(repr=False)
    started_at: float = field(default_factory=time.monotonic)
    # How scikit-learn calls are micro-batched (ml.batching).
    batching: BatchPolicy = DIRECT
    # None when MODELGATE_PREDICTION_CACHE_TTL_SECONDS is 0; its hits, misses and errors are
    # counted in Prometheus (api.observability.metrics).
    prediction_cache: PredictionCache | None = None
    # When this process last pruned the accepted webhook delivery ids (api.webhooks.receiver).
    webhooks_pruned_at: float = float("-inf")
    # The catalogue entries this process has read (they never change), by (name, version):
    # the registry holds their manifests, GET /models/{name} their sources.
    catalogue: dict[CatalogKey, CatalogEntry] = field(default_factory=dict, repr=False)
    # The Postgres replica the reports may read (MODELGATE_DATABASE_READ_URL; auth.read_replica);
    # None: they read the primary.
    read_replica: ReadReplica | None = None
    # The periodic work started by start() and cancelled by close().
    background: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, settings: Settings, secrets: Secrets) -> AppState:
        """Every component, wired to the others; nothing is loaded, started or sent to a
        server yet (``start``)."""
        engine = create_engine(
            settings.database_url, statement_timeout_seconds=settings.database_timeout_seconds
        )
        sessionmaker = create_sessionmaker(engine)
        redis = connect_redis(settings)
        rate_limiter = RateLimiter(settings, redis.storage)
        tokens = token_config(settings, secrets)
        registry = ModelRegistry(settings.model_dir, model_store(settings))
        # The catalogue entries this process has read: the follower adds to it, the webhooks'
        # deployer and the activation route too.
        catalogue: dict[CatalogKey, CatalogEntry] = {}
        event_secrets = SecretBox(secrets.key_pepper)
        schedule = settings.event_retry_schedule_seconds
        return cls(
            settings=settings,
            secrets=secrets,
            engine=engine,
            sessionmaker=sessionmaker,
            redis=redis,
            authenticator=KeyAuthenticator(
                sessionmaker,
                secrets.key_pepper,
                tokens=tokens,
                cache_ttl=settings.key_cache_ttl_seconds,
                cache_size=settings.key_cache_size,
                lookup_timeout=settings.database_timeout_seconds,
                default_rate_limit=settings.default_rate_limit,
                throttle=CredentialThrottle(redis.storage, settings.auth_failures_per_address),
            ),
            rate_limiter=rate_limiter,
            concurrency=ConcurrencyLimiter(rate_limiter, settings.concurrency_slot_ttl_seconds),
            registry=registry,
            usage_writer=UsageWriter(
                engine,
                max_batch=settings.usage_flush_max_records,
                max_wait_seconds=settings.usage_flush_wait_ms / 1000,
                timeout_seconds=settings.usage_flush_timeout_seconds,
                observer=metrics.observe_usage_flush,
            ),
            # A claim lasts the request's deadline: it only spares a duplicate its inference (the
            # usage writer's transaction bills a key once whatever the claims), so after a crash
            # a retry waits no longer than that.
            idempotency_claims=InFlightClaims(redis.client, settings.request_timeout_seconds),
            idempotent_answers=AnswerLookups(engine),
            key_activity=KeyActivity(
                engine,
                interval_seconds=settings.key_last_used_flush_seconds,
                timeout_seconds=settings.database_timeout_seconds,
            ),
            tokens=tokens,
            login_throttle=LoginThrottle(
                redis.storage,
                settings.login_failures_per_address,
                settings.login_failures_per_account,
            ),
            webhook_throttle=CredentialThrottle(redis.storage, settings.auth_failures_per_address),
            catalogue=catalogue,
            event_secrets=event_secrets,
            dispatcher=Dispatcher(
                sessionmaker,
                event_secrets,
                settings,
                retry_schedule=[float(s) for s in schedule.split(",")]
                if schedule
                else RETRY_SCHEDULE,
            ),
            deploys=DeployQueue(
                PullDeployer(settings, registry, sessionmaker, catalogue),
                sessionmaker,
                audit_timeout_seconds=settings.database_timeout_seconds,
            ),
            batching=BatchPolicy(
                max_size=settings.batch_max_size,
                max_wait_seconds=settings.batch_max_wait_ms / 1000,
            )
            if settings.batch_enabled
            else DIRECT,
            read_replica=ReadReplica(
                create_engine(
                    settings.database_read_url,
                    statement_timeout_seconds=settings.database_timeout_seconds,
                ),
                max_lag_seconds=settings.database_read_max_lag_seconds,
                observer=metrics.observe_report_read,
            )
            if settings.database_read_url
            else None,
            prediction_cache=build_prediction_cache(
                ttl_seconds=settings.prediction_cache_ttl_seconds,
                max_entries=settings.prediction_cache_size,
                key_pepper=secrets.key_pepper,
                redis_client=redis.client,
                redis_timeout_seconds=settings.redis_timeout_seconds,
            ),
        )

    async def start(self) -> None:
        """Load the models and the operator's activations, then start the usage writer, the
        key activity and the periodic work (token pruning, activations, model self-checks)."""
        settings, registry, sessionmaker = self.settings, self.registry, self.sessionmaker
        try:
            # The catalogue first: a catalogued version on this disk is loaded only if its
            # manifest is the catalogue's.
            async with asyncio.timeout(settings.database_timeout_seconds):
                async with sessionmaker() as session:
                    await sync_catalogue(registry, session, self.catalogue)
        except Exception as exc:
            logger.warning("model catalogue could not be read at start", error=type(exc).__name__)
        # Hash checks, unpickling and warm-up take a while: keep the event loop free.
        await asyncio.to_thread(registry.load)
        metrics.record_registry(registry)
        if not self.redis.uses_redis:
            logger.warning(
                "MODELGATE_REDIS_URL is not set: rate limits are kept in this process only, "
                "which is correct for a single process and wrong for several workers"
            )
        try:
            # The operator's activations (in the database) before the first request, not a
            # second after it.
            await apply_activations(
                registry, sessionmaker, settings.database_timeout_seconds, self.catalogue
            )
        except Exception as exc:
            logger.warning("model activations could not be read at start", error=type(exc).__name__)
        if not registry.is_ready:
            logger.warning(
                "no model is ready; run `modelgate models train`", dir=str(settings.model_dir)
            )
        self.usage_writer.start()
        self.key_activity.start()
        self.deploys.start()
        self.dispatcher.start()
        self.started_at = time.monotonic()
        # Created last, and first run once the app's lifespan hands control back to the loop.
        self.background = [
            asyncio.create_task(prune_tokens_periodically(sessionmaker, settings)),
            asyncio.create_task(prune_answers_periodically(sessionmaker)),
            asyncio.create_task(
                follow_activations(
                    registry,
                    sessionmaker,
                    settings.database_timeout_seconds,
                    catalogue=self.catalogue,
                )
            ),
            asyncio.create_task(
                check_models_periodically(
                    registry,
                    settings.model_check_interval_seconds,
                    sessionmaker,
                    settings.database_timeout_seconds,
                )
            ),
            asyncio.create_task(
                sweep_key_expiry_periodically(
                    sessionmaker, settings.key_expiry_sweep_interval_seconds
                )
            ),
            asyncio.create_task(metrics.measure_event_loop_lag()),
        ]

    async def close(self) -> None:
        """Stop the periodic work, then close every component in the order its data needs:
        pending usage is committed before the engine goes away."""
        for task in self.background:
            task.cancel()
        # uvicorn comes here once the requests in flight are answered (or after
        # MODELGATE_SHUTDOWN_TIMEOUT_SECONDS); closing gets as long again, so that a database or
        # Redis that stopped answering cannot keep the process from exiting.
        timeout = self.settings.shutdown_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                # Deploys still waiting are logged and audited as not run, while the database
                # is still there.
                await self.deploys.close()
                await self.dispatcher.close()
                await self.usage_writer.close()
                await self.key_activity.close()
                if self.prediction_cache is not None:
                    await self.prediction_cache.drain()
                await self.redis.close()
                if self.read_replica is not None:
                    await self.read_replica.close()
                await self.engine.dispose()
        except TimeoutError:
            logger.error(
                "closing did not finish within MODELGATE_SHUTDOWN_TIMEOUT_SECONDS",
                timeout_seconds=timeout,
            )

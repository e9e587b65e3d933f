"""The process's one Redis connection: ``limits``' asyncio storage on ``MODELGATE_REDIS_URL`` (a
plain URL, Sentinel ``redis+sentinel://`` or Cluster ``redis+cluster://``) and the redis-py
asyncio client inside it, made once by the app's composition root (``api.services``).

Who uses which: the rate limiter (``auth.limits.limiter``) and the failure and login throttles
(``auth.identity.failure_throttle``, ``auth.identity.login_throttle``) count through the
storage; the limiter's scripts, the concurrency limit (``auth.limits.concurrency``) and the
prediction cache (``api.inference.cache``) send their own commands on the client, and tracing
instruments it. Every call is bounded by the client's socket timeouts, which are
``MODELGATE_REDIS_TIMEOUT_SECONDS``.

Without a Redis URL the storage is ``limits``' memory storage and there is no client: the counts
are this process's own, which is right for one process and wrong for several workers.

On Redis Cluster a script may only touch keys of one hash slot, so every key one script touches
for one API key (its limits' counters and its set of requests in flight) carries the same hash
tag (``hash_tag``): a check stays one script in one round trip, on the node that owns the key.
On a plain Redis or a Sentinel-managed one the braces are just characters of the name.
"""

from __future__ import annotations

from typing import Any

from limits.aio.storage import Storage
from limits.storage import storage_from_string

from auth.settings import Settings


class RedisConnection:
    """``storage`` (``limits``' asyncio storage: Redis, or memory) and ``client`` (the redis-py
    asyncio client that storage uses; None without Redis)."""

    __slots__ = ("client", "storage")

    def __init__(self, storage: Storage, client: Any | None) -> None:
        self.storage = storage
        self.client = client

    @property
    def uses_redis(self) -> bool:
        """Whether the counts live on Redis (shared by every worker) rather than in memory."""
        return self.client is not None

    async def close(self) -> None:
        """Close the client's connections, and a Sentinel setup's connections to the Sentinels
        (in memory there is nothing to close)."""
        if self.client is not None:
            await self.client.aclose()
        sentinel = getattr(getattr(self.storage, "bridge", None), "sentinel", None)
        for sentinel_client in getattr(sentinel, "sentinels", ()):
            await sentinel_client.aclose()


SENTINEL_SCHEME = "redis+sentinel://"


def hash_tag(identifier: str) -> str:
    """``identifier`` as a Redis Cluster hash tag: every key whose name holds it (as its first
    ``{...}``) is in the same slot, so that one script may touch them all."""
    return "{" + identifier + "}"


def connect_redis(settings: Settings) -> RedisConnection:
    """The connection the settings ask for. Nothing is sent yet: the client connects on its
    first command."""
    options: dict[str, Any] = {}
    if settings.redis_url:
        timeouts = {
            "socket_timeout": settings.redis_timeout_seconds,
            "socket_connect_timeout": settings.redis_timeout_seconds,
        }
        # The same client library as the rest of the app (limits defaults to coredis).
        options = {"implementation": "redispy", **timeouts}
        if settings.redis_url.startswith(SENTINEL_SCHEME):
            # The Sentinels' own connections are bounded too (limits passes them none), and
            # counters are read from the master only: a replica lags, and would under-count.
            options.update(sentinel_kwargs=timeouts, use_replicas=False)
    uri = settings.redis_url or "memory://"
    storage = storage_from_string("async+" + uri, **options)
    if not isinstance(storage, Storage):  # the "async+" scheme always gives one
        raise TypeError("MODELGATE_REDIS_URL did not yield an asyncio storage")
    return RedisConnection(storage, redis_client(storage))


def redis_client(storage: Storage) -> Any:
    """The redis-py asyncio client inside ``limits``' Redis storage (the same object however
    often it is asked), or None for a storage without Redis (memory): the one way every
    component that sends its own commands reaches the storage's client."""
    bridge = getattr(storage, "bridge", None)
    return bridge.get_connection() if bridge is not None else None

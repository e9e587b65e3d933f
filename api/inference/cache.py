"""The prediction cache: a /predict answer kept for a while, per tenant, model version and
exact features, on Redis when it is configured and in this process's memory otherwise.

The key is an HMAC-SHA256, under a secret derived from the key pepper, of the tenant's id, the
model's name, version and artifact digest, and the validated features' float64 bytes (never the
request's JSON text: ``5.1`` and ``5.10`` are the same features). One tenant's lookup can never
reach another's entry, so it can neither receive another tenant's answer nor learn from a hit
that another tenant asked the same question; a re-registered artifact under the same version
number never answers from the old one's entries. The keys say nothing about the features to
whoever reads Redis without the pepper.

It fails safe: a Redis error, a reply slower than ``redis_timeout_seconds`` or an entry that does
not parse is a miss (and counted in ``modelgate_cache_errors_total``), never an error response;
after a Redis failure the cache leaves Redis alone for a second, so that a slow Redis does not
cost every request its timeout. Writes are sent in the background, so a miss does not wait for
them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
import structlog

from api.observability import metrics
from ml import LoadedModel, Prediction
from ml.model import FeatureMatrix

logger = structlog.get_logger(__name__)

_NAMESPACE = b"mg:pc:"
# After a Redis failure, how long the cache goes without Redis (every lookup a miss).
_RETRY_SECONDS = 1.0
# Writes to Redis in flight at most; beyond it, answers are not cached (Redis is slow).
_MAX_PENDING_WRITES = 1024


class MemoryBackend:
    """An LRU of at most ``max_entries`` values, each dropped ``ttl_seconds`` after it was set."""

    def __init__(self, ttl_seconds: float, max_entries: int) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: bytes) -> bytes | None:
        """The value under ``key`` if it has not expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if time.monotonic() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def set(self, key: bytes, value: bytes) -> None:
        """Store ``value``; the least recently used entry goes when full."""
        self._entries[key] = (time.monotonic() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class RedisBackend:
    """Values on Redis (``SET ... PX``), each call bounded by ``timeout_seconds``."""

    def __init__(self, client: Any, ttl_seconds: float, timeout_seconds: float) -> None:
        self._client = client
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._timeout = timeout_seconds
        self._skip_until = 0.0
        self._writes: set[asyncio.Task[None]] = set()

    async def get(self, key: bytes) -> bytes | None:
        """The value under ``key``; None on a miss and on any failure."""
        if time.monotonic() < self._skip_until:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                value = await self._client.get(key)
        except Exception as exc:  # redis-py's errors share no base with OSError; a miss
            self._failed(exc)
            return None
        if isinstance(value, str):
            return value.encode()
        return value if isinstance(value, bytes) else None

    def set(self, key: bytes, value: bytes) -> None:
        """Store ``value`` in the background (dropped if Redis is failing or backed up)."""
        if time.monotonic() < self._skip_until or len(self._writes) >= _MAX_PENDING_WRITES:
            return
        task = asyncio.get_running_loop().create_task(self._set(key, value))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _set(self, key: bytes, value: bytes) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(key, value, px=self._ttl_ms)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        metrics.record_cache_error()
        if self._skip_until == 0.0 or time.monotonic() >= self._skip_until + _RETRY_SECONDS:
            # Once per outage rather than once per request.
            logger.warning("prediction cache: redis failed; lookups miss", error=type(exc).__name__)
        self._skip_until = time.monotonic() + _RETRY_SECONDS

    async def drain(self) -> None:
        """Wait for the writes in flight (each is bounded by the timeout)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


class PredictionCache:
    """Answers of ``/predict`` by tenant, model version and exact features (see the module)."""

    def __init__(self, backend: MemoryBackend | RedisBackend, secret: bytes) -> None:
        self.backend = backend
        self._secret = secret

    def key(self, tenant_id: uuid.UUID, model: LoadedModel, matrix: FeatureMatrix) -> bytes:
        """The entry's name: an HMAC of everything that decides the answer, and whose it is."""
        manifest = model.manifest
        features = np.ascontiguousarray(matrix, dtype=np.float64)
        digest = hmac.new(self._secret, tenant_id.bytes, hashlib.sha256)
        for part in (
            manifest.name,
            manifest.version,
            # What is served: the ONNX file when there is one, else the pickle.
            (manifest.onnx_sha256 if model.runtime == "onnx" else None) or manifest.sha256,
            "x".join(str(n) for n in features.shape),
        ):
            digest.update(b"\0" + part.encode())
        digest.update(b"\0" + features.tobytes())
        return _NAMESPACE + digest.hexdigest().encode()

    async def get(
        self, tenant_id: uuid.UUID, model: LoadedModel, matrix: FeatureMatrix
    ) -> Prediction | None:
        """The cached answer for one row, or None (a miss, or any failure); counted in
        Prometheus (``api.observability.metrics``), the one count of hits, misses and errors."""
        raw = await self.backend.get(self.key(tenant_id, model, matrix))
        prediction = None if raw is None else _decode(raw, model.manifest.class_names)
        if prediction is None and raw is not None:
            metrics.record_cache_error()
        metrics.record_cache(prediction is not None)
        return prediction

    def put(
        self,
        tenant_id: uuid.UUID,
        model: LoadedModel,
        matrix: FeatureMatrix,
        prediction: Prediction,
    ) -> None:
        """Keep ``prediction`` for the configured time (without waiting for Redis)."""
        value = json.dumps([prediction.prediction, prediction.probability], separators=(",", ":"))
        self.backend.set(self.key(tenant_id, model, matrix), value.encode())

    async def drain(self) -> None:
        """Wait until the writes sent so far are done (Redis; in memory they are immediate)."""
        if isinstance(self.backend, RedisBackend):
            await self.backend.drain()


def _decode(raw: bytes, class_names: list[str]) -> Prediction | None:
    """A stored answer, or None if it is not one for a model with these classes."""
    try:
        index, probability = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if (
        type(index) is not int
        or not 0 <= index < len(class_names)
        or not isinstance(probability, list)
        or len(probability) != len(class_names)
        or not all(type(value) is float for value in probability)
    ):
        return None
    return Prediction(prediction=index, probability=probability, class_name=class_names[index])


def cache_secret(key_pepper: bytes) -> bytes:
    """The cache's HMAC key, derived from the pepper (the same on every worker)."""
    return hmac.new(key_pepper, b"modelgate prediction cache", hashlib.sha256).digest()


def build_prediction_cache(
    *,
    ttl_seconds: float,
    max_entries: int,
    key_pepper: bytes,
    redis_client: Any,
    redis_timeout_seconds: float,
) -> PredictionCache | None:
    """The cache the settings ask for: None when the TTL is 0, on Redis when a client is
    given, in memory otherwise."""
    if ttl_seconds <= 0:
        return None
    backend: MemoryBackend | RedisBackend
    if redis_client is not None:
        backend = RedisBackend(redis_client, ttl_seconds, redis_timeout_seconds)
    else:
        backend = MemoryBackend(ttl_seconds, max_entries)
    return PredictionCache(backend, cache_secret(key_pepper))

"""What modelgate measures for Prometheus, and the small API that records it.

Every metric is declared here, once, with bounded labels: route templates (never raw paths or
ids), methods from a fixed set, statuses, problem types, and the operator's model names and
versions. Per-tenant and per-key figures are the usage API's business, never labels here: one
series per tenant would grow without bound.

The recorders (:func:`record_request`, :func:`record_prediction`, :func:`record_rejection`,
:func:`record_cache`, :func:`record_cache_error`, :func:`observe_batch`,
:func:`observe_usage_flush`, :func:`record_registry`) are what the rest of ``api`` calls; they
cost a few microseconds each (a dictionary lookup of the labelled child, then
prometheus-client's own update).

Several workers: ``modelgate serve --workers N`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory before the workers start (``api.cli``); each worker's values then live in files there,
and :func:`render` sums them, so a scrape answered by any worker reports the whole server. One
process needs no directory. Nothing here may import ``api.http.errors`` (it imports the middleware,
which records through this module); the route is ``api.routes.metrics``.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from auth.events.outbox import EVENT_TYPES
from auth.usage.writer import FlushStats

if TYPE_CHECKING:
    from ml import ModelRegistry

logger = structlog.get_logger(__name__)

# Read once, as prometheus-client itself does when it is first imported: the two must agree.
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_MULTIPROC_DIR = os.environ.get(MULTIPROC_DIR_VARIABLE) or None

# The `_created` series double the output for nothing a dashboard uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Methods labelled as themselves; any other method a client sends is labelled "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds; requests run from well under a millisecond (a cached check) to the timeouts' seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Rows per inference call, and records per usage transaction (at most 5,000 by setting).
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_RECORD_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
_FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

HTTP_REQUESTS = Counter(
    "modelgate_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ("route", "method", "status"),
)
HTTP_DURATION = Histogram(
    "modelgate_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by route template, method and "
    "status.",
    ("route", "method", "status"),
    buckets=_LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "modelgate_predictions_total",
    "Prediction requests served (and billed), by model, version and runtime.",
    ("model", "version", "runtime"),
)
PREDICTION_ROWS = Counter(
    "modelgate_prediction_rows_total",
    "Instances predicted in served requests (the units billed), by model, version and runtime.",
    ("model", "version", "runtime"),
)
REJECTIONS = Counter(
    "modelgate_rejections_total",
    "Requests refused, by status and problem type (reason): 401 and 403 for a credential or its "
    "rights, 413 for a body over the limit, 429 for a limit (rate-limited, quota-exceeded, "
    "concurrency-limit-exceeded, auth-throttled, login-throttled), 503 when a dependency, the "
    "request's deadline or its usage record failed.",
    ("status", "reason"),
)
CACHE_HITS = Counter("modelgate_cache_hits_total", "Predictions answered from the cache.")
CACHE_MISSES = Counter(
    "modelgate_cache_misses_total", "Predictions looked up in the cache and not found there."
)
CACHE_ERRORS = Counter(
    "modelgate_cache_errors_total",
    "Prediction cache calls that failed (Redis unreachable, slow or in error, or a stored entry "
    "that did not parse); a failed lookup is counted as a miss too.",
)
INFERENCE_BATCH_ROWS = Histogram(
    "modelgate_inference_batch_rows",
    "Rows per call of a model's runtime, after the requests that arrived together were "
    "coalesced, by runtime.",
    ("runtime",),
    buckets=_ROW_BUCKETS,
)
USAGE_FLUSH_RECORDS = Histogram(
    "modelgate_usage_flush_records",
    "Usage records per group-commit transaction of the usage writer.",
    buckets=_RECORD_BUCKETS,
)
USAGE_FLUSH_DURATION = Histogram(
    "modelgate_usage_flush_duration_seconds",
    "Time of one usage-writer flush (the transaction, and its retry if any).",
    buckets=_FLUSH_BUCKETS,
)
USAGE_FLUSH_FAILURES = Counter(
    "modelgate_usage_flush_failures_total",
    "Usage-writer flushes that failed: every request in them was answered 503.",
)
USAGE_QUEUE_DEPTH = Gauge(
    "modelgate_usage_queue_depth",
    "Usage records waiting for the next flush, summed over the workers (sampled after each flush).",
    multiprocess_mode="livesum",
)
EVENT_LOOP_LAG = Histogram(
    "modelgate_event_loop_lag_seconds",
    "How late each worker's event loop ran a timer due every 100 ms: how long a request that is "
    "ready waits for the loop (CPU-bound work, garbage collection, a blocking call).",
    buckets=_FLUSH_BUCKETS,
)
REPORT_READS = Counter(
    "modelgate_report_reads_total",
    "Reports (usage, a closed month's billing export, the audit listing) by the database they "
    "read: the read replica (MODELGATE_DATABASE_READ_URL) or, when it is down or too far "
    "behind, the primary.",
    ("source",),
)
REPLICA_LAG = Gauge(
    "modelgate_replica_lag_seconds",
    "The read replica's lag behind the primary as last measured by a report, the largest over "
    "the workers.",
    multiprocess_mode="livemax",
)
MODEL_LOAD_FAILURES = Counter(
    "modelgate_model_load_failures_total",
    "Model versions that failed to load (manifest, hash check, artifact or warm-up), by model "
    "and version; each load of the registry counts its failures once.",
    ("model", "version"),
)
MODEL_FETCHES = Counter(
    "modelgate_model_fetches_total",
    "Fetches of model versions from the model store into this replica's cache, by model and "
    "outcome: fetched (a version this replica did not have), refetched (a local copy that no "
    "longer matched the catalogue's SHA-256) or failed (one try that failed).",
    ("model", "outcome"),
)
MODEL_ACTIVE_VERSION = Gauge(
    "modelgate_model_active_version",
    "1 for the version each model serves by default, 0 for its other versions.",
    ("model", "version"),
    # The most recent value any live worker set: during a switch, the newest state.
    multiprocess_mode="livemostrecent",
)

# Labelled children, cached: prometheus-client's labels() validates and locks on every call.
_request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_prediction_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_batch_children: dict[str, Any] = {}
_rejection_children: dict[tuple[int, str], Any] = {}


def record_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its duration, by route template
    (``api.http.middleware.route_template``), method and status."""
    key = (route, method if method in _METHODS else "other", status)
    children = _request_children.get(key)
    if children is None:
        labels = (key[0], key[1], str(status))
        children = (HTTP_REQUESTS.labels(*labels), HTTP_DURATION.labels(*labels))
        _request_children[key] = children
    children[0].inc()
    children[1].observe(seconds)


def record_rejection(status: int, problem_type: str) -> None:
    """Count one refusal by its status and problem type (``api.http.middleware`` decides which
    answers are refusals)."""
    key = (status, problem_type)
    child = _rejection_children.get(key)
    if child is None:
        child = _rejection_children[key] = REJECTIONS.labels(str(status), problem_type)
    child.inc()


def record_prediction(model: str, version: str, runtime: str, rows: int) -> None:
    """Count one served prediction request of ``rows`` instances."""
    key = (model, version, runtime)
    children = _prediction_children.get(key)
    if children is None:
        children = (PREDICTIONS.labels(*key), PREDICTION_ROWS.labels(*key))
        _prediction_children[key] = children
    children[0].inc()
    children[1].inc(rows)


def record_cache(hit: bool) -> None:
    """Count one lookup of the prediction cache."""
    (CACHE_HITS if hit else CACHE_MISSES).inc()


def record_cache_error() -> None:
    """Count one failed call of the prediction cache (a lookup, or a write in the background)."""
    CACHE_ERRORS.inc()


def observe_batch(runtime: str, rows: int) -> None:
    """Record the rows of one call of a model's runtime (``onnx`` or ``sklearn``)."""
    child = _batch_children.get(runtime)
    if child is None:
        child = _batch_children[runtime] = INFERENCE_BATCH_ROWS.labels(runtime)
    child.observe(rows)


def observe_fetch(model: str, outcome: str) -> None:
    """Count one fetch of a model version from the model store (``ml.observe.fetch_done``)."""
    MODEL_FETCHES.labels(model, outcome).inc()


EVENTS_CREATED = Counter(
    "modelgate_events_created_total",
    "Outgoing events taken from the outbox and fanned out to their endpoints, by type",
    ["type"],
)
EVENT_DELIVERIES = Counter(
    "modelgate_event_deliveries_total",
    "Delivery attempts of outgoing events, by outcome "
    "(delivered, http_error, network_error, refused)",
    ["outcome"],
)
EVENT_OLDEST_UNDELIVERED = Gauge(
    "modelgate_event_oldest_undelivered_age_seconds",
    "Age of the oldest event not yet delivered to every endpoint (0: none)",
    multiprocess_mode="max",
)


# Every series exists from the start (a scrape shows zeros rather than nothing).
for _event_type in EVENT_TYPES:
    EVENTS_CREATED.labels(_event_type)
for _outcome in ("delivered", "http_error", "network_error", "refused"):
    EVENT_DELIVERIES.labels(_outcome)


def record_events_created(event_type: str, count: int = 1) -> None:
    """Events the dispatcher fanned out (each event once, whichever worker did it)."""
    EVENTS_CREATED.labels(event_type).inc(count)


def record_event_delivery(outcome: str) -> None:
    """One delivery attempt's outcome."""
    EVENT_DELIVERIES.labels(outcome).inc()


def record_event_backlog(age_seconds: float) -> None:
    """The age of the oldest undelivered event."""
    EVENT_OLDEST_UNDELIVERED.set(age_seconds)


# How often the event loop's lag is sampled: ten timers a second cost nothing a request sees.
LOOP_LAG_INTERVAL_SECONDS = 0.1


async def measure_event_loop_lag(interval_seconds: float = LOOP_LAG_INTERVAL_SECONDS) -> None:
    """Forever: sleep ``interval_seconds`` and record how much later than due the loop woke
    (``modelgate_event_loop_lag_seconds``), the wait every ready callback shared."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_seconds
        await asyncio.sleep(interval_seconds)
        EVENT_LOOP_LAG.observe(max(0.0, loop.time() - due))


def observe_usage_flush(stats: FlushStats) -> None:
    """The usage writer's observer (``UsageWriter(observer=...)``): one flush's figures."""
    USAGE_FLUSH_RECORDS.observe(stats.records)
    USAGE_FLUSH_DURATION.observe(stats.seconds)
    USAGE_QUEUE_DEPTH.set(stats.queued)
    if stats.failed:
        USAGE_FLUSH_FAILURES.inc()


def observe_report_read(source: str, lag_seconds: float | None) -> None:
    """The read replica's observer (``ReadReplica(observer=...)``): where a report read, and
    the replica's lag when it was measured."""
    REPORT_READS.labels(source).inc()
    if lag_seconds is not None:
        REPLICA_LAG.set(lag_seconds)


# The (model, version) pairs this process last reported in MODEL_ACTIVE_VERSION.
_reported_versions: set[tuple[str, str]] = set()


def record_active_versions(registry: ModelRegistry) -> None:
    """Each model's active version, after a switch (an activation, a self-check); a version
    the registry no longer has is no longer reported."""
    reported = set()
    for info in registry.models():
        for status in info.versions:
            MODEL_ACTIVE_VERSION.labels(info.name, status.version).set(
                1 if status.version == info.active_version else 0
            )
            reported.add((info.name, status.version))
    for stale in _reported_versions - reported:
        MODEL_ACTIVE_VERSION.remove(*stale)
    _reported_versions.clear()
    _reported_versions.update(reported)


def record_registry(registry: ModelRegistry) -> None:
    """After a load of the registry (at start, and each self-check, which retries the versions
    that failed): each model's active version, and the versions that failed in this load."""
    record_active_versions(registry)
    for status in registry.failed_versions():
        MODEL_LOAD_FAILURES.labels(status.name, status.version).inc()


def render() -> bytes:
    """Every metric in Prometheus' text format: this process's, or with several workers all of
    theirs summed (reading their files: blocking, call it from a thread)."""
    if _MULTIPROC_DIR is None:
        return generate_latest(REGISTRY)
    forget_dead_workers(_MULTIPROC_DIR)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=_MULTIPROC_DIR)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


# prometheus-client's file per process and kind: counter_1234.db, gauge_livesum_1234.db...
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def forget_dead_workers(directory: str) -> None:
    """Drop the gauges of workers that are gone (a worker that was killed and replaced): a
    gauge is a live value. Their counters and histograms stay, so that totals never go down."""
    for pid in _pids(Path(directory).iterdir()):
        if pid != os.getpid() and not _alive(pid):
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def worker_exiting() -> None:
    """A worker's last word at shutdown: its gauges go with it."""
    if _MULTIPROC_DIR is not None:
        multiprocess.mark_process_dead(os.getpid(), _MULTIPROC_DIR)  # type: ignore[no-untyped-call]


def _pids(paths: Iterable[Path]) -> set[int]:
    return {
        int(match.group(1)) for path in paths if (match := _LIVE_GAUGE_FILE.fullmatch(path.name))
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process holds the number now: our worker is gone
    return True

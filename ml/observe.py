"""Hooks through which the serving layer observes inference, without ``ml`` importing it (or
Prometheus): the API installs an observer; with none installed a hook costs one global read."""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Called with the runtime ("onnx" or "sklearn") and the rows of one call of it.
BatchObserver = Callable[[str, int], None]

# Called with a model's name and the outcome of one fetch from the model store: "fetched" (a
# version this replica did not have), "refetched" (a local copy that no longer matched) or
# "failed" (one try that failed).
FetchObserver = Callable[[str, str], None]

_batch_observer: BatchObserver | None = None
_fetch_observer: FetchObserver | None = None


def set_batch_observer(observer: BatchObserver | None) -> None:
    """Install the process's batch observer (None: remove it)."""
    global _batch_observer
    _batch_observer = observer


def batch_observer() -> BatchObserver | None:
    """The process's batch observer, if one is installed."""
    return _batch_observer


def batch_done(runtime: str, rows: int) -> None:
    """Report one call of a runtime on ``rows`` rows (after the requests that arrived together
    were coalesced into it)."""
    observer = _batch_observer
    if observer is None:
        return
    try:
        observer(runtime, rows)
    except Exception as exc:
        # Measuring must never fail a prediction.
        logger.warning("batch observer raised %s", type(exc).__name__)


def set_fetch_observer(observer: FetchObserver | None) -> None:
    """Install the process's fetch observer (None: remove it)."""
    global _fetch_observer
    _fetch_observer = observer


def fetch_done(model: str, outcome: str) -> None:
    """Report one fetch of a version from the model store (ml.replica_cache)."""
    observer = _fetch_observer
    if observer is None:
        return
    try:
        observer(model, outcome)
    except Exception as exc:
        logger.warning("fetch observer raised %s", type(exc).__name__)

"""Hooks through which the serving layer observes inference, without ``ml`` importing it (or
Prometheus): the API installs an observer; with none installed a hook costs one global read."""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Called with the runtime ("onnx" or "sklearn") and the rows of one call of it.
BatchObserver = Callable[[str, int], None]

_batch_observer: BatchObserver | None = None


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

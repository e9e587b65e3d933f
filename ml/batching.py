"""Micro-batching: concurrent small requests for one model version share one runtime call.

scikit-learn pays a fixed cost per ``predict_proba`` call (about 12 ms for the default 100-tree
forest on this project's 2-core machine) and little per row (64 rows cost about 1.3 times one):
answering 64 concurrent single-row requests with one call instead of 64 is most of the work
saved. A :class:`MicroBatcher` queues the validated rows of concurrent requests, runs them in
one call in a worker thread, and hands each request its own rows' results. At most one call per
batcher runs at a time, so the rows that arrive while a call runs form the next batch by
themselves (under load, batches grow without any waiting); when the batcher is idle, the first
row waits at most ``max_wait_seconds`` for company before its call starts.

Rows are validated before they are queued (``LoadedModel.to_matrix``): a bad row is refused on
its own and never shares a call with others. A row's result does not depend on the other rows
of its call (scikit-learn predicts each row on its own), which ``tests/ml/test_batching.py``
checks bit for bit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from ml.observe import batch_done

T = TypeVar("T")
FeatureMatrix = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a model's runtime calls are batched.

    ``max_size`` rows at most per call; ``max_wait_seconds`` is the longest the first row of an
    idle batcher waits for more before its call starts (0: start at once). Each call is
    reported to ``ml.observe.batch_done``, as the ONNX runtime's calls are.
    """

    enabled: bool = True
    max_size: int = 32
    max_wait_seconds: float = 0.002

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError("max_size must be at least 1")
        if not 0 <= self.max_wait_seconds <= 1:
            raise ValueError("max_wait_seconds must be between 0 and 1")


# No batching: every request makes its own call.
DIRECT = BatchPolicy(enabled=False)


@dataclass(slots=True)
class _Waiting(Generic[T]):
    matrix: FeatureMatrix
    future: asyncio.Future[list[T]]
    queued_at: float


class MicroBatcher(Generic[T]):
    """Runs the row matrices of concurrent :meth:`submit` calls through ``infer`` together, in
    a worker thread, one call at a time. ``infer`` maps an (n, features) matrix to n results;
    ``runtime`` names it to ``ml.observe.batch_done``."""

    __slots__ = ("_full", "_infer", "_loop", "_queue", "_rows", "_runtime", "_worker")

    def __init__(self, infer: Callable[[FeatureMatrix], Sequence[T]], runtime: str) -> None:
        self._infer = infer
        # What its calls are reported as (ml.observe.batch_done).
        self._runtime = runtime
        self._queue: deque[_Waiting[T]] = deque()
        self._rows = 0
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set when the queue reaches max_size while the worker waits for it to fill.
        self._full: asyncio.Future[None] | None = None

    async def submit(self, matrix: FeatureMatrix, policy: BatchPolicy) -> list[T]:
        """The results of ``matrix``'s rows (at most ``policy.max_size`` of them), computed in
        one call with the rows of other concurrent submissions."""
        if len(matrix) > policy.max_size:
            raise ValueError("a submission may not exceed the batch's max_size")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A batcher outlives an event loop only in tests (one loop per test); whatever the
            # old loop left queued can never run.
            self._queue.clear()
            self._rows = 0
            self._worker = None
            self._full = None
            self._loop = loop
        future: asyncio.Future[list[T]] = loop.create_future()
        self._queue.append(_Waiting(matrix, future, time.monotonic()))
        self._rows += len(matrix)
        if self._worker is None:
            self._worker = loop.create_task(self._drain(policy))
        elif self._rows >= policy.max_size and self._full is not None and not self._full.done():
            self._full.set_result(None)
        return await future

    async def _drain(self, policy: BatchPolicy) -> None:
        try:
            while self._queue:
                await self._wait_for_company(policy)
                batch = self._take(policy.max_size)
                await self._run(batch)
        finally:
            self._worker = None
            # Cancelled (the loop is shutting down): nothing will answer what is left.
            for waiting in self._queue:
                waiting.future.cancel()
            self._queue.clear()
            self._rows = 0

    async def _wait_for_company(self, policy: BatchPolicy) -> None:
        if policy.max_wait_seconds <= 0 or self._rows >= policy.max_size:
            return
        remaining = self._queue[0].queued_at + policy.max_wait_seconds - time.monotonic()
        if remaining <= 0:
            return
        self._full = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait((self._full,), timeout=remaining)
        finally:
            self._full = None

    def _take(self, max_size: int) -> list[_Waiting[T]]:
        batch = [self._queue.popleft()]
        rows = len(batch[0].matrix)
        while self._queue and rows + len(self._queue[0].matrix) <= max_size:
            waiting = self._queue.popleft()
            batch.append(waiting)
            rows += len(waiting.matrix)
        self._rows -= rows
        return batch

    async def _run(self, batch: list[_Waiting[T]]) -> None:
        # A request whose client went away (its future cancelled) needs no prediction.
        live = [waiting for waiting in batch if not waiting.future.done()]
        if not live:
            return
        matrices = [waiting.matrix for waiting in live]
        matrix = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
        try:
            results = await asyncio.to_thread(self._infer, matrix)
        except Exception as exc:
            for waiting in live:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        except BaseException:
            for waiting in live:
                waiting.future.cancel()
            raise
        batch_done(self._runtime, len(matrix))
        start = 0
        for waiting in live:
            end = start + len(waiting.matrix)
            if not waiting.future.done():
                waiting.future.set_result(list(results[start:end]))
            start = end

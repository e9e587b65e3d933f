"""Micro-batching of the scikit-learn runtime: shared calls, identical answers, isolated
failures."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from ml import InvalidFeatures, LoadedModel, ModelRegistry
from ml.batching import DIRECT, BatchPolicy, MicroBatcher
from tests.conftest import recorded_batches


class _CallRecorder:
    """Wraps an estimator's predict_proba and records the rows of every call."""

    def __init__(self, estimator: Any) -> None:
        self._estimator = estimator
        self.calls: list[np.ndarray[Any, Any]] = []
        self.threads: list[int] = []

    def predict_proba(self, matrix: Any) -> Any:
        self.calls.append(np.array(matrix))
        self.threads.append(threading.get_ident())
        return self._estimator.predict_proba(matrix)


@pytest.fixture
def sklearn_model(pickle_model_dir: Path) -> tuple[_CallRecorder, LoadedModel]:
    """The iris forest served by scikit-learn, its calls recorded."""
    registry = ModelRegistry(pickle_model_dir)
    registry.load()
    loaded = registry.get("iris")
    assert loaded.runtime == "sklearn"
    recorder = _CallRecorder(joblib.load(pickle_model_dir / "iris" / "1" / "model.joblib"))
    return recorder, LoadedModel(loaded.manifest, recorder.predict_proba, "sklearn")


def _rows(count: int) -> list[list[float]]:
    rng = np.random.default_rng(7)
    low = np.array([4.3, 2.0, 1.0, 0.1])
    high = np.array([7.9, 4.4, 6.9, 2.5])
    result: list[list[float]] = rng.uniform(low, high, size=(count, 4)).tolist()
    return result


def _bits(probabilities: list[float]) -> list[str]:
    return [value.hex() for value in probabilities]


async def test_concurrent_single_rows_share_calls_and_match_unbatched_inference_bit_for_bit(
    sklearn_model: tuple[_CallRecorder, LoadedModel],
) -> None:
    recorder, model = sklearn_model
    rows = _rows(200)
    # Unbatched: one row per call, as with batching switched off.
    expected = [model.predict([row])[0] for row in rows]
    recorder.calls.clear()
    recorder.threads.clear()
    policy = BatchPolicy(max_size=32, max_wait_seconds=0.002)

    results = await asyncio.gather(*(model.predict_async([row], policy) for row in rows))

    assert [result[0].prediction for result in results] == [p.prediction for p in expected]
    assert [result[0].class_name for result in results] == [p.class_name for p in expected]
    assert [_bits(result[0].probability) for result in results] == [
        _bits(p.probability) for p in expected
    ]
    # Coalesced: far fewer calls than requests, none over the maximum, every row once.
    assert len(recorder.calls) <= 200 // 32 + 2
    assert max(len(call) for call in recorder.calls) == 32
    assert sum(len(call) for call in recorder.calls) == 200
    assert threading.get_ident() not in recorder.threads


async def test_batching_switched_off_makes_one_call_per_request(
    sklearn_model: tuple[_CallRecorder, LoadedModel],
) -> None:
    recorder, model = sklearn_model
    rows = _rows(10)

    await asyncio.gather(*(model.predict_async([row], DIRECT) for row in rows))

    assert sorted(len(call) for call in recorder.calls) == [1] * 10


async def test_a_refused_row_fails_alone_and_never_reaches_the_shared_call(
    sklearn_model: tuple[_CallRecorder, LoadedModel],
) -> None:
    recorder, model = sklearn_model
    rows: list[list[Any]] = _rows(8)
    rows[3] = [1.0, 2.0, float("nan"), 4.0]
    rows[5] = [1.0, 2.0, 3.0]
    policy = BatchPolicy(max_size=32, max_wait_seconds=0.05)

    results = await asyncio.gather(
        *(model.predict_async([row], policy) for row in rows), return_exceptions=True
    )

    assert isinstance(results[3], InvalidFeatures)
    assert isinstance(results[5], InvalidFeatures)
    served = [r for i, r in enumerate(results) if i not in (3, 5)]
    assert all(isinstance(r, list) and len(r) == 1 for r in served)
    [call] = recorder.calls
    assert len(call) == 6
    assert np.isfinite(call).all()


async def test_requests_larger_than_the_maximum_batch_run_on_their_own(
    sklearn_model: tuple[_CallRecorder, LoadedModel],
) -> None:
    recorder, model = sklearn_model
    policy = BatchPolicy(max_size=4, max_wait_seconds=0.05)

    big, small = await asyncio.gather(
        model.predict_async(_rows(5), policy), model.predict_async(_rows(1), policy)
    )

    assert (len(big), len(small)) == (5, 1)
    assert sorted(len(call) for call in recorder.calls) == [1, 5]


async def test_the_first_row_waits_for_company_but_a_full_batch_starts_at_once() -> None:
    calls: list[int] = []

    def infer(matrix: Any) -> list[float]:
        calls.append(len(matrix))
        return [float(value) for value in matrix[:, 0]]

    batcher: MicroBatcher[float] = MicroBatcher(infer, "sklearn")
    waiting = BatchPolicy(max_size=3, max_wait_seconds=1.0)

    async def later(value: float, delay: float) -> list[float]:
        await asyncio.sleep(delay)
        return await batcher.submit(np.array([[value]]), waiting)

    started = time.monotonic()
    results = await asyncio.gather(later(1.0, 0), later(2.0, 0.05), later(3.0, 0.1))

    # Three rows arriving 0.1 s apart share one call, which started as soon as the third
    # filled the batch, long before the 1 s wait was up.
    assert results == [[1.0], [2.0], [3.0]]
    assert calls == [3]
    assert time.monotonic() - started < 0.9


async def test_a_failing_call_fails_only_the_requests_that_shared_it() -> None:
    def infer(matrix: Any) -> list[float]:
        if (matrix < 0).any():
            raise RuntimeError("model broke")
        return [float(value) for value in matrix[:, 0]]

    batcher: MicroBatcher[float] = MicroBatcher(infer, "sklearn")
    policy = BatchPolicy(max_size=2, max_wait_seconds=0.05)

    with recorded_batches() as calls:
        first = await asyncio.gather(
            batcher.submit(np.array([[-1.0]]), policy),
            batcher.submit(np.array([[2.0]]), policy),
            batcher.submit(np.array([[3.0]]), policy),
            return_exceptions=True,
        )

        assert isinstance(first[0], RuntimeError)
        assert isinstance(first[1], RuntimeError)
        assert first[2] == [3.0]
        assert await batcher.submit(np.array([[4.0]]), policy) == [4.0]
    # The observer saw the calls that succeeded.
    assert calls == [("sklearn", 1), ("sklearn", 1)]


def test_a_policy_refuses_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="max_size"):
        BatchPolicy(max_size=0)
    with pytest.raises(ValueError, match="max_wait_seconds"):
        BatchPolicy(max_wait_seconds=-0.001)

"""A loaded model version and inference: :class:`LoadedModel` checks a request's features against
the version's manifest and predicts them on ONNX Runtime or scikit-learn, and
:class:`Prediction` is one answer.

:class:`LoadedModel` is immutable after loading and ``predict`` may be called from many threads
at once (scikit-learn's ``predict_proba`` does not mutate the estimator). How a version becomes
one (hash check, warm-up) is in :mod:`ml.loading`; which versions exist and which one serves, in
:mod:`ml.registry`.
"""

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ml.batching import DIRECT, BatchPolicy, MicroBatcher
from ml.errors import InvalidFeatures
from ml.manifest import Manifest
from ml.observe import batch_done

_NUMBER_TYPES = (int, float, np.integer, np.floating)
_BOOL_TYPES = (bool, np.bool_)
_ROW_TYPES = (Sequence, np.ndarray)
_TEXT_TYPES = (str, bytes, bytearray)
_NOT_NUMBERS = "features must be finite numbers"

FeatureMatrix = npt.NDArray[np.float64]
Runtime = Literal["onnx", "sklearn"]
# Batches up to this size run inline on ONNX Runtime (under 0.1 ms for the default forest);
# larger ones go to a thread so that one client's batch cannot stall the event loop.
INLINE_MAX_ROWS = 16


@dataclass(frozen=True, slots=True)
class Prediction:
    """One prediction: the most probable class's index, every class's probability (in the
    manifest's ``class_names`` order), and the predicted class's name."""

    prediction: int
    probability: list[float]
    class_name: str


class LoadedModel:
    """A verified, warmed-up model version ready to predict, served by ONNX Runtime when the
    version has an ONNX file and by scikit-learn otherwise."""

    __slots__ = (
        "_batcher",
        "_bounds",
        "_class_names",
        "_lower",
        "_n_features",
        "_pending",
        "_predict_proba",
        "_upper",
        "loaded_at",
        "manifest",
        "runtime",
    )

    def __init__(
        self,
        manifest: Manifest,
        predict_proba: Callable[[FeatureMatrix], Any],
        runtime: Runtime,
    ) -> None:
        self.manifest = manifest
        self.runtime: Runtime = runtime
        # When this process loaded the version (the tutorial's ``loaded_at``).
        self.loaded_at = datetime.now(UTC)
        self._predict_proba = predict_proba
        self._n_features = manifest.n_features
        self._class_names = tuple(manifest.class_names)
        accepted = manifest.accepted_range
        self._lower = np.array([r.min for r in accepted], dtype=np.float64)
        self._upper = np.array([r.max for r in accepted], dtype=np.float64)
        # The same bounds as Python floats, for the common case checked value by value.
        self._bounds = tuple((r.min, r.max) for r in accepted)
        # Rows of concurrent requests waiting for this event-loop turn's ONNX call.
        self._pending: list[tuple[FeatureMatrix, asyncio.Future[list[Prediction]]]] = []
        # Concurrent scikit-learn requests sharing one predict_proba call (ml.batching).
        self._batcher: MicroBatcher[Prediction] = MicroBatcher(self._infer, runtime)

    @property
    def name(self) -> str:
        """The model's name (``manifest.name``)."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The model's version (``manifest.version``)."""
        return self.manifest.version

    def predict(self, rows: Sequence[Sequence[float]]) -> list[Prediction]:
        """Validate ``rows`` and predict them in one call of the runtime (blocking).

        Raises :class:`InvalidFeatures` before touching the runtime if any row has the wrong
        number of values or a value that is not a finite real number (bools are refused).
        """
        return self._infer(self.to_matrix(rows))

    async def predict_async(
        self, rows: Sequence[Sequence[float]], batching: BatchPolicy = DIRECT
    ) -> list[Prediction]:
        """Like :meth:`predict`, without stalling the event loop (see :meth:`infer_async`)."""
        return await self.infer_async(self.to_matrix(rows), batching)

    async def infer_async(
        self, matrix: FeatureMatrix, batching: BatchPolicy = DIRECT
    ) -> list[Prediction]:
        """Predict the rows of a matrix that :meth:`to_matrix` returned, off the event loop.

        ONNX Runtime answers a forest in tens of microseconds: less than a hop to a thread and
        back costs, so it runs inline (``bench`` measures both), and the rows of every request
        that reaches this point in the same event-loop turn go to one ONNX call (a call's fixed
        cost is most of it: 10 rows cost about twice one). scikit-learn takes milliseconds of
        CPU per call and would stall every other request, so it runs in a worker thread; with
        ``batching`` enabled, concurrent requests of up to ``batching.max_size`` rows share
        that call (:class:`ml.batching.MicroBatcher`).
        """
        if self.runtime == "onnx" and len(matrix) <= INLINE_MAX_ROWS:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[list[Prediction]] = loop.create_future()
            self._pending.append((matrix, future))
            if len(self._pending) == 1:
                loop.call_soon(self._infer_pending)
            return await future
        if self.runtime == "sklearn" and batching.enabled and len(matrix) <= batching.max_size:
            return await self._batcher.submit(matrix, batching)
        batch_done(self.runtime, len(matrix))
        return await asyncio.to_thread(self._infer, matrix)

    def _infer_pending(self) -> None:
        pending, self._pending = self._pending, []
        matrices = [matrix for matrix, _ in pending]
        try:
            batch = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
            batch_done(self.runtime, len(batch))
            predictions = self._infer(batch)
        except Exception as exc:
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for matrix, future in pending:
            end = start + len(matrix)
            if not future.done():
                future.set_result(predictions[start:end])
            start = end

    def to_matrix(self, rows: Sequence[Sequence[float]]) -> FeatureMatrix:
        """``rows`` validated for this version, as a float64 matrix (one row per instance).

        Raises :class:`InvalidFeatures` naming the first offending row and feature.
        """
        n_features = self._n_features
        if isinstance(rows, _TEXT_TYPES) or not isinstance(rows, _ROW_TYPES):
            raise InvalidFeatures("features must be a list of rows of numbers")
        if len(rows) == 0:
            raise InvalidFeatures("at least one row of features is required")
        batch = len(rows) > 1
        bounds = self._bounds
        unchecked = False
        for index, row in enumerate(rows):
            # In a batch, say which instance is wrong; a single row needs no prefix.
            where = f"instance {index}: " if batch else ""
            if isinstance(row, _TEXT_TYPES) or not isinstance(row, _ROW_TYPES):
                raise InvalidFeatures(f"{where}features must be a list of numbers", row=index)
            if len(row) != n_features:
                raise InvalidFeatures(
                    f"{where}expected {n_features} features, got {len(row)}", row=index
                )
            for position, (value, (lower, upper)) in enumerate(zip(row, bounds, strict=True)):
                if type(value) is float:
                    # The common case (what JSON parses to), checked here: NaN fails both
                    # comparisons. A few comparisons cost less than numpy's call overhead.
                    if not lower <= value <= upper:
                        raise self._out_of_range(index if batch else None, position)
                    continue
                # bool is an int subclass, but True as a feature is a client bug, not 1.0.
                if isinstance(value, _BOOL_TYPES) or not isinstance(value, _NUMBER_TYPES):
                    raise InvalidFeatures(f"{where}{_NOT_NUMBERS}", row=index, feature=position)
                unchecked = True
        try:
            matrix = np.asarray(rows, dtype=np.float64)
        except (OverflowError, TypeError, ValueError):
            raise InvalidFeatures(_NOT_NUMBERS) from None
        if unchecked:
            # Integers and numpy scalars, checked once converted: every value against its
            # feature's range in one comparison.
            in_range = (matrix >= self._lower) & (matrix <= self._upper)
            if not in_range.all():
                row_index, feature = (int(i) for i in np.argwhere(~in_range)[0])
                raise self._out_of_range(row_index if batch else None, feature)
        return matrix

    def _out_of_range(self, row: int | None, feature: int) -> InvalidFeatures:
        where = "" if row is None else f"instance {row}: "
        name = self.manifest.feature_names[feature]
        lower, upper = self._lower[feature], self._upper[feature]
        return InvalidFeatures(
            # The name is the operator's (from the manifest), never the client's.
            f"{where}feature {feature} ('{name}') must be a finite number "
            f"between {lower:.9g} and {upper:.9g}",
            row=row or 0,
            feature=feature,
        )

    def _infer(self, matrix: FeatureMatrix) -> list[Prediction]:
        proba = np.asarray(self._predict_proba(matrix), dtype=np.float64)
        names = self._class_names
        # Two C-level conversions to Python lists, then one object per row.
        return [
            Prediction(prediction=index, probability=row, class_name=names[index])
            for index, row in zip(proba.argmax(axis=1).tolist(), proba.tolist(), strict=True)
        ]

"""Model files an operator brings to the registry (``modelgate models register|convert``): a
fitted classifier's file, told apart by its suffix (a scikit-learn pickle or ONNX), registered as
a new version with the names of its features and classes; and registered pickle-only versions
converted to ONNX. The CLI only parses arguments, calls these and prints."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from ml.manifest import MANIFEST_FILE, Manifest
from ml.onnx_export import ConversionError
from ml.train import convert_version, register_model, register_onnx, synthetic_rows

ONNX_SUFFIXES = (".onnx",)
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


class UnsupportedModelFile(ValueError):
    """A file whose suffix names neither a scikit-learn pickle nor an ONNX model."""


def read_rows(path: Path) -> npt.NDArray[np.float64]:
    """The rows of a CSV file of numbers (no header), as a float64 matrix: reference rows such
    as the training data. Raises ``OSError`` or ``ValueError`` if it cannot be read as such."""
    return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)


def register_file(
    model_dir: Path,
    path: Path,
    name: str,
    version: str,
    *,
    feature_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    reference: npt.NDArray[np.float64] | None = None,
    metrics: dict[str, JsonValue] | None = None,
) -> Manifest:
    """Register the classifier in ``path`` (``.onnx``, or a ``.joblib``/``.pkl``/``.pickle``
    scikit-learn pickle) as version ``version`` of ``name``, not activated, converted to ONNX
    and checked as training does (:func:`ml.train.register_model`, :func:`ml.train.register_onnx`).

    Without ``feature_names``, a pickle's features are named by the estimator's own
    ``feature_names_in_``, else numbered; without ``class_names``, its classes by its
    ``classes_``. Without ``reference`` rows, a pickle's conversion is checked on 2,000 seeded
    random rows. Raises :class:`UnsupportedModelFile` for another suffix, and
    :class:`ConversionError`, ``OSError`` or ``ValueError`` if the file cannot be registered.
    """
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return register_onnx(
            model_dir,
            name,
            path.read_bytes(),
            feature_names=feature_names,
            class_names=class_names,
            reference=reference,
            version=version,
            activate=False,
            metrics=metrics,
        )
    if suffix not in PICKLE_SUFFIXES:
        raise UnsupportedModelFile(f"{path}: expected a .joblib or .onnx file")
    # The operator's own file, on the operator's command: unpickling it runs its code, exactly
    # as training would. Serving never unpickles it again once converted.
    return register_estimator(
        model_dir,
        joblib.load(path),
        name,
        version,
        feature_names=feature_names,
        class_names=class_names,
        reference=reference,
        metrics=metrics,
    )


def register_estimator(
    model_dir: Path,
    estimator: Any,
    name: str,
    version: str | None,
    *,
    feature_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    reference: npt.NDArray[np.float64] | None = None,
    metrics: dict[str, JsonValue] | None = None,
    source: str | None = None,
    source_version: str | None = None,
) -> Manifest:
    """Register a fitted classifier as version ``version`` (None: the next number) of ``name``,
    not activated, named
    and converted as :func:`register_file` says (``source`` and ``source_version`` record where
    a pulled one came from)."""
    n_features = int(getattr(estimator, "n_features_in_", 0) or 0)
    own_features = getattr(estimator, "feature_names_in_", None)
    features = feature_names or (
        [str(f) for f in own_features]
        if own_features is not None
        else [f"feature_{i}" for i in range(n_features)]
    )
    classes = class_names or [str(c) for c in getattr(estimator, "classes_", [])]
    return register_model(
        model_dir,
        name,
        estimator,
        feature_names=features,
        class_names=classes,
        reference=reference,
        version=version,
        activate=False,
        conversion_rows=synthetic_rows(n_features) if reference is None else None,
        metrics=metrics,
        source=source,
        source_version=source_version,
    )


@dataclass(frozen=True, slots=True)
class Conversion:
    """What converting one registered version did: its manifest afterwards, or why it was not
    converted (it stays on scikit-learn)."""

    name: str
    version: str
    manifest: Manifest | None
    error: str | None


def convert_versions(
    model_dir: Path,
    reference: npt.NDArray[np.float64] | None = None,
    name: str | None = None,
) -> Iterator[Conversion]:
    """Add an ONNX file to every registered version (of ``name`` only, if given) that has only
    a pickle, checked against ``reference`` (:func:`ml.train.convert_version`); one outcome per
    version, by model and version directory, each as soon as it is done. A version that already
    has one is left as it is; one that cannot be converted faithfully is reported, not raised."""
    for manifest_path in sorted(Path(model_dir).glob(f"*/*/{MANIFEST_FILE}")):
        version_dir = manifest_path.parent
        model = version_dir.parent.name
        if name is not None and model != name:
            continue
        try:
            manifest = convert_version(version_dir, reference)
        except (ConversionError, OSError, ValueError) as exc:
            yield Conversion(model, version_dir.name, None, str(exc))
            continue
        yield Conversion(model, version_dir.name, manifest, None)

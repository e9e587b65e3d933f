"""Converting scikit-learn classifiers to ONNX, and proving the conversion faithful.

A pickle is code and an ONNX file is data: a version with an ``.onnx`` file is served by ONNX
Runtime and its pickle is never opened at serve time. The conversion happens once, when a model is
registered (or by ``modelgate models convert``), and is only kept if the ONNX model gives the same
labels as scikit-learn on the reference data and probabilities within ``PROBABILITY_TOLERANCE``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

# The bar for a faithful conversion; float32 scores from ONNX Runtime land near 1e-7.
PROBABILITY_TOLERANCE = 1e-6
# The target opset for the default domain; ai.onnx.ml is raised to 3 where double thresholds
# need it (see _tree_thresholds_as_double).
TARGET_OPSET = 17
PROBABILITIES_OUTPUT = "probabilities"


class ConversionError(Exception):
    """The estimator cannot be served faithfully by ONNX Runtime; keep scikit-learn for it."""


def session_options() -> Any:
    """One intra- and one inter-op thread: parallelism comes from uvicorn workers, and ONNX
    Runtime's own thread pool would fight them for the same cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads burn a core waiting for work that a single-threaded session never hands out.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def load_session(model_bytes: bytes) -> Any:
    """An ONNX Runtime session on the CPU for already-verified model bytes."""
    import onnxruntime as ort

    return ort.InferenceSession(
        model_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"]
    )


def convert(estimator: Any, reference: npt.NDArray[np.float64]) -> bytes:
    """The estimator as a serialized ONNX model with float64 input and a ``probabilities``
    output; raises :class:`ConversionError` unless it matches scikit-learn on ``reference``."""
    try:
        from skl2onnx import to_onnx
    except ImportError as exc:  # pragma: no cover - skl2onnx is a dependency
        raise ConversionError("skl2onnx is not installed") from exc
    sample = np.asarray(reference[:1], dtype=np.float64)
    try:
        onnx_model = to_onnx(
            estimator,
            sample,
            # No ZipMap: a plain probability matrix, in classes_ order, is what we serve.
            options={id(estimator): {"zipmap": False}},
            target_opset=TARGET_OPSET,
        )
    except Exception as exc:
        # skl2onnx raises many types for unsupported estimators; all mean "not convertible".
        raise ConversionError(f"skl2onnx cannot convert {type(estimator).__name__}") from exc
    _tree_thresholds_as_double(onnx_model, estimator)
    model_bytes: bytes = onnx_model.SerializeToString()
    verify(model_bytes, estimator, reference)
    return model_bytes


def verify(model_bytes: bytes, estimator: Any, reference: npt.NDArray[np.float64]) -> None:
    """Refuse a conversion whose labels or probabilities differ from scikit-learn's."""
    matrix = np.asarray(reference, dtype=np.float64)
    try:
        session = load_session(model_bytes)
        probabilities = predict_probabilities(session, matrix)
    except Exception as exc:
        raise ConversionError("ONNX Runtime cannot run the converted model") from exc
    expected = np.asarray(estimator.predict_proba(matrix), dtype=np.float64)
    if probabilities.shape != expected.shape:
        raise ConversionError("the converted model's output has the wrong shape")
    if not np.array_equal(probabilities.argmax(axis=1), expected.argmax(axis=1)):
        raise ConversionError("the converted model predicts different labels")
    worst = float(np.abs(probabilities - expected).max())
    if worst > PROBABILITY_TOLERANCE:
        raise ConversionError(
            f"the converted model's probabilities differ by {worst:.2e} "
            f"(more than {PROBABILITY_TOLERANCE:.0e})"
        )


def predict_probabilities(session: Any, matrix: npt.NDArray[np.float64]) -> Any:
    """Run the session on a float64 matrix; the class-probability matrix it returns."""
    input_name = session.get_inputs()[0].name
    [probabilities] = session.run([PROBABILITIES_OUTPUT], {input_name: matrix})
    return probabilities


def _tree_thresholds_as_double(onnx_model: Any, estimator: Any) -> None:
    """Give forest nodes their float64 thresholds.

    skl2onnx writes a forest's split thresholds as float32 attributes even for float64 input,
    and a training value that sits next to a threshold then goes down the other branch (seen on
    iris: labels differed). ai.onnx.ml opset 3 allows double thresholds as tensors; they are
    taken from the fitted trees themselves.
    """
    trees = getattr(estimator, "estimators_", None)
    nodes = [node for node in onnx_model.graph.node if node.op_type == "TreeEnsembleClassifier"]
    if trees is None or len(nodes) != 1:
        return  # not a forest; the verification decides whether float32 was good enough
    from onnx import helper, numpy_helper

    node = nodes[0]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    modes = [m.decode() if isinstance(m, bytes) else m for m in attributes["nodes_modes"]]
    thresholds = np.array(
        [
            0.0 if mode == "LEAF" else float(trees[tree].tree_.threshold[node_id])
            for tree, node_id, mode in zip(
                attributes["nodes_treeids"], attributes["nodes_nodeids"], modes, strict=True
            )
        ],
        dtype=np.float64,
    )
    weights = np.asarray(attributes["class_weights"], dtype=np.float64)
    replaced = {"nodes_values", "class_weights", "nodes_hitrates"}
    kept = [a for a in node.attribute if a.name not in replaced]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(
        helper.make_attribute("nodes_values_as_tensor", numpy_helper.from_array(thresholds))
    )
    node.attribute.append(
        helper.make_attribute("class_weights_as_tensor", numpy_helper.from_array(weights))
    )
    for opset in onnx_model.opset_import:
        if opset.domain == "ai.onnx.ml":
            opset.version = max(opset.version, 3)

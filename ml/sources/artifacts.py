"""What a pulled artifact may become: an ONNX graph adapted to what modelgate serves, a
scikit-learn estimator read from skops with modelgate's own list of trusted types, or (only with
the operator's explicit consent) an unpickled estimator.

An ONNX graph is served when it takes one numeric input of [rows, features] and gives a label and
a probability per class. skl2onnx's defaults (float32 input, probabilities as a ZipMap sequence of
maps) are adapted: a float64 input cast to float32 in front of the graph, and the ZipMap removed
so that the probability tensor it read is the ``probabilities`` output. The adapted graph must
answer exactly as the original on the check rows, the canary row among them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.onnx_export import PROBABILITIES_OUTPUT, PROBABILITY_TOLERANCE, load_session
from ml.sources.uri import SourceError
from ml.train import synthetic_rows

# Types skops does not trust by default that modelgate does: the node storage of scikit-learn's
# decision trees (and so of its forests and gradient boosting). skops does not trust it because
# scikit-learn follows its node and feature indices without bounds checks: a forged file could
# make a prediction read out of bounds or loop forever. modelgate trusts it only after checking
# every tree (_check_trees) before anything predicts with it. Whatever list the artifact carries
# (MLflow's skops_trusted_types, say) is never consulted.
TRUSTED_SKOPS_TYPES: tuple[str, ...] = ("sklearn.tree._tree.Tree",)
# How far and how wide _check_trees looks for trees inside the estimator.
_MAX_DEPTH = 8
_MAX_OBJECTS = 100_000

PICKLE_REFUSED = (
    "the artifact is a pickle: unpickling it runs whatever code it carries, so modelgate "
    "refuses it unless you pass both --allow-pickle and its --sha256 (better: log it with "
    "skops, serialization_format='skops', or as ONNX)"
)
_MAX_UNTRUSTED_SHOWN = 5


def load_skops(path: Path, max_bytes: int) -> Any:
    """The estimator in a skops file, read with :data:`TRUSTED_SKOPS_TYPES` and skops' own
    defaults only, once its unpacked size is known to be at most ``max_bytes`` (a skops file is
    a zip archive, which may be compressed). Raises :class:`SourceError` naming the types it
    would have to trust."""
    try:
        import skops.io as sio
    except ImportError:
        raise SourceError("a skops artifact needs skops: pip install 'modelgate[skops]'") from None
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        raise SourceError("the artifact is not a readable skops file") from None
    if unpacked > max_bytes:
        raise SourceError(f"the skops artifact unpacks to more than {max_bytes} bytes: refused")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception:
        raise SourceError("the artifact is not a readable skops file") from None
    refused = sorted(set(untrusted) - set(TRUSTED_SKOPS_TYPES))
    if refused:
        shown = ", ".join(name[:100] for name in refused[:_MAX_UNTRUSTED_SHOWN])
        more = f" and {len(refused) - _MAX_UNTRUSTED_SHOWN} more" if len(refused) > 5 else ""
        raise SourceError(
            f"the skops artifact holds types modelgate does not trust: {shown}{more} "
            "(log a model built from scikit-learn's estimators, or export it to ONNX)"
        )
    try:
        estimator = sio.load(path, trusted=list(TRUSTED_SKOPS_TYPES))
    except Exception as exc:
        raise SourceError(f"the skops artifact cannot be loaded: {type(exc).__name__}") from None
    _check_trees(estimator)
    return estimator


def _check_trees(estimator: Any) -> None:
    """Refuse any decision tree inside ``estimator`` that scikit-learn could not walk safely:
    each split node's children must come after it and exist (so every walk ends at a leaf, in
    bounds), a leaf has no child on either side, and each split's feature must be one its
    estimator receives. A tree outside a fitted tree estimator is refused."""
    from sklearn.tree._tree import Tree

    seen: set[int] = set()
    stack: list[tuple[Any, int, Any]] = [(estimator, 0, None)]
    while stack:
        value, depth, owner = stack.pop()
        if id(value) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(value))
        if len(seen) > _MAX_OBJECTS:
            raise SourceError("the skops artifact holds too many objects to check")
        if isinstance(value, Tree):
            _check_tree(value, owner)
            continue
        if isinstance(value, dict):
            children: list[Any] = list(value.values())
        elif isinstance(value, list | tuple):
            children = list(value)
        elif isinstance(value, np.ndarray):
            children = list(value.ravel()) if value.dtype == object else []
        elif type(value).__module__.startswith("sklearn"):
            children = list(vars(value).values()) if hasattr(value, "__dict__") else []
        else:
            continue
        stack.extend((child, depth + 1, value) for child in children)


def _check_tree(tree: Any, owner: Any) -> None:
    bad = SourceError("the skops artifact holds a decision tree that is not well formed")
    n_features = getattr(owner, "n_features_in_", None)
    owned: object = getattr(owner, "tree_", None)
    if id(owned) != id(tree) or not isinstance(n_features, int | np.integer):
        raise bad
    count = int(tree.node_count)
    left = np.asarray(tree.children_left, dtype=np.int64)
    right = np.asarray(tree.children_right, dtype=np.int64)
    feature = np.asarray(tree.feature, dtype=np.int64)
    if count < 1 or not (len(left) == len(right) == len(feature) == count):
        raise bad
    if np.asarray(tree.value).shape[0] != count:
        raise bad
    index = np.arange(count)
    leaf = left == -1
    split = ~leaf
    if not np.array_equal(leaf, right == -1):
        raise bad
    within = min(int(n_features), int(tree.n_features))
    if (
        (left[split] <= index[split]).any()
        or (right[split] <= index[split]).any()
        or (left[split] >= count).any()
        or (right[split] >= count).any()
        or (feature[split] < 0).any()
        or (feature[split] >= within).any()
    ):
        raise bad


def load_pickle(path: Path) -> Any:
    """Unpickle an artifact whose digest the operator pinned and whose risk they accepted."""
    import joblib

    try:
        # joblib reads its own files and plain pickles (pickle, cloudpickle) alike.
        return joblib.load(path)
    except Exception as exc:
        raise SourceError(f"the pickle cannot be loaded: {type(exc).__name__}") from None


def adapt_onnx(model_bytes: bytes) -> tuple[bytes, list[str] | None]:
    """The graph as modelgate serves it (float64 input, a ``probabilities`` tensor), and the
    class labels it names (None if it names none). Raises :class:`SourceError` saying what to
    change when the graph is not a classifier modelgate can serve, or when the adaptation
    answers differently from the original on the canary row (zeros, when no training range is
    known) and 2,000 seeded random rows."""
    import onnx
    from onnx import TensorProto, helper

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception:
        raise SourceError("the artifact is not an ONNX model") from None
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    if len(inputs) != 1 or not inputs[0].type.HasField("tensor_type"):
        raise SourceError("the ONNX model must take one input tensor of [rows, features]")
    given = inputs[0]
    dims = given.type.tensor_type.shape.dim
    elem = given.type.tensor_type.elem_type
    if len(dims) != 2 or not dims[1].HasField("dim_value") or dims[1].dim_value < 1:
        raise SourceError("the ONNX model's input must be [rows, features], features fixed")
    if elem not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        raise SourceError("the ONNX model's input must be float32 or float64")
    label, probability, zipmap, prob_type = _outputs(graph)
    classes = _class_labels(graph, zipmap)
    producer = {out: node for node in graph.node for out in node.output}
    used = {n for node in graph.node for n in (*node.input, *node.output)} | {
        value.name for value in (*graph.input, *graph.output)
    }
    nodes = [node for node in graph.node if node is not zipmap]
    if probability != PROBABILITIES_OUTPUT:
        if PROBABILITIES_OUTPUT in used:
            raise SourceError(
                f"the ONNX model uses the name {PROBABILITIES_OUTPUT!r} for something other "
                "than its class probabilities: rename it"
            )
        if probability not in producer and probability not in weights:
            raise SourceError("the ONNX model's probability output is not computed by the graph")
        nodes.append(helper.make_node("Identity", [probability], [PROBABILITIES_OUTPUT]))
    new_input = given
    if elem == TensorProto.FLOAT:
        cast_from = "modelgate_float64_input"
        if cast_from in used:
            raise SourceError(f"the ONNX model already uses the name {cast_from!r}")
        nodes.insert(0, helper.make_node("Cast", [cast_from], [given.name], to=TensorProto.FLOAT))
        shape = [d.dim_param or None if not d.HasField("dim_value") else d.dim_value for d in dims]
        new_input = helper.make_tensor_value_info(cast_from, TensorProto.DOUBLE, shape)
    outputs = [label, helper.make_tensor_value_info(PROBABILITIES_OUTPUT, prob_type, [None, None])]
    adapted_graph = helper.make_graph(
        nodes,
        graph.name or "modelgate",
        [new_input, *[value for value in graph.input if value.name in weights]],
        outputs,
        initializer=list(graph.initializer),
        value_info=list(graph.value_info),
    )
    adapted = helper.make_model(
        adapted_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )
    try:
        onnx.checker.check_model(adapted)
    except Exception as exc:
        raise SourceError(f"the adapted ONNX model is invalid: {type(exc).__name__}") from exc
    adapted_bytes: bytes = adapted.SerializeToString()
    rows = np.vstack([np.zeros((1, dims[1].dim_value)), synthetic_rows(dims[1].dim_value)])
    _check_same_answers(model_bytes, adapted_bytes, rows, elem == TensorProto.FLOAT, classes)
    return adapted_bytes, None if classes is None else [str(c) for c in classes]


def _outputs(graph: Any) -> tuple[Any, str, Any, int]:
    """The label output, the probability tensor's name, the ZipMap node that wraps it (None if
    the probabilities are a tensor output) and the probabilities' element type."""
    from onnx import TensorProto

    shape_hint = (
        "the ONNX model must give two outputs, a label per row and a probability per class "
        "(skl2onnx writes them)"
    )
    if len(graph.output) != 2:
        raise SourceError(shape_hint)
    label = probability = zipmap = None
    prob_type = TensorProto.FLOAT
    for value in graph.output:
        if value.type.HasField("sequence_type"):
            nodes = [n for n in graph.node if value.name in n.output and n.op_type == "ZipMap"]
            if len(nodes) != 1:
                raise SourceError(shape_hint)
            zipmap, probability = nodes[0], nodes[0].input[0]
        elif value.type.HasField("tensor_type"):
            rank = len(value.type.tensor_type.shape.dim)
            elem = value.type.tensor_type.elem_type
            if rank == 2 and elem in (TensorProto.FLOAT, TensorProto.DOUBLE):
                probability, prob_type = value.name, elem
            elif rank == 1:
                label = value
    if label is None or probability is None:
        raise SourceError(shape_hint)
    return label, probability, zipmap, prob_type


def _class_labels(graph: Any, zipmap: Any) -> list[Any] | None:
    """The class labels the ZipMap (else the classifier node) names, in probability order."""
    from onnx import helper

    candidates = (
        [zipmap]
        if zipmap is not None
        else [
            n for n in graph.node if n.domain == "ai.onnx.ml" and n.op_type.endswith("Classifier")
        ]
    )
    for node in candidates:
        for attribute in node.attribute:
            if attribute.name in ("classlabels_int64s", "classlabels_ints", "classlabels_strings"):
                values = list(helper.get_attribute_value(attribute))
                return [v.decode() if isinstance(v, bytes) else int(v) for v in values] or None
    return None


def _check_same_answers(
    original: bytes,
    adapted: bytes,
    rows: npt.NDArray[np.float64],
    float32_input: bool,
    classes: list[Any] | None,
) -> None:
    try:
        before = load_session(original)
        after = load_session(adapted)
        given = rows.astype(np.float32) if float32_input else rows
        old_label, old_probabilities = before.run(None, {before.get_inputs()[0].name: given})
        label_name = next(o.name for o in after.get_outputs() if o.name != PROBABILITIES_OUTPUT)
        new_label, new_probabilities = after.run(
            [label_name, PROBABILITIES_OUTPUT], {after.get_inputs()[0].name: rows}
        )
    except Exception as exc:
        raise SourceError(f"ONNX Runtime cannot run the model: {type(exc).__name__}") from None
    if isinstance(old_probabilities, list):  # a ZipMap: one {label: probability} per row
        keys = classes if classes is not None else sorted(old_probabilities[0])
        old_probabilities = [[row[key] for key in keys] for row in old_probabilities]
    old = np.asarray(old_probabilities, dtype=np.float64)
    new = np.asarray(new_probabilities, dtype=np.float64)
    if (
        old.shape != new.shape
        or not np.array_equal(np.asarray(old_label), np.asarray(new_label))
        or float(np.abs(old - new).max()) > PROBABILITY_TOLERANCE
    ):
        raise SourceError("the adapted ONNX model answers differently from the original")

"""Tensors of the Open Inference Protocol, for every front end that speaks it (V2 over REST,
``api.routes.v2``; V2 over gRPC, ``api.grpc``): the rows of an input tensor, from JSON values or
from raw little-endian bytes (the REST binary tensor data extension and gRPC's
``raw_input_contents`` are the same encoding), and the output tensors of a prediction, as values
or as raw bytes.

Every check is made before anything is allocated for the tensor: its shape against the model
(``[rows, features]``, at most the batch limit of rows), then the byte count against shape and
datatype; the raw bytes are then read in place (``numpy.frombuffer``). Values have the bounds of
JSON ones: finite, within the datatype's range, and then within the model's ``input_range``
(``LoadedModel.to_matrix``, in the pipeline).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from auth.errors import InvalidRequest
from ml import FLOAT32_MAX, LoadedModel, Prediction

Loc = tuple[str | int, ...]

INPUT_NAME = "features"
OUTPUT_NAMES = ("prediction", "probability", "class_name")
PLATFORMS = {"onnx": "onnx_onnxv1", "sklearn": "sklearn_joblib"}

# Each input datatype's integer range (the integer types) and the element's little-endian
# layout. FP16 is not an input type: JSON cannot carry it faithfully, and one set of types
# holds for every encoding.
INTEGER_BOUNDS: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}
FLOAT_BOUNDS = {"FP32": FLOAT32_MAX, "FP64": sys.float_info.max}
LAYOUTS: dict[str, np.dtype[np.generic]] = {
    name: np.dtype(code)
    for name, code in {
        "FP32": "<f4",
        "FP64": "<f8",
        "INT8": "i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "UINT8": "u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
    }.items()
}
# Where the elements of a BYTES tensor's raw form begin: each is its length, 4 bytes, then it.
BYTES_LENGTH = 4


@dataclass(frozen=True)
class TensorSignature:
    """A tensor's name, datatype and shape (-1: a dimension of any size)."""

    name: str
    datatype: str
    shape: list[int]


def signature(model: LoadedModel) -> tuple[list[TensorSignature], list[TensorSignature]]:
    """A model version's input and output tensors, as the protocol's model metadata gives
    them: any number of rows (up to the batch limit)."""
    manifest = model.manifest
    rows = -1
    inputs = [TensorSignature(INPUT_NAME, "FP64", [rows, manifest.n_features])]
    outputs = [
        TensorSignature("prediction", "INT64", [rows]),
        TensorSignature("probability", "FP64", [rows, len(manifest.class_names)]),
        TensorSignature("class_name", "BYTES", [rows]),
    ]
    return inputs, outputs


def requested_outputs(names: Sequence[str] | None, loc: Loc) -> list[str]:
    """The outputs a request asks for, in its order (all three when it names none); an unknown
    or repeated name is refused, at ``loc`` + its index."""
    if names is None:
        return list(OUTPUT_NAMES)
    chosen: list[str] = []
    for index, name in enumerate(names):
        # The client's name is not echoed: it could be anything pasted in the wrong field.
        if name not in OUTPUT_NAMES:
            raise InvalidRequest(
                f"outputs[{index}] names no output of this model ({', '.join(OUTPUT_NAMES)})",
                loc=(*loc, index, "name"),
            )
        if name in chosen:
            raise InvalidRequest(
                f"outputs[{index}] names an output already requested", loc=(*loc, index, "name")
            )
        chosen.append(name)
    return chosen


def element_size(datatype: str) -> int:
    """The size in bytes of one element of an input ``datatype``."""
    return LAYOUTS[datatype].itemsize


def row_count(shape: Sequence[int], n_features: int, max_rows: int, loc: Loc) -> int:
    """The number of rows of an input tensor of ``shape``, which must be ``[rows, n_features]``
    with 1 to ``max_rows`` rows."""
    if len(shape) != 2 or shape[1] != n_features:
        raise InvalidRequest(
            f"the input's shape must be [rows, {n_features}] for this model", loc=(*loc, "shape")
        )
    rows = shape[0]
    if not 1 <= rows <= max_rows:
        raise InvalidRequest(
            f"an inference request holds 1 to {max_rows} rows", loc=(*loc, "shape")
        )
    return rows


def rows_from_values(
    data: list[int | float] | list[list[int | float]],
    datatype: str,
    rows: int,
    n_features: int,
    loc: Loc,
) -> list[list[float]]:
    """The rows of a tensor given as JSON values, flat or one list per row, as its shape says,
    each checked against ``datatype``."""
    values: list[int | float]
    if data and isinstance(data[0], list):
        nested: list[list[int | float]] = data
        if len(nested) != rows or any(len(row) != n_features for row in nested):
            raise InvalidRequest(
                f"the input's data must be {rows} rows of {n_features} values, as its shape says",
                loc=loc,
            )
        values = [value for row in nested for value in row]
    else:
        values = data  # type: ignore[assignment]
        if len(values) != rows * n_features:
            raise InvalidRequest(
                f"the input's data holds {len(values)} values; its shape says {rows * n_features}",
                loc=loc,
            )
    floats = _as_floats(values, datatype, loc)
    return [floats[start : start + n_features] for start in range(0, len(floats), n_features)]


def _as_floats(values: list[int | float], datatype: str, loc: Loc) -> list[float]:
    integer_bounds = INTEGER_BOUNDS.get(datatype)
    if integer_bounds is not None:
        lower, upper = integer_bounds
        for index, value in enumerate(values):
            if type(value) is not int or not lower <= value <= upper:
                raise InvalidRequest(
                    f"value {index} of the input is not an integer in {datatype}'s range",
                    loc=(*loc, index),
                )
        return [float(value) for value in values]
    bound = FLOAT_BOUNDS[datatype]
    for index, value in enumerate(values):
        # Integers first compared as integers: float() of a huge one would overflow.
        if not -bound <= value <= bound:
            raise InvalidRequest(
                f"value {index} of the input is out of {datatype}'s finite range",
                loc=(*loc, index),
            )
    return [float(value) for value in values]


def rows_from_bytes(
    raw: bytes | memoryview, datatype: str, rows: int, n_features: int, loc: Loc
) -> list[list[float]]:
    """The rows of a tensor given as raw little-endian elements (row-major, no padding), whose
    length must be exactly what its shape and ``datatype`` say."""
    layout = LAYOUTS[datatype]
    expected = rows * n_features * layout.itemsize
    if len(raw) != expected:
        raise InvalidRequest(
            f"the input's binary data is {len(raw)} bytes; its shape and datatype say {expected}",
            loc=loc,
        )
    # Read in place: the only new array is the float64 one the model needs anyway.
    elements = np.frombuffer(raw, dtype=layout)
    if datatype in FLOAT_BOUNDS:
        finite = np.isfinite(elements)
        if not finite.all():
            index = int(np.argmin(finite))
            raise InvalidRequest(
                f"value {index} of the input is out of {datatype}'s finite range",
                loc=(*loc, index),
            )
    matrix: list[list[float]] = elements.astype(np.float64).reshape(rows, n_features).tolist()
    return matrix


def check_binary_size(declared: int, datatype: str, rows: int, n_features: int, loc: Loc) -> None:
    """Refuse a declared binary size that is not what the tensor's shape and datatype say
    (checked before the bytes are looked at)."""
    expected = rows * n_features * element_size(datatype)
    if declared != expected:
        raise InvalidRequest(
            f"binary_data_size is {declared}; the input's shape and datatype say {expected}",
            loc=loc,
        )


@dataclass(frozen=True)
class OutputTensor:
    """One output of a prediction, its values flat in row-major order."""

    name: str
    datatype: str
    shape: list[int]
    data: list[int] | list[float] | list[str]

    def raw(self) -> bytes:
        """The tensor's raw form: little-endian elements; a BYTES element is its UTF-8 length
        (4 bytes, little-endian) then its UTF-8 bytes."""
        if self.datatype == "BYTES":
            parts = []
            for text in self.data:
                encoded = str(text).encode()
                parts.append(len(encoded).to_bytes(BYTES_LENGTH, "little") + encoded)
            return b"".join(parts)
        layout = "<i8" if self.datatype == "INT64" else "<f8"
        return np.asarray(self.data, dtype=layout).tobytes()


def output_tensors(
    names: Sequence[str], predictions: Sequence[Prediction], n_classes: int
) -> list[OutputTensor]:
    """The outputs ``names`` (in that order) of ``predictions``, one row each."""
    rows = len(predictions)
    tensors = {
        "prediction": lambda: OutputTensor(
            "prediction", "INT64", [rows], [p.prediction for p in predictions]
        ),
        "probability": lambda: OutputTensor(
            "probability",
            "FP64",
            [rows, n_classes],
            [value for p in predictions for value in p.probability],
        ),
        "class_name": lambda: OutputTensor(
            "class_name", "BYTES", [rows], [p.class_name for p in predictions]
        ),
    }
    return [tensors[name]() for name in names]

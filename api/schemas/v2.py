"""Request and response bodies of the Open Inference Protocol (V2) over REST (``api.routes.v2``).

Field names and shapes are the protocol's (KServe's "Predict Protocol - Version 2", now the Open
Inference Protocol); every value a client sends is bounded here, where it is parsed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.http.errors import Problem
from api.schemas.predict import HARD_MAX_INSTANCES, MAX_FEATURES

# The tensor datatypes an input may declare (api.inference.tensors gives each its range and
# layout): the protocol's numeric types but FP16 (which, as the protocol says, JSON cannot carry
# faithfully). BOOL and BYTES are not features.
InputDatatype = Literal[
    "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"
]
MAX_DIMENSIONS = 8
MAX_PARAMETERS = 32
MAX_OUTPUTS = 16

# A JSON integer of any tensor datatype (INT64 down to UINT64 up), or a finite JSON number; the
# input's datatype narrows it (api.routes.v2).
Scalar = (
    Annotated[int, Field(strict=True, ge=-(2**63), le=2**64 - 1)]
    | Annotated[float, Field(strict=True, allow_inf_nan=False)]
)
TensorName = Annotated[str, Field(min_length=1, max_length=100)]
ParameterValue = (
    Annotated[bool, Field(strict=True)]
    | Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Field(strict=True, allow_inf_nan=False)]
    | Annotated[str, Field(max_length=1000)]
)
Parameters = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=100)], ParameterValue],
    Field(
        max_length=MAX_PARAMETERS,
        description="Key/value pairs (string, number or boolean values); modelgate defines "
        "none, and accepts and ignores those of other servers",
    ),
]
Dimension = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]


class InferInput(BaseModel):
    """One input tensor: for modelgate's models, the rows to predict, of shape [rows, features]."""

    model_config = ConfigDict(extra="forbid")

    name: TensorName = Field(description="The tensor's name (the model has one input; any name)")
    shape: list[Dimension] = Field(
        min_length=1,
        max_length=MAX_DIMENSIONS,
        description="[rows, features]: at most MODELGATE_MAX_BATCH_SIZE rows (100 by default), "
        "the model's feature count (GET /v2/models/{model_name})",
    )
    datatype: InputDatatype = Field(
        description="The elements' type: FP32 and FP64 take finite numbers in the type's range, "
        "the integer types integers in theirs; values are used as float64, as /predict does"
    )
    parameters: Parameters | None = Field(
        default=None,
        description="`binary_data_size` (an integer): the tensor's data is not in `data` but "
        "in the body after the JSON, that many bytes of little-endian elements in row-major "
        "order (the binary tensor data extension); it must be exactly what the shape and "
        "datatype say. Other parameters are accepted and ignored",
    )
    data: (
        Annotated[list[Scalar], Field(min_length=1, max_length=HARD_MAX_INSTANCES * MAX_FEATURES)]
        | Annotated[
            list[Annotated[list[Scalar], Field(min_length=1, max_length=MAX_FEATURES)]],
            Field(min_length=1, max_length=HARD_MAX_INSTANCES),
        ]
        | None
    ) = Field(
        default=None,
        description="The values in row-major order: flat, or one list per row; as many as the "
        "shape says, each within the model's input_range (GET /api/v1/models/{name}). Required "
        "unless the parameters give `binary_data_size`, and refused if they do",
    )


class RequestedOutput(BaseModel):
    """An output the client wants back."""

    model_config = ConfigDict(extra="forbid")

    name: TensorName = Field(description="`prediction`, `probability` or `class_name`")
    parameters: Parameters | None = Field(
        default=None,
        description="`binary_data` (a boolean): return this output as binary data after the "
        "JSON (overrides the request's `binary_data_output`). Others are accepted and ignored",
    )


class InferRequest(BaseModel):
    """An inference request: one input tensor, the outputs wanted (all by default)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {
                            "name": "input0",
                            "shape": [2, 4],
                            "datatype": "FP32",
                            "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3],
                        }
                    ],
                    "outputs": [{"name": "probability"}],
                }
            ]
        },
    )

    id: Annotated[str, Field(max_length=256)] | None = Field(
        default=None, description="Echoed in the response; the request's X-Request-ID if absent"
    )
    parameters: Parameters | None = Field(
        default=None,
        description="`binary_data_output` (a boolean): return every output as binary data "
        "after the JSON, unless the output says otherwise. Others are accepted and ignored",
    )
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = Field(
        default=None,
        max_length=MAX_OUTPUTS,
        description="The outputs to return, in this order; all three when absent",
    )


class OutputTensor(BaseModel):
    """One output tensor, its data flat in row-major order: in `data`, or (asked for as binary)
    after the JSON, `parameters.binary_data_size` bytes of it."""

    name: str
    shape: list[int]
    datatype: Literal["INT64", "FP64", "BYTES"]
    data: list[int | float | str] | None = Field(
        default=None, description="The values; absent when the output is sent as binary data"
    )
    parameters: dict[str, str | int | float | bool] | None = Field(
        default=None,
        description="`binary_data_size`: the output's size in the binary part of the body "
        "(INT64 and FP64 as 8-byte little-endian elements, BYTES each as a 4-byte little-endian "
        "length and then its UTF-8 bytes)",
    )


class InferResponse(BaseModel):
    """The outputs of an inference, for the model version that computed them."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str = Field(description="The request's `id`, or its X-Request-ID when it had none")
    parameters: dict[str, str | int | float | bool] | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    """A tensor's name, datatype and shape (-1: a dimension of any size)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """What a model version takes and gives."""

    name: str
    versions: list[str] = Field(description="Every version that may be named in a path")
    platform: Literal["onnx_onnxv1", "sklearn_joblib"] = Field(
        description="What serves the version: ONNX Runtime or scikit-learn"
    )
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    """The server's name, version and protocol extensions."""

    name: str
    version: str
    extensions: list[str] = Field(
        description="The protocol extensions served: `binary_tensor_data` (REST)"
    )


class ServerLive(BaseModel):
    """The process is up."""

    live: bool


class ServerReady(BaseModel):
    """The server can serve (database, Redis if configured, models)."""

    ready: bool


class ModelReady(BaseModel):
    """Whether a model (version) can serve."""

    name: str
    ready: bool


class V2Problem(Problem):
    """A problem JSON body that is also the protocol's error object."""

    error: str = Field(description="The protocol's error message (the problem's `detail`)")

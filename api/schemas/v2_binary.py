"""The body of a V2 REST inference request or response as the protocol frames it: JSON, or
(the binary tensor data extension) JSON followed by raw tensor data, the JSON's length in the
``Inference-Header-Content-Length`` header.

A client's body is read whatever its ``Content-Type`` (``tritonclient`` sends none, Triton,
KServe and MLServer read it anyway). The framing is checked before any tensor is looked at: the
header length within the body, every ``binary_data_size`` an integer, and the sizes adding up to
exactly the bytes after the JSON; each tensor's bytes are then handed on in place (a
``memoryview``), for ``api.inference.tensors`` to check against the tensor's shape and datatype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema

from api.inference.tensors import OutputTensor
from api.schemas.v2 import InferRequest, InferResponse, Parameters
from auth.errors import InvalidRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
# The header's bound: no body the limit allows is longer.
MAX_HEADER_LENGTH = 2**31 - 1


@dataclass(frozen=True)
class InferBody:
    """A parsed inference request: its JSON and, for each input, its binary data (``None``:
    the values are in the JSON)."""

    request: InferRequest
    binary: list[memoryview | None]


def _binary_size(parameters: Parameters | None, loc: tuple[str | int, ...]) -> int | None:
    value = (parameters or {}).get("binary_data_size")
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidRequest(
            "binary_data_size must be a non-negative integer", loc=(*loc, "binary_data_size")
        )
    return value


def parse_infer_body(body: bytes, header_length: int | None) -> InferBody:
    """The request in ``body``: all JSON, or (``header_length`` given) that many bytes of JSON
    then the inputs' binary data, in the order of the inputs."""
    length = len(body) if header_length is None else header_length
    if length > len(body):
        raise InvalidRequest(
            f"{HEADER_LENGTH} is {length}; the body is {len(body)} bytes",
            loc=("header", HEADER_LENGTH.lower()),
        )
    view = memoryview(body)
    try:
        request = InferRequest.model_validate_json(body if length == len(body) else body[:length])
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {**error, "loc": ("body", *error["loc"])}
                for error in exc.errors(include_url=False, include_context=False)
            ]
        ) from None
    binary: list[memoryview | None] = []
    offset = length
    for index, tensor in enumerate(request.inputs):
        loc: tuple[str | int, ...] = ("body", "inputs", index, "parameters")
        size = _binary_size(tensor.parameters, loc)
        if size is None:
            if tensor.data is None:
                raise InvalidRequest(
                    "the input has neither data nor binary_data_size",
                    loc=("body", "inputs", index, "data"),
                )
            binary.append(None)
            continue
        if tensor.data is not None:
            raise InvalidRequest(
                "the input has both data and binary_data_size", loc=(*loc, "binary_data_size")
            )
        # Compared with what is left before it is sliced: a size past the body's end is
        # refused, never read short.
        if size > len(body) - offset:
            raise InvalidRequest(
                f"binary_data_size is {size}; {len(body) - offset} bytes of binary data are left",
                loc=(*loc, "binary_data_size"),
            )
        binary.append(view[offset : offset + size])
        offset += size
    if offset != len(body):
        raise InvalidRequest(
            f"the body holds {len(body) - offset} bytes that no input's binary_data_size claims",
            loc=("body",),
        )
    return InferBody(request, binary)


def _flag(parameters: Parameters | None, name: str, loc: tuple[str | int, ...]) -> bool | None:
    value = (parameters or {}).get(name)
    if value is not None and type(value) is not bool:
        raise InvalidRequest(f"{name} must be a boolean", loc=(*loc, name))
    return value


def binary_outputs(request: InferRequest) -> dict[str, bool]:
    """For each output the request names, whether it wants it as binary data; ``"*"``: the
    default for the others (``binary_data_output``)."""
    wanted = {"*": _flag(request.parameters, "binary_data_output", ("body", "parameters")) or False}
    for index, output in enumerate(request.outputs or ()):
        flag = _flag(output.parameters, "binary_data", ("body", "outputs", index, "parameters"))
        if flag is not None:
            wanted[output.name] = flag
    return wanted


def encode_outputs(
    header: dict[str, Any], tensors: Sequence[OutputTensor], binary: dict[str, bool]
) -> tuple[bytes, int | None]:
    """The response body for ``header`` (the response's JSON members but its outputs) and
    ``tensors``: all JSON, or the JSON then the binary outputs' raw data. Returns the body and,
    when it carries binary data, the JSON's length (the ``Inference-Header-Content-Length``)."""
    outputs: list[dict[str, Any]] = []
    raw: list[bytes] = []
    for tensor in tensors:
        output: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if binary.get(tensor.name, binary["*"]):
            data = tensor.raw()
            output["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            output["data"] = tensor.data
        outputs.append(output)
    document = InferResponse.model_validate({**header, "outputs": outputs}).model_dump_json(
        exclude_none=True
    )
    encoded = document.encode()
    if not raw:
        return encoded, None
    return b"".join([encoded, *raw]), len(encoded)


def request_body_openapi() -> dict[str, Any]:
    """The ``openapi_extra`` of an infer route, which reads its own body: the two forms of the
    request, and the schemas they refer to (``x-schemas``, moved to the document's components by
    ``api.http.openapi``)."""
    refs, definitions = models_json_schema(
        [(InferRequest, "validation")], ref_template="#/components/schemas/{model}"
    )
    return {
        "requestBody": {
            "required": True,
            "description": "The inference request as JSON (with or without a Content-Type), "
            f"or, with {HEADER_LENGTH}, that many bytes of it followed by the inputs' binary "
            "data (the binary tensor data extension)",
            "content": {
                "application/json": {"schema": refs[(InferRequest, "validation")]},
                BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "x-schemas": definitions.get("$defs", {}),
    }

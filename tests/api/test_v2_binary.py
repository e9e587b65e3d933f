"""The Open Inference Protocol's binary tensor data extension on the V2 infer routes
(api/schemas/v2_binary.py, api/inference/tensors.py): binary inputs of every accepted datatype
answer as JSON values do, binary outputs are framed as the extension says, every framing fault
is a 422 naming its place (never a 5xx), the body limit holds, and a fuzzing pass over random
sizes, lengths and truncations gives nothing but 200, 413 and 422, billing one unit per row of
each 200 and nothing else."""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import uuid
from collections import Counter
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from auth.models import UsageRecord
from tests.conftest import IRIS_SETOSA, IRIS_VIRGINICA, Harness, bearer, create_tenant_with_key

INFER = "/v2/models/iris/infer"
HEADER = "Inference-Header-Content-Length"
DTYPES = {
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
}
ROWS = [IRIS_SETOSA, IRIS_VIRGINICA]
INT_ROWS = [[5, 3, 1, 0], [7, 3, 5, 2]]


def binary_request(
    rows: Any,
    datatype: str,
    *,
    shape: list[int] | None = None,
    size: int | None = None,
    header: dict[str, Any] | None = None,
) -> tuple[bytes, int, bytes]:
    """A binary request's JSON, its length and the raw tensor (``size``: a declared
    ``binary_data_size`` other than the true one)."""
    raw = np.asarray(rows, dtype=DTYPES[datatype]).tobytes()
    array_shape = list(np.asarray(rows).shape)
    document = {
        "inputs": [
            {
                "name": "input0",
                "shape": array_shape if shape is None else shape,
                "datatype": datatype,
                "parameters": {"binary_data_size": len(raw) if size is None else size},
            }
        ],
        **(header or {}),
    }
    encoded = json.dumps(document).encode()
    return encoded, len(encoded), raw


async def post(harness: Harness, key: str, body: bytes, length: int | None) -> httpx.Response:
    """POST ``body`` as tritonclient does: no Content-Type, the JSON's length in the header."""
    headers = bearer(key)
    if length is not None:
        headers[HEADER] = str(length)
    # A hang would be a failure too, not a stuck run.
    async with asyncio.timeout(10):
        return await harness.client.post(INFER, content=body, headers=headers)


def split(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """A binary response's JSON and its outputs' values, decoded from the binary part."""
    length = int(response.headers[HEADER])
    document: dict[str, Any] = json.loads(response.content[:length])
    offset = length
    values: dict[str, Any] = {}
    for output in document["outputs"]:
        if "data" in output:
            values[output["name"]] = output["data"]
            continue
        size = output["parameters"]["binary_data_size"]
        chunk = response.content[offset : offset + size]
        offset += size
        if output["datatype"] == "BYTES":
            texts, at = [], 0
            while at < len(chunk):
                (count,) = struct.unpack_from("<I", chunk, at)
                texts.append(chunk[at + 4 : at + 4 + count].decode())
                at += 4 + count
            values[output["name"]] = texts
        else:
            layout = "<i8" if output["datatype"] == "INT64" else "<f8"
            values[output["name"]] = np.frombuffer(chunk, dtype=layout).tolist()
    assert offset == len(response.content)
    return document, values


async def units_billed(harness: Harness, tenant_id: uuid.UUID) -> int:
    async with harness.sessionmaker() as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(UsageRecord.units), 0)).where(
                UsageRecord.tenant_id == tenant_id
            )
        )
        return int(total or 0)


@pytest.mark.parametrize("datatype", sorted(DTYPES))
async def test_binary_inputs_of_every_datatype_answer_as_json_values_do(
    harness: Harness, datatype: str
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    rows = ROWS if datatype.startswith("FP") else INT_ROWS
    # The values as the datatype holds them (5.1 as FP32 is not 5.1), sent as JSON too.
    exact = np.asarray(rows, dtype=DTYPES[datatype]).tolist()
    as_json = await harness.client.post(
        INFER,
        json={"inputs": [{"name": "x", "shape": [2, 4], "datatype": datatype, "data": exact}]},
        headers=bearer(key),
    )
    assert as_json.status_code == 200, as_json.text
    document, length, raw = binary_request(rows, datatype)
    as_binary = await post(harness, key, document + raw, length)
    assert as_binary.status_code == 200, as_binary.text
    # No output asked for in binary: the answer is JSON, as it always was.
    assert as_binary.headers["content-type"] == "application/json"
    assert HEADER not in as_binary.headers
    assert as_binary.json()["outputs"] == as_json.json()["outputs"]
    assert await units_billed(harness, tenant.id) == 4


async def test_binary_outputs_are_framed_as_the_extension_says(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    document, length, raw = binary_request(
        ROWS, "FP64", header={"id": "7", "parameters": {"binary_data_output": True}}
    )
    answer = await post(harness, key, document + raw, length)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    header, values = split(answer)
    assert header["id"] == "7"
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [
        2 * 8,
        2 * 3 * 8,
        4 + len("setosa") + 4 + len("virginica"),
    ]
    assert all("data" not in output for output in header["outputs"])
    batch = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": ROWS}, headers=bearer(key)
    )
    expected = batch.json()["predictions"]
    assert values == {
        "prediction": [p["prediction"] for p in expected],
        "probability": [v for p in expected for v in p["probability"]],
        "class_name": [p["class_name"] for p in expected],
    }
    # A JSON request may ask for binary outputs too; an output's own flag wins over the default.
    mixed = await harness.client.post(
        INFER,
        json={
            "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": ROWS}],
            "parameters": {"binary_data_output": True},
            "outputs": [
                {"name": "class_name", "parameters": {"binary_data": False}},
                {"name": "prediction"},
            ],
        },
        headers=bearer(key),
    )
    assert mixed.status_code == 200, mixed.text
    header, values = split(mixed)
    assert header["outputs"][0]["data"] == ["setosa", "virginica"]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 16}
    assert values["prediction"] == [0, 2]


def _framing_faults() -> dict[str, tuple[bytes, int | None, tuple[Any, ...]]]:
    """Each fault: the body, the header length, and the ``loc`` of the 422 it must get."""
    document, length, raw = binary_request(ROWS, "FP32")
    sized = lambda size: binary_request(ROWS, "FP32", size=size)  # noqa: E731
    short, short_length, _ = sized(len(raw) - 4)
    long_, long_length, _ = sized(len(raw) + 4)
    odd, odd_length, _ = binary_request(ROWS, "FP32", shape=[3, 4])
    text, text_length, _ = binary_request(ROWS, "FP32", size="32")  # type: ignore[arg-type]
    negative, negative_length, _ = sized(-1)
    both = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "data": ROWS,
                    "parameters": {"binary_data_size": 32},
                }
            ]
        }
    ).encode()
    neither = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32"}]}).encode()
    flag, flag_length, _ = binary_request(
        ROWS, "FP32", header={"parameters": {"binary_data_output": "yes"}}
    )
    nan, nan_length, _ = binary_request(ROWS, "FP64")
    nan_raw = np.array([[1.0, np.nan, 1.0, 1.0], ROWS[1]], dtype="<f8").tobytes()
    inf_raw = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, np.inf, 1.0]], dtype="<f4").tobytes()
    params = ("body", "inputs", 0, "parameters")
    header_loc = ("header", HEADER.lower())
    return {
        # The header says the JSON runs past the body's end.
        "header past the end": (document, length + 10, header_loc),
        "header past the end of a whole body": (document + raw, length + len(raw) + 1, header_loc),
        # A size that agrees with the body but not with the tensor's shape and datatype.
        "size short of the shape": (short + raw[:-4], short_length, params),
        "size past the shape": (long_ + raw + b"\0" * 4, long_length, params),
        "shape past the data": (odd + raw, odd_length, params),
        # A truncated body: the size claims more than is left.
        "truncated": (document + raw[:-1], length, (*params, "binary_data_size")),
        "no binary part": (document, None, (*params, "binary_data_size")),
        # Bytes that no input claims.
        "trailing bytes": (document + raw + b"\0", length, ("body",)),
        "size not an integer": (text + raw, text_length, (*params, "binary_data_size")),
        "negative size": (negative + raw, negative_length, (*params, "binary_data_size")),
        "data and size": (both + raw, len(both), (*params, "binary_data_size")),
        "neither data nor size": (neither, len(neither), ("body", "inputs", 0, "data")),
        "binary_data_output not a boolean": (
            flag + raw,
            flag_length,
            ("body", "parameters", "binary_data_output"),
        ),
        # The bounds of JSON values: finite.
        "NaN": (nan + nan_raw, nan_length, (*params, 1)),
        "infinity": (document + inf_raw, length, (*params, 6)),
    }


@pytest.mark.parametrize("fault", sorted(_framing_faults()))
async def test_framing_faults_are_a_422_naming_the_place_and_bill_nothing(
    harness: Harness, fault: str
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    body, length, loc = _framing_faults()[fault]
    response = await post(harness, key, body, length)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["error"] == problem["detail"]
    assert [error["loc"] for error in problem["errors"]] == [list(loc)]
    assert await units_billed(harness, tenant.id) == 0


@pytest.mark.parametrize("value", ["twelve", "-1", "1e3", str(2**31)])
async def test_a_header_length_that_is_no_length_is_a_422(harness: Harness, value: str) -> None:
    _, key = await create_tenant_with_key(harness)
    document, _, raw = binary_request(ROWS, "FP32")
    response = await harness.client.post(
        INFER, content=document + raw, headers={**bearer(key), HEADER: value}
    )
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["header", HEADER]


async def test_the_body_limit_holds_for_binary_data(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    limit = harness.state.settings.max_body_bytes
    document, length, raw = binary_request(ROWS, "FP32", size=limit)
    response = await post(harness, key, document + raw + b"\0" * limit, length)
    assert response.status_code == 413, response.text


MANGLINGS = ("datatype", "features", "size", "cut", "extra", "header", "no header")


@st.composite
def mangled_requests(draw: st.DrawFn) -> tuple[bytes, int | None, int]:
    """A binary request, as it is or mangled in up to three ways: its bytes of another
    datatype, another feature count, a declared size or header length off by some bytes, the
    body cut short or given extra bytes, no header. Returns the body, the header length and the
    rows a 200 must bill."""
    manglings = draw(
        st.one_of(
            st.just(()), st.lists(st.sampled_from(MANGLINGS), min_size=1, max_size=3, unique=True)
        )
    )
    datatype = draw(st.sampled_from(sorted(DTYPES)))
    rows = draw(st.integers(1, 3))
    features = draw(st.sampled_from([3, 5])) if "features" in manglings else 4
    values = draw(st.lists(st.integers(0, 7), min_size=rows * features, max_size=rows * features))
    layout = draw(st.sampled_from(sorted(DTYPES))) if "datatype" in manglings else datatype
    raw = np.asarray(values, dtype=DTYPES[layout]).tobytes()
    size = len(raw)
    if "size" in manglings:
        size += draw(st.sampled_from([-1, 1, -len(raw), 2**40, 2**63 - 1]))
    document, length, _ = binary_request(
        np.zeros((rows, features)), datatype, size=size, shape=[rows, features]
    )
    body = document + raw
    if "cut" in manglings:
        body = body[: draw(st.integers(0, len(body) - 1))]
    if "extra" in manglings:
        body += draw(st.binary(min_size=1, max_size=16))
    header: int | None = length
    if "header" in manglings:
        header = length + draw(st.sampled_from([-1, 1, -length, -length - 1, 10**6]))
    if "no header" in manglings:
        header = None
    return body, header, rows


async def test_fuzzed_binary_framing_gives_no_5xx_and_bills_only_what_it_serves(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    served: list[int] = []
    statuses: Counter[int] = Counter()

    # hypothesis drives a synchronous test; each example is sent on the harness's own loop.
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(mangled_requests())
    def one(example: tuple[bytes, int | None, int]) -> None:
        body, header, rows = example
        response = asyncio.run_coroutine_threadsafe(post(harness, key, body, header), loop).result()
        assert response.status_code in (200, 413, 422), response.text
        statuses[response.status_code] += 1
        if response.status_code == 200:
            served.append(rows)
        else:
            assert response.json()["error"]

    await asyncio.to_thread(one)
    # Both served and refused requests in number, or the pass proves less than it says.
    assert statuses[200] >= 20, statuses
    assert statuses[422] >= 50, statuses
    assert await units_billed(harness, tenant.id) == sum(served)


async def test_a_compressed_body_is_refused_not_decompressed(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    document, length, raw = binary_request(ROWS, "FP32")
    response = await harness.client.post(
        INFER,
        content=gzip.compress(document + raw),
        headers={**bearer(key), HEADER: str(length), "Content-Encoding": "gzip"},
    )
    assert response.status_code == 422, response.text

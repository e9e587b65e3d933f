"""The Open Inference Protocol over REST as its clients speak it: NVIDIA's ``tritonclient.http``,
unmodified and with its defaults (no Content-Type, binary tensor data both ways) and with JSON
tensors, against a real ``modelgate serve``: the same predictions as ``/predict/batch`` for the
same rows, one unit billed per row and visible in ``/me/usage``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.conftest import IRIS_SETOSA, IRIS_VIRGINICA
from tests.e2e.servers import run_cli, serve

pytestmark = pytest.mark.e2e

ROWS = [IRIS_SETOSA, IRIS_VIRGINICA, [5.9, 3.0, 4.2, 1.5]]
INPUT_TYPES = {"FP64": np.float64, "FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}


def tenant_key(environment: dict[str, str], cwd: Path, *scopes: str) -> str:
    """A new tenant's API key (``modelgate keys issue``), with ``scopes``."""
    run_cli(environment, cwd, "db", "upgrade")
    tenant = json.loads(run_cli(environment, cwd, "tenants", "create", "--name", "v2").stdout)
    issued = run_cli(
        environment, cwd, "keys", "issue", "--tenant", tenant["id"], "--scopes", ",".join(scopes)
    )
    return issued.stdout.strip().splitlines()[-1]


@pytest.fixture
def served(tour_environment: dict[str, str], tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A running server and a key with ``predict`` and ``usage:read``."""
    key = tenant_key(tour_environment, tmp_path, "predict", "usage:read")
    with serve(tour_environment, tmp_path) as port:
        yield port, key


def _batch(port: int, key: str, rows: list[list[float]]) -> list[dict[str, Any]]:
    response = httpx.post(
        f"http://127.0.0.1:{port}/api/v1/predict/batch",
        json={"instances": rows},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def _units(port: int, key: str) -> int:
    response = httpx.get(
        f"http://127.0.0.1:{port}/api/v1/me/usage", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    units: int = response.json()["total_units"]
    return units


def _texts(result: triton_http.InferResult) -> list[str]:
    """The class names of a result: the client decodes BYTES as bytes from binary data and as
    str from JSON."""
    return [
        value.decode() if isinstance(value, bytes) else value
        for value in result.as_numpy("class_name").tolist()
    ]


def _infer(
    client: triton_http.InferenceServerClient,
    key: str,
    matrix: np.ndarray[Any, Any],
    datatype: str,
    *,
    binary: bool,
    outputs: list[triton_http.InferRequestedOutput] | None = None,
) -> triton_http.InferResult:
    tensor = triton_http.InferInput("input0", list(matrix.shape), datatype)
    tensor.set_data_from_numpy(matrix, binary_data=binary)
    return client.infer(
        "iris", [tensor], outputs=outputs, headers={"Authorization": f"Bearer {key}"}
    )


def test_tritonclient_http_infers_in_binary_and_json_as_predict_batch_and_is_billed(
    served: tuple[int, str],
) -> None:
    port, key = served
    client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.is_server_live()
    assert client.is_model_ready("iris", headers=headers)
    metadata = client.get_model_metadata("iris", headers=headers)
    assert metadata["inputs"][0]["shape"] == [-1, 4]
    billed = _units(port, key)
    for datatype, dtype in INPUT_TYPES.items():
        matrix = np.array(ROWS, dtype=dtype)
        # The rows as the server sees them (5.1 as FP32 is not 5.1): /predict/batch gets those.
        expected = _batch(port, key, matrix.astype(np.float64).tolist())
        billed += len(ROWS)
        for binary in (True, False):
            # The client's defaults: every output asked for in binary (binary_data_output).
            result = _infer(client, key, matrix, datatype, binary=binary)
            assert result.get_response()["model_name"] == "iris"
            assert result.as_numpy("prediction").tolist() == [p["prediction"] for p in expected]
            assert result.as_numpy("probability").tolist() == [p["probability"] for p in expected]
            assert _texts(result) == [p["class_name"] for p in expected]
            # Each output asked for by name, in binary or in JSON, in the order asked.
            result = _infer(
                client,
                key,
                matrix,
                datatype,
                binary=binary,
                outputs=[
                    triton_http.InferRequestedOutput("class_name", binary_data=not binary),
                    triton_http.InferRequestedOutput("probability", binary_data=binary),
                ],
            )
            names = [output["name"] for output in result.get_response()["outputs"]]
            assert names == ["class_name", "probability"]
            assert _texts(result) == [p["class_name"] for p in expected]
            assert result.as_numpy("probability").tolist() == [p["probability"] for p in expected]
            billed += 2 * len(ROWS)
    # One unit per row of every call, and nothing for the metadata and readiness calls.
    assert _units(port, key) == billed


def test_tritonclient_http_gets_the_protocols_errors_for_bad_requests(
    served: tuple[int, str],
) -> None:
    port, key = served
    client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
    # A row of 3 features where the model takes 4: the protocol's error object.
    with pytest.raises(InferenceServerException) as refused:
        _infer(client, key, np.array([[1.0, 2.0, 3.0]]), "FP64", binary=True)
    assert refused.value.status() == "422"
    assert "shape" in (refused.value.message() or "")
    # A NaN in binary is refused as in JSON.
    with pytest.raises(InferenceServerException) as refused:
        _infer(client, key, np.array([[np.nan, 1.0, 1.0, 1.0]]), "FP64", binary=True)
    assert refused.value.status() == "422"
    # A request that names no credential: 401, billed nothing.
    with pytest.raises(InferenceServerException) as refused:
        _infer(client, "mg_nope", np.array(ROWS), "FP64", binary=True)
    assert refused.value.status() == "401"
    assert _units(port, key) == 0

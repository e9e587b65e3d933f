"""The Open Inference Protocol (V2) over REST (api/v2.py): the protocol's own examples, adapted
to the 4-feature iris model, its metadata, readiness and error object, held to the same
credentials, plans, rate limits and quota as /api/v1/predict."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from auth.models import UsageRecord
from tests.conftest import (
    IRIS_SETOSA,
    IRIS_VIRGINICA,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    running_app,
    unique,
    wrong_checksum,
)

# The protocol's inference request example (KServe "Predict Protocol - Version 2",
# docs/predict-api/v2/required_api.md; kserve/open-inference-protocol
# specification/protocol/inference_rest.md), exactly as published: two inputs (a [2, 2] UINT32
# tensor and a BOOL one) and one requested output.
SPEC_EXAMPLE: dict[str, Any] = {
    "id": "42",
    "inputs": [
        {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
        {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True]},
    ],
    "outputs": [{"name": "output0"}],
}
# The same request for the iris model: one input of two rows of four features, flat and
# row-major, and one requested output (the per-class probabilities, a [2, 3] tensor).
IRIS_EXAMPLE: dict[str, Any] = {
    "id": "42",
    "inputs": [
        {
            "name": "input0",
            "shape": [2, 4],
            "datatype": "FP32",
            "data": [*IRIS_SETOSA, *IRIS_VIRGINICA],
        }
    ],
    "outputs": [{"name": "probability"}],
}
INFER = "/v2/models/iris/infer"


def _example(**changes: Any) -> dict[str, Any]:
    """The iris example with its input's members changed."""
    body = copy.deepcopy(IRIS_EXAMPLE)
    body["inputs"][0].update(changes)
    return body


def _assert_v2_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The protocol's error object inside our problem JSON, with the request's id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["error"], str)
    assert body["error"]
    assert body["error"] == body["detail"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


async def _usage_rows(harness: Harness, tenant_id: uuid.UUID) -> list[UsageRecord]:
    async with harness.sessionmaker() as session:
        result = await session.scalars(
            select(UsageRecord).where(UsageRecord.tenant_id == tenant_id)
        )
        return list(result)


async def test_v2_infer_answers_the_protocols_example_as_predict_batch_does(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(INFER, json=IRIS_EXAMPLE, headers=bearer(key))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"] == "42"
    assert (body["model_name"], body["model_version"]) == ("iris", "1")
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("probability", "FP64", [2, 3])
    batch = await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, IRIS_VIRGINICA]},
        headers=bearer(key),
    )
    expected = [p["probability"] for p in batch.json()["predictions"]]
    assert output["data"] == [*expected[0], *expected[1]]
    assert "X-RateLimit-Remaining" in response.headers


async def test_v2_infer_takes_nested_data_and_returns_every_output_by_default(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    body = _example(data=[IRIS_SETOSA, IRIS_VIRGINICA], datatype="FP64")
    del body["outputs"], body["id"]
    response = await harness.client.post(INFER, json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    answer = response.json()
    # No id in the request: the response carries the request's X-Request-ID.
    assert answer["id"] == response.headers["X-Request-ID"]
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert [o["name"] for o in answer["outputs"]] == ["prediction", "probability", "class_name"]
    assert outputs["prediction"] == {
        "name": "prediction",
        "shape": [2],
        "datatype": "INT64",
        "data": [0, 2],
    }
    assert outputs["class_name"]["datatype"] == "BYTES"
    assert outputs["class_name"]["data"] == ["setosa", "virginica"]
    assert len(outputs["probability"]["data"]) == 6
    # Integer datatypes take integers; a pinned version answers as the active one.
    ints = _example(datatype="INT32", data=[5, 3, 1, 0, 7, 3, 5, 2])
    pinned = await harness.client.post(
        "/v2/models/iris/versions/1/infer", json=ints, headers=bearer(key)
    )
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["model_version"] == "1"


async def test_the_protocols_literal_example_is_refused_with_its_error_object(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(INFER, json=SPEC_EXAMPLE, headers=bearer(key))
    body = _assert_v2_error(response, 422)
    assert body["type"] == "validation-error"
    assert body["errors"]


async def test_v2_health_is_public_like_api_v1_health(harness: Harness) -> None:
    server = await harness.client.get("/v2")
    assert server.status_code == 200
    assert server.json() == {
        "name": "modelgate",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    live = await harness.client.get("/v2/health/live")
    assert live.status_code == 200
    assert live.json() == {"live": True}
    ready = await harness.client.get("/v2/health/ready")
    v1 = await harness.client.get("/api/v1/health/ready")
    assert ready.status_code == v1.status_code == 200
    assert ready.json() == {"ready": True}
    assert ready.headers["X-Request-ID"]


async def test_v2_health_ready_is_503_with_ready_false_when_no_model_is(
    harness: Harness, tmp_path: Path
) -> None:
    # A server whose model directory is empty: no model can serve.
    settings = make_settings(harness.backend, tmp_path / "no-models", tmp_path / "var")
    async with running_app(settings, harness.backend) as empty:
        response = await empty.client.get("/v2/health/ready")
        v1 = await empty.client.get("/api/v1/health/ready")
    assert v1.status_code == 503
    body = _assert_v2_error(response, 503)
    assert body["ready"] is False
    assert body["checks"]["models"] == "unavailable"
    assert response.headers["Retry-After"]


async def test_v2_model_metadata_describes_the_tensors(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    expected = {
        "name": "iris",
        "versions": ["1"],
        "platform": "onnx_onnxv1",
        "inputs": [{"name": "features", "datatype": "FP64", "shape": [-1, 4]}],
        "outputs": [
            {"name": "prediction", "datatype": "INT64", "shape": [-1]},
            {"name": "probability", "datatype": "FP64", "shape": [-1, 3]},
            {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    for path in ("/v2/models/iris", "/v2/models/iris/versions/1"):
        response = await harness.client.get(path, headers=bearer(key))
        assert response.status_code == 200, response.text
        assert response.json() == expected


async def test_v2_model_ready_says_the_model_can_serve(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    for path in ("/v2/models/iris/ready", "/v2/models/iris/versions/1/ready"):
        response = await harness.client.get(path, headers=bearer(key))
        assert response.status_code == 200, response.text
        assert response.json() == {"name": "iris", "ready": True}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/no-such-model"),
        ("GET", "/v2/models/no-such-model/ready"),
        ("POST", "/v2/models/no-such-model/infer"),
        ("GET", "/v2/models/iris/versions/99"),
        ("GET", "/v2/models/iris/versions/99/ready"),
        ("POST", "/v2/models/iris/versions/99/infer"),
    ],
)
async def test_unknown_models_and_versions_are_404_with_the_error_object(
    harness: Harness, method: str, path: str
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    response = await harness.client.request(
        method, path, json=IRIS_EXAMPLE if method == "POST" else None, headers=bearer(key)
    )
    body = _assert_v2_error(response, 404)
    assert body["type"] == "not-found"
    assert "no-such-model" not in response.text  # a client's name is never echoed
    assert await _usage_rows(harness, tenant.id) == []


async def _tenant_on_plan(harness: Harness, admin: str, models: list[str]) -> str:
    plan = await harness.client.post(
        "/api/v1/admin/plans",
        json={"name": unique("plan"), "models": models},
        headers=bearer(admin),
    )
    assert plan.status_code == 201, plan.text
    tenant = await harness.client.post(
        "/api/v1/admin/tenants",
        json={"name": unique("tenant"), "plan": plan.json()["name"]},
        headers=bearer(admin),
    )
    assert tenant.status_code == 201, tenant.text
    issued = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.json()['id']}/keys",
        json={"name": "k", "scopes": ["predict"]},
        headers=bearer(admin),
    )
    assert issued.status_code == 201, issued.text
    key: str = issued.json()["key"]
    return key


async def test_a_model_outside_the_plan_answers_as_an_unknown_model_on_v2(
    harness: Harness,
) -> None:
    admin = await create_admin_key(harness)
    outsider = await _tenant_on_plan(harness, admin, ["wine"])
    insider = await _tenant_on_plan(harness, admin, ["iris"])

    def shape(response: httpx.Response) -> tuple[int, str, dict[str, Any]]:
        body = {k: v for k, v in response.json().items() if k != "request_id"}
        return response.status_code, response.headers["content-type"], body

    for method, suffix in (
        ("GET", ""),
        ("GET", "/ready"),
        ("POST", "/infer"),
        ("GET", "/versions/1"),
        ("GET", "/versions/1/ready"),
        ("POST", "/versions/1/infer"),
        ("GET", "/versions/99"),
        ("POST", "/versions/99/infer"),
    ):
        body = IRIS_EXAMPLE if method == "POST" else None
        outside = await harness.client.request(
            method, f"/v2/models/iris{suffix}", json=body, headers=bearer(outsider)
        )
        unknown = await harness.client.request(
            method, f"/v2/models/no-such-model{suffix}", json=body, headers=bearer(outsider)
        )
        assert outside.status_code == 404, (suffix, outside.text)
        assert shape(outside) == shape(unknown)
        served = await harness.client.request(
            method, f"/v2/models/iris{suffix}", json=body, headers=bearer(insider)
        )
        assert served.status_code == (404 if "99" in suffix else 200), served.text


async def test_v2_model_routes_need_a_tenant_credential_with_the_predict_scope(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    _, reader = await create_tenant_with_key(harness, scopes=("usage:read",))
    admin = await create_admin_key(harness)
    for method, path in (
        ("GET", "/v2/models/iris"),
        ("GET", "/v2/models/iris/ready"),
        ("POST", INFER),
        ("POST", "/v2/models/iris/versions/1/infer"),
    ):
        body = IRIS_EXAMPLE if method == "POST" else None
        for headers in ({}, bearer(wrong_checksum(key)), {"Authorization": "Basic abc"}):
            refused = await harness.client.request(method, path, json=body, headers=headers)
            _assert_v2_error(refused, 401)
            assert refused.headers["WWW-Authenticate"] == "Bearer"
        for other in (reader, admin):
            forbidden = await harness.client.request(method, path, json=body, headers=bearer(other))
            _assert_v2_error(forbidden, 403)
    assert await _usage_rows(harness, tenant.id) == []


async def test_v2_infer_is_rate_limited_and_a_refusal_is_not_billed(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, rate_limit="3/minute")
    statuses = []
    for path in ("/v2/models/iris", INFER, INFER, INFER):
        response = await harness.client.request(
            "GET" if path == "/v2/models/iris" else "POST",
            path,
            json=None if path == "/v2/models/iris" else IRIS_EXAMPLE,
            headers=bearer(key),
        )
        statuses.append(response.status_code)
        assert response.headers["X-RateLimit-Limit"] == "3"
    assert statuses == [200, 200, 200, 429]
    body = _assert_v2_error(response, 429)
    assert body["type"] == "rate-limited"
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert [r.units for r in await _usage_rows(harness, tenant.id)] == [2, 2]


async def test_the_quota_refuses_a_multi_row_infer_whole(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=5)
    first = await harness.client.post(INFER, json=IRIS_EXAMPLE, headers=bearer(key))
    assert first.status_code == 200, first.text
    # 2 units used of 5: four rows would cross the quota, and none of them is served.
    four = _example(shape=[4, 4], data=[IRIS_SETOSA] * 4)
    crossing = await harness.client.post(INFER, json=four, headers=bearer(key))
    body = _assert_v2_error(crossing, 429)
    assert body["type"] == "quota-exceeded"
    assert int(crossing.headers["Retry-After"]) > 0
    fitting = await harness.client.post(
        INFER, json=_example(shape=[3, 4], data=[IRIS_VIRGINICA] * 3), headers=bearer(key)
    )
    assert fitting.status_code == 200, fitting.text
    assert sorted(r.units for r in await _usage_rows(harness, tenant.id)) == [2, 3]


async def test_each_row_of_an_infer_is_one_billed_unit(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    seven = _example(shape=[7, 4], data=[IRIS_SETOSA] * 7)
    response = await harness.client.post(
        "/v2/models/iris/versions/1/infer", json=seven, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    [record] = await _usage_rows(harness, tenant.id)
    assert (record.units, record.model, record.model_version) == (7, "iris", "1")
    assert str(record.request_id) == response.headers["X-Request-ID"]
    usage = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    assert usage.json()["total_units"] == 7


def _input(body: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = body["inputs"][0]
    return entry


def _with(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body.update(changes)
    return body


BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("shape-is-not-rows-by-features", _example(shape=[8])),
    ("three-dimensions", _example(shape=[2, 4, 1])),
    ("five-features", _example(shape=[2, 5], data=[1.0] * 10)),
    ("data-shorter-than-shape", _example(shape=[3, 4])),
    ("data-longer-than-shape", _example(shape=[1, 4])),
    ("ragged-rows", _example(data=[IRIS_SETOSA, [1.0, 2.0, 3.0]])),
    ("zero-rows", _example(shape=[0, 4])),
    ("over-the-batch-limit", _example(shape=[101, 4], data=[1.0] * 404)),
    ("bool-datatype", _example(datatype="BOOL")),
    ("fp16-datatype", _example(datatype="FP16")),
    ("bytes-datatype", _example(datatype="BYTES", data=["a"] * 8)),
    ("float-in-an-integer-tensor", _example(datatype="INT32")),
    ("int8-out-of-range", _example(datatype="INT8", data=[1, 2, 3, 300, 1, 2, 3, 4])),
    ("uint-negative", _example(datatype="UINT16", data=[1, 2, 3, -1, 1, 2, 3, 4])),
    ("fp32-out-of-range", _example(data=[1e300, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])),
    ("huge-integer", _example(datatype="FP64", data=[10**40, 2, 3, 4, 1, 2, 3, 4])),
    ("past-int64", _example(datatype="INT64", data=[2**70, 2, 3, 4, 1, 2, 3, 4])),
    ("nan", _example(data=[float("nan"), 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])),
    ("infinity", _example(data=[float("inf"), 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])),
    ("bool-value", _example(data=[True, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])),
    ("string-value", _example(data=["5.1", 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])),
    ("three-levels-of-nesting", _example(data=[[IRIS_SETOSA], [IRIS_VIRGINICA]])),
    ("no-inputs", _with(IRIS_EXAMPLE, inputs=[])),
    ("two-inputs", _with(IRIS_EXAMPLE, inputs=IRIS_EXAMPLE["inputs"] * 2)),
    ("unknown-output", _with(IRIS_EXAMPLE, outputs=[{"name": "output0"}])),
    ("output-twice", _with(IRIS_EXAMPLE, outputs=[{"name": "prediction"}] * 2)),
    ("unknown-member", _with(IRIS_EXAMPLE, tenant_id="someone-else")),
    ("id-not-a-string", _with(IRIS_EXAMPLE, id=42)),
    ("parameters-not-an-object", _with(IRIS_EXAMPLE, parameters=[1])),
    ("parameter-nested", _with(IRIS_EXAMPLE, parameters={"a": {"b": 1}})),
    ("no-data", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}),
]


@pytest.mark.parametrize(
    "body", [body for _, body in BAD_REQUESTS], ids=[name for name, _ in BAD_REQUESTS]
)
async def test_a_bad_infer_request_is_422_with_the_error_object_and_bills_nothing(
    harness: Harness, body: dict[str, Any]
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    # Python's encoder, which writes NaN and Infinity as JavaScript does (httpx refuses to).
    response = await harness.client.post(
        INFER,
        content=json.dumps(body),
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    problem = _assert_v2_error(response, 422)
    assert problem["type"] == "validation-error"
    assert problem["errors"]
    assert await _usage_rows(harness, tenant.id) == []


async def test_parameters_of_other_servers_are_accepted_and_ignored(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    body = _with(IRIS_EXAMPLE, parameters={"content_type": "np", "priority": 1, "x": True})
    _input(body)["parameters"] = {"content_type": "np"}
    body["outputs"][0]["parameters"] = {"binary_data": False}
    response = await harness.client.post(INFER, json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    assert "parameters" not in response.json()


async def test_a_value_outside_the_models_input_range_is_422_naming_the_feature(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    # FP64 holds 1e39; the model's input (float32) does not.
    body = _example(datatype="FP64", data=[*IRIS_SETOSA, 5.0, 1e39, 1.0, 1.0])
    response = await harness.client.post(INFER, json=body, headers=bearer(key))
    problem = _assert_v2_error(response, 422)
    assert problem["errors"][0]["loc"] == ["body", "inputs", 0, "data", 5]
    assert "feature 1" in problem["error"]


async def test_an_oversized_body_is_413_with_the_error_object(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    padding = "x" * (harness.state.settings.max_body_bytes + 1)
    body = _with(IRIS_EXAMPLE, id=padding)
    response = await harness.client.post(INFER, json=body, headers=bearer(key))
    _assert_v2_error(response, 413)


@pytest.mark.parametrize("content", [b"{", b"\xff\xfe", b"[]", b"null", b""])
async def test_a_body_that_is_not_an_infer_request_is_422_with_the_error_object(
    harness: Harness, content: bytes
) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        INFER, content=content, headers={**bearer(key), "Content-Type": "application/json"}
    )
    _assert_v2_error(response, 422)

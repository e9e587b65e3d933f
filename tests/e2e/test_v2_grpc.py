"""The Open Inference Protocol over gRPC (api/grpc/) as its clients speak it: NVIDIA's
``tritonclient.grpc``, unmodified, against a real ``modelgate serve`` with
``MODELGATE_GRPC_PORT``: the same predictions as ``/predict/batch`` for the same rows, one unit
billed per row and visible in ``/me/usage``, and the status codes that mirror the HTTP answers for
no key, a revoked key, a key over its rate limit, a tenant over its quota, an unentitled model,
an unknown one and a bad tensor; counted in ``/metrics`` and logged with the access line.

This process imports tritonclient's copy of the protocol's messages, never modelgate's (both
would register ``inference.*`` in protobuf's one pool)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import IRIS_SETOSA, IRIS_VIRGINICA, only_on
from tests.e2e.servers import BIN, access_lines, free_port, hermetic_cwd, run_cli, wait_ready

pytestmark = pytest.mark.e2e

ROWS = [IRIS_SETOSA, IRIS_VIRGINICA, [5.9, 3.0, 4.2, 1.5]]
# Connections made for inference: all of them going to one of two workers by chance is 1 in 2,048.
CONNECTIONS = 12


@dataclass
class Served:
    """A running server: its HTTP base URL, gRPC address, admin key and log."""

    http: str
    grpc: str
    admin: str
    log: Path
    process: subprocess.Popen[bytes]

    def admin_post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(
            f"{self.http}/api/v1/admin{path}",
            json=body or {},
            headers={"Authorization": f"Bearer {self.admin}"},
        )
        assert response.status_code in (200, 201), response.text
        answer: dict[str, Any] = response.json()
        return answer

    def tenant_key(self, scopes: list[str] | None = None, **tenant: Any) -> tuple[str, str]:
        """A new tenant (``tenant``: its fields) and a key for it (with ``scopes``, or the
        default ones): the key and its id."""
        created = self.admin_post("/tenants", {"name": f"t{time.monotonic_ns()}", **tenant})
        key: dict[str, Any] = {"name": "grpc"}
        if scopes is not None:
            key["scopes"] = scopes
        issued = self.admin_post(f"/tenants/{created['id']}/keys", key)
        return issued["key"], issued["id"]


@contextmanager
def serving(environment: dict[str, str], tmp_path: Path, workers: int) -> Iterator[Served]:
    """``modelgate serve --workers N`` with gRPC on a port of its own."""
    environment = {
        **environment,
        "MODELGATE_LOG_LEVEL": "INFO",
        "MODELGATE_DEFAULT_RATE_LIMIT": "1000/minute",
        "MODELGATE_GRPC_PORT": str(free_port()),
    }
    run_cli(environment, tmp_path, "db", "upgrade")
    admin = run_cli(environment, tmp_path, "admin", "create-key", "--name", "ops")
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [str(BIN / "modelgate"), "serve", "--port", str(port), "--workers", str(workers)],
            cwd=hermetic_cwd(tmp_path),
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            start_new_session=True,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/api/v1/health/ready", server)
            # HTTP is ready once one worker is: wait for all to serve gRPC too.
            deadline = time.monotonic() + 60
            while log.read_text().count("serving gRPC") < workers:
                assert time.monotonic() < deadline, "the workers did not both serve gRPC"
                assert server.poll() is None, "the server exited"
                time.sleep(0.05)
            yield Served(
                f"http://127.0.0.1:{port}",
                f"127.0.0.1:{environment['MODELGATE_GRPC_PORT']}",
                admin.stdout.strip().splitlines()[-1],
                log,
                server,
            )
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.fixture
def served(tour_environment: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    """Two workers, both serving the gRPC port."""
    with serving(tour_environment, tmp_path, 2) as server:
        yield server


@pytest.fixture
def served_alone(tour_environment: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    """One worker: without Redis (the embedded default) each worker keeps its own rate limits."""
    with serving(tour_environment, tmp_path, 1) as server:
        yield server


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _infer(
    client: triton_grpc.InferenceServerClient,
    key: str,
    rows: Any,
    datatype: str = "FP64",
    model: str = "iris",
    outputs: list[str] | None = None,
) -> triton_grpc.InferResult:
    matrix = np.asarray(
        rows, dtype={"FP64": np.float64, "FP32": np.float32, "INT32": np.int32}[datatype]
    )
    tensor = triton_grpc.InferInput("input0", list(matrix.shape), datatype)
    tensor.set_data_from_numpy(matrix)
    return client.infer(
        model,
        [tensor],
        outputs=None if outputs is None else [triton_grpc.InferRequestedOutput(n) for n in outputs],
        headers=_auth(key),
    )


def _refused(call: Any) -> str:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return str(refused.value.status())


def _units(served: Served, key: str) -> int:
    response = httpx.get(
        f"{served.http}/api/v1/me/usage", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    units: int = response.json()["total_units"]
    return units


def test_tritonclient_grpc_infers_as_predict_batch_and_is_billed(served: Served) -> None:
    key, _ = served.tenant_key()
    client = triton_grpc.InferenceServerClient(served.grpc)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata().name == "modelgate"
    assert client.is_model_ready("iris", headers=_auth(key))
    metadata = client.get_model_metadata("iris", headers=_auth(key))
    assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("features", [-1, 4])]
    batch = httpx.post(
        f"{served.http}/api/v1/predict/batch",
        json={"instances": ROWS},
        headers={"Authorization": f"Bearer {key}"},
    ).json()["predictions"]
    # Every call on a connection of its own (gRPC shares one between channels unless told
    # not to): the kernel spreads them over both workers, which serve the port (SO_REUSEPORT).
    for _ in range(CONNECTIONS):
        own = triton_grpc.InferenceServerClient(
            served.grpc, channel_args=[("grpc.use_local_subchannel_pool", 1)]
        )
        result = _infer(own, key, ROWS)
        own.close()
        assert result.as_numpy("prediction").tolist() == [p["prediction"] for p in batch]
        assert result.as_numpy("probability").tolist() == [p["probability"] for p in batch]
        assert result.as_numpy("class_name").tolist() == [p["class_name"].encode() for p in batch]
    named = _infer(client, key, ROWS, "FP32", outputs=["class_name"])
    assert [o.name for o in named.get_response().outputs] == ["class_name"]
    ints = _infer(client, key, [[5, 3, 1, 0]], "INT32")
    assert ints.as_numpy("prediction").tolist() == [0]
    # One unit per row of each call (the batch's too), nothing for metadata and readiness.
    assert _units(served, key) == 3 + CONNECTIONS * 3 + 3 + 1
    # Counted in /metrics and logged with the same access line as HTTP, by both workers.
    text = httpx.get(f"{served.http}/metrics").text
    assert 'route="/inference.GRPCInferenceService/ModelInfer"' in text
    lines = [
        line
        for line in access_lines(served.log.read_text())
        if line["route"] == "/inference.GRPCInferenceService/ModelInfer"
    ]
    assert len(lines) == CONNECTIONS + 2
    assert {line["status"] for line in lines} == {200}
    assert all(line["tenant_id"] and line["key_id"] for line in lines)
    assert len({line["pid"] for line in lines}) == 2, "one worker served every call"


def test_tritonclient_grpc_gets_the_status_codes_of_the_http_answers(
    served_alone: Served,
) -> None:
    served = served_alone
    client = triton_grpc.InferenceServerClient(served.grpc)
    key, _ = served.tenant_key()
    assert _refused(lambda: _infer(client, "", ROWS)) == "StatusCode.UNAUTHENTICATED"
    assert _refused(lambda: client.is_model_ready("iris")) == "StatusCode.UNAUTHENTICATED"
    revoked, revoked_id = served.tenant_key()
    served.admin_post(f"/keys/{revoked_id}/revoke")
    assert _refused(lambda: _infer(client, revoked, ROWS)) == "StatusCode.UNAUTHENTICATED"
    assert _refused(lambda: _infer(client, key, ROWS, model="nope")) == "StatusCode.NOT_FOUND"
    # A live key without the predict scope: HTTP's 403.
    reader, _ = served.tenant_key(scopes=["usage:read"])
    assert _refused(lambda: _infer(client, reader, ROWS)) == "StatusCode.PERMISSION_DENIED"
    # A JWT minted from a key is a credential as the key is: served, and billed to its tenant.
    minted_from, _ = served.tenant_key()
    token = httpx.post(
        f"{served.http}/api/v1/auth/token",
        data={"grant_type": "client_credentials", "client_secret": minted_from},
    )
    assert token.status_code == 200, token.text
    _infer(client, token.json()["access_token"], ROWS)
    assert _units(served, minted_from) == len(ROWS)
    assert _refused(lambda: _infer(client, key, [[1.0, 2.0]])) == "StatusCode.INVALID_ARGUMENT"
    assert (
        _refused(lambda: _infer(client, key, [[np.nan, 1, 1, 1]])) == "StatusCode.INVALID_ARGUMENT"
    )
    # Raw contents of another size than the shape says, short or long; a message over the
    # bound (MODELGATE_MAX_BODY_BYTES), refused by gRPC before it is read.
    exact = np.asarray(ROWS, dtype="<f8").tobytes()
    for raw in (exact[:-1], exact + b"\0" * 8, b""):
        status, trailing = _raw_infer(served, key, raw)
        assert status == grpc.StatusCode.INVALID_ARGUMENT, raw
        assert "x-request-id" in trailing
    status, _ = _raw_infer(served, key, b"\0" * (512 * 1024), shape=(100, 4))
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    served.admin_post("/plans", {"name": "other-models", "models": ["other"]})
    unentitled, _ = served.tenant_key(plan="other-models")
    assert _refused(lambda: _infer(client, unentitled, ROWS)) == "StatusCode.NOT_FOUND"
    assert (
        _refused(lambda: client.get_model_metadata("iris", headers=_auth(unentitled)))
        == "StatusCode.NOT_FOUND"
    )
    # Over the quota: refused whole, with when to retry in the trailing metadata.
    quota, _ = served.tenant_key(monthly_quota=4)
    _infer(client, quota, ROWS)
    status, trailing = _raw_infer(served, quota)
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(trailing["retry-after"]) > 0
    assert _units(served, quota) == 3
    # Over the key's rate limit.
    limited, _ = served.tenant_key(rate_limit="2/minute")
    _infer(client, limited, ROWS[:1])
    _infer(client, limited, ROWS[:1])
    status, trailing = _raw_infer(served, limited)
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(trailing["retry-after"]) > 0
    assert "x-request-id" in trailing
    assert _units(served, key) == 0


@only_on("postgres")
def test_sigterm_stops_grpc_taking_calls_as_http_starts_its_drain(served_alone: Served) -> None:
    """On SIGTERM the gRPC server stops taking calls when the HTTP server does, not once HTTP
    has drained: while an HTTP request is still in flight (its body half sent), a new gRPC
    call is refused UNAVAILABLE; the HTTP request is then answered and the server exits 0."""
    served = served_alone
    key, _ = served.tenant_key()
    _infer(triton_grpc.InferenceServerClient(served.grpc), key, ROWS)
    port = int(served.http.rsplit(":", 1)[1])
    body = json.dumps({"features": IRIS_SETOSA}).encode()
    half = len(body) // 2
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(
            b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Content-Type: application/json\r\n\r\n"
            + body[:half]
        )
        time.sleep(0.5)  # the worker has read the headers: the request is in flight
        os.kill(served.process.pid, signal.SIGTERM)
        status = None
        deadline = time.monotonic() + 10
        while status is None and time.monotonic() < deadline:
            fresh = triton_grpc.InferenceServerClient(
                served.grpc, channel_args=[("grpc.use_local_subchannel_pool", 1)]
            )
            try:
                _infer(fresh, key, ROWS)
            except InferenceServerException as refused:
                status = str(refused.status())
            fresh.close()
            time.sleep(0.1)
        assert status == "StatusCode.UNAVAILABLE"
        assert served.process.poll() is None, "the server exited with a request in flight"
        connection.sendall(body[half:])
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert served.process.wait(timeout=30) == 0


def _raw_infer(
    served: Served, key: str, raw: bytes | None = None, shape: tuple[int, ...] = (3, 4)
) -> tuple[grpc.StatusCode, dict[str, str]]:
    """A ModelInfer through the protocol's own stub (tritonclient's), for the trailing
    metadata that tritonclient's errors do not keep; ``raw``: the input as raw contents."""
    request = service_pb2.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="input0", datatype="FP64", shape=list(shape))
    if raw is None:
        tensor.contents.fp64_contents.extend(value for row in ROWS for value in row)
    else:
        request.raw_input_contents.append(raw)
    with grpc.insecure_channel(served.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, metadata=tuple(_auth(key).items()))
        except grpc.RpcError as error:
            return error.code(), dict(error.trailing_metadata() or ())
    raise AssertionError("served")

"""Traces switched on by the standard OTEL_* variables alone, in a real ``modelgate serve``
process: the request spans reach the exporter those variables name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import Backend, only_on
from tests.e2e.servers import BIN, free_port, hermetic_cwd, run_cli, wait_ready

pytestmark = pytest.mark.e2e


def _spans(stdout: str) -> list[dict[str, object]]:
    """The spans the SDK's console exporter printed (one indented JSON object each)."""
    decoder = json.JSONDecoder()
    spans, index = [], 0
    while (start := stdout.find("{", index)) != -1:
        span, index = decoder.raw_decode(stdout, start)
        spans.append(span)
    return spans


@only_on("sqlite")
def test_otel_variables_alone_switch_request_traces_on(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = {
        **tour_environment,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "modelgate-e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "modelgate"), "serve", "--port", str(port)],
        cwd=hermetic_cwd(tmp_path),
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/api/v1/health/ready", server)
        models = httpx.get(f"http://127.0.0.1:{port}/api/v1/models/iris", timeout=10)
        assert models.status_code == 401
    finally:
        # SIGTERM: the batch processor exports what it holds as the process exits.
        os.killpg(server.pid, signal.SIGTERM)
        stdout, _ = server.communicate(timeout=30)
    spans = _spans(stdout.decode())
    servers = [s for s in spans if s.get("kind") == "SpanKind.SERVER"]
    refused = [s for s in servers if s["name"] == "GET /api/v1/models/{name}"]
    assert len(refused) == 1, [s["name"] for s in servers]
    attributes = refused[0]["attributes"]
    assert isinstance(attributes, dict)
    assert attributes["http.response.status_code"] == 401
    resource = refused[0]["resource"]
    assert isinstance(resource, dict)
    assert resource["attributes"]["service.name"] == "modelgate-e2e"


@only_on("sqlite")
@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: zipkin is not one of"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: json is not one of",
        ),
    ],
)
def test_serve_refuses_a_trace_exporter_it_cannot_build_in_one_line(
    backend: Backend,
    tour_environment: dict[str, str],
    tmp_path: Path,
    variables: dict[str, str],
    message: str,
) -> None:
    environment = {**tour_environment, **variables}
    port = str(free_port())
    refused = run_cli(environment, tmp_path, "serve", "--port", port, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in refused.stderr

"""One benchmark run: check dependencies, set up, micro-benchmarks, load cells, report."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import IRIS_ROW, BenchError, cpu
from bench.grpc_load import run_grpc_load
from bench.load import Target, require_wrk, run_wrk
from bench.micro import run_micro_sync
from bench.report import (
    FAILED,
    OK,
    SKIPPED,
    Cell,
    RunReport,
    machine_meta,
    render_table,
    write_json,
)
from bench.services import (
    BENCH_MONTHLY_QUOTA,
    BENCH_RATE_LIMIT,
    HOST,
    SERVER_LOG_LEVEL,
    SKLEARN_MODEL,
    BenchEnvironment,
    Server,
    bench_environment,
    check_postgres,
    check_redis,
    echo_server,
    free_port,
    modelgate_server,
    resolve_database,
    running,
    seed_usage,
)
from bench.usage_scale import run_usage_scale

ENDPOINTS = (
    "echo",
    "predict",
    "predict-jwt",
    "batch",
    "usage",
    "predict-sklearn",
    "predict-sklearn-direct",
    "predict-cached",
    "v2-infer",
    "v2-binary",
    "grpc-infer",
    "predict-idem",
)
MODELGATE_ENDPOINTS = (
    "predict",
    "predict-jwt",
    "batch",
    "usage",
    "predict-sklearn",
    "v2-infer",
    "v2-binary",
    "predict-idem",
)
# Endpoints driven on a server of their own, started with these settings on top of the bench's.
VARIANT_SERVERS: dict[str, dict[str, str]] = {
    # The scikit-learn version with micro-batching switched off: one call per request.
    "predict-sklearn-direct": {"MODELGATE_BATCH_ENABLED": "false"},
    # The ONNX version with the prediction cache on (Redis): every request after the first is
    # a hit, so this is the cache's best case.
    "predict-cached": {"MODELGATE_PREDICTION_CACHE_TTL_SECONDS": "60"},
}
BATCH_ROWS = 10
V2_BINARY_HEADER = json.dumps(
    {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 4],
                "datatype": "FP64",
                "parameters": {"binary_data_size": 32},
            }
        ],
        "parameters": {"binary_data_output": True},
    },
    separators=(",", ":"),
).encode()
# Per startup, per cell: the fixed costs beyond warm-up + measurement, for the time estimate.
STARTUP_ESTIMATE_S = 6.0
CELL_OVERHEAD_ESTIMATE_S = 0.5


@dataclass(frozen=True)
class RunOptions:
    """What ``python -m bench run`` was asked to do."""

    database_url: str
    redis_url: str
    duration_s: float
    warmup_s: float
    connections: tuple[int, ...]
    workers: tuple[int, ...]
    only: tuple[str, ...]
    micro: bool
    usage_records: int
    output: Path | None
    # Records of the big tenant in the usage-at-scale step (bench/usage_scale.py); 0: skipped.
    usage_scale_records: int = 0


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout holds the table alone."""
    print(message, file=sys.stderr, flush=True)


def _json_body(payload: object) -> str:
    return json.dumps(payload, separators=(",", ":"))


def targets(api_key: str) -> dict[str, Target]:
    """The request each endpoint is driven with (the JWT target is built once a token exists)."""
    json_type = {"Content-Type": "application/json"}
    auth = {"Authorization": f"Bearer {api_key}"}
    return {
        "echo": Target("echo", "POST", "/echo", _json_body({"features": IRIS_ROW}), json_type),
        "predict": Target(
            "predict",
            "POST",
            "/api/v1/predict",
            _json_body({"features": IRIS_ROW}),
            {**json_type, **auth},
        ),
        "batch": Target(
            "batch",
            "POST",
            "/api/v1/predict/batch",
            _json_body({"instances": [IRIS_ROW] * BATCH_ROWS}),
            {**json_type, **auth},
            rows_per_request=BATCH_ROWS,
        ),
        "usage": Target("usage", "GET", "/api/v1/me/usage", "", auth),
        # The Open Inference Protocol's infer, one row: to compare with POST /predict.
        "v2-infer": Target(
            "v2-infer",
            "POST",
            "/v2/models/iris/infer",
            _json_body(
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": IRIS_ROW}]}
            ),
            {**json_type, **auth},
        ),
        # The same row as tritonclient.http sends it by default: FP64 bytes after the JSON, and
        # every output asked for in binary.
        "v2-binary": Target(
            "v2-binary",
            "POST",
            "/v2/models/iris/infer",
            V2_BINARY_HEADER + struct.pack("<4d", *IRIS_ROW),
            {**auth, "Inference-Header-Content-Length": str(len(V2_BINARY_HEADER))},
        ),
        **{
            name: Target(
                name,
                "POST",
                "/api/v1/predict",
                _json_body({"features": IRIS_ROW, "model": SKLEARN_MODEL}),
                {**json_type, **auth},
            )
            for name in ("predict-sklearn", "predict-sklearn-direct")
        },
        # /predict with a new Idempotency-Key on every request (bench/lua/request.lua makes
        # them): the cost of a key that is looked up, claimed and stored with its record.
        "predict-idem": Target(
            "predict-idem",
            "POST",
            "/api/v1/predict",
            _json_body({"features": IRIS_ROW}),
            {**json_type, **auth},
            unique_idempotency_key=True,
        ),
        "predict-cached": Target(
            "predict-cached",
            "POST",
            "/api/v1/predict",
            _json_body({"features": IRIS_ROW}),
            {**json_type, **auth},
        ),
    }


def fetch_jwt(base_url: str, api_key: str) -> tuple[str | None, str]:
    """A JWT from ``POST /api/v1/auth/token``, or None and the reason (404 until it exists)."""
    form = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_secret": api_key}
    ).encode()
    url = base_url + "/api/v1/auth/token"  # always http://127.0.0.1:<port>, built by us
    request = urllib.request.Request(url, data=form, method="POST")  # noqa: S310
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (our URL)
            token = json.loads(response.read()).get("access_token")
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):
            return None, "POST /api/v1/auth/token does not exist yet"
        return None, f"POST /api/v1/auth/token answered {exc.code}"
    except (OSError, ValueError) as exc:
        return None, f"POST /api/v1/auth/token failed ({type(exc).__name__})"
    if not isinstance(token, str):
        return None, "POST /api/v1/auth/token returned no access_token"
    return token, ""


def measure_cell(server: Server, target: Target, cell: Cell, options: RunOptions) -> None:
    """Warm up (not recorded), then measure; any error in the measured run fails the cell."""
    if not server.alive():
        cell.status, cell.note = FAILED, f"server exited: {server.log_tail()}"
        return
    try:
        if options.warmup_s > 0:
            warmup = run_wrk(server.base_url, target, cell.connections, options.warmup_s)
            cell.warmup_errors = warmup.error_count
        before = cpu.snapshot()
        cell.result = run_wrk(server.base_url, target, cell.connections, options.duration_s)
        cell.cpu_seconds = cpu.usage(before, cpu.snapshot(), server.pid)
    except BenchError as exc:
        cell.status, cell.note = FAILED, str(exc)
        return
    result = cell.result
    if result.error_count:
        details = [f"{count} x HTTP {status}" for status, count in sorted(result.statuses.items())]
        details += [
            f"{count} x socket {kind}" for kind, count in result.socket_errors.items() if count
        ]
        cell.status = FAILED
        cell.note = ", ".join(details)
        if server.log_path.exists() and server.log_path.stat().st_size:
            cell.note += f"; server log: {server.log_tail(2)}"
    elif result.requests == 0:
        cell.status, cell.note = FAILED, "no request completed"
    else:
        cell.status = OK
    figure = f"{result.requests_per_s:9.1f} req/s" if cell.status == OK else "FAILED"
    log(
        f"  w{cell.workers} {cell.endpoint:<8} c{cell.connections:<3} {figure}  "
        f"p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  errors {result.error_count}"
    )


def measure_grpc_cell(
    server: Server, address: str, api_key: str, cell: Cell, options: RunOptions
) -> None:
    """``measure_cell`` for the gRPC cell, driven by ``bench.grpc_load``."""
    if not server.alive():
        cell.status, cell.note = FAILED, f"server exited: {server.log_tail()}"
        return
    try:
        if options.warmup_s > 0:
            warmup = run_grpc_load(address, api_key, cell.connections, options.warmup_s)
            cell.warmup_errors = warmup.error_count
        cell.result = run_grpc_load(address, api_key, cell.connections, options.duration_s)
    except BenchError as exc:
        cell.status, cell.note = FAILED, str(exc)
        return
    result = cell.result
    if result.error_count or result.requests == 0:
        cell.status = FAILED
        cell.note = ", ".join(f"{n} x {code}" for code, n in result.statuses.items()) or "none"
    else:
        cell.status = OK
        cell.note = f"load generator CPU {result.wrk_cpu_percent:.0f}%"
    log(
        f"  w{cell.workers} grpc     c{cell.connections:<3} {result.requests_per_s:9.1f} req/s  "
        f"p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  errors {result.error_count}"
    )


def run_pass(
    env: BenchEnvironment,
    workers: int,
    options: RunOptions,
    report: RunReport,
) -> None:
    """All selected endpoints at one worker count: the echo app, then ``modelgate serve``."""
    all_targets = targets(env.api_key)
    if "echo" in options.only:
        log(f"starting the echo app with {workers} worker(s)")
        with running(echo_server(env, workers)) as server:
            for connections in options.connections:
                cell = Cell("echo", workers, connections)
                report.cells.append(cell)
                measure_cell(server, all_targets["echo"], cell, options)
    for endpoint, settings in VARIANT_SERVERS.items():
        if endpoint not in options.only:
            continue
        variables = ", ".join(f"{name}={value}" for name, value in settings.items())
        log(f"starting modelgate serve with {workers} worker(s) and {variables}")
        with running(modelgate_server(env, workers, settings, endpoint)) as server:
            for connections in options.connections:
                cell = Cell(endpoint, workers, connections)
                report.cells.append(cell)
                measure_cell(server, all_targets[endpoint], cell, options)
    if "grpc-infer" in options.only:
        grpc_port = free_port()
        log(f"starting modelgate serve with {workers} worker(s) and MODELGATE_GRPC_PORT")
        settings = {"MODELGATE_GRPC_PORT": str(grpc_port)}
        with running(modelgate_server(env, workers, settings, "grpc")) as server:
            for connections in options.connections:
                cell = Cell("grpc-infer", workers, connections)
                report.cells.append(cell)
                measure_grpc_cell(server, f"{HOST}:{grpc_port}", env.api_key, cell, options)
    wanted = [name for name in MODELGATE_ENDPOINTS if name in options.only]
    if not wanted:
        return
    log(f"starting modelgate serve with {workers} worker(s)")
    with running(modelgate_server(env, workers)) as server:
        for endpoint in wanted:
            target = all_targets.get(endpoint)
            if endpoint == "predict-jwt":
                token, why_not = fetch_jwt(server.base_url, env.api_key)
                if token is None:
                    report.cells.append(
                        Cell("predict-jwt", workers, 0, status=SKIPPED, note=why_not)
                    )
                    continue
                target = Target(
                    "predict-jwt",
                    "POST",
                    "/api/v1/predict",
                    _json_body({"features": IRIS_ROW}),
                    {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
                )
            if endpoint == "usage":
                # The same data volume behind /me/usage in every run and at every worker count.
                asyncio.run(seed_usage(env, options.usage_records))
            assert target is not None  # noqa: S101 (every endpoint above has a target)
            for connections in options.connections:
                cell = Cell(
                    endpoint, workers, connections, rows_per_request=target.rows_per_request
                )
                report.cells.append(cell)
                measure_cell(server, target, cell, options)


def estimate_seconds(options: RunOptions) -> float:
    """A rough duration of the whole run, printed up front."""
    modelgate = [e for e in MODELGATE_ENDPOINTS if e in options.only]
    variants = [e for e in (*VARIANT_SERVERS, "grpc-infer") if e in options.only]
    per_pass_cells = len(options.connections) * (
        ("echo" in options.only) + len(modelgate) + len(variants)
    )
    starts = ("echo" in options.only) + bool(modelgate) + len(variants)
    cell_s = options.warmup_s + options.duration_s + CELL_OVERHEAD_ESTIMATE_S
    per_pass = per_pass_cells * cell_s + starts * STARTUP_ESTIMATE_S
    micro_s = 25.0 if options.micro else 0.0
    # The fill runs at a few thousand records per second on two cores.
    scale_s = 90.0 + options.usage_scale_records / 6000 if options.usage_scale_records else 0.0
    return 20.0 + micro_s + scale_s + per_pass * len(options.workers)


def check_dependencies(options: RunOptions) -> dict[str, str]:
    """Fail fast, with one line, if wrk, Postgres or Redis is missing; returns their versions."""
    wrk = require_wrk()
    database = resolve_database(options.database_url)
    postgres = asyncio.run(check_postgres(database))
    redis_version = asyncio.run(check_redis(options.redis_url))
    return {"wrk": wrk, "postgres": postgres, "redis": redis_version}


def run(options: RunOptions, on_table: Callable[[str], None] = print) -> int:
    """Run the benchmark; returns the exit status (1 if any cell failed)."""
    dependencies = check_dependencies(options)
    started = time.monotonic()
    log(
        f"modelgate bench: about {estimate_seconds(options) / 60:.1f} min "
        f"(Postgres {dependencies['postgres']}, Redis {dependencies['redis']}, "
        f"servers log at {SERVER_LOG_LEVEL})"
    )
    meta = machine_meta()
    meta.update(
        {
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dependencies": {"postgres": dependencies["postgres"], "redis": dependencies["redis"]},
            "settings": {
                "duration_s": options.duration_s,
                "warmup_s": options.warmup_s,
                "connections": list(options.connections),
                "workers": list(options.workers),
                "endpoints": list(options.only),
                "server_log_level": SERVER_LOG_LEVEL,
                "tenant_rate_limit": BENCH_RATE_LIMIT,
                "tenant_monthly_quota": BENCH_MONTHLY_QUOTA,
                "usage_records_seeded": options.usage_records,
                "batch_rows": BATCH_ROWS,
                "load_generator": "wrk (bench/lua/request.lua), on the same machine",
            },
        }
    )
    report = RunReport(meta=meta)
    report.notes.append(
        f"servers run with MODELGATE_LOG_LEVEL={SERVER_LOG_LEVEL} (no per-request log line), "
        "uvicorn with uvloop/httptools, no proxy headers, no access log"
    )
    if "usage" in options.only:
        report.notes.append(
            f"/me/usage aggregates {options.usage_records} seeded usage records "
            "of the current month"
        )
    log("setting up: fresh database, migrations, model, tenant, key")
    with bench_environment(options.database_url, options.redis_url) as env:
        if options.micro:
            log("micro-benchmarks")
            report.micro = run_micro_sync(env, log)
        for workers in options.workers:
            run_pass(env, workers, options, report)
        if options.usage_scale_records:
            scale = run_usage_scale(env, options.usage_scale_records, log)
            meta["usage_scale"] = scale.to_json()
            report.notes.extend(scale.lines())
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    path = write_json(report, options.output)
    on_table(render_table(report))
    log(f"\nresults written to {path} ({meta['elapsed_s']:.0f} s)")
    if report.failed:
        log(f"error: {len(report.failed)} cell(s) FAILED with error responses; see the table")
        return 1
    return 0

"""The load generator of the gRPC cell: ``wrk`` speaks no gRPC, so this drives ModelInfer with
grpcio's asyncio client, one channel (one HTTP/2 connection) per connection of the cell, each
sending its next call as soon as the last is answered, as wrk's connections do. Run in a process
of its own (``python -m bench.grpc_load``), so that its CPU is counted like wrk's.

It is Python, and on a small machine it is the bottleneck long before the server: its figures are
a floor for what the server does, and the cell says how much CPU the generator used.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from bench import BenchError
from bench.load import RESULT_MARKER, LoadResult

DEADLINE_S = 5.0


async def _drive(address: str, api_key: str, connections: int, duration_s: float) -> dict[str, Any]:
    import grpc

    from api.grpc.protocol import open_inference_grpc_pb2 as pb
    from api.grpc.protocol import open_inference_grpc_pb2_grpc as stubs

    request = pb.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="input0", datatype="FP64", shape=[1, 4])
    tensor.contents.fp64_contents.extend([5.1, 3.5, 1.4, 0.2])
    metadata = (("authorization", f"Bearer {api_key}"),)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + duration_s

    async def connection() -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = stubs.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    await stub.ModelInfer(request, metadata=metadata, timeout=DEADLINE_S)
                except grpc.aio.AioRpcError as error:
                    name = error.code().name
                    statuses[name] = statuses.get(name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(fraction: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] * 1000

    return {
        "requests": len(latencies) + sum(statuses.values()),
        "duration_s": elapsed,
        "ok": len(latencies),
        "p50_ms": percentile(0.5),
        "p90_ms": percentile(0.9),
        "p99_ms": percentile(0.99),
        "mean_ms": sum(latencies) / len(latencies) * 1000 if latencies else 0.0,
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
        "statuses": statuses,
    }


def run_grpc_load(address: str, api_key: str, connections: int, duration_s: float) -> LoadResult:
    """Drive ``address`` for ``duration_s`` from a child process and return what it measured."""
    env = {**os.environ, "BENCH_GRPC_KEY": api_key}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "bench.grpc_load", address, str(connections), str(duration_s)],
            env=env,
            capture_output=True,
            text=True,
            timeout=duration_s + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError("the gRPC load generator did not finish in time") from None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = None
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            summary = json.loads(line[len(RESULT_MARKER) :])
    if completed.returncode != 0 or summary is None:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise BenchError(f"the gRPC load generator failed: {detail[-1] if detail else '?'}")
    duration = summary["duration_s"]
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return LoadResult(
        requests=summary["requests"],
        duration_s=round(duration, 3),
        requests_per_s=summary["ok"] / duration if duration > 0 else 0.0,
        p50_ms=summary["p50_ms"],
        p90_ms=summary["p90_ms"],
        p99_ms=summary["p99_ms"],
        mean_ms=summary["mean_ms"],
        max_ms=summary["max_ms"],
        non2xx=sum(summary["statuses"].values()),
        statuses=summary["statuses"],
        socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 0},
        wrk_cpu_percent=round(100 * cpu_s / duration, 1) if duration > 0 else 0.0,
    )


def main() -> None:
    """``python -m bench.grpc_load ADDRESS CONNECTIONS SECONDS`` (the key in BENCH_GRPC_KEY)."""
    address, connections, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    summary = asyncio.run(_drive(address, os.environ["BENCH_GRPC_KEY"], connections, seconds))
    print(RESULT_MARKER + json.dumps(summary))


if __name__ == "__main__":
    main()

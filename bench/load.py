"""The load generator: ``wrk`` driven by ``bench/lua/request.lua``, one fixed request per run."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import BenchError

LUA_SCRIPT = Path(__file__).resolve().parent / "lua" / "request.lua"
RESULT_MARKER = "BENCH_RESULT "
# A request slower than this counts as a socket error (and so fails the cell): at these loads a
# multi-second response is a defect, not a data point.
WRK_TIMEOUT_SECONDS = 5
WRK_INSTALL_HINT = (
    "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk` (macOS)"
)


@dataclass(frozen=True)
class Target:
    """One request to drive: method, path, body and headers (the API key is in ``headers``)."""

    name: str
    method: str
    path: str
    body: str | bytes = ""
    headers: dict[str, str] = field(default_factory=dict)
    rows_per_request: int = 1
    # A new Idempotency-Key on every request (made by the Lua script, not pre-formatted).
    unique_idempotency_key: bool = False


@dataclass(frozen=True)
class LoadResult:
    """What one wrk run measured. Latencies in milliseconds."""

    requests: int
    duration_s: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    non2xx: int
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    # The load generator's own CPU use (user+system, in % of one core), to show it is not the
    # bottleneck: on a small machine wrk and the server share the same cores.
    wrk_cpu_percent: float

    @property
    def error_count(self) -> int:
        """Non-2xx responses plus socket errors (connect, read, write, timeout)."""
        return self.non2xx + sum(self.socket_errors.values())

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the results file."""
        data = asdict(self)
        data["errors"] = self.error_count
        return data


def require_wrk() -> str:
    """The path of ``wrk``, or a ``BenchError`` telling how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise BenchError(WRK_INSTALL_HINT)
    return path


def wrk_threads(connections: int) -> int:
    """wrk needs at least one connection per thread; two threads saturate a 2-core box."""
    return 1 if connections < 2 else 2


def run_wrk(base_url: str, target: Target, connections: int, duration_s: float) -> LoadResult:
    """Run wrk once against ``base_url + target.path`` and parse the script's summary."""
    wrk = require_wrk()
    seconds = max(1, math.ceil(duration_s))
    argv = [
        wrk,
        f"-t{wrk_threads(connections)}",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={WRK_TIMEOUT_SECONDS}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        base_url + target.path,
    ]
    env = dict(os.environ)
    env["BENCH_METHOD"] = target.method
    env["BENCH_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in target.headers.items())
    env["BENCH_IDEMPOTENCY_KEYS"] = "1" if target.unique_idempotency_key else ""
    with tempfile.TemporaryDirectory(prefix="bench-body-") as directory:
        if isinstance(target.body, bytes):
            # Binary bodies (NUL bytes included) reach the script through a file.
            body_file = Path(directory) / "body"
            body_file.write_bytes(target.body)
            env["BENCH_BODY_FILE"] = str(body_file)
        else:
            env["BENCH_BODY"] = target.body
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            completed = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False
            )
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"wrk did not finish within {seconds + 30} s ({target.name})"
            ) from None
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise BenchError(f"wrk failed ({target.name}): {detail[-1] if detail else 'no output'}")
    summary = _parse_summary(completed.stdout, target.name)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    duration = summary["duration_us"] / 1e6
    latency = summary["latency_us"]
    errors = summary["errors"]
    return LoadResult(
        requests=summary["requests"],
        duration_s=round(duration, 3),
        requests_per_s=summary["requests"] / duration if duration > 0 else 0.0,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        mean_ms=latency["mean"] / 1000,
        max_ms=latency["max"] / 1000,
        non2xx=summary["non2xx"],
        statuses=summary["statuses"],
        socket_errors={k: errors[k] for k in ("connect", "read", "write", "timeout")},
        wrk_cpu_percent=round(100 * cpu_s / duration, 1) if duration > 0 else 0.0,
    )


def _parse_summary(stdout: str, name: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            parsed: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            return parsed
    raise BenchError(f"wrk printed no summary for {name} (is {LUA_SCRIPT} intact?)")

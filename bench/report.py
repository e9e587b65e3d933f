"""The results: one table on stdout, the same figures as JSON, and the comparison of two runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import RESULTS_DIR, ROOT, BenchError
from bench.load import LoadResult
from bench.micro import MicroResult

SCHEMA_VERSION = 1
OK, FAILED, SKIPPED = "ok", "failed", "skipped"

# How each endpoint is named in the table, in the order rows are shown.
ENDPOINT_LABELS = {
    "echo": "echo (framework ceiling)",
    "predict": "POST /predict (API key)",
    "predict-jwt": "POST /predict (JWT)",
    "predict-sklearn": "/predict scikit-learn, batched",
    "predict-sklearn-direct": "/predict scikit-learn, direct",
    "predict-cached": "/predict ONNX, cache hit",
    "batch": "POST /predict/batch x10",
    "usage": "GET /me/usage",
    "v2-infer": "POST /v2/models/iris/infer (1 row)",
    "v2-binary": "V2 infer, binary tensors (1 row)",
    "predict-idem": "/predict, a new Idempotency-Key each",
    "grpc-infer": "gRPC ModelInfer (1 row, Python client)",
}


@dataclass
class Cell:
    """One endpoint at one worker count and one concurrency: a warm-up, then a measured run."""

    endpoint: str
    workers: int
    connections: int
    rows_per_request: int = 1
    status: str = OK
    note: str = ""
    result: LoadResult | None = None
    warmup_errors: int = 0
    # CPU seconds the server's processes, Postgres and Redis used during the measured run
    # (bench.cpu; empty where /proc cannot be read).
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def cpu_percent(self, who: str) -> float | None:
        """What ``who`` used during the measured run, in % of one core."""
        if self.result is None or who not in self.cpu_seconds or not self.result.duration_s:
            return None
        return 100 * self.cpu_seconds[who] / self.result.duration_s

    @property
    def server_us_per_request(self) -> float | None:
        """The server's CPU per request answered (all its workers), in µs."""
        if self.status != OK or self.result is None or "server" not in self.cpu_seconds:
            return None
        return 1e6 * self.cpu_seconds["server"] / max(1, self.result.requests)

    @property
    def key(self) -> tuple[int, str, int]:
        """How cells of two runs are matched."""
        return (self.workers, self.endpoint, self.connections)

    @property
    def requests_per_s(self) -> float | None:
        """Throughput, or None if the cell failed or was skipped (never averaged in)."""
        if self.status != OK or self.result is None:
            return None
        return self.result.requests_per_s


@dataclass
class RunReport:
    """Everything one run measured, plus where and how."""

    meta: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    micro: list[MicroResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Cell]:
        """The cells that saw errors (or could not run)."""
        return [cell for cell in self.cells if cell.status == FAILED]

    def echo_rps(self, workers: int, connections: int) -> float | None:
        """The echo app's throughput at the same worker count and concurrency."""
        for cell in self.cells:
            if cell.endpoint == "echo" and (cell.workers, cell.connections) == (
                workers,
                connections,
            ):
                return cell.requests_per_s
        return None

    def ratio(self, cell: Cell) -> float | None:
        """The cell's req/s as a fraction of echo's in this run."""
        rps, echo = cell.requests_per_s, self.echo_rps(cell.workers, cell.connections)
        if rps is None or not echo:
            return None
        return rps / echo

    def to_json(self) -> dict[str, Any]:
        """The results file's content."""
        load = []
        for cell in self.cells:
            entry: dict[str, Any] = {
                "endpoint": cell.endpoint,
                "label": ENDPOINT_LABELS.get(cell.endpoint, cell.endpoint),
                "workers": cell.workers,
                "connections": cell.connections,
                "status": cell.status,
                "note": cell.note,
                "requests_per_s": _round(cell.requests_per_s, 1),
                "rows_per_s": _round(
                    cell.requests_per_s * cell.rows_per_request if cell.requests_per_s else None, 1
                ),
                "ratio_to_echo": _round(self.ratio(cell), 4),
                "warmup_errors": cell.warmup_errors,
                "cpu_percent": {
                    who: _round(cell.cpu_percent(who), 1) for who in sorted(cell.cpu_seconds)
                },
                "server_cpu_us_per_request": _round(cell.server_us_per_request, 1),
                # Kept for failed cells too, for diagnosis; the figures above are null then.
                "measured": cell.result.to_json() if cell.result else None,
            }
            load.append(entry)
        return {
            "schema": SCHEMA_VERSION,
            "meta": self.meta,
            "load": load,
            "micro": [result.to_json() for result in self.micro],
            "notes": self.notes,
            "failed": len(self.failed),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_gib() -> float | None:
    """Total memory in GiB (Linux), for the record."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def git_revision() -> str:
    """The checkout's commit (with ``-dirty`` if it has changes), read-only."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def machine_meta() -> dict[str, Any]:
    """Where the figures come from: cores, CPU model, memory, OS, Python, library versions."""
    versions: dict[str, str | None] = {}
    for package in (
        "fastapi",
        "starlette",
        "uvicorn",
        "pydantic",
        "sqlalchemy",
        "asyncpg",
        "redis",
        "limits",
        "scikit-learn",
        "numpy",
        "uvloop",
        "httptools",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load_avg] if load_avg else None,
        "versions": versions,
        "git": git_revision(),
    }


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


# The pieces of a /predict request that are modelgate's own accounting, by their micro-benchmarks
# under load (64 concurrent): the cached credential check, the rate-limit check (the bench key is
# busy enough for its permits to be leased, as /predict's are) and the usage record's group
# commit. Issue 21's goal: together at most 15% of a request's CPU.
HOT_PATH_PIECES = ("key.authenticate", "limiter.hit.leased.x64", "usage.write.x64")


def hot_path_share(report: RunReport) -> str | None:
    """One line: the CPU of authentication, limit and metering per request (the micro column),
    and its share of the server's CPU per ``/predict`` request at one worker, 64 connections."""
    cpu = {m.name: m.cpu_us_per_op for m in report.micro if m.cpu_us_per_op is not None}
    cell = next(
        (
            c
            for c in report.cells
            if (c.endpoint, c.workers, c.connections) == ("predict", 1, 64)
            and c.server_us_per_request
        ),
        None,
    )
    if cell is None or not all(name in cpu for name in HOT_PATH_PIECES):
        return None
    pieces = sum(cpu[name] for name in HOT_PATH_PIECES)
    per_request = cell.server_us_per_request or 0.0
    return (
        f"authentication + limit + metering: {pieces:.0f} µs of CPU per request "
        f"({' + '.join(f'{cpu[name]:.1f}' for name in HOT_PATH_PIECES)}), "
        f"{100 * pieces / per_request:.1f}% of /predict's {per_request:.0f} µs at 1 worker, 64 "
        "connections"
    )


def render_table(report: RunReport) -> str:
    """The load results as one fixed-width table, then the micro-benchmarks and notes."""
    meta = report.meta
    lines = [
        f"modelgate bench {meta['timestamp']}  git {meta['git']}  "
        f"{meta['cores']} cores, {meta['cpu_model']}  python {meta['python']}",
        f"measured {meta['settings']['duration_s']} s after {meta['settings']['warmup_s']} s "
        f"warm-up per cell; servers log at {meta['settings']['server_log_level']}; "
        "wrk runs on the same machine",
        "",
    ]
    header = (
        f"{'workers':>7}  {'endpoint':<26} {'conns':>5} {'req/s':>9} {'rows/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'vs echo':>7} {'wrk cpu':>7} "
        f"{'srv cpu':>7} {'pg cpu':>6} {'redis':>6} {'srv µs/req':>10}"
    )
    lines += [header, "-" * len(header)]
    order = list(ENDPOINT_LABELS)
    cells = sorted(
        report.cells,
        key=lambda c: (
            c.workers,
            order.index(c.endpoint) if c.endpoint in order else 99,
            c.connections,
        ),
    )
    previous: tuple[int, str] | None = None
    for cell in cells:
        if previous is not None and previous[0] != cell.workers:
            lines.append("")
        previous = (cell.workers, cell.endpoint)
        label = ENDPOINT_LABELS.get(cell.endpoint, cell.endpoint)
        result = cell.result
        if cell.status == SKIPPED:
            lines.append(f"{cell.workers:>7}  {label:<26} {'-':>5}   skipped: {cell.note}")
            continue
        if cell.status == FAILED:
            rps_text, rows_text, ratio_text = "FAILED", "-", "-"
        else:
            rps = cell.requests_per_s
            rps_text = _fmt(rps, ".1f")
            rows_text = (
                _fmt(rps * cell.rows_per_request, ".1f")
                if rps and cell.rows_per_request > 1
                else "-"
            )
            ratio_text = _percent(report.ratio(cell))
        errors = str(result.error_count) if result else "-"
        # A failed cell's latencies mix error responses with real ones: not shown as figures.
        shown = result if cell.status == OK else None
        lines.append(
            f"{cell.workers:>7}  {label:<26} {cell.connections:>5} {rps_text:>9} {rows_text:>9} "
            f"{_fmt(shown.p50_ms if shown else None, '.2f'):>8} "
            f"{_fmt(shown.p99_ms if shown else None, '.2f'):>8} {errors:>6} {ratio_text:>7} "
            f"{_fmt(result.wrk_cpu_percent if result else None, '.0f'):>6}% "
            f"{_fmt(cell.cpu_percent('server'), '.0f'):>6}% "
            f"{_fmt(cell.cpu_percent('postgres'), '.0f'):>5}% "
            f"{_fmt(cell.cpu_percent('redis'), '.0f'):>5}% "
            f"{_fmt(cell.server_us_per_request, '.0f'):>10}"
        )
    failed = report.failed
    if failed:
        lines += ["", "FAILED cells (errors in the measured run; not reported as figures):"]
        for cell in failed:
            lines.append(f"  w{cell.workers} {cell.endpoint} c{cell.connections}: {cell.note}")
    if report.micro:
        # µs/op is wall time per operation; CPU µs is this process's CPU per operation (what
        # an operation that waits on Postgres or Redis costs the worker).
        lines += [
            "",
            f"{'micro-benchmark':<24} {'µs/op':>10} {'min':>9} {'max':>9} {'CPU µs':>8}  what",
        ]
        for micro in report.micro:
            if micro.skipped:
                lines.append(
                    f"{micro.name:<24} {'skipped':>10} {'':>9} {'':>9} {'':>8}  {micro.skipped}"
                )
            else:
                lines.append(
                    f"{micro.name:<24} {_fmt(micro.us_per_op, '.1f'):>10} "
                    f"{_fmt(micro.min_us_per_op, '.1f'):>9} {_fmt(micro.max_us_per_op, '.1f'):>9} "
                    f"{_fmt(micro.cpu_us_per_op, '.1f'):>8}  {micro.description}"
                )
    share = hot_path_share(report)
    if share:
        lines += ["", share]
    if report.notes:
        lines += ["", *(f"note: {note}" for note in report.notes)]
    return "\n".join(lines)


def write_json(report: RunReport, path: Path | None = None) -> Path:
    """Write the results file (``bench/results/<timestamp>.json`` unless a path is given)."""
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS_DIR / f"{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    return path


def _load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None
    if data.get("schema") != SCHEMA_VERSION:
        raise BenchError(f"{path} is not a bench results file (schema {SCHEMA_VERSION})")
    return data


def _ratio_text(new: float | None, old: float | None) -> str:
    if new is None or not old:
        return "-"
    return f"{new / old:.2f}x"


def compare(path_a: Path, path_b: Path) -> str:
    """Side by side: each cell's req/s and p99 in A and B, and B/A; the same for micro µs/op."""
    a, b = _load(path_a), _load(path_b)
    lines = [
        f"A: {path_a.name}  ({a['meta']['timestamp']}, git {a['meta']['git']}, "
        f"{a['meta']['cores']} cores, {a['meta']['cpu_model']})",
        f"B: {path_b.name}  ({b['meta']['timestamp']}, git {b['meta']['git']}, "
        f"{b['meta']['cores']} cores, {b['meta']['cpu_model']})",
        "B/A for req/s: above 1 is faster; for p99 and µs/op: below 1 is faster. "
        "A/echo, B/echo: req/s as a share of the same run's echo app (machine-independent). "
        "Failed cells show as '-'.",
        "",
    ]
    header = (
        f"{'workers':>7}  {'endpoint':<26} {'conns':>5} {'A req/s':>9} {'B req/s':>9} "
        f"{'B/A':>6} {'A p99':>8} {'B p99':>8} {'B/A':>6} {'A/echo':>7} {'B/echo':>7}"
    )
    lines += [header, "-" * len(header)]
    cells_b = {(c["workers"], c["endpoint"], c["connections"]): c for c in b["load"]}
    matched = 0
    for cell_a in a["load"]:
        key = (cell_a["workers"], cell_a["endpoint"], cell_a["connections"])
        cell_b = cells_b.get(key)
        if cell_b is None or SKIPPED in (cell_a["status"], cell_b["status"]):
            continue
        matched += 1
        p99_a, p99_b = _p99(cell_a), _p99(cell_b)
        rps_a, rps_b = cell_a["requests_per_s"], cell_b["requests_per_s"]
        lines.append(
            f"{key[0]:>7}  {cell_a['label']:<26} {key[2]:>5} {_fmt(rps_a, '.1f'):>9} "
            f"{_fmt(rps_b, '.1f'):>9} {_ratio_text(rps_b, rps_a):>6} {_fmt(p99_a, '.2f'):>8} "
            f"{_fmt(p99_b, '.2f'):>8} {_ratio_text(p99_b, p99_a):>6} "
            f"{_percent(cell_a.get('ratio_to_echo')):>7} {_percent(cell_b.get('ratio_to_echo')):>7}"
        )
    if not matched:
        lines.append("(no load cells in common: different endpoints, workers or connections)")
    micro_b = {m["name"]: m for m in b.get("micro", [])}
    micro_rows = [(m, micro_b.get(m["name"])) for m in a.get("micro", []) if m["name"] in micro_b]
    if micro_rows:
        lines += ["", f"{'micro-benchmark':<24} {'A µs/op':>10} {'B µs/op':>10} {'B/A':>6}"]
        for micro_a, other in micro_rows:
            us_a, us_b = micro_a.get("us_per_op"), other.get("us_per_op") if other else None
            lines.append(
                f"{micro_a['name']:<24} {_fmt(us_a, '.1f'):>10} {_fmt(us_b, '.1f'):>10} "
                f"{_ratio_text(us_b, us_a):>6}"
            )
    return "\n".join(lines)


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def _p99(cell: dict[str, Any]) -> float | None:
    measured = cell.get("measured")
    if cell.get("status") != OK or not measured:
        return None
    value = measured.get("p99_ms")
    return float(value) if value is not None else None

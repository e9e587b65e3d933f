"""Usage reads at scale: do ``/me/usage`` and the billing export cost the same whatever the
volume of raw records?

Two databases on the bench's Postgres server, each migrated, each served in turn by a real
``modelgate serve`` (one worker):

- *big*: a tenant with N records (1,000,000 by default) and a tenant with 10,000;
- *small*: 10,000 records only, of two tenants (5,000 each), so that its export has exactly as
  many rows as the big one's: the comparison is of volume, not of output.

Each tenant's records are spread evenly over the 31 UTC days that end today and written with
``bench/usage_fill.py``'s ``fill`` (the usage writer's own transaction), whose rate is reported.
Then, sequentially (one request at a time, so that the figures are latencies, not queueing):
``/me/usage`` over those 31 days for the big and the small tenant of the big database (p95 of
each, and their ratio), and the CSV export of the month holding most of those days on each
database (median of three downloads, their ratio, and how much the server's resident memory grew
while it streamed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench import BenchError
from bench.services import (
    BenchDatabase,
    BenchEnvironment,
    create_database,
    drop_database,
    modelgate_cli,
    modelgate_server,
    running,
)
from bench.usage_fill import fill

SMALL_RECORDS = 10_000
DAYS = 31
USAGE_SAMPLES = 300
USAGE_WARMUP = 30
EXPORT_RUNS = 3


@dataclass
class UsageScaleResult:
    """What the usage-at-scale step measured."""

    big_records: int
    small_records: int
    fill_rate_per_s: float
    usage_p95_big_ms: float
    usage_p95_small_ms: float
    export_big_ms: float
    export_small_ms: float
    export_rows: int
    export_rss_growth_big_mb: float
    export_rss_growth_small_mb: float

    @property
    def usage_ratio(self) -> float:
        """p95 of /me/usage for the big tenant over the small one's (the goal: at most 2)."""
        return self.usage_p95_big_ms / self.usage_p95_small_ms

    @property
    def export_ratio(self) -> float:
        """The month's export on the big database over the small one (the goal: at most 2)."""
        return self.export_big_ms / self.export_small_ms

    def to_json(self) -> dict[str, Any]:
        """The figures and both ratios."""
        return {
            **asdict(self),
            "usage_ratio": round(self.usage_ratio, 3),
            "export_ratio": round(self.export_ratio, 3),
        }

    def lines(self) -> list[str]:
        """The figures as the bench prints them."""
        return [
            f"usage at scale (Postgres, one worker, sequential requests): {self.big_records:,} "
            f"records filled at {self.fill_rate_per_s:,.0f} records/s through the usage writer",
            f"  /me/usage over {DAYS} days, p95: {self.usage_p95_big_ms:.2f} ms for the tenant "
            f"with {self.big_records:,} records, {self.usage_p95_small_ms:.2f} ms for one with "
            f"{self.small_records:,}: ratio {self.usage_ratio:.2f} (goal: at most 2)",
            f"  the month's export ({self.export_rows} rows): {self.export_big_ms:.1f} ms on the "
            f"database with {self.big_records + self.small_records:,} records, "
            f"{self.export_small_ms:.1f} ms on one with {self.small_records:,}: ratio "
            f"{self.export_ratio:.2f} (goal: at most 2); server memory grew "
            f"{self.export_rss_growth_big_mb:.1f} MB and {self.export_rss_growth_small_mb:.1f} MB "
            "while streaming",
        ]


def _database(env: BenchEnvironment, suffix: str) -> BenchDatabase:
    base = env.database
    return BenchDatabase(
        admin_url=base.admin_url, url=base.url.set(database=f"{base.name}_{suffix}")
    )


@contextlib.contextmanager
def _environment(env: BenchEnvironment, database: BenchDatabase) -> Iterator[BenchEnvironment]:
    """The bench environment on another (fresh, migrated) database; dropped on the way out."""
    url = database.url.render_as_string(hide_password=False)
    other = BenchEnvironment(
        database=database,
        redis_url=env.redis_url,
        workdir=env.workdir,  # the same trained model and development secrets
        env={**env.env, "MODELGATE_DATABASE_URL": url},
    )
    asyncio.run(create_database(database))
    try:
        modelgate_cli(other, "db", "upgrade")
        yield other
    finally:
        asyncio.run(drop_database(database))


def _tenant(env: BenchEnvironment, name: str) -> tuple[str, str]:
    """A tenant (unlimited, with a generous rate limit) and a usage:read key."""
    tenant = json.loads(
        modelgate_cli(env, "tenants", "create", "--name", name, "--rate-limit", "1000000/minute")
    )
    output = modelgate_cli(env, "keys", "issue", "--tenant", tenant["id"], "--scopes", "usage:read")
    return tenant["id"], _last_line(output)


def _last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def _fill(env: BenchEnvironment, tenant_id: str, records: int) -> float:
    url = env.env["MODELGATE_DATABASE_URL"]
    return asyncio.run(fill(url, uuid.UUID(tenant_id), records, DAYS))


def _group_rss_bytes(group: int) -> int:
    """Resident memory of every process in a process group (the server and its workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, ProcessLookupError):
            continue
    return total


def _usage_p95(client: httpx.Client, key: str) -> float:
    today = datetime.now(UTC).date()
    params = {"start": (today - timedelta(days=DAYS - 1)).isoformat(), "end": today.isoformat()}
    headers = {"Authorization": f"Bearer {key}"}
    timings = []
    for index in range(USAGE_WARMUP + USAGE_SAMPLES):
        started = time.perf_counter()
        response = client.get("/api/v1/me/usage", params=params, headers=headers)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise BenchError(f"/me/usage answered {response.status_code}: {response.text[:200]}")
        if index >= USAGE_WARMUP:
            timings.append(elapsed)
    return statistics.quantiles(timings, n=20)[18]  # the 95th percentile


class _PeakMemory:
    """Samples a process group's resident memory every 5 ms until stopped."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.baseline = self.peak = _group_rss_bytes(group)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _group_rss_bytes(self.group))
            time.sleep(0.005)

    def growth_mb(self) -> float:
        """Stop sampling; the largest growth seen over the baseline."""
        self._done.set()
        self._thread.join()
        return (self.peak - self.baseline) / 2**20


def _busiest_month() -> str:
    """The month holding most of the 31 days that end today (the middle day's): the export
    that reads the most."""
    return (datetime.now(UTC) - timedelta(days=DAYS // 2)).strftime("%Y-%m")


def _export(client: httpx.Client, admin_key: str, group: int) -> tuple[float, int, float]:
    """Median export time (ms), its row count, and the largest memory growth (MB) seen."""
    month = _busiest_month()
    headers = {"Authorization": f"Bearer {admin_key}"}
    times, growths, rows = [], [], 0
    for _ in range(EXPORT_RUNS):
        memory = _PeakMemory(group)
        started = time.perf_counter()
        lines = 0
        with client.stream(
            "GET", "/api/v1/admin/billing/export", params={"month": month}, headers=headers
        ) as response:
            if response.status_code != 200:
                raise BenchError(f"the export answered {response.status_code}")
            for _line in response.iter_lines():
                lines += 1
        times.append((time.perf_counter() - started) * 1000)
        growths.append(memory.growth_mb())
        rows = lines - 1  # the header
    return statistics.median(times), rows, max(growths)


def _serve_and(env: BenchEnvironment, work: Callable[[httpx.Client, int], Any]) -> Any:
    server = modelgate_server(env, 1)
    with running(server), httpx.Client(base_url=server.base_url, timeout=120) as client:
        process = server._process
        if process is None:
            raise BenchError("the server did not start")
        return work(client, process.pid)


def run_usage_scale(
    env: BenchEnvironment, big_records: int, log: Callable[[str], None]
) -> UsageScaleResult:
    """Fill both databases, measure, drop them."""
    with (
        _environment(env, _database(env, "scale_big")) as big,
        _environment(env, _database(env, "scale_small")) as small,
    ):
        admin_big = _last_line(modelgate_cli(big, "admin", "create-key", "--name", "bench"))
        admin_small = _last_line(modelgate_cli(small, "admin", "create-key", "--name", "bench"))
        big_tenant, big_key = _tenant(big, "scale-big")
        small_tenant, small_key = _tenant(big, "scale-small")
        log(f"usage at scale: filling {big_records:,} records (and 2 x {SMALL_RECORDS:,})")
        rate = _fill(big, big_tenant, big_records)
        _fill(big, small_tenant, SMALL_RECORDS)
        for name in ("scale-small-a", "scale-small-b"):
            _fill(small, _tenant(small, name)[0], SMALL_RECORDS // 2)
        log(f"  filled at {rate:,.0f} records/s; measuring /me/usage and the export")

        def on_big(client: httpx.Client, group: int) -> tuple[float, float, float, int, float]:
            p95_big = _usage_p95(client, big_key)
            p95_small = _usage_p95(client, small_key)
            export_ms, rows, growth = _export(client, admin_big, group)
            return p95_big, p95_small, export_ms, rows, growth

        def on_small(client: httpx.Client, group: int) -> tuple[float, int, float]:
            return _export(client, admin_small, group)

        p95_big, p95_small, export_big, rows_big, growth_big = _serve_and(big, on_big)
        export_small, rows_small, growth_small = _serve_and(small, on_small)
        if rows_big != rows_small:
            raise BenchError(f"the exports differ in rows ({rows_big} and {rows_small})")
    return UsageScaleResult(
        big_records=big_records,
        small_records=SMALL_RECORDS,
        fill_rate_per_s=rate,
        usage_p95_big_ms=p95_big,
        usage_p95_small_ms=p95_small,
        export_big_ms=export_big,
        export_small_ms=export_small,
        export_rows=rows_small,
        export_rss_growth_big_mb=growth_big,
        export_rss_growth_small_mb=growth_small,
    )

"""Where the machine's CPU goes during a measured run: the server (its supervisor and workers),
Postgres and Redis, read from ``/proc`` before and after (issue 21: what each uses at 64
connections, and the server's CPU per request, which the micro-benchmarks' CPU column is a share
of). On a 2-core machine the load generator, the databases and the server share the cores, so a
server that could do more is held back by what the others take. Linux only: elsewhere the figures
are left out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# What a process is counted under, by its command name (``comm``); the server's processes are
# found by ancestry instead (its workers are Python processes like any other).
NAMED = {"postgres": "postgres", "redis-server": "redis"}


@dataclass(frozen=True)
class Snapshot:
    """Every process's CPU seconds (user + system) and parent at one moment."""

    seconds: dict[int, float]
    parents: dict[int, int]
    names: dict[int, str]


def snapshot() -> Snapshot | None:
    """The processes' CPU times now, or None where ``/proc`` cannot be read."""
    if not PROC.is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[int, float] = {}
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone since the listing
        # "pid (comm) state ppid ... utime stime ...": comm may hold spaces and parentheses.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks
        names[pid] = name
    return Snapshot(seconds, parents, names)


def _descends(pid: int, root: int, parents: dict[int, int]) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = parents.get(pid, 0)
    return pid == root


def usage(
    before: Snapshot | None, after: Snapshot | None, server_pid: int | None
) -> dict[str, float]:
    """CPU seconds used between the two snapshots by the server's process tree, Postgres and
    Redis (a process that started in between counts from zero; one that ended is missed)."""
    if before is None or after is None:
        return {}
    used = {"server": 0.0, "postgres": 0.0, "redis": 0.0}
    for pid, seconds in after.seconds.items():
        spent = seconds - before.seconds.get(pid, 0.0)
        if server_pid is not None and _descends(pid, server_pid, after.parents):
            used["server"] += spent
        elif after.names[pid] in NAMED:
            used[NAMED[after.names[pid]]] += spent
    return used

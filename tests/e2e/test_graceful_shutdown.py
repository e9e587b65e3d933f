"""SIGTERM to a real ``modelgate serve`` (one worker, and two behind uvicorn's supervisor, on
Postgres and Redis), sent to the server's own process as an orchestrator sends it.

What a client may see is judged request by request. A request whose body the client had written
in full before the signal was sent was accepted by a running server: it must be answered 2xx. A
request written later may instead fail to connect or go unanswered (the server has stopped
accepting), but any answer it does get must be 2xx too: a drain answers, it never refuses. Every
2xx is billed: the tenant's units in the database equal the 2xx responses received. The process
exits with status 0 within the shutdown timeout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import IRIS_SETOSA, Backend, only_on, recorded_units
from tests.e2e.servers import BIN, free_port, hermetic_cwd, run_cli, wait_ready

pytestmark = pytest.mark.e2e

CLIENTS = 16
# Generous: the machine running the tests is shared. The drain itself takes milliseconds.
SHUTDOWN_TIMEOUT = 20


@dataclass
class Outcome:
    """One request as its client saw it (times from time.monotonic())."""

    sent_at: float | None = None  # when its body was fully written; None: never
    status: int | None = None
    error: str | None = None


@contextmanager
def _server(
    environment: dict[str, str], cwd: Path, workers: int, **settings: str
) -> Iterator[tuple[Any, int]]:
    """A ``modelgate serve`` process, ready; killed (whole group) if the test leaves it running."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "modelgate"), "serve", "--port", str(port), "--workers", str(workers)],
        cwd=hermetic_cwd(cwd),
        env={
            **environment,
            "MODELGATE_SHUTDOWN_TIMEOUT_SECONDS": str(SHUTDOWN_TIMEOUT),
            **{f"MODELGATE_{name.upper()}": value for name, value in settings.items()},
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/api/v1/health/ready", server)
        yield server, port
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _tenant_key(environment: dict[str, str], cwd: Path) -> tuple[str, str]:
    run_cli(environment, cwd, "db", "upgrade")
    tenant = json.loads(
        run_cli(
            environment,
            cwd,
            "tenants",
            "create",
            "--name",
            "drained",
            "--rate-limit",
            "1000000/minute",
        ).stdout
    )
    issued = run_cli(environment, cwd, "keys", "issue", "--tenant", tenant["id"])
    return tenant["id"], issued.stdout.strip().splitlines()[-1]


async def _fetch(database_url: str, sql: str, *arguments: object) -> Any:
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        return await connection.fetchval(sql, *arguments)
    finally:
        await connection.close()


def _key_last_used(database_url: str, tenant_id: str) -> Any:
    sql = "SELECT max(last_used_at) FROM api_key WHERE tenant_id = $1"
    return asyncio.run(_fetch(database_url, sql, uuid.UUID(tenant_id)))


def _wait_exit(server: Any, signalled_at: float) -> float:
    """Wait for the process to exit; returns how long after the signal it did."""
    try:
        server.wait(timeout=SHUTDOWN_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"modelgate serve still running {SHUTDOWN_TIMEOUT + 30} s after SIGTERM")
    return time.monotonic() - signalled_at


async def _load_then_sigterm(port: int, key: str, server: Any) -> tuple[list[Outcome], float]:
    """Predictions from CLIENTS concurrent clients (half on kept-alive connections, half on a
    new connection per request); SIGTERM to the server once 200 have been answered; the load
    goes on until the process has exited. Returns every request's outcome and the time of the
    signal."""
    outcomes: list[Outcome] = []
    answered = 0
    signalled_at: float | None = None
    stop = asyncio.Event()

    async def client(keep_alive: bool) -> None:
        nonlocal answered
        limits = httpx.Limits(max_keepalive_connections=1 if keep_alive else 0)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/api/v1", timeout=60, limits=limits
        ) as http:
            while not stop.is_set():
                outcome = Outcome()
                outcomes.append(outcome)

                async def trace(
                    event: str, info: dict[str, Any], outcome: Outcome = outcome
                ) -> None:
                    if event == "http11.send_request_body.complete":
                        outcome.sent_at = time.monotonic()

                try:
                    response = await http.post(
                        "/predict",
                        json={"features": IRIS_SETOSA},
                        headers={"Authorization": f"Bearer {key}"},
                        extensions={"trace": trace},
                    )
                except httpx.TransportError as exc:
                    outcome.error = type(exc).__name__
                    await asyncio.sleep(0.05)  # a stopped server refuses at once: don't spin
                else:
                    outcome.status = response.status_code
                    answered += 1

    tasks = [asyncio.create_task(client(keep_alive=i % 2 == 0)) for i in range(CLIENTS)]
    deadline = time.monotonic() + 60
    while answered < 200:
        assert time.monotonic() < deadline, f"only {answered} answers in 60 s"
        assert not any(task.done() for task in tasks), [t.exception() for t in tasks if t.done()]
        await asyncio.sleep(0.05)
    # Taken before the signal is sent: whatever was written before it certainly was too.
    signalled_at = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    while server.poll() is None and time.monotonic() < signalled_at + SHUTDOWN_TIMEOUT + 30:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a few refused connections after the exit
    stop.set()
    await asyncio.gather(*tasks)
    return outcomes, signalled_at


@only_on("postgres")
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_answers_every_accepted_request_and_bills_every_2xx(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path, workers: int
) -> None:
    tenant_id, key = _tenant_key(tour_environment, tmp_path)
    with _server(tour_environment, tmp_path, workers) as (server, port):
        outcomes, signalled_at = asyncio.run(_load_then_sigterm(port, key, server))
        exited_after = _wait_exit(server, signalled_at)
    assert server.returncode == 0
    assert exited_after < SHUTDOWN_TIMEOUT, exited_after

    refused = [o for o in outcomes if o.status is not None and not 200 <= o.status < 300]
    assert not refused, f"answers other than 2xx: {[o.status for o in refused]}"
    dropped = [
        o for o in outcomes if o.error and o.sent_at is not None and o.sent_at < signalled_at
    ]
    assert not dropped, f"requests written before SIGTERM and never answered: {dropped}"
    in_flight = [
        o
        for o in outcomes
        if o.status is not None and o.sent_at is not None and o.sent_at < signalled_at
    ]
    ok = sum(1 for o in outcomes if o.status is not None)
    assert ok >= 200
    # The server did stop: requests after the signal failed to connect (nothing hung).
    assert any(o.error for o in outcomes), "no request failed after the server exited"
    recorded = asyncio.run(recorded_units(tour_environment["MODELGATE_DATABASE_URL"], tenant_id))
    assert recorded == ok, (recorded, ok, len(in_flight))


def _send_partial_prediction(port: int, key: str) -> tuple[socket.socket, bytes]:
    """Open a connection and write a prediction's headers and the first half of its body;
    returns the socket and the rest of the body."""
    body = json.dumps({"features": IRIS_SETOSA}).encode()
    half = len(body) // 2
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(
        b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {key}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:half]
    )
    return connection, body[half:]


def _read_response(connection: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@only_on("postgres")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_in_flight_at_sigterm_is_answered_while_new_connections_are_refused(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path, workers: int
) -> None:
    """A request whose body is still arriving keeps its worker draining: meanwhile the port
    refuses new connections (none waits, unserved, in a listening socket's backlog), and the
    request, once its body is complete, is answered 200 and billed. The key's last use, which
    workers write only every hour here, is written as the worker closes."""
    tenant_id, key = _tenant_key(tour_environment, tmp_path)
    database_url = tour_environment["MODELGATE_DATABASE_URL"]
    assert _key_last_used(database_url, tenant_id) is None
    with _server(tour_environment, tmp_path, workers, key_last_used_flush_seconds="3600") as (
        server,
        port,
    ):
        connection, rest = _send_partial_prediction(port, key)
        with connection:
            time.sleep(0.5)  # the worker has read the headers: the request is in flight
            signalled_at = time.monotonic()
            os.kill(server.pid, signal.SIGTERM)
            refused_at = None
            while time.monotonic() < signalled_at + 10:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    refused_at = time.monotonic()
                    break
                time.sleep(0.1)
            assert refused_at is not None, "new connections still accepted 10 s after SIGTERM"
            assert server.poll() is None, "the server exited with a request in flight"
            connection.sendall(rest)
            status, body = _read_response(connection)
        assert status == 200, body
        assert json.loads(body)["prediction"] is not None
        exited_after = _wait_exit(server, signalled_at)
    assert server.returncode == 0
    assert exited_after < SHUTDOWN_TIMEOUT, exited_after
    assert asyncio.run(recorded_units(database_url, tenant_id)) == 1
    assert _key_last_used(database_url, tenant_id) is not None

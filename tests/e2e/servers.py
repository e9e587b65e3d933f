"""Running real ``modelgate serve`` processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def hermetic_cwd(cwd: Path) -> Path:
    """``cwd`` for a ``modelgate`` process, checked: its settings come from the environment the
    test gives it and from a ``.env`` in its working directory, which must therefore not exist
    (a fresh ``tmp_path`` has none; the repository's own ``.env`` must never be read)."""
    assert not (cwd / ".env").exists(), f"{cwd}/.env would configure the server under test"
    return cwd


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    # One client for every poll: httpx.get makes a client each call (20 ms of CPU, its TLS
    # context), which polling every 50 ms turned into 40% of a core for each server starting.
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"{url} not ready after {timeout} s")


@contextmanager
def serve(
    environment: dict[str, str], cwd: Path, workers: int = 1, log_path: Path | None = None
) -> Iterator[int]:
    """Run ``modelgate serve`` until ready; yields its port and stops it (whole group) on exit.
    With ``log_path``, the server's log (stderr) is written there."""
    port = free_port()
    log = log_path.open("wb") if log_path is not None else None
    server = subprocess.Popen(
        [str(BIN / "modelgate"), "serve", "--port", str(port), "--workers", str(workers)],
        cwd=hermetic_cwd(cwd),
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=log if log is not None else subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/api/v1/health/ready", server)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if log is not None:
            log.close()


# Credentials for moto_server (it accepts any): the standard AWS chain's environment variables,
# so that boto3 runs with its defaults. Every other AWS_* variable of the caller is dropped.
MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def aws_environment(environment: dict[str, str]) -> dict[str, str]:
    """``environment`` without the caller's AWS_* variables, with moto's credentials."""
    kept = {key: value for key, value in environment.items() if not key.startswith("AWS_")}
    return {**kept, **MOTO_CREDENTIALS}


@contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's standalone S3 server (``moto_server``) on a free port until exit; yields its
    endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=1) as client:  # one client for every poll (wait_ready)
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"moto_server exited with {process.returncode}")
                try:
                    client.get(f"{url}/moto-api/")
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise AssertionError("moto_server did not start") from None
                    time.sleep(0.05)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def server_environment(
    database_url: str, redis_url: str, models: Path, var: Path, **settings: str
) -> dict[str, str]:
    """The environment of a server or command a test starts: this process's without any
    ``MODELGATE_*`` of the caller's (the suite is hermetic), the virtualenv's commands first on
    PATH, the database, Redis, model and var directories, then ``settings`` (each a
    ``MODELGATE_*`` name and its value)."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("MODELGATE_")
    }
    environment.update(
        {
            "PATH": f"{BIN}{os.pathsep}{environment.get('PATH', '')}",
            "MODELGATE_DATABASE_URL": database_url,
            "MODELGATE_REDIS_URL": redis_url,
            "MODELGATE_MODEL_DIR": str(models),
            "MODELGATE_VAR_DIR": str(var),
            **settings,
        }
    )
    return environment


def run_cli(
    environment: dict[str, str], cwd: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``modelgate ARGS`` and capture its output."""
    return subprocess.run(
        [str(BIN / "modelgate"), *args],
        cwd=hermetic_cwd(cwd),
        env=environment,
        capture_output=True,
        text=True,
        check=check,
    )


def tenant_and_key(environment: dict[str, str], cwd: Path, *options: str) -> tuple[str, str]:
    """A new tenant (``modelgate tenants create OPTIONS``) and an API key issued for it:
    (tenant id, key)."""
    tenant = json.loads(run_cli(environment, cwd, "tenants", "create", *options).stdout)
    issued = run_cli(environment, cwd, "keys", "issue", "--tenant", tenant["id"]).stdout
    return tenant["id"], issued.strip().splitlines()[-1]


def access_lines(log: str) -> list[dict[str, Any]]:
    """The access lines (logger ``modelgate.request``, event "request") of a server's JSON log."""
    lines = []
    for text in log.splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if line.get("logger") == "modelgate.request" and line.get("event") == "request":
            lines.append(line)
    return lines

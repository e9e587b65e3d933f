"""The deployment of docker-compose.yml without a container engine: the repository's own nginx
configuration (deploy/nginx.conf) in front of several real ``modelgate serve`` replicas on their
own ports, sharing Postgres and Redis."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.servers import BIN, free_port, hermetic_cwd, wait_ready

REPO = Path(__file__).resolve().parents[2]
NGINX_SITE = REPO / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_INSTALLED = Path(NGINX).is_file()
# The one upstream server line of the repository's configuration (compose's service "api" on
# its port), with whatever parameters follow the address.
_UPSTREAM_SERVER = re.compile(r"^(?P<indent>[ \t]*)server api:8000(?P<parameters>[^;]*);", re.M)
_LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen 80;", re.M)
_LOG_DIR = "/var/log/nginx/"
# The nginx address the replicas see, the one MODELGATE_TRUSTED_PROXIES names in these tests.
PROXY_ADDRESS = "127.0.0.1"


def render_site(
    upstream_ports: Sequence[int], listen_port: int, log_dir: Path, down: Sequence[int] = ()
) -> str:
    """deploy/nginx.conf with its upstream server line replaced by one line per replica (same
    parameters; ``down`` for the ports in ``down``, taken out of the rotation), its listen line
    by a loopback port, and its log directory by ``log_dir``; every other line as in the
    repository."""
    text = NGINX_SITE.read_text()

    def servers(match: re.Match[str]) -> str:
        return "\n".join(
            f"{match['indent']}server {PROXY_ADDRESS}:{port}{match['parameters']}"
            f"{' down' if port in down else ''};"
            for port in upstream_ports
        )

    text, upstreams = _UPSTREAM_SERVER.subn(servers, text)
    assert upstreams == 1, "deploy/nginx.conf: expected one 'server api:8000 ...;' line"
    text, listens = _LISTEN.subn(rf"\g<indent>listen {PROXY_ADDRESS}:{listen_port};", text)
    assert listens == 1, "deploy/nginx.conf: expected one 'listen 80;' line"
    assert _LOG_DIR in text, f"deploy/nginx.conf: expected a log in {_LOG_DIR}"
    return text.replace(_LOG_DIR, f"{log_dir}/")


def _main_config(directory: Path) -> str:
    """What the official nginx image's own nginx.conf around conf.d provides, with every path in
    ``directory``. As root, the workers run as nobody (the image's workers are not root either)."""
    user = ""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}
worker_processes 2;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{
    worker_connections 1024;
}}
http {{
{temp_paths}
    default_type application/octet-stream;
    keepalive_timeout 65;
    include {directory}/site.conf;
}}
"""


@dataclass
class Nginx:
    """A running nginx: its port, its directory (configuration and logs), its replicas."""

    port: int
    directory: Path
    upstream_ports: tuple[int, ...]
    process: subprocess.Popen[bytes]

    def take_out(self, upstream_port: int) -> None:
        """Mark a replica ``down`` and reload (SIGHUP): new requests go to the others, and the
        old workers finish the requests they hold, as an operator takes a replica out of the
        rotation before stopping it."""
        site = render_site(self.upstream_ports, self.port, self.directory, down=[upstream_port])
        (self.directory / "site.conf").write_text(site)
        self.process.send_signal(signal.SIGHUP)

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    @property
    def url(self) -> str:
        return f"http://{PROXY_ADDRESS}:{self.port}"


def prepare_nginx(upstream_ports: Sequence[int], directory: Path) -> tuple[int, list[str]]:
    """Write the configuration into ``directory``; the port nginx will listen on and the
    command that runs it in the foreground."""
    port = free_port()
    (directory / "site.conf").write_text(render_site(upstream_ports, port, directory))
    (directory / "nginx.conf").write_text(_main_config(directory))
    command = [
        NGINX,
        "-p",
        str(directory),
        "-c",
        str(directory / "nginx.conf"),
        "-e",
        str(directory / "error.log"),
        "-g",
        "daemon off;",
    ]
    return port, command


@contextmanager
def nginx_directory() -> Iterator[Path]:
    """A directory for nginx's configuration, logs and temporary files that its workers (nobody,
    when the tests run as root) may enter; removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="modelgate-nginx-"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _wait_listening(port: int, process: subprocess.Popen[bytes], directory: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors = (directory / "error.log").read_text(errors="replace")
            raise AssertionError(f"nginx exited with {process.returncode}: {errors}")
        try:
            with socket.create_connection((PROXY_ADDRESS, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nginx not listening on {port}")


@contextmanager
def nginx(upstream_ports: Sequence[int]) -> Iterator[Nginx]:
    """The repository's nginx configuration in front of ``upstream_ports``; stopped gracefully
    (SIGQUIT) on exit."""
    with nginx_directory() as directory:
        port, command = prepare_nginx(upstream_ports, directory)
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            _wait_listening(port, process, directory)
            yield Nginx(port, directory, tuple(upstream_ports), process)
        finally:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@dataclass
class Replica:
    """One ``modelgate serve`` process (one worker) and its log."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_lines(self) -> int:
        return len(self.log_path.read_text().splitlines())

    def answered(self, route: str, status: int, since: int = 0) -> int:
        """How many requests for ``route`` this replica answered with ``status`` after line
        ``since`` of its log (its own access lines, each with its pid)."""
        count = 0
        for line in self.log_path.read_text().splitlines()[since:]:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if (
                event.get("event") == "request"
                and event.get("route") == route
                and event.get("status") == status
            ):
                assert event.get("pid") == self.process.pid, event
                count += 1
        return count

    def terminate(self) -> None:
        """SIGTERM, as an orchestrator stops a replica."""
        os.killpg(self.process.pid, signal.SIGTERM)


@contextmanager
def replica(environment: dict[str, str], cwd: Path, log_path: Path) -> Iterator[Replica]:
    """``modelgate serve`` (one worker) on a port of its own until it is ready; stopped on exit
    if it still runs."""
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(BIN / "modelgate"), "serve", "--port", str(port)],
            cwd=hermetic_cwd(cwd),
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/api/v1/health/ready", process)
            yield Replica(port, process, log_path)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()

"""Real servers that hold models, for the pull tests: MLflow's own tracking server (SQLite
backend, artifacts served by it), and a local https file server with a self-signed certificate
(trusted through ``SSL_CERT_FILE``, as an operator would add a private CA). Each on a free port,
stopped (its whole process group) on exit. moto's S3 server is ``tests.e2e.servers.moto_server``."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.e2e.servers import BIN, free_port, wait_ready


@contextmanager
def _process(
    command: list[str],
    ready_url: str,
    log: Path,
    timeout: float = 90,
    environment: dict[str, str] | None = None,
) -> Iterator[None]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=log.parent,
            env=environment,
        )
        try:
            try:
                wait_ready(ready_url, process, timeout=timeout)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {log.read_text()[-3000:]}") from None
            yield
        finally:
            # Test servers with nothing to keep: a short grace, then the whole group goes.
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def mlflow_server(directory: Path) -> Iterator[str]:
    """``mlflow server`` on SQLite with ``--serve-artifacts`` (webhooks need the SQL backend),
    allowed to deliver webhooks to loopback ``http://`` addresses; yields its URL."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environment.update(
        {
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            # MLflow caches each event's webhooks (60 s by default): a test's new webhook must
            # not wait behind the list an earlier test left.
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",
            # No job runner: it starts three more Python processes (huey consumers, for MLflow's
            # GenAI jobs), seconds of CPU on a busy machine; the registry, its artifacts and its
            # webhooks (delivered from a thread pool) do not use it.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{directory / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(directory / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # Creating its schema takes MLflow a while on a busy machine.
    with _process(command, f"{url}/health", directory / "mlflow.log", 180, environment):
        yield url


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, its own CA, and its key: (certificate, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelgate test CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# How long ``/slow/<file>`` waits before it answers.
SLOW_SECONDS = 5.0


class _Files(SimpleHTTPRequestHandler):
    """Serves a directory; ``/redirect-to-http/<file>`` answers 302 to the same file over
    plain http, ``/slow/<file>`` the file after SLOW_SECONDS."""

    def do_GET(self) -> None:
        prefix = "/redirect-to-http/"
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_SECONDS)
            self.path = self.path[len("/slow") :]
        elif self.path.startswith(prefix):
            host, port = self.server.server_address[:2]
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{port}/{self.path[len(prefix) :]}")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: ARG002 - quiet
        return


@contextmanager
def https_file_server(served: Path, certificate: Path, key: Path) -> Iterator[str]:
    """Serve ``served`` over TLS on 127.0.0.1; yields the base URL (``https://127.0.0.1:P``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Files, directory=str(served)))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

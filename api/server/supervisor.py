"""Running the API under uvicorn, with a graceful shutdown on SIGTERM (``modelgate serve``).

On SIGTERM (or SIGINT) every worker stops accepting connections, lets the requests it has
accepted finish (at most ``MODELGATE_SHUTDOWN_TIMEOUT_SECONDS``; a request still running then is
cancelled), then runs the app's lifespan shutdown: pending usage flushed, key activity written,
Redis and database pools closed (at most the same time again, ``api.app.lifespan``). Two gaps in
uvicorn's own behaviour are closed here:

- With several workers the supervisor keeps its copy of the listening socket until the last
  worker has exited, so connections made during the drain are accepted by the kernel into a
  backlog that nobody reads, and reset when the supervisor exits: requests sent and lost. The
  supervisor closes its copy first, so that once the workers close theirs new connections are
  refused at once (which a load balancer retries on another replica safely).
- After a drain, uvicorn raises the SIGTERM again, so the process ends "killed by SIGTERM" (exit
  status 143) although it stopped cleanly, as asked. Here it exits with 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from socket import socket

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

logger = logging.getLogger("modelgate.serve")

# How much longer than a worker's own bounds (drain, then closing) the supervisor waits for it.
_JOIN_MARGIN_SECONDS = 10.0


class _Server(uvicorn.Server):
    """uvicorn's server, whose SIGTERM ends in exit status 0 once drained."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # uvicorn raises every captured signal again when this block ends.
                self._captured_signals = [
                    sig for sig in self._captured_signals if sig != signal.SIGTERM
                ]


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, which stops accepting before the workers drain and does
    not wait forever for a worker that does not exit."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket], join_timeout: float) -> None:
        super().__init__(config, sockets)
        self.join_timeout = join_timeout

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    def join_all(self) -> None:
        deadline = time.monotonic() + self.join_timeout
        for worker in self.processes:
            worker.process.join(max(deadline - time.monotonic(), 0))
            if worker.process.exitcode is None:
                logger.error("worker %s did not exit in time; killed", worker.pid)
                worker.kill()
                worker.join()


def run(host: str, port: int, workers: int, shutdown_timeout: int) -> None:
    """Serve ``api.app:create_app`` until SIGTERM or SIGINT; exit status 0 after a drain."""
    config = uvicorn.Config(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_graceful_shutdown=shutdown_timeout,
        # uvicorn's own proxy handling stays off (it would believe 127.0.0.1's X-Forwarded-For
        # and rewrite the peer): MODELGATE_TRUSTED_PROXIES and api.http.forwarded alone decide.
        proxy_headers=False,
        server_header=False,
        log_config=None,
    )
    if workers > 1:
        # A worker takes at most the drain, then the closing, each bounded by the timeout.
        join_timeout = 2 * shutdown_timeout + _JOIN_MARGIN_SECONDS
        _Supervisor(config, [config.bind_socket()], join_timeout).run()
        return
    server = _Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, raised again after its drain
        server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)

"""Serving the Open Inference Protocol over gRPC (``api.grpc.service``) in each worker process,
beside its HTTP server: started by the app's lifespan once the process's services are up, when
``MODELGATE_GRPC_PORT`` is set.

Every worker of ``modelgate serve --workers N`` binds the same port with ``SO_REUSEPORT`` (gRPC's
``grpc.so_reuseport``), and the kernel spreads new connections over them, as the supervisor's
one shared socket does for HTTP. A port per worker was the other way; it would make clients know
N ports (or need a proxy), and a worker that restarts would change nothing for them here.

Drained on SIGTERM with the HTTP server: the signal that starts uvicorn's drain also starts
gRPC's (``grpc.aio.Server.stop(grace)``: new calls are refused, calls in flight have
``MODELGATE_SHUTDOWN_TIMEOUT_SECONDS`` to finish), and the lifespan's shutdown waits for it before
the services it uses close. Messages are bounded: a request by ``MODELGATE_MAX_BODY_BYTES``, as an
HTTP body is, an answer by ``MAX_SEND_BYTES``.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from types import FrameType
from typing import Any

import grpc
import structlog

from api.services import AppState
from auth.errors import ConfigurationError
from auth.settings import Settings

logger = structlog.get_logger("modelgate.serve")

# An answer's bound: 1,000 rows of a few outputs are far below it.
MAX_SEND_BYTES = 4 * 1024 * 1024


class GrpcServing:
    """This worker's gRPC server, and its drain."""

    def __init__(self, server: Any, grace: float) -> None:
        self.server = server
        self.grace = grace
        self._stopping: asyncio.Task[None] | None = None

    def drain(self) -> None:
        """Stop taking calls and give those in flight the grace period (once)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.server.stop(self.grace))

    async def close(self) -> None:
        """Drain (if not yet draining) and wait until the server has stopped."""
        self.drain()
        assert self._stopping is not None  # noqa: S101 (drain sets it)
        await self._stopping


async def start_grpc(state: AppState, settings: Settings, name: str, version: str) -> GrpcServing:
    """Start serving ``inference.GRPCInferenceService`` on ``MODELGATE_GRPC_PORT``."""
    # Imported only when gRPC is served: the generated module registers the protocol's messages
    # in protobuf's process-wide pool.
    from api.grpc.protocol import open_inference_grpc_pb2_grpc as generated
    from api.grpc.service import InferenceService

    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ]
    )
    generated.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceService(state, name, version), server
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise ConfigurationError(f"MODELGATE_GRPC_PORT: cannot listen on {address}")
    await server.start()
    serving = GrpcServing(server, settings.shutdown_timeout_seconds)
    _drain_on_signals(serving)
    logger.info("serving gRPC", address=address)
    return serving


def _drain_on_signals(serving: GrpcServing) -> None:
    """Start the gRPC drain when SIGTERM or SIGINT arrives, then let the handler in place (the
    HTTP server's, which starts its own drain) have the signal too."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach only the main thread's handlers
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # nobody serves HTTP here with a drain of its own

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(serving.drain)
            previous(signum, frame)

        signal.signal(sig, handler)

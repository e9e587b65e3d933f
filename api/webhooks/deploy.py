"""The hand-off from a webhook receiver to whatever deploys a model version.

A receiver turns each accepted delivery into one :class:`DeployRequest` and offers it to the
process's :class:`DeployQueue` (``AppState.deploys``), which runs it in the background through
the process's :class:`Deployer`, one job at a time. The queue is bounded: a receiver reserves a
place before it accepts a delivery, and a full queue refuses the delivery (503 with
``Retry-After``: the sender retries later) rather than growing without limit. Nothing is lost
silently: each job's outcome, a failure included, is logged and audited (``webhook.deploy``), and
jobs still waiting at shutdown are logged and audited as not run.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.audit import Actor, record_event

logger = structlog.get_logger(__name__)

# Jobs waiting per process; a deployment takes seconds (load, warm up, canary), deliveries
# come one per new version or alias move.
QUEUE_CAPACITY = 16
# An audit detail's free text, clipped.
_DETAIL_LENGTH = 300


@dataclass(frozen=True, slots=True)
class DeployRequest:
    """One accepted delivery: deploy ``name`` at ``version`` from ``source_uri``, and make it
    the active version once it verified, converted, warmed up and answered its canary if
    ``activate``. ``source_uri`` is ``models:/<MLflow name>/<version>`` for MLflow, the
    payload's ``source`` for the generic hook."""

    name: str
    version: str
    source_uri: str
    activate: bool
    delivery_id: str
    via: Literal["mlflow", "generic"]
    # The artifact's SHA-256 when the sender pins it (the generic hook's "sha256"; an https://
    # source needs one).
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class DeployOutcome:
    """What a deployer did with a request: ``state`` is ``deployed`` (registered, and
    activated if asked) or ``refused`` (the request cannot be done as it is, with the reason)."""

    state: Literal["deployed", "refused"]
    detail: str
    activated: bool = False


class Deployer(Protocol):
    """Deploys one request (may take seconds: it is run in the background, never in a
    request). Raises for a failure it cannot describe as an outcome; the runner records it."""

    async def deploy(self, request: DeployRequest) -> DeployOutcome:
        """Deploy ``request`` and say what was done."""
        ...


def _actor(request: DeployRequest) -> Actor:
    return Actor(name=f"webhook:{request.via}", request_id=request.delivery_id)


class DeployQueue:
    """A bounded queue of deploy requests and the one task that runs them, in order."""

    def __init__(
        self,
        deployer: Deployer,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        capacity: int = QUEUE_CAPACITY,
        audit_timeout_seconds: float = 5.0,
    ) -> None:
        self.deployer = deployer
        self._sessionmaker = sessionmaker
        self._capacity = capacity
        self._audit_timeout = audit_timeout_seconds
        self._queue: asyncio.Queue[DeployRequest] = asyncio.Queue()
        # Places reserved by receivers that have not submitted (or released) yet, plus the
        # requests waiting: never more than the capacity.
        self._reserved = 0
        self._task: asyncio.Task[None] | None = None

    def reserve(self) -> bool:
        """Reserve a place for one request; False when the queue is full."""
        if self._reserved + self._queue.qsize() >= self._capacity:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """Give back a reservation that will not be submitted."""
        self._reserved = max(self._reserved - 1, 0)

    def submit(self, request: DeployRequest) -> None:
        """Queue ``request`` in the place reserved for it."""
        self.release()
        self._queue.put_nowait(request)
        logger.info("model deploy queued", **_fields(request))

    def start(self) -> None:
        """Start the task that runs the queued requests."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="model-deploys")

    async def join(self) -> None:
        """Wait until every request queued so far has been run (for tests and shutdown)."""
        await self._queue.join()

    async def close(self) -> None:
        """Stop running requests; those still waiting are logged and audited as not run."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            request = self._queue.get_nowait()
            self._queue.task_done()
            logger.error("model deploy not run: the server is shutting down", **_fields(request))
            await self._audit(request, "not-run", "the server shut down before it ran")

    async def _run(self) -> None:
        while True:
            request = await self._queue.get()
            try:
                await self._run_one(request)
            finally:
                self._queue.task_done()

    async def _run_one(self, request: DeployRequest) -> None:
        try:
            outcome = await self.deployer.deploy(request)
        except asyncio.CancelledError:
            logger.error("model deploy interrupted by shutdown", **_fields(request))
            await self._audit(request, "failed", "interrupted by shutdown")
            raise
        except Exception as exc:
            # The class only: a message may quote a path or a value from the payload.
            logger.exception("model deploy failed", error=type(exc).__name__, **_fields(request))
            await self._audit(request, "failed", type(exc).__name__)
            return
        log = logger.info if outcome.state == "deployed" else logger.warning
        log(
            "model deploy " + outcome.state,
            detail=outcome.detail,
            activated=outcome.activated,
            **_fields(request),
        )
        await self._audit(request, outcome.state, outcome.detail, activated=outcome.activated)

    async def _audit(
        self, request: DeployRequest, state: str, detail: str, *, activated: bool = False
    ) -> None:
        try:
            async with asyncio.timeout(self._audit_timeout), self._sessionmaker() as session:
                await record_event(
                    session,
                    _actor(request),
                    action="webhook.deploy",
                    target_type="model",
                    target_id=request.name,
                    detail={
                        **_fields(request),
                        "outcome": state,
                        "detail": detail[:_DETAIL_LENGTH],
                        "activated": activated,
                    },
                )
                await session.commit()
        except Exception as exc:
            logger.error(
                "model deploy outcome not audited", error=type(exc).__name__, **_fields(request)
            )


def _fields(request: DeployRequest) -> dict[str, object]:
    fields = asdict(request)
    fields["source_uri"] = request.source_uri[:_DETAIL_LENGTH]
    # "name" would clash with structlog's own use of the word in some renderers.
    fields["model"] = fields.pop("name")
    return fields

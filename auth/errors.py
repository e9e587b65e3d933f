"""The project's own errors. Services raise these; the API turns them into problem JSON."""

from __future__ import annotations


class ModelgateError(Exception):
    """Base of every error a client may see; ``detail`` is safe to show (no secrets)."""

    status_code = 500
    type = "internal-error"
    title = "Internal server error"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.title
        super().__init__(self.detail)


class ConfigurationError(Exception):
    """The configuration is unusable; the process must not start."""


class Unauthenticated(ModelgateError):
    """Missing, malformed, unknown, revoked or expired credential."""

    status_code = 401
    type = "unauthenticated"
    title = "Unauthenticated"


class Forbidden(ModelgateError):
    """A valid credential without the needed scope."""

    status_code = 403
    type = "forbidden"
    title = "Forbidden"


class NotFound(ModelgateError):
    """The resource does not exist, or is not the caller's to see."""

    status_code = 404
    type = "not-found"
    title = "Not found"


class Conflict(ModelgateError):
    """The request conflicts with existing state (e.g. a duplicate name)."""

    status_code = 409
    type = "conflict"
    title = "Conflict"


class InvalidRequest(ModelgateError):
    """A request that is well-formed JSON but semantically invalid; ``loc`` names the field
    (as a validation error's ``loc`` does: ``("body", "expires_at")``) when one is to blame."""

    status_code = 422
    type = "validation-error"
    title = "Invalid request"

    def __init__(self, detail: str | None = None, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(detail)
        self.loc = loc


class QuotaExceeded(ModelgateError):
    """Serving the request would cross the tenant's monthly quota."""

    status_code = 429
    type = "quota-exceeded"
    title = "Monthly quota exceeded"

    def __init__(self, detail: str | None = None, retry_after: int = 3600) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class TenantSuspended(ModelgateError):
    """The tenant is suspended by an operator."""

    status_code = 403
    type = "tenant-suspended"
    title = "Tenant suspended"


class DependencyUnavailable(ModelgateError):
    """A dependency (Redis, the database, a model) is down; the client may retry."""

    status_code = 503
    type = "service-unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str | None = None, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class DatabaseTimedOut(DependencyUnavailable):
    """The database did not answer within ``database_timeout_seconds``."""

    def __init__(self) -> None:
        super().__init__("the database did not answer in time", retry_after=2)


class IdempotencyKeyInvalid(ModelgateError):
    """An ``Idempotency-Key`` header that is not one Structured Field string of 1 to 255
    printable characters (or the header sent twice)."""

    status_code = 400
    type = "idempotency-key-invalid"
    title = "Invalid Idempotency-Key"


class IdempotencyKeyInUse(ModelgateError):
    """A request with this ``Idempotency-Key`` is still being served: retry once it is done."""

    status_code = 409
    type = "idempotency-key-in-use"
    title = "Idempotency-Key in use"

    def __init__(self, detail: str | None = None, retry_after: int = 1) -> None:
        super().__init__(detail)
        # A request is served in milliseconds: the first answer is usually stored by then.
        self.retry_after = retry_after


class IdempotencyKeyReused(ModelgateError):
    """The ``Idempotency-Key`` was used for a request with another body."""

    status_code = 422
    type = "idempotency-key-reused"
    title = "Idempotency-Key reused"

"""Errors raised by the model layer.

Every message is written for API clients: it never contains a file path, a digest or a stack
trace, so the API layer may put ``str(error)`` straight into a problem-JSON ``detail``.
"""


class ModelError(Exception):
    """Base class of every error the model layer raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(ModelError):
    """The requested model name, or the requested version of it, does not exist."""


class ModelUnavailable(ModelError):
    """The model or version exists but cannot serve (it failed to load, or nothing is ready)."""


class InvalidFeatures(ModelError):
    """The feature rows do not fit the model: wrong count, wrong type, not finite or out of the
    version's input range. ``row`` and ``feature`` locate the offending value when known."""

    def __init__(self, message: str, row: int | None = None, feature: int | None = None) -> None:
        super().__init__(message)
        self.row = row
        self.feature = feature

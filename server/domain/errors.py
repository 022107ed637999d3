"""Domain errors. Each carries a stable code that the API layer maps to a gRPC status.

Messages are public: they must never contain row values, identifiers or stack traces.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable, transport-independent error codes."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    BUDGET_EXHAUSTED = "budget_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_LIMIT = "resource_limit"
    RELEASE_FAILED = "release_failed"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    CLIENT_GONE = "client_gone"


class EntremiseError(Exception):
    """Base of every error the hub reports to a caller."""

    code: ErrorCode = ErrorCode.INVALID_ARGUMENT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(EntremiseError):
    """The request is malformed or violates a declared schema."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFoundError(EntremiseError):
    """The named object does not exist (or is not visible to the caller)."""

    code = ErrorCode.NOT_FOUND


class AlreadyExistsError(EntremiseError):
    """An object with the same identity already exists."""

    code = ErrorCode.ALREADY_EXISTS


class PermissionDeniedError(EntremiseError):
    """The caller is authenticated but has no right to this operation."""

    code = ErrorCode.PERMISSION_DENIED


class UnauthenticatedError(EntremiseError):
    """No valid credential was presented."""

    code = ErrorCode.UNAUTHENTICATED


class FailedPreconditionError(EntremiseError):
    """The system is not in a state that allows the operation (e.g. a deleted dataset)."""

    code = ErrorCode.FAILED_PRECONDITION


class ResourceLimitError(EntremiseError):
    """A size limit (message, upload, rows) was exceeded."""

    code = ErrorCode.RESOURCE_LIMIT


class BudgetExhaustedError(EntremiseError):
    """The release would overspend the agreement's privacy budget; nothing was spent."""

    code = ErrorCode.BUDGET_EXHAUSTED

    def __init__(self, *, requested: str, remaining: str) -> None:
        super().__init__(
            f"privacy budget exhausted: query needs epsilon {requested}, "
            f"agreement has {remaining} left; nothing was spent"
        )
        self.requested = requested
        self.remaining = remaining


class ReleaseFailedError(EntremiseError):
    """A release failed after its debit: it stays charged, and the message never varies."""

    code = ErrorCode.RELEASE_FAILED

    def __init__(self, charged: str) -> None:
        super().__init__(
            f"the release could not be completed; its cost ({charged}) stays spent, because the "
            "budget is debited before any data is read (the operator has the details)"
        )


class OverloadedError(EntremiseError):
    """Too much work is queued: retry after `retry_after_s` seconds; nothing was spent."""

    code = ErrorCode.OVERLOADED

    def __init__(self, what: str, retry_after_s: float) -> None:
        super().__init__(
            f"the hub is busy: its {what} queue is full; retry in {retry_after_s:g} s "
            "(nothing was spent)"
        )
        self.retry_after_s = retry_after_s


class UnavailableError(EntremiseError):
    """The hub cannot take the work now (it is shutting down); retry later."""

    code = ErrorCode.UNAVAILABLE


class ClientGoneError(EntremiseError):
    """The client cancelled or its deadline passed while its request waited: nothing ran."""

    code = ErrorCode.CLIENT_GONE

    def __init__(self, what: str) -> None:
        super().__init__(f"cancelled by the client while waiting in the {what} queue")


class ComputationStopped(Exception):
    """The engine was interrupted (hub shutdown) before it produced a result: nothing left."""

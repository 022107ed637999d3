"""The SDK's errors: one base, `EntremiseError`, and the status of a refused call, `Status`.

Every error the SDK raises derives from `EntremiseError`:

- `RPCError`: the hub refused or could not answer a call; `status` says how (a `Status`),
  `message` is the hub's one-line explanation;
- `InvalidArgumentError` (and `entremise.sdk.query.QueryError`): an argument refused before
  anything was sent;
- `MatchingKeyError`, `SchemaError`, `PrepareError`, `IdentifierError`: a problem found on the
  caller's side before anything was sent (a key file, a schema, an input file, identifiers).
  Each also derives from the partner-side error of the same name in `entremise.partners`
  (and so from `ValueError`), so that code catching those keeps working.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from entremise.partners import keys as _keys
from entremise.partners import prepare as _prepare
from entremise.partners import pseudonymise as _pseudonymise
from entremise.partners import schema as _schema


class Status(enum.IntEnum):
    """Why a call failed: the gRPC status codes, by name and number.

    The hub answers RESOURCE_EXHAUSTED when a budget is spent or when it is too busy to queue
    the work (then `RPCError.retry_after_s` says when to retry; nothing was spent),
    PERMISSION_DENIED when the caller's role or agreements do not allow the call, UNAVAILABLE
    when no hub answers or the hub is shutting down.
    """

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode) -> Status:
        """The status of a gRPC status code."""
        return cls[code.name]


class EntremiseError(Exception):
    """Base of every error the SDK raises."""


class RPCError(EntremiseError):
    """A call the hub refused or could not answer.

    `status` says why (a `Status`); `message` is the hub's explanation, one line;
    `retry_after_s`, when the hub is busy, is how long it suggests waiting before retrying.
    """

    def __init__(self, status: Status, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgumentError(EntremiseError, ValueError):
    """An argument the SDK can tell is wrong before sending anything (the message says why)."""


#: The name `RPCError` had before the SDK was its own package.
EntremiseRPCError = RPCError


class MatchingKeyError(EntremiseError, _keys.MatchingKeyError):
    """A key file or key exchange that cannot be used (the message says why)."""


class SchemaError(EntremiseError, _schema.SchemaError):
    """A schema file or object that cannot be understood."""


class PrepareError(EntremiseError, _prepare.PrepareError):
    """The input file cannot be turned into a safe upload; the message says why."""


class IdentifierError(EntremiseError, _pseudonymise.IdentifierError):
    """Identifiers that cannot be normalised (row numbers are reported, never values)."""


#: Partner-side errors and the SDK error each becomes when it crosses the SDK.
_PARTNER_SIDE: tuple[tuple[type[ValueError], type[EntremiseError]], ...] = (
    (_keys.MatchingKeyError, MatchingKeyError),
    (_schema.SchemaError, SchemaError),
    (_prepare.PrepareError, PrepareError),
    (_pseudonymise.IdentifierError, IdentifierError),
)


@contextmanager
def partner_side_errors() -> Iterator[None]:
    """Raise the partner-side tools' errors as the SDK's errors of the same name."""
    try:
        yield
    except EntremiseError:
        raise
    except (
        _keys.MatchingKeyError,
        _schema.SchemaError,
        _prepare.PrepareError,
        _pseudonymise.IdentifierError,
    ) as exc:
        for partner_error, sdk_error in _PARTNER_SIDE:
            if isinstance(exc, partner_error):
                raise sdk_error(*exc.args).with_traceback(exc.__traceback__) from None
        raise  # pragma: no cover (every class caught above is listed)


class WitnessError(EntremiseError):
    """The hub's signed audit head cannot be witnessed: the message says why.

    Raised by `Client.witness_head()`, and after an upload or a query run that otherwise
    succeeded: the operation's result is then in `result` (the upload's `UploadResult`, the
    query's `QueryResult`), since the hub did the operation.
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


class HistoryChangedError(WitnessError):
    """The hub's audit history changed since a head this client witnessed (a rewrite)."""


class HubKeyChangedError(WitnessError):
    """The hub's audit key is not the one this client witnessed before, or does not verify."""

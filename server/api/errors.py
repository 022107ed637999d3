"""The one error catalogue: domain error codes -> gRPC status codes, and the translator."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import grpc

from entremise.privacy.budget import InvalidEpsilonError
from entremise.server.domain.errors import EntremiseError, ErrorCode

log = logging.getLogger(__name__)

ERROR_MAP: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.BUDGET_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.RELEASE_FAILED: grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE = "internal server error (logged on the hub)"


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Abort the RPC; grpc raises inside ``context.abort``."""
    context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def rpc_errors(context: grpc.ServicerContext, rpc: str) -> Iterator[None]:
    """Map domain errors to their status; anything unexpected becomes a sanitised INTERNAL."""
    try:
        yield
    except EntremiseError as exc:
        log.info("%s refused: %s %s", rpc, exc.code, exc.message)
        abort(context, ERROR_MAP[exc.code], exc.message)
    except InvalidEpsilonError as exc:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Exception as exc:
        if isinstance(exc, grpc.RpcError):  # the client went away mid-stream
            raise
        log.exception("%s failed", rpc)
        abort(context, grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

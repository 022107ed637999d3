"""The one error catalogue: domain error codes -> gRPC status codes, and the translator."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import grpc

from entremise.privacy.budget import InvalidEpsilonError
from entremise.server.api.metrics import RPC_CALLS, RPC_SECONDS
from entremise.server.domain.errors import EntremiseError, ErrorCode, OverloadedError

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
    ErrorCode.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.CLIENT_GONE: grpc.StatusCode.CANCELLED,
}

#: Trailing metadata of an OVERLOADED refusal: milliseconds to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"


INTERNAL_MESSAGE = "internal server error (logged on the hub)"

Servicer = TypeVar("Servicer")
Request = TypeVar("Request")
Response = TypeVar("Response")


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Abort the RPC; grpc raises inside ``context.abort``."""
    context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def rpc_errors(context: grpc.ServicerContext, rpc: str) -> Iterator[None]:
    """Map domain errors to their status; anything unexpected becomes a sanitised INTERNAL."""
    started, code = time.monotonic(), grpc.StatusCode.OK
    try:
        yield
    except EntremiseError as exc:
        code = ERROR_MAP[exc.code]
        log.info("%s refused: %s %s", rpc, exc.code, exc.message)
        if isinstance(exc, OverloadedError):
            context.set_trailing_metadata(
                ((RETRY_AFTER_KEY, str(math.ceil(exc.retry_after_s * 1000))),)
            )
        abort(context, code, exc.message)
    except InvalidEpsilonError as exc:
        code = grpc.StatusCode.INVALID_ARGUMENT
        abort(context, code, str(exc))
    except Exception as exc:
        if isinstance(exc, grpc.RpcError):  # the client went away mid-stream
            code = grpc.StatusCode.CANCELLED
            raise
        code = grpc.StatusCode.INTERNAL
        log.exception("%s failed", rpc)
        abort(context, code, INTERNAL_MESSAGE)
    finally:
        RPC_CALLS.labels(rpc, code.name).inc()
        RPC_SECONDS.labels(rpc).observe(time.monotonic() - started)


def rpc(
    method: Callable[[Servicer, Request, grpc.ServicerContext], Response],
) -> Callable[[Servicer, Request, grpc.ServicerContext], Response]:
    """Decorate a servicer method: its errors reach the client as statuses, through `rpc_errors`.

    The method name is the RPC's name in the logs.
    """

    @functools.wraps(method)
    def translated(self: Servicer, request: Request, context: grpc.ServicerContext) -> Response:
        with rpc_errors(context, method.__name__):
            return method(self, request, context)
        raise AssertionError("unreachable: rpc_errors aborts")  # pragma: no cover

    return translated


__all__: list[Any] = [
    "ERROR_MAP",
    "INTERNAL_MESSAGE",
    "RETRY_AFTER_KEY",
    "abort",
    "rpc",
    "rpc_errors",
]

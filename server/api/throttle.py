"""Per-address throttling as a gRPC server interceptor: before authentication or any database work.

The interceptor runs in the worker thread ahead of the servicer: a throttled call is refused
with RESOURCE_EXHAUSTED (and a `retry-after` trailer, in seconds) without reading its token,
touching the store or writing the audit log. Calls that end UNAUTHENTICATED count as failed
authentications of their address.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import grpc

from entremise.server.domain.limits import PeerThrottle, ThrottledError


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string, without its port.

    ``ipv4:127.0.0.1:5555`` -> ``127.0.0.1``; ``ipv6:[::1]:5555`` (or percent-encoded,
    ``ipv6:%5B::1%5D:5555``) -> ``::1``; anything else (``unix:/path``) is kept whole.
    """
    scheme, sep, rest = peer.partition(":")
    if not sep or scheme not in ("ipv4", "ipv6"):
        return peer
    rest = unquote(rest)
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit():
        host = rest
    return host.strip("[]")


class PeerThrottleInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Apply a PeerThrottle to every call (every service, health and reflection included)."""

    def __init__(self, throttle: PeerThrottle) -> None:
        self.throttle = throttle

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """The method's handler, guarded by the throttle."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        behavior: Any
        factory: Any
        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        return factory(
            self._guard(behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guard(self, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        throttle = self.throttle

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            peer = peer_address(context.peer())
            try:
                throttle.admit(peer)
            except ThrottledError as exc:
                context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
            try:
                return behavior(request, context)
            finally:
                if context.code() is grpc.StatusCode.UNAUTHENTICATED:  # type: ignore[attr-defined]
                    throttle.failed(peer)

        return guarded

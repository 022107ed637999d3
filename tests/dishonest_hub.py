"""A dishonest hub for tests: a gRPC front that relays to a real hub and rewrites answers.

Partners must not have to trust the hub, so the tests put this in front of a real hub (real
gRPC, port 0): every call is relayed byte for byte, except the answers a test chooses to
rewrite, per method and per caller token - which is exactly what a compromised hub could do
(serve each partner a different view). Nothing of ours is mocked: the hub behind it is real
and the partners run the real SDK.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from entremise.v1 import (
    admin_service_pb2,
    agreement_service_pb2,
    compliance_service_pb2,
    partner_service_pb2,
    query_service_pb2,
)

#: rewrite(method name, caller token, response bytes) -> response bytes
Rewrite = Callable[[str, str, bytes], bytes]

_RELAYED_METADATA = ("authorization", "x-request-id")


def _methods() -> Iterator[tuple[str, str, bool]]:
    modules = (
        admin_service_pb2,
        agreement_service_pb2,
        compliance_service_pb2,
        partner_service_pb2,
        query_service_pb2,
    )
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield f"/{service.full_name}/{method.name}", method.name, method.client_streaming


class DishonestHub:
    """Relays to `upstream`; `rewrite` may change any unary answer before the caller sees it."""

    def __init__(self, upstream: str, rewrite: Rewrite) -> None:
        self.rewrite = rewrite
        self._channel = grpc.insecure_channel(
            upstream,
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for path, name, client_streaming in _methods():
            if client_streaming:
                handlers[path] = grpc.stream_unary_rpc_method_handler(self._streamed(path))
            else:
                handlers[path] = grpc.unary_unary_rpc_method_handler(self._unary(path, name))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            handlers=[_Handlers(handlers)],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"
        self._server.start()

    @staticmethod
    def _metadata(context: grpc.ServicerContext) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in context.invocation_metadata() if k in _RELAYED_METADATA)

    @staticmethod
    def _token(metadata: tuple[tuple[str, str], ...]) -> str:
        for key, value in metadata:
            if key == "authorization":
                return value.removeprefix("Bearer ")
        return ""

    def _unary(self, path: str, name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        call = self._channel.unary_unary(path)

        def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = self._metadata(context)
            try:
                response: bytes = call(request, metadata=metadata, timeout=60)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            return self.rewrite(name, self._token(metadata), response)

        return relay

    def _streamed(self, path: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
        call = self._channel.stream_unary(path)

        def relay(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            try:
                response: bytes = call(requests, metadata=self._metadata(context), timeout=300)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            return response

        return relay

    def close(self) -> None:
        """Stop the front (the hub behind it keeps running)."""
        self._server.stop(grace=None)
        self._channel.close()


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

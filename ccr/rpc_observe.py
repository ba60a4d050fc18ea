"""Server interceptors that time every unary gRPC call (a decision) and, with tracing on, run it
inside a span that continues the caller's trace (the traceparent in its initial metadata).

Streams (access logs, ext_proc, ADS) pass through untouched: their "latency" is a connection's
lifetime. The wrapped handler is built once per method and reused, so a call pays two
perf_counter() reads and one histogram observe() when tracing is off.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from ccr import metrics, tracing


def _short(method: str) -> str:
    # "/envoy.service.auth.v3.Authorization/Check" -> "Authorization/Check"
    service, _, name = method.lstrip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}/{name}"


class _Cache:
    def __init__(self, service: str) -> None:
        self.service = service
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (handler, its wrapper)
        self._streams: dict[str, Any] = {}  # method -> its ccr_rpc_streams_total child

    def stream_started(self, method: str) -> None:
        counter = self._streams.get(method)
        if counter is None:
            counter = self._streams[method] = metrics.RPC_STREAMS.labels(self.service, _short(method))
        counter.inc()

    def get(self, method: str, handler: Any, wrap: Any) -> Any:
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        short = _short(method)
        wrapped = wrap(handler, metrics.Timer(self.service, short), f"{self.service} {short}")
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _aio_wrap(handler: Any, timer: metrics.Timer, span_name: str) -> Any:
    inner = handler.unary_unary
    perf = time.perf_counter

    if tracing.TRACER is None:
        async def uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = perf()
            try:
                resp = await inner(request, context)
            except BaseException:
                timer.done(start, True)
                raise
            timer.done(start)
            return resp
    else:
        async def uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = perf()
            parent = tracing.parent_from_metadata(context.invocation_metadata())
            try:
                if parent is None:  # not sampled by Envoy: no span
                    resp = await inner(request, context)
                else:
                    with tracing.server_span(span_name, parent):
                        resp = await inner(request, context)
            except BaseException:
                timer.done(start, True)
                raise
            timer.done(start)
            return resp

    return grpc.unary_unary_rpc_method_handler(uu, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


def _sync_wrap(handler: Any, timer: metrics.Timer, span_name: str) -> Any:
    inner = handler.unary_unary
    perf = time.perf_counter

    if tracing.TRACER is None:
        def uu(request: Any, context: grpc.ServicerContext) -> Any:
            start = perf()
            try:
                resp = inner(request, context)
            except BaseException:
                timer.done(start, True)
                raise
            timer.done(start)
            return resp
    else:
        def uu(request: Any, context: grpc.ServicerContext) -> Any:
            start = perf()
            parent = tracing.parent_from_metadata(context.invocation_metadata())
            try:
                if parent is None:  # not sampled by Envoy: no span
                    resp = inner(request, context)
                else:
                    with tracing.server_span(span_name, parent):
                        resp = inner(request, context)
            except BaseException:
                timer.done(start, True)
                raise
            timer.done(start)
            return resp

    return grpc.unary_unary_rpc_method_handler(uu, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


class AioRpcObserver(grpc.aio.ServerInterceptor):
    def __init__(self, service: str) -> None:
        self._cache = _Cache(service)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health."):
            return handler
        if handler.unary_unary is None:  # a stream: counted here, once per call, its messages untouched
            self._cache.stream_started(details.method)
            return handler
        return self._cache.get(details.method, handler, _aio_wrap)


class RpcObserver(grpc.ServerInterceptor):
    """The same for grpcio's sync server (ratelimit)."""

    def __init__(self, service: str) -> None:
        self._cache = _Cache(service)

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith("/grpc.health."):
            return handler
        if handler.unary_unary is None:
            self._cache.stream_started(details.method)
            return handler
        return self._cache.get(details.method, handler, _sync_wrap)

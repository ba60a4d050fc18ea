"""A real OTLP/gRPC trace receiver for tests: opentelemetry.proto's TraceService, keeping every span."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class Span:
    service: str  # the resource's service.name
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]


def _value(v: object) -> object:
    kind = v.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._cond = threading.Condition()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802 - gRPC method
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            service = next((str(_value(a.value)) for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(Span(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                    {a.key: _value(a.value) for a in s.attributes}))
        with self._cond:
            self.spans += got
            self._cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, done: Callable[[list[Span]], bool], timeout: float = 20.0) -> list[Span]:
        """The spans received once `done(spans)` holds; AssertionError with what came otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"spans received: {[(s.service, s.name) for s in self.spans]}")
                self._cond.wait(left)
            return list(self.spans)


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Receiver]]:
    """(host:port, receiver) of a TraceService on a free loopback port."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", receiver
    finally:
        server.stop(grace=None)

"""An OTLP/gRPC trace sink for benches: accepts and counts spans, keeps nothing. Run as a process:

    python bench/_otlp_sink.py READY_FILE     # writes {"address": "127.0.0.1:PORT", "pid": N}
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ccr.service import write_ready  # noqa: E402


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    spans = 0

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201 - gRPC method
        self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    write_ready(sys.argv[1], f"127.0.0.1:{port}")
    stop.wait()
    print(f"otlp sink: {sink.spans} spans received", file=sys.stderr)
    server.stop(None)


if __name__ == "__main__":
    main()

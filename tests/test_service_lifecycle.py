"""A service's life as an orchestrator sees it: grpc.health.v1 once it serves, NOT_SERVING and a
drain of the calls in flight on SIGTERM, and JSON log lines when the config asks for them.

Real processes (the access-log receiver on real PostgreSQL, the rate limit service on real Redis).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import orjson
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ccr.logs import REQUEST_ID, JsonLines
from ccr.procs import Child
from tests.harness import running_service
from tests.test_audit import entry, rows

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CONFIG = """
version: 1
providers: [{name: anthropic}]
models: [{match: "claude-*", provider: anthropic}]
services: {drain_timeout_s: 20, log_format: json}
"""


def _health(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_serving_and_unknown_service(tmp_path: Path, redis_url: str) -> None:
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=redis_url) as child, \
            grpc.insecure_channel(str(child.info["address"])) as ch:
        assert _health(ch, "") == SERVING
        assert _health(ch, "ratelimit") == SERVING
        try:
            _health(ch, "extauth")
            raise AssertionError("health of a service this process does not run must be NOT_FOUND")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND


def test_sigterm_reports_not_serving_and_drains_an_open_stream(tmp_path: Path, postgres_dsn: str) -> None:
    """Envoy holds access-log streams open; entries sent after SIGTERM on a stream already open
    still get their rows, and the process exits cleanly once the stream ends."""
    prefix = f"req-{uuid.uuid4().hex[:8]}-"
    with running_service("audit", tmp_path, CONFIG, postgres_dsn=postgres_dsn) as child, \
            grpc.insecure_channel(str(child.info["address"])) as ch:
        assert _health(ch, "") == SERVING
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="accesslog"))
        assert next(watch).status == SERVING

        outbox: list[als_pb2.StreamAccessLogsMessage | None] = []
        more = threading.Condition()

        def messages():
            first = True
            while True:
                with more:
                    more.wait_for(lambda: outbox)
                    m = outbox.pop(0)
                if m is None:
                    return
                if first:
                    m.identifier.node.id = "ccr-envoy-0"
                    m.identifier.log_name = "ccr"
                    first = False
                yield m

        def send(rid: str | None) -> None:
            with more:
                if rid is None:
                    outbox.append(None)
                else:
                    m = als_pb2.StreamAccessLogsMessage()
                    m.http_logs.log_entry.append(entry(rid))
                    outbox.append(m)
                more.notify()

        stream = als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs.future(messages(), timeout=60)
        send(prefix + "before")
        # Wait on the condition itself: the first row is written before SIGTERM goes out.
        _wait_rows(postgres_dsn, prefix, 1, child)

        os.kill(child.pid, signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # an orchestrator stops sending new work here
        watch.cancel()
        send(prefix + "after")
        send(None)
        assert isinstance(stream.result(timeout=60), als_pb2.StreamAccessLogsResponse)
        assert set(rows(postgres_dsn, prefix)) == {prefix + "before", prefix + "after"}
        assert child.proc.wait(timeout=30) == 0, child.log_tail()

    lines = (tmp_path / "logs" / "audit.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records, "no JSON log lines"
    assert all(r["service"] == "accesslog" and r["level"] and r["ts"].endswith("Z") for r in records)
    msgs = [r["msg"] for r in records]
    assert any(m.startswith("stopping: health NOT_SERVING") for m in msgs)
    assert msgs[-1] == "stopped"
    # Every line the service wrote is JSON (nothing from Python's default handler).
    assert [line for line in lines if line.strip() and not line.startswith("{")] == []


def _wait_rows(dsn: str, prefix: str, n: int, child: Child) -> None:
    deadline = time.monotonic() + 30
    while len(rows(dsn, prefix)) < n:
        assert child.alive(), child.log_tail()
        assert time.monotonic() < deadline, "row never written"
        time.sleep(0.02)


def test_json_lines_carry_the_request_id() -> None:
    fmt = JsonLines("extauth")
    rec = logging.LogRecord("ccr.extauth", logging.WARNING, __file__, 1, "denied %s", ("bob",), None)
    token = REQUEST_ID.set("rid-123")
    try:
        out = orjson.loads(fmt.format(rec))
    finally:
        REQUEST_ID.reset(token)
    assert out["request_id"] == "rid-123" and out["msg"] == "denied bob" and out["level"] == "warning"
    assert out["service"] == "extauth" and out["logger"] == "ccr.extauth"
    out = orjson.loads(fmt.format(rec))
    assert "request_id" not in out
    rec.request_id = "rid-extra"
    assert orjson.loads(fmt.format(rec))["request_id"] == "rid-extra"


def test_start_after_reads_the_runtime_only_once_the_file_exists(tmp_path: Path) -> None:
    """The supervisor starts the router before the services are up (its imports overlap theirs) and lets it read
    the runtime only then: `--start-after` holds parse_args until the file exists."""
    import subprocess
    import sys

    runtime, go = tmp_path / "runtime.json", tmp_path / "router.go"
    runtime.write_text("early")
    probe = ("import sys; from pathlib import Path; from ccr.service import parse_args; print('started', flush=True); "
             "args = parse_args('probe'); print(Path(args.runtime).read_text(), flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", probe, "--runtime", str(runtime), "--start-after", str(go)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        # Held: parse_args polls for the file (the child sleeps in the kernel) and has not read the runtime.
        wchan = Path(f"/proc/{proc.pid}/wchan")
        while "nanosleep" not in wchan.read_text():
            assert proc.poll() is None, "the child went on without the file"
        runtime.write_text("late")  # what the supervisor writes once the services are up
        go.touch()
        assert proc.stdout.readline().strip() == "late"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

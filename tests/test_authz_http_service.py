"""The extauth process with services.authz_transport: http: its HTTP front next to the gRPC port (the
ready file's "authz_http"), deciding with the real Authorizer (PostgreSQL keys, the shipped policy)
exactly as the gRPC Check does, and draining on SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httptools
import psycopg
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2

from ccr.contract import (
    AUTHZ_HTTP_FULL_PREFIX,
    AUTHZ_HTTP_HEALTH_PATH,
    AUTHZ_HTTP_IDENTITY_PREFIX,
    AUTHZ_HTTP_STATUS_STANDINS,
    H_AUTHZ_PEER_ADDRESS,
    H_TRACEPARENT,
    H_TRACESTATE,
    READY_AUTHZ_HTTP,
)
from ccr.procs import Child, spawn, wait_ready_file
from ccr.runtime import Runtime
from ccr.service import GRPC_OPTIONS
from ccr.spire import python_workload, start_spire
from ccr.svid import peer_uri_sans
from extauth.bundle import build_bundle
from extauth.keys import create_key
from tests import opa_envoy_policies as oe
from tests.harness import running_service
from tests.otlp_receiver import Span, otlp_receiver
from tests.test_extauth import http_check, msg_body
from tests.test_tracing_unsampled import _traceparent

REPO = Path(__file__).resolve().parent.parent

GATEWAY_YAML = """
version: 1
providers:
  - name: anthropic
models:
  - match: claude-*
    provider: anthropic
services:
  authz_transport: http
limits:
  requests_per_minute: 77
"""


class Conn:
    """One keep-alive HTTP/1.1 connection, answers parsed with httptools."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[dict] = []
        self.cur: dict = {}

    def on_message_begin(self) -> None:
        self.cur = {"headers": [], "body": b""}

    def on_header(self, k: bytes, v: bytes) -> None:
        self.cur["headers"].append((k.decode().lower(), v.decode()))

    def on_headers_complete(self) -> None:
        self.cur["status"] = self.parser.get_status_code()
        self.cur["keep_alive"] = self.parser.should_keep_alive()

    def on_body(self, b: bytes) -> None:
        self.cur["body"] += b

    def on_message_complete(self) -> None:
        self.done.append(self.cur)

    def ask(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> dict:
        lines = [f"{method} {path} HTTP/1.1", "host: gw.local", "x-request-id: 0b7c1f8e-rid",
                 f"content-length: {len(body)}", f"{H_AUTHZ_PEER_ADDRESS}: 10.9.8.7",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        while not self.done:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("closed without an answer")
            self.parser.feed_data(data)
        return self.done.pop(0)

    def closed(self) -> bool:
        return self.sock.recv(65536) == b""


def _md(answer: dict) -> dict:
    out = {}
    for k, v in answer["headers"]:
        if k.startswith("x-ccr-md-"):
            out[k.removeprefix("x-ccr-md-").replace("-", "_")] = json_format.MessageToDict(
                struct_pb2.Value.FromString(base64.b64decode(v)))
    return out


@pytest.fixture(scope="module")
def service(postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    run = tmp_path_factory.mktemp("extauth-http")
    bundle = build_bundle(REPO / "policies", run / "policy.tar.gz", "ccr/authz/decision")
    with running_service("extauth", run, GATEWAY_YAML, postgres_dsn=postgres_dsn,
                         policy_bundle=str(bundle)) as child:
        yield child


@pytest.fixture(scope="module")
def key(postgres_dsn: str) -> tuple[str, str]:
    rec, k = create_key(postgres_dsn, "http-front", rpm=42)
    return rec.id, k


def test_the_ready_file_names_the_front(service: Child) -> None:
    assert str(service.info[READY_AUTHZ_HTTP]).startswith("127.0.0.1:")
    assert service.info[READY_AUTHZ_HTTP] != service.info["address"]
    c = Conn(str(service.info[READY_AUTHZ_HTTP]))
    assert c.ask("GET", AUTHZ_HTTP_HEALTH_PATH)["status"] == 200


def test_an_http_check_decides_as_the_grpc_check(service: Child, key: tuple[str, str]) -> None:
    kid, k = key
    c = Conn(str(service.info[READY_AUTHZ_HTTP]))
    a = c.ask("POST", AUTHZ_HTTP_FULL_PREFIX + "/v1/messages?beta=true",
              {"x-api-key": k, "content-type": "application/json", "x-forwarded-proto": "https"}, msg_body())
    assert a["status"] == 200 and a["keep_alive"], a
    headers = dict(a["headers"])
    assert {k_: v for k_, v in headers.items() if k_.startswith("x-ccr-") and not k_.startswith("x-ccr-md-")} == {
        "x-ccr-principal-id": kid, "x-ccr-key-id": kid, "x-ccr-principal": "http-front",
        "x-ccr-model": "claude-sonnet-4-5", "x-ccr-provider": "anthropic", "x-ccr-cluster": "provider_anthropic"}
    md = _md(a)
    with grpc.insecure_channel(str(service.info["address"]), options=GRPC_OPTIONS) as ch:
        resp = pb_grpc.AuthorizationStub(ch).Check(http_check(
            {"x-api-key": k, "content-type": "application/json"}, path="/v1/messages?beta=true", body=msg_body()))
    assert resp.status.code == code_pb2.OK
    want = json_format.MessageToDict(resp.dynamic_metadata)
    assert md.pop("decision_id") != want.pop("decision_id")  # each request its own decision
    assert md == want
    assert md["rpm"] == {"requests_per_unit": 42.0, "unit": "MINUTE"}


def test_refusals_and_own_answers_over_http(service: Child, key: tuple[str, str]) -> None:
    _, k = key
    c = Conn(str(service.info[READY_AUTHZ_HTTP]))
    a = c.ask("POST", AUTHZ_HTTP_FULL_PREFIX + "/v1/messages", {"x-api-key": "ccr_" + "A" * 43}, msg_body())
    assert a["status"] == 401
    assert json.loads(a["body"])["error"]["type"] == "authentication_error"
    assert _md(a)["error_type"] == "authentication_error"
    models = c.ask("GET", AUTHZ_HTTP_FULL_PREFIX + "/v1/models", {"x-api-key": k})
    assert models["status"] == AUTHZ_HTTP_STATUS_STANDINS[200]
    assert json.loads(models["body"])["has_more"] is False
    ident = c.ask("POST", AUTHZ_HTTP_IDENTITY_PREFIX + "/v1/messages", {"x-api-key": k})
    assert ident["status"] == 200 and _md(ident) == {}
    ident = c.ask("POST", AUTHZ_HTTP_IDENTITY_PREFIX + "/v1/messages", {"x-api-key": "nope"})
    assert ident["status"] == 401


def test_sigterm_drains_the_front(postgres_dsn: str, tmp_path: Path, key: tuple[str, str]) -> None:
    _, k = key
    bundle = build_bundle(REPO / "policies", tmp_path / "policy.tar.gz", "ccr/authz/decision")
    with running_service("extauth", tmp_path, GATEWAY_YAML, postgres_dsn=postgres_dsn,
                         policy_bundle=str(bundle)) as child:
        address = str(child.info[READY_AUTHZ_HTTP])
        checker, idle = Conn(address), Conn(address)
        assert checker.ask("GET", AUTHZ_HTTP_HEALTH_PATH)["status"] == 200
        assert idle.ask("POST", AUTHZ_HTTP_FULL_PREFIX + "/v1/messages", {"x-api-key": k}, msg_body())["status"] == 200
        child.proc.send_signal(signal.SIGTERM)
        # The health checker is told 503 (the service waits for it to ask again before it stops).
        while (h := checker.ask("GET", AUTHZ_HTTP_HEALTH_PATH))["status"] == 200:
            pass
        assert h["status"] == 503
        # Then idle keep-alive connections are closed, and new ones refused.
        assert idle.closed()
        assert checker.closed()
        child.proc.wait(30)
        with pytest.raises(OSError):
            Conn(address)
    # running_service asserts the exit code was 0.


def _spawn_extauth(run: Path, i: int, *extra: str) -> tuple[Child, Path]:
    ready = run / f"extauth-{i}.ready"
    child = spawn(f"extauth-{i}", [sys.executable, "-m", "extauth", "--runtime", str(run / "runtime.json"),
                                   "--ready-file", str(ready), *extra], run / "logs", cwd=REPO)
    return child, ready


def test_workers_share_the_http_port_only_with_reuse_port(postgres_dsn: str, tmp_path: Path) -> None:
    bundle = build_bundle(REPO / "policies", tmp_path / "policy.tar.gz", "ccr/authz/decision")
    # running_service writes the runtime and starts the first worker, sharing its ports.
    with running_service("extauth", tmp_path, GATEWAY_YAML, postgres_dsn=postgres_dsn,
                         policy_bundle=str(bundle)) as first:
        http = str(first.info[READY_AUTHZ_HTTP])
        # A lone service may not take a port another holds.
        lone, ready = _spawn_extauth(tmp_path, 9, "--authz-http-port", http.rpartition(":")[2])
        assert lone.proc.wait(60) != 0
        assert f"cannot bind {http} for {READY_AUTHZ_HTTP}" in lone.log_tail()
    # Workers: the first binds port 0 with --reuse-port, the second joins it.
    children = []
    try:
        w0, r0 = _spawn_extauth(tmp_path, 0, "--reuse-port")
        children.append(w0)
        info0 = wait_ready_file(w0, r0)
        grpc_port = str(info0["address"]).rpartition(":")[2]
        http_port = str(info0[READY_AUTHZ_HTTP]).rpartition(":")[2]
        w1, r1 = _spawn_extauth(tmp_path, 1, "--reuse-port", "--port", grpc_port, "--authz-http-port", http_port)
        children.append(w1)
        info1 = wait_ready_file(w1, r1)
        assert info1[READY_AUTHZ_HTTP] == info0[READY_AUTHZ_HTTP]
        # Connections land on both (the kernel's hash): each answers health over the shared port.
        served = {w0.pid: 0, w1.pid: 0}
        for _ in range(40):
            c = Conn(str(info0[READY_AUTHZ_HTTP]))
            assert c.ask("GET", AUTHZ_HTTP_HEALTH_PATH)["status"] == 200
            for pid in served:
                served[pid] += _holds_connection(pid, c.sock)
            c.sock.close()
            if all(served.values()):
                break
        assert all(served.values()), served
    finally:
        for c in reversed(children):
            assert c.stop() == 0, c.log_tail()


def _holds_connection(pid: int, sock: socket.socket) -> int:
    """1 when process `pid` holds the server end of `sock`'s connection."""
    local_port = sock.getsockname()[1]
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == local_port and f[9] in inodes:
            return 1
    return 0


def test_a_sampled_http_check_gets_its_span(postgres_dsn: str, tmp_path: Path, key: tuple[str, str]) -> None:
    """As the gRPC Check (tests/test_tracing_unsampled.py): a span child of the caller's for a sampled
    traceparent, with the decision's GenAI attributes; none for an unsampled one."""
    _, k = key
    bundle = build_bundle(REPO / "policies", tmp_path / "policy.tar.gz", "ccr/authz/decision")
    calls = [_traceparent(sampled=True), _traceparent(sampled=False)]
    with otlp_receiver() as (endpoint, receiver):
        config = GATEWAY_YAML + f"telemetry: {{otlp_endpoint: '{endpoint}', sample_ratio: 0.05}}\n"
        with running_service("extauth", tmp_path, config, postgres_dsn=postgres_dsn,
                             policy_bundle=str(bundle)) as svc:
            c = Conn(str(svc.info[READY_AUTHZ_HTTP]))
            for tp, _, _ in reversed(calls):  # the sampled one last: once its span is here, both were exported
                a = c.ask("POST", AUTHZ_HTTP_FULL_PREFIX + "/v1/messages",
                          {"x-api-key": k, H_TRACEPARENT: tp, H_TRACESTATE: ""}, msg_body())
                assert a["status"] == 200

            def of(spans: list[Span], tid: str) -> list[Span]:
                return [s for s in spans if s.service == "ccr-extauth" and s.trace_id == tid]

            spans = receiver.wait_for(lambda spans: bool(of(spans, calls[0][1])))
    assert of(spans, calls[1][1]) == []
    (span,) = of(spans, calls[0][1])
    assert span.parent_span_id == calls[0][2] and span.name == "extauth Authorization/CheckHTTP"
    assert span.attributes["gen_ai.request.model"] == "claude-sonnet-4-5"
    assert span.attributes["ccr.endpoint"] == "messages.create"


def test_spiffe_mtls_serves_only_envoys_svid(postgres_dsn: str, tmp_path: Path) -> None:
    """With a SPIRE agent, the front serves TLS with extauth's X.509-SVID (ccr/svid.py: the key in
    memory only) and accepts only Envoy's SPIFFE ID, as the gRPC port does."""
    bundle = build_bundle(REPO / "policies", tmp_path / "policy.tar.gz", "ccr/authz/decision")
    python = python_workload(tmp_path / "parts", "extauth")
    spire = start_spire(tmp_path, tmp_path / "logs", {"extauth": python})
    try:
        # No Redis here: the request-time limits stay with the rate limit service (as running_service sets).
        (tmp_path / "gateway.yaml").write_text(GATEWAY_YAML.replace("limits:\n", "limits:\n  admission: ratelimit\n"))
        Runtime(config_path=str(tmp_path / "gateway.yaml"), run_dir=str(tmp_path), postgres_dsn=postgres_dsn,
                redis_url="redis://127.0.0.1:1/0", policy_bundle=str(bundle), spiffe_socket=str(spire.agent_socket),
                spiffe_trust_domain=spire.trust_domain).save(tmp_path / "runtime.json")
        ready = tmp_path / "extauth.ready"
        child = spawn("extauth", [str(python), "-m", "extauth", "--runtime", str(tmp_path / "runtime.json"),
                                  "--ready-file", str(ready)], tmp_path / "logs", cwd=REPO)
        try:
            address = str(wait_ready_file(child, ready, timeout=60)[READY_AUTHZ_HTTP])
            host, _, port = address.rpartition(":")

            def ask(part: str | None) -> tuple[list[str], bytes]:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False  # an X.509-SVID names a SPIFFE ID, not a host
                ctx.load_verify_locations(cafile=str(spire.bundle_pem))
                if part is not None:
                    chain, key = spire.mint_x509(part)
                    (tmp_path / f"{part}.pem").write_bytes(chain)
                    (tmp_path / f"{part}.key").write_bytes(key)
                    ctx.load_cert_chain(str(tmp_path / f"{part}.pem"), str(tmp_path / f"{part}.key"))
                with socket.create_connection((host, int(port)), timeout=10) as raw, \
                        ctx.wrap_socket(raw) as conn:
                    server_uris = peer_uri_sans(conn.getpeercert())
                    conn.sendall(f"GET {AUTHZ_HTTP_HEALTH_PATH} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                    try:
                        return server_uris, conn.recv(64)
                    except (ssl.SSLError, ConnectionError):
                        return server_uris, b""

            uris, got = ask("envoy")
            assert uris == [f"spiffe://{spire.trust_domain}/extauth"]  # the server's own SVID
            assert got.startswith(b"HTTP/1.1 200 ")
            assert ask("ratelimit")[1] == b""  # another part of the run: refused by its SPIFFE ID
            assert ask(None)[1] == b""  # no client certificate: the handshake fails (TLS 1.3: seen on read)
        finally:
            assert child.stop() == 0, child.log_tail()
        logged = child.log_tail(200)
        assert f"peer identity spiffe://{spire.trust_domain}/ratelimit" in logged
        assert "the handshake failed" in logged
    finally:
        for c in reversed(spire.children):
            c.stop()


def _decision_row(dsn: str, decision_id: str) -> tuple[bool, int, str, str]:
    """(allow, status, reason, policy_set) of a decision, once the decision log has written it (in batches)."""
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT allow, status, reason, policy_set FROM policy_decisions "
                               "WHERE decision_id = %s", (decision_id,)).fetchone()
            if row is not None:
                return row
            assert time.monotonic() < deadline, f"no policy decision {decision_id}"
            time.sleep(0.05)


def test_a_refusal_with_an_undeclared_header_is_logged_as_the_503_the_client_gets(
        postgres_dsn: str, tmp_path: Path) -> None:
    """An OPA-Envoy policy set denies (429) with a header the config does not declare (policy.result_names):
    the router would drop it, so the front refuses with 503 instead, and the decision log records that 503,
    not the policy's 429. A refusal the transport carries keeps its own status in the log."""
    teams = oe.build(tmp_path, "teams", oe.OBJECT, "envoy/authz/result")  # denies with x-ext-auth-allow: no
    tenant = f"t{uuid.uuid4().hex[:8]}"
    config = yaml.safe_load(GATEWAY_YAML)
    config["policy"] = {"sets": [{"name": "teams", "mode": "opa-envoy", "entrypoint": "envoy/authz/result",
                                  "tenants": [tenant], "bundle": {"path": str(teams)}}]}
    bundle = build_bundle(REPO / "policies", tmp_path / "policy.tar.gz", "ccr/authz/decision")
    _, k = create_key(postgres_dsn, "undeclared-refusal", tenant=tenant)
    with running_service("extauth", tmp_path, yaml.safe_dump(config), postgres_dsn=postgres_dsn,
                         policy_bundle=str(bundle)) as child:
        c = Conn(str(child.info[READY_AUTHZ_HTTP]))
        a = c.ask("POST", AUTHZ_HTTP_FULL_PREFIX + "/v1/messages",
                  {"x-api-key": k, "content-type": "application/json"}, msg_body())
        assert a["status"] == AUTHZ_HTTP_STATUS_STANDINS[503], a
        assert json.loads(a["body"])["error"]["type"] == "api_error"
        assert all(name != "x-ext-auth-allow" for name, _ in a["headers"])
        md = _md(a)
        assert md["error_type"] == "api_error"
        allow, status, reason, policy_set = _decision_row(postgres_dsn, md["decision_id"])
        assert (allow, status, policy_set) == (False, 503, "teams")
        assert "x-ext-auth-allow" in reason and "policy.result_names" in reason and "(429)" in reason
        # A refusal without undeclared names is carried, and logged, with its own status.
        a = c.ask("POST", AUTHZ_HTTP_FULL_PREFIX + "/v1/messages", {"x-api-key": "ccr_" + "B" * 43}, msg_body())
        assert a["status"] == 401
        assert _decision_row(postgres_dsn, _md(a)["decision_id"])[:2] == (False, 401)

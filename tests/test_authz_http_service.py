"""The extauth process with services.authz_transport: http: its HTTP front next to the gRPC port (the
ready file's "authz_http"), deciding with the real Authorizer (PostgreSQL keys, the shipped policy)
exactly as the gRPC Check does, and draining on SIGTERM."""

from __future__ import annotations

import base64
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import httptools
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2

from ccr.contract import (
    AUTHZ_HTTP_FULL_PREFIX,
    AUTHZ_HTTP_HEALTH_PATH,
    AUTHZ_HTTP_IDENTITY_PREFIX,
    AUTHZ_HTTP_STATUS_STANDINS,
    H_AUTHZ_PEER_ADDRESS,
    READY_AUTHZ_HTTP,
)
from ccr.procs import Child
from ccr.service import GRPC_OPTIONS
from extauth.bundle import build_bundle
from extauth.keys import create_key
from tests.harness import running_service
from tests.test_extauth import http_check, msg_body

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

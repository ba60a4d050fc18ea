"""Time ext_authz Check with the 84 KB agent request: in-process handler and loopback gRPC.

    .venv/bin/python bench/extauth_check.py [--dsn postgresql://...] [-n 2000] [-c 16]

Without --dsn an embedded PostgreSQL is started in a temp dir and stopped at the end.
The gRPC numbers include the client (same machine, one Python process); the
in-process numbers are the handler alone (request parse + key cache + body parse
+ cached decision + response build).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from envoy.service.auth.v3 import attribute_context_pb2 as ac  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2 as pb  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc  # noqa: E402

from ccr import db  # noqa: E402
from ccr.config import load_config  # noqa: E402
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.runtime import Runtime  # noqa: E402
from ccr.service import GRPC_OPTIONS  # noqa: E402
from extauth.bundle import build_bundle  # noqa: E402
from extauth.keys import KeyStore, create_key  # noqa: E402
from extauth.policy import PolicyEngine  # noqa: E402
from extauth.server import Authorizer  # noqa: E402

FIXTURE = fixture_path(AGENT_REQUEST)
GATEWAY_YAML = (
    "version: 1\nproviders: [{name: anthropic}]\nmodels: [{match: 'claude-*', provider: anthropic}]\n"
)


def summary(label: str, lat_s: list[float], wall_s: float) -> None:
    lat = sorted(x * 1e6 for x in lat_s)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"{label:<28} n={len(lat):>6}  p50={statistics.median(lat):8.1f} us  "
          f"p99={p99:8.1f} us  {len(lat) / wall_s:9.0f} req/s")


async def bench_inproc(run: Path, dsn: str, raw_req: bytes, n: int) -> None:
    config = load_config(run / "gateway.yaml")
    keys = KeyStore(dsn)
    await keys.start()
    policy = PolicyEngine.load(run / "policy.tar.gz", config.policy.entrypoint)
    auth = Authorizer(config, keys, policy)
    try:
        for _ in range(20):  # warm caches
            assert (await auth.check(pb.CheckRequest.FromString(raw_req))).status.code == 0
        lat: list[float] = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            await auth.check(pb.CheckRequest.FromString(raw_req))
            lat.append(time.perf_counter() - s)
        summary("in-process Authorizer.check", lat, time.perf_counter() - t0)
    finally:
        await keys.close()
        policy.close()


async def bench_grpc(address: str, req: pb.CheckRequest, n: int, conc: int) -> None:
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.AuthorizationStub(ch)
        for _ in range(20):
            assert (await stub.Check(req)).status.code == 0
        lat: list[float] = []
        per_worker = max(1, n // conc)

        async def worker() -> None:
            for _ in range(per_worker):
                s = time.perf_counter()
                await stub.Check(req)
                lat.append(time.perf_counter() - s)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        summary(f"loopback gRPC (c={conc})", lat, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", help="PostgreSQL DSN with the ccr schema (default: start an embedded one)")
    ap.add_argument("-n", type=int, default=2000, help="iterations per mode (bounded)")
    ap.add_argument("-c", type=int, default=16, help="concurrent gRPC calls")
    args = ap.parse_args()
    n = max(1, min(args.n, 100_000))

    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as tmp:
        run = Path(tmp)
        pg = None
        dsn = args.dsn
        if dsn is None:
            from ccr.localservers import start_postgres

            pg = start_postgres(run / "pg", run / "logs")
            dsn = str(pg.info["dsn"])
        proc = None
        try:
            db.migrate(dsn)
            _, key = create_key(dsn, "bench")
            (run / "gateway.yaml").write_text(GATEWAY_YAML)
            build_bundle(REPO / "policies", run / "policy.tar.gz", "ccr/authz/decision")
            Runtime(config_path=str(run / "gateway.yaml"), run_dir=str(run), postgres_dsn=dsn,
                    redis_url="redis://127.0.0.1:1", policy_bundle=str(run / "policy.tar.gz")
                    ).save(run / "runtime.json")
            body = FIXTURE.read_bytes()
            model = orjson.loads(body)["model"]
            http = ac.AttributeContext.HttpRequest(
                method="POST", path="/v1/messages?beta=true", host="gw",
                headers={"authorization": f"Bearer {key}", "content-type": "application/json",
                         "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking"},
                raw_body=body,
            )
            attrs = ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
            req = pb.CheckRequest(attributes=attrs)
            raw = req.SerializeToString()
            print(f"request: {len(body)} B body ({model}), CheckRequest {len(raw)} B")

            asyncio.run(bench_inproc(run, dsn, raw, n))

            ready = run / "ready.json"
            proc = subprocess.Popen(
                [sys.executable, "-m", "extauth", "--runtime", str(run / "runtime.json"),
                 "--ready-file", str(ready)],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "CCR_LOG_LEVEL": "WARNING"},
            )
            deadline = time.monotonic() + 30
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("extauth did not start")
                time.sleep(0.05)
            address = json.loads(ready.read_text())["address"]
            asyncio.run(bench_grpc(address, req, n, 1))
            asyncio.run(bench_grpc(address, req, n, args.c))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
            if pg is not None:
                pg.stop()


if __name__ == "__main__":
    main()

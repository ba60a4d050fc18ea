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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import check_request, closed_loop, database, summary  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2 as pb  # noqa: E402

from ccr.config import load_config  # noqa: E402
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.localservers import start_redis  # noqa: E402
from ccr.runtime import Runtime  # noqa: E402
from extauth.bundle import build_bundle  # noqa: E402
from extauth.decisions import DecisionLog  # noqa: E402
from extauth.keys import KeyStore, create_key  # noqa: E402
from extauth.policy import PolicyEngine  # noqa: E402
from extauth.server import Authorizer  # noqa: E402

FIXTURE = fixture_path(AGENT_REQUEST)
GATEWAY_YAML = (
    "version: 1\nproviders: [{name: anthropic}]\nmodels: [{match: 'claude-*', provider: anthropic}]\n"
)


async def bench_inproc(run: Path, dsn: str, raw_req: bytes, n: int, decision_log: bool) -> None:
    config = load_config(run / "gateway.yaml")
    keys = KeyStore(dsn)
    await keys.start()
    policy = PolicyEngine.load(run / "policy.tar.gz", config.policy.entrypoint)
    decisions = DecisionLog(dsn) if decision_log else None
    if decisions is not None:
        await decisions.start()
    auth = Authorizer(config, keys, policy, decisions=decisions)
    try:
        for _ in range(20):  # warm caches
            assert (await auth.check(pb.CheckRequest.FromString(raw_req))).status.code == 0
        lat: list[float] = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            await auth.check(pb.CheckRequest.FromString(raw_req))
            lat.append(time.perf_counter() - s)
        label = "in-process check" + (" +declog" if decisions is not None else "")
        print(summary(label, lat, time.perf_counter() - t0, width=28))
    finally:
        if decisions is not None:
            await decisions.close()
        await keys.close()
        policy.close()


async def bench_grpc(address: str, req: pb.CheckRequest, n: int, conc: int) -> None:
    lat, wall = await closed_loop(address, req, n, conc, warmup=20)
    print(summary(f"loopback gRPC (c={conc})", lat, wall, width=28))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", help="PostgreSQL DSN with the ccr schema (default: start an embedded one)")
    ap.add_argument("-n", type=int, default=2000, help="iterations per mode (bounded)")
    ap.add_argument("-c", type=int, default=16, help="concurrent gRPC calls")
    ap.add_argument("--inproc-only", action="store_true", help="skip the gRPC modes")
    args = ap.parse_args()
    n = max(1, min(args.n, 100_000))

    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as tmp, database(Path(tmp), args.dsn) as dsn:
        run = Path(tmp)
        proc = None
        # extauth decides the request's rate limits in its Check (limits.admission: extauth) on Redis.
        redis = start_redis(run / "redis", run / "logs")
        try:
            _, key = create_key(dsn, "bench")
            (run / "gateway.yaml").write_text(GATEWAY_YAML)
            build_bundle(REPO / "policies", run / "policy.tar.gz", "ccr/authz/decision")
            Runtime(config_path=str(run / "gateway.yaml"), run_dir=str(run), postgres_dsn=dsn,
                    redis_url=str(redis.info["url"]), policy_bundle=str(run / "policy.tar.gz")
                    ).save(run / "runtime.json")
            body = FIXTURE.read_bytes()
            model = orjson.loads(body)["model"]
            req = check_request(body, {"authorization": f"Bearer {key}", "anthropic-beta": "interleaved-thinking"})
            raw = req.SerializeToString()
            print(f"request: {len(body)} B body ({model}), CheckRequest {len(raw)} B")

            # Alternating, so a busy machine's drift affects both alike: with and without the decision log.
            for _ in range(2):
                asyncio.run(bench_inproc(run, dsn, raw, n, decision_log=False))
                asyncio.run(bench_inproc(run, dsn, raw, n, decision_log=True))
            if args.inproc_only:
                return

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
            redis.stop()


if __name__ == "__main__":
    main()

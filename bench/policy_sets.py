"""What policy sets add to one ext_authz Check of the 84 KB agent request (in-process, with the decision log).

    .venv/bin/python bench/policy_sets.py [--dsn postgresql://...] [-n 1000]

Modes, alternated twice so a busy machine's drift affects all alike: the global set alone; plus a
per-tenant `ccr` set (cached like the global one); plus a shadow OPA-Envoy set that denies everything,
without and with the body in its input; plus an enforced OPA-Envoy set that allows (an OPA-Envoy
input is built from the CheckRequest on every request, and the WASM policy parses all of it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import check_request, database, summary  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2 as pb  # noqa: E402

from ccr.config import parse_config  # noqa: E402
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.runtime import Runtime  # noqa: E402
from extauth.bundle import build_bundle  # noqa: E402
from extauth.bundle_source import BundleLoader, FileSource  # noqa: E402
from extauth.decisions import DecisionLog  # noqa: E402
from extauth.keys import KeyStore, create_key  # noqa: E402
from extauth.policy_sets import PolicySets  # noqa: E402
from extauth.server import Authorizer  # noqa: E402

ENTRYPOINT = "ccr/authz/decision"
GATEWAY = {"version": 1, "providers": [{"name": "anthropic"}],
           "models": [{"match": "claude-*", "provider": "anthropic"}]}
SHADOW_DENY_ALL = "package envoy.authz\n\ndefault allow := false\n"
ALLOW_MESSAGES = """package envoy.authz

default allow := false

allow if {
    input.attributes.request.http.method == "POST"
    input.parsed_path == ["v1", "messages"]
    startswith(input.parsed_body.model, "claude-")
}
"""


def opa_envoy_bundle(run: Path, name: str, rego: str) -> Path:
    src = run / name
    src.mkdir()
    (src / "policy.rego").write_text(rego)
    return build_bundle(src, run / f"{name}.tar.gz", "envoy/authz/allow", revision=name)


async def bench(run: Path, dsn: str, raw: bytes, n: int, label: str, sets: list[dict]) -> None:
    config = parse_config({**GATEWAY, "policy": {"sets": sets}})
    runtime = Runtime(config_path=str(run / "gateway.yaml"), run_dir=str(run), postgres_dsn=dsn,
                      redis_url="redis://127.0.0.1:1")
    loader = BundleLoader(None, FileSource(run / "global.tar.gz"), ENTRYPOINT)
    ps = PolicySets.from_config(config, runtime, loader)
    policy = await loader.load_initial()
    await ps.load_initial()
    keys = KeyStore(dsn)
    await keys.start()
    decisions = DecisionLog(dsn)
    await decisions.start()
    auth = Authorizer(config, keys, policy, decisions=decisions, sets=ps)
    try:
        for _ in range(20):  # warm caches
            assert (await auth.check(pb.CheckRequest.FromString(raw))).status.code == 0
        lat: list[float] = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            await auth.check(pb.CheckRequest.FromString(raw))
            lat.append(time.perf_counter() - s)
        print(summary(label, lat, time.perf_counter() - t0, width=40))
    finally:
        await decisions.close()
        await keys.close()
        await ps.close()
        policy.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", help="PostgreSQL DSN with the ccr schema (default: start an embedded one)")
    ap.add_argument("-n", type=int, default=1000, help="checks per mode (bounded)")
    args = ap.parse_args()
    n = max(1, min(args.n, 100_000))
    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as tmp, database(Path(tmp), args.dsn) as dsn:
        run = Path(tmp)
        (run / "gateway.yaml").write_text(yaml.safe_dump(GATEWAY))
        _, key = create_key(dsn, "bench-sets", tenant="acme")
        build_bundle(REPO / "policies", run / "global.tar.gz", ENTRYPOINT, revision="global")
        tenant = {"name": "acme", "tenants": ["acme"], "bundle": {"path": str(run / "global.tar.gz")}}
        shadow = {"name": "trial", "mode": "opa-envoy", "shadow": True,
                  "bundle": {"path": str(opa_envoy_bundle(run, "trial", SHADOW_DENY_ALL))}}
        enforced = {"name": "envoy", "mode": "opa-envoy",
                    "bundle": {"path": str(opa_envoy_bundle(run, "envoy", ALLOW_MESSAGES))}}
        body = fixture_path(AGENT_REQUEST).read_bytes()
        req = check_request(body, {"authorization": f"Bearer {key}", "content-type": "application/json"})
        raw = req.SerializeToString()
        print(f"request: {len(body)} B body ({orjson.loads(body)['model']}), CheckRequest {len(raw)} B")
        headers_only = {**shadow, "name": "trial-headers", "with_body": False}
        for _ in range(2):
            asyncio.run(bench(run, dsn, raw, n, "global set only", []))
            asyncio.run(bench(run, dsn, raw, n, "+ tenant set (ccr mode)", [tenant]))
            asyncio.run(bench(run, dsn, raw, n, "+ shadow OPA-Envoy, with_body: false", [tenant, headers_only]))
            asyncio.run(bench(run, dsn, raw, n, "+ shadow OPA-Envoy, with the body", [tenant, shadow]))
            asyncio.run(bench(run, dsn, raw, n, "+ shadow and enforced OPA-Envoy sets", [tenant, shadow, enforced]))


if __name__ == "__main__":
    main()

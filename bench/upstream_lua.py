"""What the usage meter costs Envoy: the provider cluster's upstream filters with and without it.

    .venv/bin/python bench/upstream_lua.py [--duration 6] [--concurrency 8] [--rounds 2]

A minimal Envoy (listener -> router -> the Anthropic emulator, `--concurrency 1`) whose provider
cluster carries the gateway's upstream filters, in four variants run in turn, `--rounds` times:

    none   header hygiene + credential injector (as the gateway has them) + codec
    empty  an empty Lua filter in front of those
    meter  router/meter.lua in front of those (the gateway's Messages cluster)

The 84 KB streamed agent request, closed loop at `--concurrency` workers. It prints Envoy's CPU
per request (user+sys of the Envoy process from /proc, so the client and the emulator are left
out) and req/s. No Python service is involved: this isolates the Lua filter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import _bound_port  # noqa: E402
from ccr.credentials import secret_name, write_secret  # noqa: E402
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.procs import Child, spawn, wait_ready_file, wait_until  # noqa: E402
from ccr.supervisor import envoy_binary  # noqa: E402
from router.resources import METER_LUA, T  # noqa: E402

KEY = "sk-ant-bench-upstream-lua"
VARIANTS = ("none", "empty", "meter")


def upstream_filters(variant: str, secret_file: Path) -> list[dict[str, Any]]:
    tail = [
        {"name": "envoy.filters.http.header_mutation", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [
                {"remove": "authorization"}, {"remove_on_match": {"key_matcher": {"prefix": "x-ccr-"}}},
                {"append": {"header": {"key": "accept-encoding", "value": "identity"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]}}},
        {"name": "envoy.filters.http.credential_injector", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            "overwrite": True,
            "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": {
                "@type": T + "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                "header": "x-api-key",
                "credential": {"name": secret_name("bench"), "sds_config": {
                    "path_config_source": {"path": str(secret_file)}, "resource_api_version": "V3"}}}}}},
        {"name": "envoy.filters.http.upstream_codec", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
    ]
    if variant == "none":
        return tail
    source = METER_LUA.read_text() if variant == "meter" else "-- an empty script"
    return [{"name": "envoy.filters.http.lua", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": source}}}, *tail]


def bootstrap(variant: str, upstream_port: int, secret_file: Path) -> dict[str, Any]:
    hcm = {"@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "b",
           "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "provider"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}]}
    return {
        "node": {"id": "bench-upstream-lua", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [{"name": "provider", "type": "STATIC", "connect_timeout": "2s",
                          "load_assignment": {"cluster_name": "provider", "endpoints": [{"lb_endpoints": [
                              {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                           "port_value": upstream_port}}}}]}]},
                          "typed_extension_protocol_options": {
                              "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                                  "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                                  "explicit_http_config": {"http_protocol_options": {}},
                                  "http_filters": upstream_filters(variant, secret_file)}}}],
        },
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks of 10 ms


async def load(url: str, body: bytes, workers: int, seconds: float) -> tuple[int, int]:
    ok = bad = 0
    headers = {"x-api-key": "client-key", "anthropic-version": "2023-06-01", "content-type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async def worker() -> None:
            nonlocal ok, bad
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                async with s.post(url + "/v1/messages", data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        ok += 1
                    else:
                        bad += 1
        await asyncio.gather(*(worker() for _ in range(workers)))
    return ok, bad


def measure(variant: str, tmp: Path, upstream_port: int, body: bytes, args: argparse.Namespace) -> str:
    secret = write_secret(tmp / "credential.json", "bench", KEY)
    cfg = tmp / f"envoy-{variant}.json"
    cfg.write_text(json.dumps(bootstrap(variant, upstream_port, secret)))
    admin_path = tmp / f"admin-{variant}"
    admin_path.unlink(missing_ok=True)
    envoy = spawn(f"envoy-{variant}", [envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                                       "--admin-address-path", str(admin_path), "-l", "warning"], tmp)
    try:
        wait_until(envoy, lambda: admin_path.exists() and admin_path.read_text().strip() != "", 30, "serving admin")
        admin = "http://" + admin_path.read_text().strip()
        wait_until(envoy, lambda: _bound_port(admin) is not None, 30, "listening")
        url = f"http://127.0.0.1:{_bound_port(admin)}"
        asyncio.run(load(url, body, args.concurrency, 1.0))  # warm-up, not counted
        c0, t0 = cpu_seconds(envoy.pid), time.monotonic()
        ok, bad = asyncio.run(load(url, body, args.concurrency, args.duration))
        cpu, wall = cpu_seconds(envoy.pid) - c0, time.monotonic() - t0
    finally:
        envoy.stop()
    per = f"{cpu * 1e6 / ok:8.0f}" if ok else "       -"
    return f"  {variant:<6} envoy {per} us/req  {ok / wall:7.0f} req/s  ok={ok} errors={bad}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds measured per variant and round")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop workers")
    ap.add_argument("--rounds", type=int, default=2, help="times each variant runs (interleaved)")
    args = ap.parse_args()
    body = fixture_path(AGENT_REQUEST).read_bytes()
    with tempfile.TemporaryDirectory(prefix="ccr-bench-lua-") as d:
        tmp = Path(d)
        emulator: Child = spawn("emulator", [sys.executable, "-m", "emulators.anthropic", "--port", "0",
                                             "--api-key", KEY, "--ready-file", str(tmp / "emulator.ready")],
                                tmp, cwd=REPO)
        try:
            port = int(str(wait_ready_file(emulator, tmp / "emulator.ready")["address"]).rsplit(":", 1)[1])
            print(f"agent request {len(body)} bytes, streamed; c={args.concurrency}, {args.duration:g}s per run; "
                  "Envoy CPU only (clock ticks of 10 ms)")
            for r in range(1, args.rounds + 1):
                print(f"round {r}")
                for v in VARIANTS:
                    print(measure(v, tmp, port, body, args), flush=True)
        finally:
            emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

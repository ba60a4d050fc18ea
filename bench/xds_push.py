"""xDS push latency for GPU pool endpoints: a change in the router's registry to Envoy serving it.

    .venv/bin/python bench/xds_push.py [--sizes 1,100,1000] [--rounds 3] [--protocol both]

The router's own pieces in this process (router/pools.py Registry -> Snapshot.with_endpoints ->
router/xds.py AdsServer over gRPC) and a real Envoy connected to it over ADS (state of the world
or delta), with one EDS pool cluster. For each size N it measures, from the registry call to the
moment Envoy's admin /clusters lists the expected hosts (polled every 2 ms):

* fill: N workers appear at once (an empty pool filled by one change);
* join: one worker joins a pool of N-1 (the common case: one registration);
* leave: one worker of N deregisters.

Endpoints are addresses nobody listens on (no health checks in this cluster: the push alone is
measured). Figures depend on the machine; on a shared one, read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from envoy.service.discovery.v3 import ads_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ccr.config import GatewayConfig  # noqa: E402
from ccr.procs import spawn  # noqa: E402
from ccr.supervisor import envoy_binary, render_bootstrap  # noqa: E402
from router.pools import Registry  # noqa: E402
from router.resources import Resources  # noqa: E402
from router.xds import AdsServer, Snapshot  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLUSTER = "pool"


def _config() -> GatewayConfig:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    doc["providers"].append({"name": "gpu", "kind": "openai", "endpoint": "http://pool", "region": "eu",
                             "pool": {"max_ttl_s": 3600}})
    return GatewayConfig.model_validate(doc)


def _base() -> Snapshot:
    cluster = {"name": CLUSTER, "type": "EDS", "connect_timeout": "1s", "lb_policy": "LEAST_REQUEST",
               "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}
    return Snapshot.of(Resources(listeners=[], routes=[], clusters=[cluster],
                                 endpoints=[{"cluster_name": CLUSTER, "endpoints": []}]))


def _worker(i: int) -> dict[str, Any]:
    return {"address": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8000", "region": "eu", "ttl_s": 3600}


async def _hosts(client: httpx.AsyncClient, admin: str) -> int:
    text = (await client.get(f"{admin}/clusters")).text
    return sum(1 for line in text.splitlines() if line.startswith(f"{CLUSTER}::") and "::cx_total::" in line)


async def _wait_for(client: httpx.AsyncClient, admin: str, n: int, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while await _hosts(client, admin) != n:
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"Envoy did not reach {n} hosts within {timeout}s")
        await asyncio.sleep(0.002)


async def _measure(protocol: str, sizes: list[int], rounds: int, work: Path) -> dict[str, dict[int, list[float]]]:
    base = _base()
    ads = AdsServer(base)
    reg = Registry(_config())
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def publish() -> None:
        await ads.update(base.with_endpoints(reg.assignments(lambda p: [CLUSTER])))

    boot = work / f"envoy-{protocol}.yaml"
    boot.write_text(render_bootstrap(f"bench-{protocol}", "127.0.0.1", 0, f"127.0.0.1:{port}", protocol=protocol))
    admin_path = work / f"admin-{protocol}"
    envoy = spawn(f"envoy-{protocol}", [envoy_binary(), "-c", str(boot), "--disable-hot-restart", "--concurrency",
                                        "1", "--admin-address-path", str(admin_path), "-l", "error"], work)
    out: dict[str, dict[int, list[float]]] = {"fill": {}, "join": {}, "leave": {}}
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            while not (admin_path.exists() and admin_path.read_text().strip()):
                await asyncio.sleep(0.01)
            admin = "http://" + admin_path.read_text().strip()
            await _wait_for(client, admin, 0)
            for n in sizes:
                for kind in out:
                    out[kind][n] = []
                for _ in range(rounds):
                    reg.workers["gpu"].clear()
                    await publish()
                    await _wait_for(client, admin, 0)
                    t0 = time.perf_counter()  # fill: N at once
                    for i in range(n):
                        reg.workers["gpu"].pop(str(i), None)
                        reg.register("gpu", str(i), _worker(i))
                    await publish()
                    await _wait_for(client, admin, n)
                    out["fill"][n].append(time.perf_counter() - t0)
                    reg.deregister("gpu", str(n - 1))
                    await publish()
                    await _wait_for(client, admin, n - 1)
                    t0 = time.perf_counter()  # join: one more
                    reg.register("gpu", str(n - 1), _worker(n - 1))
                    await publish()
                    await _wait_for(client, admin, n)
                    out["join"][n].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()  # leave: one fewer
                    reg.deregister("gpu", "0")
                    await publish()
                    await _wait_for(client, admin, n - 1)
                    out["leave"][n].append(time.perf_counter() - t0)
    finally:
        envoy.stop()
        await server.stop(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,100,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--protocol", choices=("sotw", "delta", "both"), default="both")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    protocols = ["sotw", "delta"] if args.protocol == "both" else [args.protocol]
    with tempfile.TemporaryDirectory(prefix="ccr-xds-push-") as d:
        print(f"{'protocol':<8} {'change':<6} " + " ".join(f"{'N=' + str(n):>14}" for n in sizes)
              + "   (median ms, max ms)")
        for protocol in protocols:
            res = asyncio.run(_measure(protocol, sizes, args.rounds, Path(d)))
            for kind, by_n in res.items():
                cells = [f"{statistics.median(v) * 1000:7.1f} {max(v) * 1000:6.1f}" for v in by_n.values()]
                print(f"{protocol:<8} {kind:<6} " + " ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()

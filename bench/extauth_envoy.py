"""ext_authz Check latency as Envoy sees it, per identity kind, with the 84 KB agent request.

    .venv/bin/python bench/extauth_envoy.py [--rate 200] [--seconds 10]

For each identity (an API key, a cached OIDC token from a test IdP, a SPIFFE workload presenting
an X.509-SVID on an mTLS listener) it starts a fresh gateway (emulator upstream, embedded
PostgreSQL/Redis), sends the agent request open loop at --rate req/s for --seconds, then reads
Envoy's own histogram of its calls to extauth (`cluster.ccr_extauth.upstream_rq_time`: from
sending the Check to having its answer, which is the time the request waits on authorization)
and prints its P50/P99, beside the client's end-to-end P50/P99. The issue 5 target is a P99 of
at most 2 ms at 200 req/s; timings on a shared 2-core machine are noisy, so this is run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.supervisor import Gateway  # noqa: E402
from tests import pki  # noqa: E402
from tests.harness import gateway_config  # noqa: E402
from tests.idp import running_idp  # noqa: E402

SPIFFE_ID = "spiffe://example.org/ns/ci/sa/agent"
HISTOGRAM = "cluster.ccr_extauth.upstream_rq_time"


def envoy_quantiles(admin_url: str, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{admin_url}/stats?format=json&filter=^{name}$", timeout=5) as r:
        doc = json.loads(r.read())
    for stat in doc.get("stats", []):
        hist = stat.get("histograms")
        if not hist:
            continue
        quantiles = hist["supported_quantiles"]
        for h in hist["computed_quantiles"]:
            if h["name"] == name:
                return {f"P{q:g}": v["cumulative"] for q, v in zip(quantiles, h["values"], strict=True)
                        if v.get("cumulative") is not None}
    raise SystemExit(f"Envoy has no histogram {name}")


async def paced(url: str, body: bytes, headers: dict[str, str], ctx: ssl.SSLContext | None,
                rate: float, seconds: float) -> tuple[list[float], int]:
    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(ssl=ctx if ctx is not None else False, limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
            lat.append(time.perf_counter() - t)

        for _ in range(20):  # warm the connection pool and every cache on the path
            await one()
        lat.clear()
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return lat, errors


def ms(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] * 1000 if s else float("nan")


def run(label: str, tmp: Path, edit: Callable[[dict[str, Any]], None], headers: dict[str, str],
        ctx: ssl.SSLContext | None, args: argparse.Namespace, local_key: bool = False) -> None:
    where = tmp / label.split()[0]
    where.mkdir()
    gw = Gateway(gateway_config(where, edit)).start()
    try:
        if local_key:
            headers = {**headers, "x-api-key": gw.issue_local_key()}
        body = fixture_path(AGENT_REQUEST).read_bytes()
        if args.no_stream:
            doc = json.loads(body)
            doc["stream"] = False
            body = json.dumps(doc).encode()
        hdrs = {"anthropic-version": "2023-06-01", "content-type": "application/json",
                "accept-encoding": "identity", **headers}
        lat, errors = asyncio.run(paced(gw.url + "/v1/messages", body, hdrs, ctx, args.rate, args.seconds))
        q = envoy_quantiles(gw.admin_url, HISTOGRAM)
        nan = float("nan")
        print(f"{label:<14} n={len(lat):>5} errors={errors}  envoy->extauth P50={q.get('P50', nan):5.2f} ms "
              f"P99={q.get('P99', nan):5.2f} ms   client end-to-end p50={statistics.median(lat) * 1000:6.2f} ms "
              f"p99={ms(lat, 0.99):6.2f} ms")
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--no-stream", action="store_true", help="ask for JSON replies instead of SSE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ccr-bench-authz-") as d, running_idp() as idp:
        tmp = Path(d)
        ca = pki.make_ca(tmp / "pki", "example-ca")
        server = pki.issue(ca, tmp / "pki", "gateway", dns=("localhost",), ips=("127.0.0.1",), server=True)
        svid = pki.issue(ca, tmp / "pki", "agent", uris=(SPIFFE_ID,))
        token = idp.mint("alice", exp_in=3600, claims={"email": "alice@example.org", "groups": ["default"]})

        def base(cfg: dict[str, Any]) -> None:
            for p in cfg["providers"]:
                p["emulator"] = True
            cfg["gateway"]["tls"] = {"cert_file": str(server.cert_file), "key_file": str(server.key_file),
                                     "client_ca_file": str(ca.cert_file), "require_client_cert": False}
            cfg["identity"] = {
                "oidc": [{"issuer": idp.issuer, "audiences": [idp.audience]}],
                "spiffe": {"enabled": True, "trust_domains": ["example.org"], "allow_without_key": True},
            }
            cfg["limits"] = {"requests_per_minute": 1_000_000}

        plain = ssl.create_default_context(cafile=str(ca.cert_file))
        mtls = ssl.create_default_context(cafile=str(ca.cert_file))
        mtls.load_cert_chain(str(svid.cert_file), str(svid.key_file))
        print(f"{args.rate:g} req/s for {args.seconds:g} s per identity, 84 KB agent request "
              f"({'JSON' if args.no_stream else 'streamed'} replies), TLS listener")
        run("api key", tmp, base, {}, plain, args, local_key=True)
        run("oidc (cached)", tmp, base, {"authorization": f"Bearer {token}"}, plain, args)
        run("spiffe", tmp, base, {}, mtls, args)


if __name__ == "__main__":
    main()

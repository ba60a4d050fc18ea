"""Self-hosted GPU pools: workers register with the router, and Envoy learns them by EDS.

A worker (vLLM, TGI, SGLang, or any OpenAI- or Anthropic-compatible server) calls the router's
registration API with its pool (a provider with `pool:` in the config), region, address, models,
capacity and a TTL, and repeats the call (a heartbeat, with its current queue depth) before the
TTL runs out. Every change is pushed to Envoy at once as the pool clusters' ClusterLoadAssignment;
a worker whose heartbeat stops is removed when its TTL passes. Envoy's own health checks and
outlier detection on the pool cluster (router/resources.py) eject a registered worker that fails.

HTTP API (JSON; `Authorization: Bearer <token>`, the token from pools.registration.token_env):
  PUT    /v1/pools/{pool}/workers/{id}  {"address": "ip:port", "region", "models": [...],
                                         "capacity": n, "queue_depth": n, "ttl_s": s}   register/heartbeat
  DELETE /v1/pools/{pool}/workers/{id}                                                  deregister
  GET    /v1/pools/{pool}/workers                                                       what is registered
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from ccr.config import GatewayConfig, Provider

log = logging.getLogger("ccr.pools")

Json = dict[str, Any]
WORKER_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_WORKERS_PER_POOL = 10_000


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Worker:
    id: str
    pool: str
    host: str
    port: int
    region: str
    models: list[str]
    capacity: int
    queue_depth: int
    ttl_s: float
    expires_at: float  # on the registry's clock

    @property
    def weight(self) -> int:
        return max(1, self.capacity - self.queue_depth)


def _address(value: object) -> tuple[str, int]:
    """An IP literal and port: EDS endpoints are addresses, and a name would be resolved by nobody."""
    if not isinstance(value, str):
        raise Refused(400, "address: expected \"ip:port\"")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        p = int(port)
    except ValueError:
        raise Refused(400, f"address: {value!r} is not \"ip:port\" with an IP address") from None
    if not 0 < p < 65536:
        raise Refused(400, f"address: port {p} out of range")
    return host, p


def _int(body: Json, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise Refused(400, f"{key}: expected an integer from {lo} to {hi}")
    return v


class Registry:
    """The registered workers per pool; `clock` is injectable (tests), `on_change` runs on every change."""

    def __init__(self, config: GatewayConfig, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.clock = clock
        self.on_change = on_change
        self.workers: dict[str, dict[str, Worker]] = {p.name: {} for p in config.pool_providers}

    def reconfigure(self, config: GatewayConfig) -> None:
        """A new config: pools that are gone lose their workers; the rest keep theirs."""
        self.config = config
        self.workers = {p.name: self.workers.get(p.name, {}) for p in config.pool_providers}

    def _pool(self, name: str) -> Provider:
        for p in self.config.pool_providers:
            if p.name == name:
                return p
        raise Refused(404, f"no pool {name!r} on this gateway")

    def register(self, pool: str, worker_id: str, body: Json) -> Worker:
        """Register a worker, or renew one (a heartbeat): its TTL starts again."""
        p = self._pool(pool)
        assert p.pool is not None
        if not WORKER_ID.match(worker_id):
            raise Refused(400, "worker id: 1 to 128 of A-Z a-z 0-9 _ . : -")
        host, port = _address(body.get("address"))
        region = body.get("region")
        if region != p.region:  # a pool is in one region: residency depends on it
            raise Refused(403, f"region: pool {pool!r} is in region {p.region!r}, not {region!r}")
        models = body.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models) or len(models) > 100:
            raise Refused(400, "models: expected a list of model names")
        ttl = body.get("ttl_s", p.pool.max_ttl_s)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= p.pool.max_ttl_s:
            raise Refused(400, f"ttl_s: expected a number above 0 and at most {p.pool.max_ttl_s}")
        capacity = _int(body, "capacity", 100, 1, 1_000_000)
        queue = _int(body, "queue_depth", 0, 0, 10_000_000)
        workers = self.workers[pool]
        if worker_id not in workers and len(workers) >= MAX_WORKERS_PER_POOL:
            raise Refused(429, f"pool {pool!r} has {MAX_WORKERS_PER_POOL} workers, the most it takes")
        old = workers.get(worker_id)
        w = Worker(worker_id, pool, host, port, region, models, capacity, queue, float(ttl), self.clock() + ttl)
        workers[worker_id] = w
        # A heartbeat that changes nothing Envoy sees is not a new config.
        if old is None or (old.host, old.port, old.weight) != (w.host, w.port, w.weight):
            if old is None:
                log.info("worker %s joined pool %s at %s:%d", worker_id, pool, host, port)
            self.on_change()
        return w

    def deregister(self, pool: str, worker_id: str) -> bool:
        self._pool(pool)
        if self.workers[pool].pop(worker_id, None) is None:
            return False
        log.info("worker %s left pool %s", worker_id, pool)
        self.on_change()
        return True

    def expire(self) -> int:
        """Remove workers whose heartbeat stopped; how many went."""
        now = self.clock()
        gone = 0
        for pool, workers in self.workers.items():
            for wid in [wid for wid, w in workers.items() if w.expires_at <= now]:
                del workers[wid]
                gone += 1
                log.warning("worker %s of pool %s removed: no heartbeat within its TTL", wid, pool)
        if gone:
            self.on_change()
        return gone

    def assignments(self, clusters_of: Callable[[Provider], list[str]]) -> list[Json]:
        """ClusterLoadAssignments for every cluster of every pool (`clusters_of` names them)."""
        out = []
        for p in self.config.pool_providers:
            assert p.pool is not None
            lb = [{
                "endpoint": {"hostname": f"{w.host}:{w.port}",
                             "address": {"socket_address": {"address": w.host, "port_value": w.port}}},
                "load_balancing_weight": w.weight if p.pool.weight_by_queue else 1,
                "metadata": {"filter_metadata": {"ccr": {"worker": w.id}}},
            } for w in sorted(self.workers[p.name].values(), key=lambda w: w.id)]
            for name in clusters_of(p):
                out.append({"cluster_name": name, "endpoints": [{"lb_endpoints": lb}] if lb else []})
        return out


def api(registry: Registry, token: str) -> web.Application:
    """The registration API; every call needs the bearer token (compared in constant time)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            return web.json_response({"error": "a valid Authorization: Bearer token is required"}, status=401)
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except Refused as e:
            return web.json_response({"error": str(e)}, status=e.status)

    async def put(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, "body: expected a JSON object") from None
        if not isinstance(body, dict):
            raise Refused(400, "body: expected a JSON object")
        w = registry.register(request.match_info["pool"], request.match_info["id"], body)
        return web.json_response({"id": w.id, "pool": w.pool, "ttl_s": w.ttl_s})

    async def delete(request: web.Request) -> web.Response:
        if not registry.deregister(request.match_info["pool"], request.match_info["id"]):
            raise Refused(404, "no such worker")
        return web.json_response({"deleted": request.match_info["id"]})

    async def listing(request: web.Request) -> web.Response:
        registry._pool(request.match_info["pool"])
        now = registry.clock()
        return web.json_response({"workers": [
            {**{k: v for k, v in asdict(w).items() if k != "expires_at"}, "expires_in_s": w.expires_at - now}
            for w in registry.workers[request.match_info["pool"]].values()]})

    app = web.Application(middlewares=[auth], client_max_size=64 * 1024)
    app.router.add_put("/v1/pools/{pool}/workers/{id}", put)
    app.router.add_delete("/v1/pools/{pool}/workers/{id}", delete)
    app.router.add_get("/v1/pools/{pool}/workers", listing)
    return app


async def expire_loop(registry: Registry, interval: float = 0.2) -> None:
    while True:
        await asyncio.sleep(interval)
        registry.expire()

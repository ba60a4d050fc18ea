"""State-of-the-world ADS server: Envoy's listeners, routes and clusters over one stream.

Each config version is serialised once into `Any`s and shared by every stream.
A stream gets a type's resources when it first asks and whenever the version
changes; ACKs are noted, NACKs are logged with Envoy's reason and keep the
last good version in place on the Envoy side.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

# Typed configs referenced by "@type" inside the resources must be in the pool to parse.
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2 as _cel  # noqa: F401
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as _als  # noqa: F401
from envoy.extensions.common.matching.v3 import extension_matcher_pb2 as _matcher  # noqa: F401
from envoy.extensions.compression.gzip.compressor.v3 import gzip_pb2 as _gzip  # noqa: F401
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2 as _skip  # noqa: F401
from envoy.extensions.filters.http.compressor.v3 import compressor_pb2 as _compressor  # noqa: F401
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2 as _inject  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as _authz  # noqa: F401
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2 as _proc  # noqa: F401
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2 as _mutation  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2 as _lua  # noqa: F401
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2 as _rl  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2 as _router  # noqa: F401
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2 as _codec  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2 as _hcm,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (  # noqa: F401
    header_mutation_pb2 as _early_mutation,
)
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2 as _generic  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2 as _previous  # noqa: F401
from envoy.extensions.retry.priority.previous_priorities.v3 import (  # noqa: F401
    previous_priorities_config_pb2 as _previous_priorities,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2 as _tls  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as _opts  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.type.matcher.v3 import http_inputs_pb2 as _inputs  # noqa: F401
from google.protobuf import any_pb2, json_format

from router.resources import Resources

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

log = logging.getLogger("ccr.xds")


def _pack(kind: type, resource: dict[str, object]) -> tuple[str, any_pb2.Any]:
    msg = json_format.ParseDict(resource, kind())
    out = any_pb2.Any()
    out.Pack(msg)
    return str(resource["name"]), out


@dataclass(frozen=True)
class Snapshot:
    version: str
    by_type: dict[str, list[tuple[str, any_pb2.Any]]]

    @classmethod
    def of(cls, res: Resources) -> Snapshot:
        by_type = {
            LDS: [_pack(listener_pb2.Listener, r) for r in res.listeners],
            RDS: [_pack(route_pb2.RouteConfiguration, r) for r in res.routes],
            CDS: [_pack(cluster_pb2.Cluster, r) for r in res.clusters],
            EDS: [],
        }
        digest = hashlib.sha256()
        for type_url in sorted(by_type):
            for name, anyr in by_type[type_url]:
                digest.update(name.encode())
                digest.update(anyr.value)
        return cls(version=digest.hexdigest()[:16], by_type=by_type)

    def response(self, type_url: str, names: list[str], nonce: str) -> discovery_pb2.DiscoveryResponse:
        items = self.by_type.get(type_url, [])
        # Listeners and clusters are wildcard; routes are asked for by name.
        if type_url in (RDS, EDS) and names:
            items = [(n, r) for n, r in items if n in names]
        return discovery_pb2.DiscoveryResponse(
            version_info=self.version, type_url=type_url, nonce=nonce, resources=[r for _, r in items]
        )


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._changed = asyncio.Condition()
        self.acked: dict[str, dict[str, str]] = {}  # node id -> type -> acked version

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def update(self, snapshot: Snapshot) -> None:
        if snapshot.version == self._snapshot.version:
            return
        async with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()
        log.info("config version %s published", snapshot.version)

    async def StreamAggregatedResources(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        out: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = asyncio.Queue()
        # type -> (names asked for, version last sent)
        subscribed: dict[str, tuple[list[str], str]] = {}
        nonce = 0
        node_id = ""

        def send(type_url: str, names: list[str]) -> None:
            nonlocal nonce
            nonce += 1
            snap = self._snapshot
            subscribed[type_url] = (names, snap.version)
            out.put_nowait(snap.response(type_url, names, str(nonce)))

        async def read() -> None:
            nonlocal node_id
            try:
                async for req in request_iterator:
                    if req.node.id:
                        node_id = req.node.id
                    type_url = req.type_url
                    names = list(req.resource_names)
                    if req.HasField("error_detail"):
                        log.error("node %s rejected %s version %s: %s", node_id, type_url.rsplit(".", 1)[-1],
                                  req.version_info, req.error_detail.message)
                    elif req.response_nonce:
                        self.acked.setdefault(node_id, {})[type_url] = req.version_info
                    prev = subscribed.get(type_url)
                    # A first request, a changed subscription, or a version the node lacks.
                    if (prev is None or sorted(prev[0]) != sorted(names)
                            or (not req.response_nonce and req.version_info != self._snapshot.version)):
                        send(type_url, names)
            finally:
                out.put_nowait(None)

        async def watch() -> None:
            while True:
                async with self._changed:
                    await self._changed.wait()
                # Clusters before listeners before routes, as Envoy expects on updates.
                for type_url in (CDS, EDS, LDS, RDS):
                    if type_url in subscribed:
                        send(type_url, subscribed[type_url][0])

        tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
        try:
            while (resp := await out.get()) is not None:
                yield resp
        finally:
            for t in tasks:
                t.cancel()

"""ADS server: Envoy's listeners, routes, clusters and endpoints over one stream, in both of
xDS's protocols (docs/routing.md, "xDS"):

* state of the world (StreamAggregatedResources): a type's full set whenever the config version
  changes;
* incremental (DeltaAggregatedResources): only the resources whose own version changed, and the
  names of those removed; a reconnecting Envoy's initial_resource_versions say what it already
  has, so a router restart resends only what differs.

Each config version is serialised once into `Any`s (with a per-resource version: a digest of its
bytes) and shared by every stream. Updates go out in the order Envoy needs (clusters, endpoints,
listeners, routes). ACKs are noted per node id; a NACK is logged once per node, type and version
with Envoy's reason, is not answered (Envoy keeps its last good config; no retry loop), and the
next config version is sent as usual.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.config.trace.v3 import opentelemetry_pb2 as _otel  # noqa: F401

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
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2 as _h2m  # noqa: F401
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

from ccr import metrics
from router.resources import Resources

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# Clusters (and their endpoints) before the listeners and routes that use them.
PUSH_ORDER = (CDS, EDS, LDS, RDS)
WILDCARD_TYPES = (LDS, CDS)  # Envoy asks for all of these; routes and endpoints by name

log = logging.getLogger("ccr.xds")
# Type URL -> the `type` label of ccr_xds_version_info / ccr_xds_nacks_total.
_SHORT = {LDS: "Listener", RDS: "RouteConfiguration", CDS: "Cluster", EDS: "ClusterLoadAssignment"}


def _pack(kind: type, resource: dict[str, object]) -> tuple[str, any_pb2.Any]:
    msg = json_format.ParseDict(resource, kind())
    out = any_pb2.Any()
    out.Pack(msg)
    return str(resource.get("name") or resource["cluster_name"]), out


@dataclass(frozen=True)
class Snapshot:
    version: str
    by_type: dict[str, list[tuple[str, any_pb2.Any]]]

    @classmethod
    def of(cls, res: Resources) -> Snapshot:
        return cls.from_types({
            LDS: [_pack(listener_pb2.Listener, r) for r in res.listeners],
            RDS: [_pack(route_pb2.RouteConfiguration, r) for r in res.routes],
            CDS: [_pack(cluster_pb2.Cluster, r) for r in res.clusters],
            EDS: [_pack(endpoint_pb2.ClusterLoadAssignment, r) for r in res.endpoints],
        })

    @classmethod
    def from_types(cls, by_type: dict[str, list[tuple[str, any_pb2.Any]]]) -> Snapshot:
        """A snapshot of these packed resources; its version is a digest of them all."""
        digest = hashlib.sha256()
        for type_url in sorted(by_type):
            for name, anyr in by_type[type_url]:
                digest.update(name.encode())
                digest.update(anyr.value)
        return cls(version=digest.hexdigest()[:16], by_type=by_type)

    def with_endpoints(self, assignments: list[dict[str, object]]) -> Snapshot:
        """This snapshot with these ClusterLoadAssignments in place of those of the same clusters
        (GPU pools: only the endpoints are packed again on a worker change)."""
        packed = dict(_pack(endpoint_pb2.ClusterLoadAssignment, a) for a in assignments)
        eds = [(n, packed.pop(n, r)) for n, r in self.by_type[EDS]] + list(packed.items())
        return Snapshot.from_types({**self.by_type, EDS: eds})

    @functools.cached_property
    def versions(self) -> dict[str, dict[str, tuple[str, any_pb2.Any]]]:
        """type -> name -> (the resource's own version, the resource), for the incremental protocol."""
        return {t: {n: (hashlib.sha256(r.value).hexdigest()[:16], r) for n, r in items}
                for t, items in self.by_type.items()}

    def response(self, type_url: str, names: list[str], nonce: str) -> discovery_pb2.DiscoveryResponse:
        items = self.by_type.get(type_url, [])
        # Listeners and clusters are wildcard; routes and endpoints are asked for by name.
        if type_url not in WILDCARD_TYPES and names:
            items = [(n, r) for n, r in items if n in names]
        return discovery_pb2.DiscoveryResponse(
            version_info=self.version, type_url=type_url, nonce=nonce, resources=[r for _, r in items]
        )


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._changed = asyncio.Condition()
        self.acked: dict[str, dict[str, str]] = {}  # node id -> type -> acked version
        self.nacked: dict[str, dict[str, str]] = {}  # node id -> type -> the version it refused
        self._nacks_logged: set[tuple[str, str, str]] = set()
        self._streams: set[_Progress] = set()  # every connected Envoy stream's progress
        self._generation = 0  # counts published snapshots: a later one covers an earlier one
        self._generations: dict[str, int] = {snapshot.version: 0}
        metrics.xds_served(_SHORT.values(), snapshot.version)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def update(self, snapshot: Snapshot) -> None:
        if snapshot.version == self._snapshot.version:
            return
        async with self._changed:
            self._snapshot = snapshot
            self._generation += 1
            if len(self._generations) > 1000:
                self._generations.clear()
            self._generations[snapshot.version] = self._generation
            self._changed.notify_all()
        metrics.xds_served(_SHORT.values(), snapshot.version)
        log.info("config version %s published", snapshot.version)

    def streams(self) -> list[tuple[str, str, bool]]:
        """(node id, config version last sent, whether every response of it is answered) per stream."""
        return [(p.node_id, p.version, not p.pending) for p in self._streams]

    async def wait_applied(self, version: str, timeout: float) -> dict[str, str]:
        """Until every connected Envoy has answered every response of config `version` (or of a later
        one: a GPU worker may register meanwhile).

        Returns node id -> Envoy's reason for each node that refused (NACKed) part of it; raises
        TimeoutError naming the nodes still silent. No Envoy connected: nothing to wait for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        generation = self._generations.get(version, self._generation + 1)  # unknown: never published
        while True:
            waiting = [p for p in self._streams if p.generation < generation or p.pending]
            if not waiting:
                return {p.node_id: p.nack for p in self._streams if p.nack}
            if loop.time() > deadline:
                silent = ", ".join(sorted(p.node_id or "?" for p in waiting))
                raise TimeoutError(f"no answer to config version {version} from {silent}")
            await asyncio.sleep(0.01)

    def _nack(self, node_id: str, type_url: str, version: str, message: str) -> None:
        """Logged once per node, type and version: Envoy repeats a NACK on every later request."""
        metrics.xds_nacked(_SHORT.get(type_url, "other"))
        self.nacked.setdefault(node_id, {})[type_url] = version
        key = (node_id, type_url, version)
        if key not in self._nacks_logged:
            self._nacks_logged.add(key)
            log.error("node %s rejected %s version %s (it keeps its last good config): %s", node_id,
                      _short(type_url), version, message)

    def _ack(self, node_id: str, type_url: str, version: str) -> None:
        self.acked.setdefault(node_id, {})[type_url] = version
        self.nacked.get(node_id, {}).pop(type_url, None)

    async def _changes(self) -> AsyncIterator[Snapshot]:
        while True:
            async with self._changed:
                await self._changed.wait()
            yield self._snapshot

    async def StreamAggregatedResources(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        out: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = asyncio.Queue()
        # type -> (names asked for, version last sent)
        subscribed: dict[str, tuple[list[str], str]] = {}
        sent_nonces: dict[str, str] = {}  # type -> the nonce of the last response (older ones are stale)
        nonce = 0
        node_id = ""
        progress = _Progress()
        self._streams.add(progress)

        def send(type_url: str, names: list[str]) -> None:
            nonlocal nonce
            nonce += 1
            snap = self._snapshot
            subscribed[type_url] = (names, snap.version)
            sent_nonces[type_url] = str(nonce)
            progress.sent(snap.version, self._generation, type_url, str(nonce))
            out.put_nowait(snap.response(type_url, names, str(nonce)))

        async def read() -> None:
            nonlocal node_id
            try:
                async for req in request_iterator:
                    if req.node.id:
                        node_id = progress.node_id = req.node.id
                    type_url = req.type_url
                    names = list(req.resource_names)
                    if req.response_nonce:
                        progress.answered(type_url, req.response_nonce,
                                          req.error_detail.message if req.HasField("error_detail") else None)
                    if req.response_nonce and req.response_nonce != sent_nonces.get(type_url):
                        # Answers an older response we already superseded: only the names can matter.
                        prev = subscribed.get(type_url)
                        if prev is not None and sorted(prev[0]) != sorted(names):
                            send(type_url, names)
                        continue
                    if req.HasField("error_detail"):
                        self._nack(node_id, type_url, subscribed.get(type_url, ([], ""))[1],
                                   req.error_detail.message)
                    elif req.response_nonce:
                        self._ack(node_id, type_url, req.version_info)
                    prev = subscribed.get(type_url)
                    # A first request, a changed subscription, or (after a router restart) a version
                    # the node has but that is not this config's.
                    if (prev is None or sorted(prev[0]) != sorted(names)
                            or (not req.response_nonce and req.version_info != self._snapshot.version)):
                        send(type_url, names)
            finally:
                out.put_nowait(None)

        async def watch() -> None:
            async for _ in self._changes():
                for type_url in PUSH_ORDER:
                    if type_url in subscribed:
                        send(type_url, subscribed[type_url][0])

        tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
        try:
            while (resp := await out.get()) is not None:
                yield resp
        finally:
            self._streams.discard(progress)
            for t in tasks:
                t.cancel()

    async def DeltaAggregatedResources(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        out: asyncio.Queue[discovery_pb2.DeltaDiscoveryResponse | None] = asyncio.Queue()
        streams: dict[str, _DeltaType] = {}
        nonce = 0
        node_id = ""
        progress = _Progress()
        self._streams.add(progress)

        def push(type_url: str, force: bool = False) -> None:
            nonlocal nonce
            st = streams[type_url]
            snap = self._snapshot
            changed, removed = st.diff(snap.versions.get(type_url, {}))
            progress.version, progress.generation = snap.version, self._generation  # nothing to send: up to date
            if not (changed or removed or force):
                return
            nonce += 1
            progress.sent(snap.version, self._generation, type_url, str(nonce))
            st.last_nonce = str(nonce)
            st.pending_version = snap.version
            out.put_nowait(discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=snap.version, type_url=type_url, nonce=str(nonce),
                resources=[discovery_pb2.Resource(name=n, version=v, resource=r) for n, v, r in changed],
                removed_resources=removed))

        async def read() -> None:
            nonlocal node_id
            try:
                async for req in request_iterator:
                    if req.node.id:
                        node_id = progress.node_id = req.node.id
                    type_url = req.type_url
                    if req.response_nonce:
                        progress.answered(type_url, req.response_nonce,
                                          req.error_detail.message if req.HasField("error_detail") else None)
                    st = streams.get(type_url)
                    first = st is None
                    if st is None:
                        st = streams[type_url] = _DeltaType(type_url in WILDCARD_TYPES)
                        # What a reconnecting Envoy already holds (e.g. after a router restart).
                        st.sent.update(req.initial_resource_versions)
                    st.subscribe(list(req.resource_names_subscribe), list(req.resource_names_unsubscribe))
                    if req.response_nonce:
                        if req.response_nonce == st.last_nonce:
                            if req.HasField("error_detail"):
                                self._nack(node_id, type_url, st.pending_version, req.error_detail.message)
                            else:
                                self._ack(node_id, type_url, st.pending_version)
                        if not (req.resource_names_subscribe or req.resource_names_unsubscribe):
                            continue  # an ACK or NACK only: nothing new to send (never resend a refused one)
                    push(type_url, force=first)
            finally:
                out.put_nowait(None)

        async def watch() -> None:
            async for _ in self._changes():
                for type_url in PUSH_ORDER:
                    if type_url in streams:
                        push(type_url)

        tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
        try:
            while (resp := await out.get()) is not None:
                yield resp
        finally:
            self._streams.discard(progress)
            for t in tasks:
                t.cancel()


class _Progress:
    """How far one Envoy stream is: the config version last sent on it and the responses not yet answered."""

    def __init__(self) -> None:
        self.node_id = ""
        self.version = ""
        self.generation = -1  # of the last snapshot sent (AdsServer._generation)
        self.pending: dict[str, str] = {}  # type -> nonce of its last response, until ACKed or NACKed
        self.nack: str | None = None  # Envoy's reason, when it refused part of `version`

    def sent(self, version: str, generation: int, type_url: str, nonce: str) -> None:
        if version != self.version:
            self.nack = None
        self.version, self.generation = version, generation
        self.pending[type_url] = nonce

    def answered(self, type_url: str, nonce: str, error: str | None) -> None:
        if self.pending.get(type_url) == nonce:
            del self.pending[type_url]
            if error is not None:
                self.nack = f"{_short(type_url)}: {error}"


class _DeltaType:
    """One type's state on an incremental stream: what the node subscribed to and what it has."""

    def __init__(self, wildcard: bool) -> None:
        self.wildcard = wildcard
        self.names: set[str] = set()
        self.sent: dict[str, str] = {}  # name -> version the node has (or was last sent)
        self.last_nonce = ""
        self.pending_version = ""

    def subscribe(self, add: list[str], remove: list[str]) -> None:
        for n in add:
            if n == "*":
                self.wildcard = True
            else:
                self.names.add(n)
        for n in remove:
            if n == "*":
                self.wildcard = False
            self.names.discard(n)
            self.sent.pop(n, None)

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def diff(self, current: dict[str, tuple[str, any_pb2.Any]]) -> tuple[list[tuple[str, str, any_pb2.Any]], list[str]]:
        changed = [(n, v, r) for n, (v, r) in current.items() if self.wants(n) and self.sent.get(n) != v]
        removed = [n for n in self.sent if n not in current and self.wants(n)]
        for n, v, _ in changed:
            self.sent[n] = v
        for n in removed:
            del self.sent[n]
        return changed, removed

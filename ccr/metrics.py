"""Prometheus metrics of a ccr service: one registry per process, served on its own port.

Kept minimal on purpose (issue 11 generalises metrics): the policy bundle each set serves.
A service that calls `serve()` reports the address in its ready file (ccr.contract.READY_METRICS);
`ccr up` records it in the run state (Runtime.metrics).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, start_http_server

disable_created_metrics()  # no *_created series: a counter's start time is not what anyone graphs
REGISTRY = CollectorRegistry()

POLICY_BUNDLE_INFO = Gauge(
    "ccr_policy_bundle_info", "The policy bundle a policy set serves (always 1).",
    ["set", "revision", "digest"], registry=REGISTRY)
POLICY_BUNDLE_LAST_LOAD = Gauge(
    "ccr_policy_bundle_last_load_success_timestamp_seconds",
    "When the policy set's bundle in use was loaded (unix time).", ["set"], registry=REGISTRY)
POLICY_BUNDLE_LOAD_FAILURES = Counter(
    "ccr_policy_bundle_load_failures", "Bundles refused (unreachable, unsigned, tampered, broken) per policy set.",
    ["set"], registry=REGISTRY)

MTLS_PEER_REFUSALS = Counter(
    "ccr_mtls_peer_refusals", "Calls refused because the verified peer's SPIFFE ID may not call this service.",
    ["peer"], registry=REGISTRY)

_bundle_labels: dict[str, tuple[str, str]] = {}  # set -> its current (revision, digest) labels
address: str | None = None  # host:port of /metrics once serve() ran


def bundle_loaded(set_name: str, revision: str, digest: str, at: float) -> None:
    old = _bundle_labels.get(set_name)
    if old is not None and old != (revision, digest):
        POLICY_BUNDLE_INFO.remove(set_name, *old)  # one series per set: the revision in use
    _bundle_labels[set_name] = (revision, digest)
    POLICY_BUNDLE_INFO.labels(set_name, revision, digest).set(1)
    POLICY_BUNDLE_LAST_LOAD.labels(set_name).set(at)
    POLICY_BUNDLE_LOAD_FAILURES.labels(set_name)  # present (0) from the first load on


def bundle_refused(set_name: str) -> None:
    POLICY_BUNDLE_LOAD_FAILURES.labels(set_name).inc()


def serve(host: str) -> str:
    """Serve /metrics on a free port of `host` (a daemon thread); returns host:port."""
    global address
    server, _ = start_http_server(0, addr=host, registry=REGISTRY)
    address = f"{host}:{server.server_port}"
    return address

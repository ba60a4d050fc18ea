"""Prometheus metrics of a ccr service: one registry per process, served on its own port.

Every service process (each worker too: workers share their gRPC port, not their metrics port)
calls `serve()` once; it reports the address in its ready file (ccr.contract.READY_METRICS) and
`ccr up` records it in the run state (Runtime.metrics). Envoy's own stats are on its admin port
(/stats/prometheus). docs/observability.md lists every metric.

Cardinality is bounded by construction: labels take values from the config (providers, models,
`telemetry.metric_groups`) or from fixed sets; a principal id never becomes a label.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

disable_created_metrics()  # no *_created series: a counter's start time is not what anyone graphs
REGISTRY = CollectorRegistry()

# Label value for what the allow-lists do not name, and for what is not known at all.
OTHER = "other"
NONE = "none"

# -- policy bundles (extauth) ------------------------------------------------------------------

POLICY_BUNDLE_INFO = Gauge(
    "ccr_policy_bundle_info", "The policy bundle a policy set serves (always 1).",
    ["set", "revision", "digest"], registry=REGISTRY)
POLICY_BUNDLE_LAST_LOAD = Gauge(
    "ccr_policy_bundle_last_load_success_timestamp_seconds",
    "When the policy set's bundle in use was loaded (unix time).", ["set"], registry=REGISTRY)
POLICY_BUNDLE_LOAD_FAILURES = Counter(
    "ccr_policy_bundle_load_failures", "Bundles refused (unreachable, unsigned, tampered, broken) per policy set.",
    ["set"], registry=REGISTRY)

# Decisions the decision log lost, by where: `queue` (extauth's in-memory queue was full), `postgres` or
# `file` (a write failed), `http` (the upload buffer was full, or the service refused a batch for good).
DECISION_LOG_DROPPED = Counter(
    "ccr_policy_decision_log_dropped", "Policy decisions the decision log dropped, by sink.", ["sink"],
    registry=REGISTRY)
DECISION_LOG_UPLOADS = Counter(
    "ccr_policy_decision_log_uploads", "Decision-log batches POSTed to the HTTP service, by result (ok, error).",
    ["result"], registry=REGISTRY)

# -- every gRPC service: decision latency (ccr.service.RpcMetrics) ------------------------------

# Decisions take 0.1-10 ms; the tail that matters is Envoy's deadline (about a second).
_DECISION_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)
RPC_DURATION = Histogram(
    "ccr_rpc_duration_seconds", "Time a unary gRPC call (a decision) took in the service, by service and method.",
    ["service", "method"], buckets=_DECISION_BUCKETS, registry=REGISTRY)
RPC_STREAMS = Counter(
    "ccr_rpc_streams", "Streaming gRPC calls started (adapter: one per upstream attempt; access log and ADS: "
    "one per Envoy connection).", ["service", "method"], registry=REGISTRY)
RPC_ERRORS = Counter(
    "ccr_rpc_errors", "Unary gRPC calls that ended in an error status (an abort or an exception).",
    ["service", "method"], registry=REGISTRY)

# -- HTTP services (signin) -------------------------------------------------------------------------

HTTP_DURATION = Histogram(
    "ccr_http_request_duration_seconds", "HTTP requests a ccr HTTP service (signin) answered, by route and "
    "status class.", ["service", "route", "code"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
    registry=REGISTRY)

# -- requests, as the access log receiver sees them (audit/observe.py) ---------------------------

_REQUEST_LABELS = ["route", "model", "provider", "group"]
REQUESTS = Counter(
    "ccr_requests", "Requests through the gateway, by route (endpoint), model, provider, principal group "
    "and status class (2xx, 4xx, 5xx, none).", [*_REQUEST_LABELS, "code"], registry=REGISTRY)
REQUEST_ERRORS = Counter(
    "ccr_request_errors", "Requests that failed, by kind: denied (policy), rate_limited, client (other 4xx), "
    "upstream (a provider's 5xx), gateway (5xx not from a provider), incomplete (no response).",
    [*_REQUEST_LABELS, "kind"], registry=REGISTRY)
REQUEST_DURATION = Histogram(
    "ccr_request_duration_seconds", "Downstream request duration to the last byte sent, as Envoy logged it.",
    _REQUEST_LABELS, buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
TOKENS = Counter(
    "ccr_tokens", "Tokens metered from providers' replies, by type (input, output, cache_write, cache_read).",
    ["model", "provider", "group", "type"], registry=REGISTRY)
COST = Counter(
    "ccr_cost_usd", "Cost of metered requests at the configured prices, in US dollars.",
    ["model", "provider", "group"], registry=REGISTRY)

# -- rate limits and budgets (ratelimit) ---------------------------------------------------------

RATELIMIT_DECISIONS = Counter(
    "ccr_ratelimit_decisions", "Rate limit service answers: domain limits (requests and tokens) or budgets "
    "(spend reservations); result ok, over_limit or error (store down or a malformed call: refused).",
    ["domain", "result"], registry=REGISTRY)

# Budgets: where each budget stands in its current period (ratelimit, ratelimit/budget_metrics.py).
# Labels: the budget's configured name and its period kind (day|week|month): one series per budget,
# however many members a per-seat budget has (its figures are the seat nearest its cap).
BUDGET_LABELS = ["budget", "period"]
_BUDGET_FAMILIES = (
    ("ccr_budget_limit_usd", "A budget's cap per period, in US dollars."),
    ("ccr_budget_spend_usd", "Spent in the budget's current period (settled, from the ledger), in US dollars; "
     "per-seat budgets: the seat nearest its cap."),
    ("ccr_budget_reserved_usd", "Worst cases of requests in flight held on the budget's counter (Redis), in US "
     "dollars; per-seat budgets: the seat nearest its cap."),
    ("ccr_budget_used_ratio", "Share of the cap used (counter, else ledger) in the current period; 1 = at the cap."),
    ("ccr_budget_period_end_timestamp_seconds", "When the budget's current period ends and it resets (unix time)."),
    ("ccr_budget_seats", "Per-seat budgets: members with spend in the current period."),
)


class BudgetCollector:
    """Budget gauges read at scrape time from `source` (set by the ratelimit service; None elsewhere: the
    families are listed without samples). `source` returns ccr.budget_usage.BudgetUsage values."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[Any]] | None = None

    def describe(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily(n, h, labels=BUDGET_LABELS) for n, h in _BUDGET_FAMILIES]

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        fams = {n: GaugeMetricFamily(n, h, labels=BUDGET_LABELS) for n, h in _BUDGET_FAMILIES}
        source = self.source
        for u in (source() if source is not None else ()):
            b = u.budget
            labels = [b.name, str(b.period)]
            cap = b.amount_micro_usd
            fams["ccr_budget_limit_usd"].add_metric(labels, cap / 1e6)
            fams["ccr_budget_spend_usd"].add_metric(labels, u.spent / 1e6)
            if u.reserved is not None:
                fams["ccr_budget_reserved_usd"].add_metric(labels, u.reserved / 1e6)
            if cap:
                fams["ccr_budget_used_ratio"].add_metric(labels, u.used / cap)
            fams["ccr_budget_period_end_timestamp_seconds"].add_metric(labels, u.window.end)
            if b.scope == "per_seat":
                fams["ccr_budget_seats"].add_metric(labels, u.seats)
        return list(fams.values())


BUDGETS = BudgetCollector()
REGISTRY.register(BUDGETS)

# -- audit spool (accesslog) -----------------------------------------------------------------------

# Registered by watch_spool() in the access log receivers only (an unlabelled gauge always shows).

# -- xDS (router) ------------------------------------------------------------------------------------

XDS_VERSION_INFO = Gauge(
    "ccr_xds_version_info", "The config version the router serves, per resource type (always 1).",
    ["type", "version"], registry=REGISTRY)
XDS_NACKS = Counter("ccr_xds_nacks", "Config versions Envoy rejected (NACKs), per resource type.",
                    ["type"], registry=REGISTRY)
# -- gateway config versions (every follower and the router; ccr/config_sync.py) ---------------------

CONFIG_VERSION_INFO = Gauge(
    "ccr_config_version_info", "The gateway config version this process serves (always 1): sequence number "
    "of the run and the digest of the validated config.", ["service", "seq", "digest"], registry=REGISTRY)
CONFIG_VERSION = Gauge("ccr_config_version", "The sequence number of the gateway config version this process "
                       "serves.", ["service"], registry=REGISTRY)
CONFIG_REFUSED = Counter("ccr_config_refused", "Config edits the router refused (invalid, restart-only, or not "
                         "acknowledged by every process).", registry=REGISTRY)
MTLS_REFUSALS = Counter(
    "ccr_mtls_refusals", "Connections or calls an mTLS service refused, by reason: plaintext, no_client_certificate, "
    "untrusted_certificate (another CA or trust domain), expired_certificate, wrong_spiffe_id, ...",
    ["service", "reason"], registry=REGISTRY)
MTLS_PEER_REFUSALS = Counter(
    "ccr_mtls_peer_refusals", "Calls refused because the verified peer's SPIFFE ID may not call this service.",
    ["peer"], registry=REGISTRY)

_bundle_labels: dict[str, tuple[str, str]] = {}  # set -> its current (revision, digest) labels
_xds_versions: dict[str, str] = {}  # type -> version label in use
_config_labels: dict[str, tuple[str, str]] = {}  # service -> its (seq, digest) labels in use
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


def xds_served(types: Iterable[str], version: str) -> None:
    """The router now serves `version` for each of `types` (short names: Listener, Cluster, ...)."""
    for t in types:
        old = _xds_versions.get(t)
        if old is not None and old != version:
            XDS_VERSION_INFO.remove(t, old)
        _xds_versions[t] = version
        XDS_VERSION_INFO.labels(t, version).set(1)
        XDS_NACKS.labels(t)  # present (0) from the start, so rate() sees the first NACK


def config_version(service: str, seq: int, digest: str) -> None:
    old = _config_labels.get(service)
    new = (str(seq), digest[:16])
    if old is not None and old != new:
        CONFIG_VERSION_INFO.remove(service, *old)
    _config_labels[service] = new
    CONFIG_VERSION_INFO.labels(service, *new).set(1)
    CONFIG_VERSION.labels(service).set(seq)


def xds_nacked(type_name: str) -> None:
    XDS_NACKS.labels(type_name).inc()


def watch_spool(spool: Any, name: str = "ccr_audit_spool", what: str = "the access log spool") -> None:
    """Read the spool's size at scrape time (no cost per row). The rows' spool is `ccr_audit_spool_*`,
    the captured bodies' `ccr_audit_body_spool_*` (audit/bodies.py)."""
    Gauge(f"{name}_bytes", f"Bytes in {what}, waiting for PostgreSQL.",
          registry=REGISTRY).set_function(lambda: spool.bytes)
    Gauge(f"{name}_rows", f"Rows in {what}, waiting for PostgreSQL.",
          registry=REGISTRY).set_function(lambda: spool.rows)
    Gauge(f"{name}_max_bytes", f"The bound of {what} (audit.spool_max_bytes, audit.body_spool_max_bytes).",
          registry=REGISTRY).set(spool.max_bytes)


class Timer:
    """Observes one labelled histogram child and counts errors: pre-bound, so a call costs two
    perf_counter() reads and one observe()."""

    __slots__ = ("_errors", "_observe")

    def __init__(self, service: str, method: str) -> None:
        self._observe: Callable[[float], None] = RPC_DURATION.labels(service, method).observe
        self._errors = RPC_ERRORS.labels(service, method)

    def done(self, start: float, failed: bool = False) -> None:
        self._observe(time.perf_counter() - start)
        if failed:
            self._errors.inc()


class LabelSets:
    """Bounded label values from the config: provider names, model names (a model id that is not
    literally in the config is labelled with the pattern it matched), allowed principal groups."""

    def __init__(self, providers: Iterable[str], model_patterns: Iterable[str], groups: Iterable[str]) -> None:
        self.providers = frozenset(providers)
        self._patterns = list(model_patterns)
        self._literal = frozenset(p for p in self._patterns if not any(c in p for c in "*?["))
        self._groups = list(groups)
        self._group_set = frozenset(self._groups)
        self._model_cache: dict[str, str] = {}

    def provider(self, name: str | None) -> str:
        if not name:
            return NONE
        return name if name in self.providers else OTHER

    def model(self, model: str | None) -> str:
        if not model:
            return NONE
        hit = self._model_cache.get(model)
        if hit is None:
            if model in self._literal:
                hit = model
            else:
                hit = next((p for p in self._patterns if fnmatch.fnmatchcase(model, p)), OTHER)
            if len(self._model_cache) < 4096:  # a cache, not a way to grow without bound
                self._model_cache[model] = hit
        return hit

    def group(self, groups: Iterable[str] | None) -> str:
        """The first of the principal's groups on the allow-list (in allow-list order), else "other"."""
        if groups is None:
            return NONE
        mine = set(groups) & self._group_set
        if not mine:
            return OTHER
        return next(g for g in self._groups if g in mine)


def http_middleware(service: str) -> Any:
    """aiohttp middleware timing each request; the route label is the matched route's path template."""
    from aiohttp import web

    @web.middleware
    async def timed(request: Any, handler: Any) -> Any:
        start = time.perf_counter()
        code = "5xx"
        try:
            resp = await handler(request)
            code = f"{resp.status // 100}xx"
            return resp
        except web.HTTPException as e:
            code = f"{e.status // 100}xx"
            raise
        finally:
            route = request.match_info.route.resource
            HTTP_DURATION.labels(service, route.canonical if route is not None else NONE, code).observe(
                time.perf_counter() - start)

    return timed


def label_sets(config: Any) -> LabelSets:
    return LabelSets((p.name for p in config.providers), (m.match for m in config.models),
                     config.telemetry.metric_groups)


def serve(host: str, port: int = 0) -> str:
    """Serve /metrics on `host`:`port` (0: a free one) in a daemon thread, once per process; returns host:port."""
    global address
    if address is None:
        server, _ = start_http_server(port, addr=host, registry=REGISTRY)
        address = f"[{host}]:{server.server_port}" if ":" in host else f"{host}:{server.server_port}"
        logging.getLogger("ccr.metrics").info("metrics on http://%s/metrics", address)
    return address

"""What the access log receiver tells operators about each request: Prometheus counters and, with
tracing on, one span per request in the request's trace (its traceparent is in the logged headers).

The receiver is where a request's whole story is known at once (route, model, provider, principal
groups, status, latency, metered usage): counting here costs nothing on the request path. Labels
are bounded (ccr.metrics.LabelSets); a failure here is logged and never touches the audit row.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from audit.entry import _FINAL_TYPES, Namespaces, entry_flags, error_kind
from ccr import metrics, tracing
from ccr.config import GatewayConfig
from ccr.contract import AUTHZ_NS, H_TRACEPARENT, H_TRACESTATE, USAGE_NS
from ccr.pricing import PriceTable, Usage, cost_micro

log = logging.getLogger("ccr.audit.observe")

_TOKEN_TYPES = (("input_tokens", "input"), ("output_tokens", "output"),
                ("cache_creation_input_tokens", "cache_write"), ("cache_read_input_tokens", "cache_read"))


def _str(fields: dict[str, struct_pb2.Value], name: str) -> str | None:
    v = fields.get(name)
    return v.string_value or None if v is not None and v.WhichOneof("kind") == "string_value" else None


def _num(fields: Any, name: str) -> int:
    if name not in fields:
        return 0
    v = fields[name]
    if v is None or v.WhichOneof("kind") != "number_value" or not v.number_value >= 0:
        return 0
    return int(v.number_value)


def _groups(fields: dict[str, struct_pb2.Value]) -> list[str] | None:
    v = fields.get("groups")
    if v is None or v.WhichOneof("kind") != "list_value":
        return None
    return [x.string_value for x in v.list_value.values if x.WhichOneof("kind") == "string_value"]


class _Series:
    """The labelled children of one (route, model, provider, group): looked up once, then reused
    (prometheus-client's labels() costs more than the increment)."""

    __slots__ = ("codes", "cost", "errors", "observe", "tokens")

    def __init__(self, labels: tuple[str, str, str, str]) -> None:
        route, model, provider, group = labels
        self.codes: dict[str, Any] = {}
        self.errors: dict[str, Any] = {}
        self.observe = metrics.REQUEST_DURATION.labels(*labels).observe
        self.tokens = [(f, metrics.TOKENS.labels(model, provider, group, kind).inc) for f, kind in _TOKEN_TYPES]
        self.cost = metrics.COST.labels(model, provider, group).inc


class RequestObserver:
    def __init__(self, config: GatewayConfig) -> None:
        self.labels = metrics.label_sets(config)
        self.prices = PriceTable(config)
        self.config = config
        self._series: dict[tuple[str, str, str, str], _Series] = {}  # bounded: every label is

    def entry(self, e: accesslog_pb2.HTTPAccessLogEntry, ns: Namespaces | None = None) -> None:
        try:
            self._entry(e, ns)
        except Exception:  # telemetry never costs a row
            log.exception("metrics for access log entry request_id=%r failed", e.request.request_id)

    def _entry(self, e: accesslog_pb2.HTTPAccessLogEntry, ns: Namespaces | None) -> None:
        common = e.common_properties
        if common.intermediate_log_entry or common.access_log_type not in _FINAL_TYPES:
            return
        started = time.time_ns()
        ns = ns or Namespaces(common)
        authz = ns(AUTHZ_NS)
        model_id = _str(authz, "model")
        provider_name = _str(authz, "provider")
        key = (_str(authz, "endpoint") or metrics.NONE,  # extauth's endpoint names: a fixed set
               self.labels.model(model_id), self.labels.provider(provider_name), self.labels.group(_groups(authz)))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(key)
        status = e.response.response_code.value
        code = f"{status // 100}xx" if status else metrics.NONE
        counter = series.codes.get(code)
        if counter is None:
            counter = series.codes[code] = metrics.REQUESTS.labels(*key, code)
        counter.inc()
        if status == 0 or status >= 400:
            kind = error_kind(common, status, entry_flags(common, ns))
            if kind is not None:
                err = series.errors.get(kind)
                if err is None:
                    err = series.errors[kind] = metrics.REQUEST_ERRORS.labels(*key, kind)
                err.inc()
        if common.HasField("time_to_last_downstream_tx_byte"):
            d = common.time_to_last_downstream_tx_byte
            series.observe(d.seconds + d.nanos / 1e9)
        counts: dict[str, int] = {}
        usage = ns(USAGE_NS)
        if usage:
            for field, inc in series.tokens:
                n = _num(usage, field)
                counts[field] = n
                if n:
                    inc(n)
        if any(counts.values()):
            rates = self.prices.rates(model_id)
            if rates is not None:
                micro = cost_micro(Usage(**counts), rates)
                if micro:
                    series.cost(micro / 1e6)
        if tracing.TRACER is not None:
            self._span(e, started, model_id, provider_name, counts)

    def _span(self, e: accesslog_pb2.HTTPAccessLogEntry, started: int, model: str | None,
              provider: str | None, counts: dict[str, int]) -> None:
        headers = e.request.request_headers
        traceparent = headers.get(H_TRACEPARENT)
        # Most requests are not sampled: they leave here, before any attribute is looked up.
        if traceparent is None or not tracing.sampled(traceparent):
            return
        carrier = {H_TRACEPARENT: traceparent}
        if H_TRACESTATE in headers:
            carrier[H_TRACESTATE] = headers[H_TRACESTATE]
        attrs: dict[str, Any] = {tracing.GEN_AI_REQUEST_MODEL: model,
                                 tracing.GEN_AI_SYSTEM: tracing.gen_ai_system(self.config, provider),
                                 "http.response.status_code": e.response.response_code.value,
                                 "ccr.request_id": e.request.request_id}
        if counts:
            attrs[tracing.GEN_AI_INPUT_TOKENS] = counts.get("input_tokens", 0)
            attrs[tracing.GEN_AI_OUTPUT_TOKENS] = counts.get("output_tokens", 0)
        parent = tracing.parent(carrier)
        if parent is None:
            return
        span = tracing.TRACER.start_span("accesslog record", context=parent,
                                         attributes={k: v for k, v in attrs.items() if v is not None},
                                         start_time=started)
        span.end()

"""One Envoy HTTPAccessLogEntry -> one `request_log` row (column order = COLUMNS)."""

from __future__ import annotations

import math
from datetime import UTC
from typing import TYPE_CHECKING

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2, struct_pb2

from ccr.contract import (
    ALS_TAG_SERVED_PROVIDER,
    AUTHZ_BUNDLE_REVISION,
    AUTHZ_DECISION_ID,
    AUTHZ_ERROR_TYPE,
    AUTHZ_MODEL_REQUESTED,
    AUTHZ_NS,
    AUTHZ_RATELIMIT_OUTCOME,
    H_CLIENT_REQUEST_ID,
    USAGE_CACHE_1H,
    USAGE_CACHE_5M,
    USAGE_NOTE,
    USAGE_NS,
    USAGE_STATUS,
    USAGE_TOKEN_FIELDS,
    UsageStatus,
)
from ccr.pricing import PriceTable, Usage, cost_micro
from ccr.provider_models import to_bedrock, to_vertex

if TYPE_CHECKING:
    from ccr.config import GatewayConfig

TOKEN_FIELDS = USAGE_TOKEN_FIELDS

# Migration 11's columns (docs/audit.md "The row"), appended: a chain registered before it covers
# the columns above only (audit_chains.columns), so its links still verify.
DETAIL_COLUMNS: tuple[str, ...] = (
    "principal_id", "principal_kind", "groups", "tenant", "spiffe_id", "source_address", "endpoint",
    "model_served", "provider", "region", "attempts", "error_type", "error_kind",
    "cache_write_5m_tokens", "cache_write_1h_tokens", "cost_micro_usd", "ttft_ms",
    "decision_id", "bundle_revision", "ratelimit",
)
COLUMNS: tuple[str, ...] = (
    "ts", "request_id", "key_id", "principal", "model", "method", "path", "status",
    *TOKEN_FIELDS,
    "latency_ms", "upstream_cluster", "response_flags", "bytes_received", "bytes_sent",
    "usage_status", "usage_note", "client_request_id",
    *DETAIL_COLUMNS,
    "model_requested",  # the id the client named (an alias, or the model itself); `model` is the concrete one
)
# Client-chosen text is kept for correlation only; bound what one row can hold.
MAX_CLIENT_REQUEST_ID = 256
MAX_NOTE = 1000
Row = tuple[object, ...]

_BIGINT_MAX = 2**63 - 1
_LogType = accesslog_pb2.AccessLogType
# Only the final entry of a request makes its row; earlier (periodic/start) or
# upstream entries with the same request_id would otherwise win ON CONFLICT.
_FINAL_TYPES = frozenset({_LogType.NotSet, _LogType.DownstreamEnd})

# ResponseFlags field -> Envoy's %RESPONSE_FLAGS% short code, in Envoy's order.
_FLAGS: tuple[tuple[str, str], ...] = (
    ("failed_local_healthcheck", "LH"), ("no_healthy_upstream", "UH"),
    ("upstream_request_timeout", "UT"), ("local_reset", "LR"), ("upstream_remote_reset", "UR"),
    ("upstream_connection_failure", "UF"), ("upstream_connection_termination", "UC"),
    ("upstream_overflow", "UO"), ("no_route_found", "NR"), ("delay_injected", "DI"),
    ("fault_injected", "FI"), ("rate_limited", "RL"), ("unauthorized_details", "UAEX"),
    ("rate_limit_service_error", "RLSE"), ("downstream_connection_termination", "DC"),
    ("upstream_retry_limit_exceeded", "URX"), ("stream_idle_timeout", "SI"),
    ("invalid_envoy_request_headers", "IH"), ("downstream_protocol_error", "DPE"),
    ("upstream_max_stream_duration_reached", "UMSDR"), ("response_from_cache_filter", "RFCF"),
    ("no_filter_config_found", "NFCF"), ("duration_timeout", "DT"), ("upstream_protocol_error", "UPE"),
    ("no_cluster_found", "NC"), ("overload_manager", "OM"), ("dns_resolution_failure", "DF"),
    ("downstream_remote_reset", "DR"),
)


class MalformedEntry(ValueError):
    """An entry that cannot become a row; it is logged and skipped, the stream goes on."""


def _clean(s: str) -> str:
    # PostgreSQL text cannot hold NUL; one stray byte must not cost the whole batch.
    return s.replace("\x00", "\ufffd") if "\x00" in s else s


def _namespace(md: base_pb2.Metadata, ns: str) -> dict[str, struct_pb2.Value]:
    # Indexing a protobuf message map inserts the key; test membership first.
    return dict(md.filter_metadata[ns].fields) if ns in md.filter_metadata else {}


class Namespaces:
    """One entry's metadata namespaces, each read out of the message once: the row, the metrics
    (audit/observe.py) and the ledger (audit/ledger.py) all read them, and copying a protobuf
    map is most of what reading a field costs."""

    __slots__ = ("_md", "_seen")

    def __init__(self, common: accesslog_pb2.AccessLogCommon) -> None:
        self._md = common.metadata
        self._seen: dict[str, dict[str, struct_pb2.Value]] = {}

    def __call__(self, ns: str) -> dict[str, struct_pb2.Value]:
        got = self._seen.get(ns)
        if got is None:
            got = self._seen[ns] = _namespace(self._md, ns)
        return got


def _text(fields: dict[str, struct_pb2.Value], name: str) -> str | None:
    v = fields.get(name)
    kind = v.WhichOneof("kind") if v is not None else None
    if kind is None or kind == "null_value":
        return None
    if kind == "string_value":
        return _clean(v.string_value) if v.string_value else None
    raise MalformedEntry(f"metadata field {name!r} is a {kind}, expected a string")


def _count(fields: dict[str, struct_pb2.Value], name: str) -> int | None:
    v = fields.get(name)
    kind = v.WhichOneof("kind") if v is not None else None
    if kind is None or kind == "null_value":
        return None  # unknown stays unknown
    if kind == "number_value":
        n = v.number_value
        if math.isfinite(n) and n == int(n) and 0 <= n <= _BIGINT_MAX:
            return int(n)
    elif kind == "string_value" and v.string_value.isdigit() and int(v.string_value) <= _BIGINT_MAX:
        return int(v.string_value)
    raise MalformedEntry(f"usage field {name!r} is not a non-negative integer: {str(v).strip()}")


def _ms(d: duration_pb2.Duration) -> float:
    return d.seconds * 1000.0 + d.nanos / 1e6


def _method(value: int) -> str:
    if value == base_pb2.METHOD_UNSPECIFIED:
        return "-"
    try:
        return base_pb2.RequestMethod.Name(value)
    except ValueError:  # an enum value newer than our protos
        return str(value)


# Field name -> (Envoy's position, code).
_FLAG_AT = {name: (i, code) for i, (name, code) in enumerate(_FLAGS)}
_FLAG_ORDER = {code: i for i, (_, code) in enumerate(_FLAGS)}


def response_flags(flags: accesslog_pb2.ResponseFlags) -> str | None:
    """Set flags as Envoy prints them ("UH,UF"); None when no flag is set.

    ListFields() yields only what is set (a true bool, a present unauthorized_details): most
    entries have no flag, and this visits none instead of reading all 28.
    """
    set_ = sorted(_FLAG_AT[f.name] for f, _ in flags.ListFields() if f.name in _FLAG_AT)
    return ",".join(code for _, code in set_) or None


# A refusal extauth made for the limits (limits.admission: extauth) -> the flag Envoy's rate limit filter
# sets when it refuses itself: the row, the error kind and the ratelimit column read the same either way.
_LIMIT_FLAGS = {"over_limit": "RL", "budget": "RL", "error": "RLSE"}


def entry_flags(common: accesslog_pb2.AccessLogCommon, ns: Namespaces) -> str | None:
    """The entry's response flags, a limits refusal made inside ext_authz read as the rate limit
    filter's own (AUTHZ_RATELIMIT_OUTCOME, set only by extauth on such a refusal)."""
    flags = response_flags(common.response_flags)
    if flags is not None and "UAEX" in flags:
        outcome = ns(AUTHZ_NS).get(AUTHZ_RATELIMIT_OUTCOME)
        if outcome is not None and outcome.WhichOneof("kind") == "string_value":
            code = _LIMIT_FLAGS.get(outcome.string_value)
            if code is not None:
                codes = [code if c == "UAEX" else c for c in flags.split(",")]
                return ",".join(sorted(set(codes), key=lambda c: _FLAG_ORDER.get(c, 99)))
    return flags


_STATUSES = frozenset(s.value for s in UsageStatus)
# Flags that say the gateway itself answered, and why (first match wins).
_REFUSALS = (("UAEX", "refused by the gateway's authorization"), ("RL", "rate limited by the gateway"),
             ("RLSE", "rate limit service unavailable"), ("NR", "no route for this path"),
             ("UH", "no healthy upstream"), ("UF", "upstream connection failed"),
             ("OM", "refused by the overload manager"), ("DPE", "downstream protocol error"))


def _forwarded(common: accesslog_pb2.AccessLogCommon) -> bool:
    """Whether any byte of the request went to a provider.

    Not upstream_remote_address: Envoy sets it once a host is picked, also when the
    adapter (upstream ext_proc) or the connection failed before anything was sent.
    """
    return common.HasField("time_to_first_upstream_tx_byte")


UsageColumns = tuple[int | None, int | None, int | None, int | None, str, str | None]


def usage_columns(common: accesslog_pb2.AccessLogCommon, status: int, flags: str | None,
                  ns: Namespaces | None = None) -> UsageColumns:
    """Token counts, usage_status and usage_note: from the adapter's metadata, else from what happened."""
    usage = (ns or Namespaces(common))(USAGE_NS)
    if usage:
        counts = [_count(usage, f) for f in TOKEN_FIELDS]
        raw = _text(usage, USAGE_STATUS)
        note = _text(usage, USAGE_NOTE)
        if raw in _STATUSES:
            ustatus = str(raw)
        elif raw is None and any(c is not None for c in counts):
            ustatus, note = UsageStatus.COMPLETE.value, "adapter sent counts without a usage_status"
        else:
            counts = [None] * len(TOKEN_FIELDS)
            ustatus, note = UsageStatus.UNKNOWN.value, f"adapter sent an unrecognised usage_status {raw!r}"
        if ustatus in (UsageStatus.UNKNOWN, UsageStatus.NOT_FORWARDED):
            counts = [None] * len(TOKEN_FIELDS)  # a status that says "unknown" never carries numbers
        return (*counts, ustatus, note[:MAX_NOTE] if note else None)  # type: ignore[return-value]
    set_flags = set((flags or "").split(","))
    why = next((text for code, text in _REFUSALS if code in set_flags), None)
    if not _forwarded(common):
        note = why or (f"the gateway replied {status} before contacting a provider" if status
                       else "the request ended before reaching a provider")
        return None, None, None, None, UsageStatus.NOT_FORWARDED.value, note
    return None, None, None, None, UsageStatus.UNKNOWN.value, (
        f"a provider was contacted but no usage was reported by the adapter (status {status}, "
        f"flags {flags or 'none'})")


# The Anthropic API's error type for a status (what its error body says; the gateway's own
# refusals name theirs in AUTHZ_NS instead).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 503: "api_error", 504: "timeout_error",
                529: "overloaded_error"}
_BILLED = frozenset({UsageStatus.COMPLETE, UsageStatus.PARTIAL, UsageStatus.ESTIMATED, UsageStatus.NOT_BILLABLE})


def error_kind(common: accesslog_pb2.AccessLogCommon, status: int, flags: str | None) -> str | None:
    """Who failed the request, from what Envoy logged; None when it did not fail.

    `denied` (ext_authz refused), `rate_limited` (429 by the gateway), `budget` (402 by the gateway),
    `client` (other 4xx, a provider's own included), `upstream` (a provider's 5xx), `gateway` (a 5xx the
    gateway produced), `incomplete` (no response sent).
    """
    if status == 0:
        return "incomplete"
    if status < 400:
        return None
    forwarded = common.HasField("time_to_first_upstream_rx_byte")  # a provider answered this status
    codes = set((flags or "").split(","))
    if "UAEX" in codes:
        return "denied"
    if status == 402 and not forwarded:  # the budget filter's refusal (it also sets the RL flag)
        return "budget"
    if "RL" in codes or (status == 429 and not forwarded):
        return "rate_limited"
    if status >= 500:
        return "upstream" if forwarded else "gateway"
    return "client"


def ratelimit_outcome(authorized: bool, status: int, flags: str | None) -> str:
    """What the gateway's limits said: `ok` (passed), `over_limit` (refused, 429), `budget` (a hard budget
    refused, 402), `error` (the rate limit service failed), `not_checked` (refused before the limits)."""
    codes = set((flags or "").split(","))
    if "RLSE" in codes:
        return "error"
    if "RL" in codes:
        return "budget" if status == 402 else "over_limit"
    return "ok" if authorized else "not_checked"


def _address(a: object) -> str | None:
    sock = getattr(a, "socket_address", None)
    if sock is None or not sock.address:
        pipe = getattr(a, "pipe", None)
        return _clean(pipe.path) or None if pipe is not None and pipe.path else None
    return _clean(sock.address)


def _string_list(fields: dict[str, struct_pb2.Value], name: str) -> list[str] | None:
    v = fields.get(name)
    if v is None or v.WhichOneof("kind") in (None, "null_value"):
        return None
    if v.WhichOneof("kind") != "list_value":
        raise MalformedEntry(f"metadata field {name!r} is not a list")
    out = []
    for x in v.list_value.values:
        if x.WhichOneof("kind") != "string_value":
            raise MalformedEntry(f"metadata field {name!r} holds a non-string")
        out.append(_clean(x.string_value))
    return out


class RowFacts:
    """What the config adds to a row: provider by cluster, its region and model spelling, prices.

    Everything here is the gateway's own (config, Envoy's fields, extauth's metadata): no client header.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.providers = {p.name: p for p in config.providers}
        self.by_cluster: dict[str, str] = {}
        for p in config.providers:
            for c in (p.cluster, p.translate_cluster, p.objects_cluster):
                self.by_cluster[c] = p.name
        self.prices = PriceTable(config)

    def provider_of(self, tagged: str | None, cluster: str | None) -> str | None:
        if tagged and tagged in self.providers:
            return tagged
        return self.by_cluster.get(cluster) if cluster else None

    def region(self, provider: str | None) -> str | None:
        p = self.providers.get(provider) if provider else None
        return p.region if p is not None else None

    def model_served(self, provider: str | None, model: str | None) -> str | None:
        """The model id the serving provider was asked for: its own spelling of the requested id."""
        p = self.providers.get(provider) if provider else None
        if p is None or model is None:
            return None
        kind = str(p.kind)
        if kind == "bedrock":
            return to_bedrock(model, p.model_ids)
        if kind == "vertex":
            return to_vertex(model, p.model_ids)
        return p.model_ids.get(model, model)

    def cost(self, model: str | None, usage_status: str, counts: list[int | None], w5: int | None,
             w1: int | None, batch: bool) -> int | None:
        """Micro-USD at the configured prices for metered usage; None when usage or the price is unknown."""
        if usage_status not in _BILLED:
            return 0 if usage_status == UsageStatus.NOT_FORWARDED else None
        rates = self.prices.rates(model)
        if rates is None:
            return None
        i, o, cw, cr = (c or 0 for c in counts)
        return cost_micro(Usage(i, o, cw, cr, w5, w1), rates, batch=batch)


def entry_to_row(e: accesslog_pb2.HTTPAccessLogEntry, facts: RowFacts | None = None,
                 ns: Namespaces | None = None) -> Row | None:
    """The row for a final entry, None for an intermediate one; MalformedEntry if unusable.
    `ns`: the entry's namespaces when the caller reads them too."""
    common = e.common_properties
    if common.intermediate_log_entry or common.access_log_type not in _FINAL_TYPES:
        return None
    if not e.request.request_id:
        raise MalformedEntry("no request_id (x-request-id); the row could not be deduplicated")
    if not common.HasField("start_time"):
        raise MalformedEntry("no start_time")
    try:
        ts = common.start_time.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as err:
        raise MalformedEntry(f"start_time out of range: {err}") from None
    ns = ns or Namespaces(common)
    authz = ns(AUTHZ_NS)
    status = e.response.response_code.value  # 0 when no response was sent (e.g. client reset)
    flags = entry_flags(common, ns)
    *counts, usage_status, usage_note = usage_columns(common, status, flags, ns)
    client_rid = e.request.request_headers.get(H_CLIENT_REQUEST_ID)
    if common.HasField("time_to_last_downstream_tx_byte"):
        latency: float | None = _ms(common.time_to_last_downstream_tx_byte)
    elif common.HasField("duration"):
        latency = _ms(common.duration)
    else:
        latency = None
    model = _text(authz, "model")
    return (
        ts,
        _clean(e.request.request_id),
        _text(authz, "key_id"),
        _text(authz, "principal"),
        model,
        _method(e.request.request_method),
        _clean(e.request.path),
        status,
        *counts,
        latency,
        _clean(common.upstream_cluster) or None,
        flags,
        min(e.request.request_body_bytes, _BIGINT_MAX),
        min(e.response.response_body_bytes, _BIGINT_MAX),
        usage_status,
        usage_note,
        _clean(client_rid[:MAX_CLIENT_REQUEST_ID]) if client_rid else None,
        *_details(e, common, authz, model, status, flags, counts, usage_status, facts, ns),
        _text(authz, AUTHZ_MODEL_REQUESTED),
    )


def _details(e: accesslog_pb2.HTTPAccessLogEntry, common: accesslog_pb2.AccessLogCommon,
             authz: dict[str, struct_pb2.Value], model: str | None, status: int, flags: str | None,
             counts: list[int | None], usage_status: str, facts: RowFacts | None, ns: Namespaces) -> Row:
    """The values of DETAIL_COLUMNS."""
    cluster = _clean(common.upstream_cluster) or None
    tagged = common.custom_tags.get(ALS_TAG_SERVED_PROVIDER) if common.custom_tags else None
    provider = facts.provider_of(tagged, cluster) if facts is not None else _clean(tagged) if tagged else None
    usage = ns(USAGE_NS)
    w5 = _count(usage, USAGE_CACHE_5M) if usage and counts[2] is not None else None
    w1 = _count(usage, USAGE_CACHE_1H) if usage and counts[2] is not None else None
    writes = counts[2]
    if writes is not None and writes > (w5 or 0) + (w1 or 0):
        # Writes the provider did not split are listed (and priced) as 1-hour writes, as in the ledger.
        w5, w1 = w5 or 0, (w1 or 0) + writes - (w5 or 0) - (w1 or 0)
    endpoint = _text(authz, "endpoint")
    kind = error_kind(common, status, flags)
    err_type = _text(authz, AUTHZ_ERROR_TYPE) if kind == "denied" else None
    if kind is not None and err_type is None:
        err_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error") \
            if status else None
    attempts = common.upstream_request_attempt_count or None
    if common.HasField("time_to_first_downstream_tx_byte"):
        ttft: float | None = _ms(common.time_to_first_downstream_tx_byte)
    else:
        ttft = None
    return (
        _text(authz, "principal_id"),
        _text(authz, "principal_kind"),
        _string_list(authz, "groups"),
        _text(authz, "tenant"),
        _text(authz, "spiffe_id"),
        _address(common.downstream_direct_remote_address),
        endpoint,
        facts.model_served(provider, model) if facts is not None and common.HasField(
            "time_to_first_upstream_tx_byte") else None,
        provider,
        facts.region(provider) if facts is not None else None,
        attempts,
        err_type,
        kind,
        w5,
        w1,
        facts.cost(model, usage_status, counts, w5, w1, endpoint == "batches.results") if facts is not None
        else None,
        ttft,
        _text(authz, AUTHZ_DECISION_ID),
        _text(authz, AUTHZ_BUNDLE_REVISION),
        ratelimit_outcome("principal_id" in authz and kind != "denied", status, flags),
    )

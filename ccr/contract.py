"""Names that cross a process boundary, defined once.

Envoy, extauth, ratelimit, the adapter and the audit receiver agree on these;
docs/contracts.md says what travels under each name. Change a name here and
every side changes with it.
"""

from __future__ import annotations

from enum import StrEnum

# Dynamic metadata namespaces.
AUTHZ_NS = "envoy.filters.http.ext_authz"  # written by extauth's CheckResponse
# The client's request headers, saved by a failover chain's first attempt and put back on every later
# one (router/chain_restore.lua, which spells it out too: tests check they agree).
CHAIN_REQUEST_NS = "ccr.chain.request"
USAGE_NS = "ccr.usage"  # written by the adapter at the end of each upstream attempt

# Fields of USAGE_NS. Token counts are numbers, or null when unknown (never a made-up 0).
USAGE_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
USAGE_STATUS = "usage_status"  # a UsageStatus value: how the counts were obtained
USAGE_NOTE = "usage_note"  # human-readable reason when the status is not `complete`


class UsageStatus(StrEnum):
    """How a request_log row's token counts were obtained (column usage_status)."""

    COMPLETE = "complete"  # the provider's final usage was read
    PARTIAL = "partial"  # the provider's cumulative count was seen, but the reply was cut off
    ESTIMATED = "estimated"  # final usage never arrived; output counted from the streamed deltas
    NOT_BILLABLE = "not_billable"  # the reply was read and carries no usage (errors, count_tokens, models): 0
    UNKNOWN = "unknown"  # a provider was called but its usage could not be read: counts NULL
    NOT_FORWARDED = "not_forwarded"  # refused or failed before reaching a provider: counts NULL

# Keys in AUTHZ_NS about the model. `model` is the concrete model served (an alias resolved, ccr/routing.py);
# AUTHZ_MODEL_REQUESTED the id as the client named it (request_log.model_requested). For an alias only,
# per request: where the upstream rewrites the client's id to `model` (router/alias.lua): AUTHZ_MODEL_SPAN
# "start,end" byte offsets of the body's top-level "model" JSON value, or AUTHZ_MODEL_PATH the request path
# with the served id (Bedrock clients name the model in the path).
AUTHZ_MODEL = "model"
AUTHZ_MODEL_REQUESTED = "model_requested"
AUTHZ_MODEL_SPAN = "model_span"
AUTHZ_MODEL_PATH = "model_path"
# Key in AUTHZ_NS: how many requests a Message Batch create carries (a number).
AUTHZ_BATCH_REQUESTS = "batch_requests"
# Key in AUTHZ_NS: the id of the decision that allowed the request (policy_decisions.decision_id).
AUTHZ_DECISION_ID = "decision_id"
# Keys in AUTHZ_NS for the audit row (docs/audit.md): the revision of the policy bundle that decided,
# and, on a refusal, the Anthropic error type the client was given (extauth also sets the decision id,
# the principal facts it had established and the bundle revision on refusals).
AUTHZ_BUNDLE_REVISION = "bundle_revision"
AUTHZ_ERROR_TYPE = "error_type"
# Keys in AUTHZ_NS the policy's result sets (policies/README.md, "Result"); absent when it sets none.
# The region the request is bound to (data residency): routing must keep the request, failover
# included, on providers of this region (string; also sent as H_REGION).
AUTHZ_REGION = "region"
# Labels for the audit row: a struct of string -> string (e.g. {"tier": "contractor"}).
AUTHZ_LABELS = "policy_labels"
# Rate-limit descriptor values: a struct of string -> string, for descriptor actions that read
# dynamic metadata (e.g. {"tier": "contractor"}).
AUTHZ_RATELIMIT = "policy_ratelimit"


# Keys in AUTHZ_NS that exist for the rate limit descriptors (Envoy's metadata action reads
# strings only): the principal id when the principal is a person (absent otherwise), and the
# principal's groups joined by RL_GROUP_SEPARATOR (absent when it has none).
AUTHZ_USER_ID = "user_id"
AUTHZ_GROUP_LIST = "group_list"
RL_GROUP_SEPARATOR = ","

# Rate limit domain of the route's descriptors.
RL_DOMAIN = "ccr"
# Descriptor entry every request carries: the principal id (from H_PRINCIPAL_ID).
RL_PRINCIPAL_KEY = "principal"
# One-entry descriptors the route sends when extauth knows the fact (docs/ratelimit.md), read
# from AUTHZ_NS metadata (never from client headers): descriptor key -> AUTHZ_NS key.
RL_KEY_KEY = "key_id"
RL_USER_KEY = "user"
RL_GROUPS_KEY = "groups"  # value: the groups joined by RL_GROUP_SEPARATOR
RL_TENANT_KEY = "tenant"
RL_SPIFFE_KEY = "spiffe_id"
RL_MODEL_KEY = "model"
RL_FACTS: tuple[tuple[str, str], ...] = (
    (RL_KEY_KEY, "key_id"), (RL_USER_KEY, AUTHZ_USER_ID), (RL_GROUPS_KEY, AUTHZ_GROUP_LIST),
    (RL_TENANT_KEY, "tenant"), (RL_SPIFFE_KEY, "spiffe_id"), (RL_MODEL_KEY, "model"),
)
# At stream end the route charges metered usage: one descriptor per kind of token, first entry
# (RL_USAGE_KEY, kind), then the principal and the facts above; hits_addend = that USAGE_NS count.
RL_USAGE_KEY = "ccr_usage"
RL_USAGE_KINDS: tuple[tuple[str, str], ...] = (
    ("input", "input_tokens"), ("output", "output_tokens"),
    ("cache_read", "cache_read_input_tokens"), ("cache_creation", "cache_creation_input_tokens"),
)

# Request headers extauth sets for the route and filters after it. Any client-sent
# header with this prefix is stripped before ext_authz runs, and all of them are
# removed before the request goes upstream.
CCR_HEADER_PREFIX = "x-ccr-"
H_PRINCIPAL_ID = "x-ccr-principal-id"  # Principal.id: what limits and audit rows key on
H_KEY_ID = "x-ccr-key-id"  # only when the credential was an API key
H_PRINCIPAL = "x-ccr-principal"
H_MODEL = "x-ccr-model"
H_PROVIDER = "x-ccr-provider"
H_CLUSTER = "x-ccr-cluster"
# Batch creates only: the number of requests in the batch; the batch-create route's rate
# limit charges that many hits (hits_addend). Removed by the route before upstream.
H_BATCH_REQUESTS = "x-ccr-batch-requests"
# The region the policy bound the request to (same value as AUTHZ_REGION); only when it did.
H_REGION = "x-ccr-region"
# Inside a failover chain's upstream filters only: the provider of this attempt's host (from the
# endpoint's metadata), which picks the credential injected; removed before the request leaves.
H_ATTEMPT_PROVIDER = "x-ccr-attempt-provider"
SET_HEADERS = (H_PRINCIPAL_ID, H_KEY_ID, H_PRINCIPAL, H_MODEL, H_PROVIDER, H_CLUSTER)

# The client's own x-request-id, moved aside by the listener before Envoy generates the
# gateway's id (the audit key). Not x-ccr-*: those are stripped from clients before ext_authz.
# Logged as request_log.client_request_id (non-unique, informational only).
H_CLIENT_REQUEST_ID = "x-client-request-id"
H_REQUEST_ID = "x-request-id"
# The region a client asks its request to be served in (input.request.region_hint). Not x-ccr-*:
# those are stripped from clients. A hint, never a binding: the policy decides (data residency),
# and the gateway removes it before the request goes upstream.
H_REGION_HINT = "ccr-region"

# gRPC initial metadata on the adapter's stream: which provider the attempt goes to.
ADAPTER_PROVIDER_MD = "x-ccr-provider"
# ... and, on the translate cluster's stream only, "1": the attempt must be a translation.
ADAPTER_TRANSLATE_MD = "x-ccr-translate"

# mTLS between the gateway's own processes (ccr/pki.py): the run's trust domain and the
# names whose SPIFFE IDs (spiffe://<domain>/<name>) each side checks.
RUN_TRUST_DOMAIN = "ccr.local"
ID_ENVOY = "envoy"  # Envoy, as a client of our gRPC services
ID_ADAPTER = "adapter"  # the provider adapter (holds provider credentials)
ID_EXTAUTH = "extauth"
ID_RATELIMIT = "ratelimit"
ID_ACCESSLOG = "accesslog"
ID_ROUTER = "router"  # the ADS server Envoy takes its config from
ID_SIGNIN = "signin"
# Every part that gets an X.509-SVID from SPIRE under `ccr up` (ccr/spire.py).
SPIFFE_PARTS = (ID_ENVOY, ID_EXTAUTH, ID_RATELIMIT, ID_ADAPTER, ID_ACCESSLOG, ID_ROUTER, ID_SIGNIN)
# SDS secret names the SPIRE agent serves to Envoy: its own SVID (by SPIFFE ID) and the trust
# bundle of the run's trust domain (by trust domain ID).
SDS_BUNDLE_NAME = f"spiffe://{RUN_TRUST_DOMAIN}"

# Sign-in (the gateway as an OIDC relying party). Envoy routes this prefix to the sign-in
# service with ext_authz off; nothing under it reaches a provider.
SIGNIN_PREFIX = "/ccr/auth/"
# PostgreSQL NOTIFY channel: payload = a session id that was revoked; extauth forgets it.
SESSIONS_CHANNEL = "ccr_signin_sessions"

# gRPC initial metadata on extauth's Check from the headers-only ext_authz filter that runs
# before the body is buffered (router/downstream.py): check identity only, no body, no model.
AUTHZ_PHASE_MD = "x-ccr-authz-phase"
AUTHZ_PHASE_IDENTITY = "identity"


# File in the run directory where extauth publishes the policy bundle in use (JSON: revision,
# digest, signed, source, entrypoint, loaded_at, last_check_at, last_error, last_error_at, pid);
# `ccr policy status` reads it. Written atomically (rename).
POLICY_STATUS_FILE = "policy-status.json"

# The policy set `policy.dir` / `policy.bundle` configure (policy_decisions.policy_set, metrics' `set` label,
# the top level of POLICY_STATUS_FILE); the sets of `policy.sets` are listed under its "sets" key by name.
POLICY_GLOBAL_SET = "global"
# Key in a service's ready file (and Runtime.metrics): host:port of its Prometheus /metrics endpoint.
READY_METRICS = "metrics"
# Key in extauth's ready file: host:port of its HTTP authorization front (services.authz_transport: http).
READY_AUTHZ_HTTP = "authz_http"

# -- Spend: budgets reserved at admission, settled at completion (docs/spend.md) -------------

# Rate limit domain of the spend descriptor; a second ratelimit filter (stage SPEND_STAGE) asks it,
# so a budget refusal has its own status (402) and the request limits stay untouched.
SPEND_DOMAIN = "ccr_spend"
SPEND_STAGE = 1
# Key in AUTHZ_NS (a JSON string, absent when nothing is billable or spend is off): the request's
# worst-case cost and who it is charged to. {"v": 1, "r": micro-USD, "p": principal id,
# "pk": principal kind, "k": key id, "g": [groups], "t": tenant, "w": SPIFFE ID, "m": model}.
AUTHZ_SPEND = "spend"
# Key in AUTHZ_NS (a number, Messages creates only): the worst-case micro-USD, also when no budget
# applies (then AUTHZ_SPEND is absent and nothing is reserved); the ledger charges it when the
# usage of a forwarded request cannot be read.
AUTHZ_SPEND_WORST = "spend_worst"
# Key in AUTHZ_NS, only on a refusal extauth made for the request-time limits or budgets (limits.admission:
# extauth): "over_limit" (429), "budget" (402) or "error" (503, the store down). The audit receiver reads
# such a refusal as Envoy's rate limit filter's own (response flag RL, or RLSE for "error"), so the row and
# the metrics say what they say when Envoy asks the rate limit service.
AUTHZ_RATELIMIT_OUTCOME = "ratelimit_outcome"
# Descriptor entries of the spend descriptor: the AUTHZ_SPEND string and the gateway's request id.
RL_SPEND_KEY = "spend"
RL_REQUEST_ID_KEY = "request_id"
# Where Envoy's rate limit filter puts RateLimitResponse.dynamic_metadata (the access log sees it).
RATELIMIT_NS = "envoy.filters.http.ratelimit"
# Fields the spend service sets in RATELIMIT_NS: the micro-USD reserved and the Redis counters it
# was reserved on (a list of strings); the audit receiver settles exactly those. When extauth reserves
# (limits.admission: extauth) the same fields are in AUTHZ_NS.
SPEND_RESERVED = "spend_reserved"
SPEND_COUNTERS = "spend_counters"
# Response header on a request admitted under a soft budget at or past a threshold (or admitted
# while budgets could not be checked). Not x-ccr-*: those are internal and stripped.
H_BUDGET_WARNING = "ccr-budget-warning"
# On a budget refusal (402 billing_error): the budget's name and when it resets (RFC 3339).
H_BUDGET = "ccr-budget"
H_BUDGET_RESET = "ccr-budget-reset"
# Extra usage fields in USAGE_NS (numbers or null): the cache writes split by lifetime, from the
# Anthropic usage object's cache_creation.ephemeral_5m_input_tokens / ephemeral_1h_input_tokens.
USAGE_CACHE_5M = "cache_creation_5m_input_tokens"
USAGE_CACHE_1H = "cache_creation_1h_input_tokens"
USAGE_CACHE_SPLIT = (USAGE_CACHE_5M, USAGE_CACHE_1H)
# Where the provider gives them: usage.cache_creation.<these>, in the order of USAGE_CACHE_SPLIT.
USAGE_CACHE_SPLIT_SOURCE = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")
# Every count a meter publishes in USAGE_NS (the split is 0 when the provider gave none).
USAGE_METERED_FIELDS = USAGE_TOKEN_FIELDS + USAGE_CACHE_SPLIT

# -- Telemetry (docs/observability.md) ------------------------------------------------------

# W3C trace context: Envoy's gRPC client sends its span's context in these initial metadata keys,
# and the access log carries the request's header of that name (ALS additional_request_headers_to_log).
H_TRACEPARENT = "traceparent"
H_TRACESTATE = "tracestate"
# Envoy's cluster for the OTLP/gRPC collector (telemetry.otlp_endpoint), used by its tracer.
OTLP_CLUSTER = "ccr_otlp"

# -- Audit rows (docs/audit.md) ---------------------------------------------------------------

# The gRPC access log's custom tag holding the provider of the endpoint that served the request's
# last attempt (Envoy reads the upstream host's metadata: failover chains name it per endpoint).
ALS_TAG_SERVED_PROVIDER = "ccr.served_provider"

# -- Body capture (docs/audit.md "Bodies"): only for principals and tenants audit.bodies names ------

# Key in AUTHZ_NS (a struct, only on a capture-enabled request extauth allowed): {"retention_days": n,
# "request": base64 of the request body as received (at most audit.body_max_bytes of it),
# "request_bytes": its full length, "request_truncated": bool}.
AUTHZ_BODY_CAPTURE = "body_capture"
# Request header extauth sets on the same requests (value: the most response bytes to keep). The
# upstream filters' capture (router/meter.lua, router/capture.lua) reads it and removes it with every
# other x-ccr-*; a client cannot send it (x-ccr-* is stripped before ext_authz).
H_CAPTURE = "x-ccr-capture"
# Namespace the capture writes (per upstream attempt; the last attempt's is what the client got):
# "max" (from H_CAPTURE, set when the request leaves), "response" (base64 of the reply body as sent to
# the client, at most "max" bytes), "response_bytes" (its full length), "response_truncated" (bool).
CAPTURE_NS = "ccr.capture"

# -- ext_authz over HTTP/1.1 (services.authz_transport: http; docs/hot-path.md) -----------------

# Envoy's http_service check requests go to extauth's HTTP front under these path prefixes (Envoy
# prepends them to the client's path, query kept): the body-buffering check, and the headers-only
# identity-first check (AUTHZ_PHASE_IDENTITY over gRPC).
AUTHZ_HTTP_FULL_PREFIX = "/ccr-authz/full"
AUTHZ_HTTP_IDENTITY_PREFIX = "/ccr-authz/identity"
# GET: 200 while the front takes checks, 503 while it drains (Envoy's HTTP health check of replicas).
AUTHZ_HTTP_HEALTH_PATH = "/ccr-authz/health"
# Request headers Envoy adds to each check (authorization_request.headers_to_add, Envoy's own values,
# after every client x-ccr-* was stripped): the downstream peer's IP, and a verified client
# certificate's URI SAN and URL-encoded PEM (CheckRequest's source.address, .principal, .certificate).
H_AUTHZ_PEER_ADDRESS = "x-ccr-authz-peer-address"
H_AUTHZ_PEER_URI = "x-ccr-authz-peer-uri"
H_AUTHZ_PEER_CERT = "x-ccr-authz-peer-cert"
# Optional, for full parity with the gRPC CheckRequest (the front works without them; send both or
# neither): the client's own Content-Length (%REQ(content-length)%, absent for a chunked upload; the
# check's own is Envoy's: 0 for an identity-first check, the buffered length for a full one) and the
# downstream protocol (%PROTOCOL%: CheckRequest http.protocol; never empty, so it tells the front that
# a missing H_AUTHZ_CONTENT_LENGTH means the client sent none).
H_AUTHZ_CONTENT_LENGTH = "x-ccr-authz-content-length"
H_AUTHZ_PROTOCOL = "x-ccr-authz-protocol"
# Every request header of a check named x-ccr-authz-* is Envoy's own (client x-ccr-* are stripped first).
H_AUTHZ_PREFIX = "x-ccr-authz-"
# One answer header per AUTHZ_NS key: H_AUTHZ_MD_PREFIX + the key with "_" as "-", its value the
# base64 of a serialized google.protobuf.Value. Envoy's header_to_metadata filters (PROTOBUF_VALUE,
# BASE64) write it into AUTHZ_NS typed, on an allow (request rules after ext_authz) and on a refusal
# (response rules before it), and remove the header. Only these keys exist on this transport.
H_AUTHZ_MD_PREFIX = "x-ccr-md-"
AUTHZ_HTTP_MD_KEYS = (
    "principal", "principal_id", "principal_kind", "groups", "key_id", AUTHZ_USER_ID, AUTHZ_GROUP_LIST,
    "tenant", "owner", "spiffe_id", AUTHZ_MODEL, AUTHZ_MODEL_REQUESTED, AUTHZ_MODEL_SPAN, AUTHZ_MODEL_PATH,
    "endpoint", "provider", "cluster", "rpm", AUTHZ_BATCH_REQUESTS, AUTHZ_REGION, AUTHZ_LABELS, AUTHZ_RATELIMIT,
    AUTHZ_DECISION_ID, AUTHZ_BUNDLE_REVISION, AUTHZ_ERROR_TYPE, AUTHZ_SPEND, AUTHZ_SPEND_WORST, SPEND_RESERVED,
    SPEND_COUNTERS, AUTHZ_RATELIMIT_OUTCOME,
)
# The body capture (AUTHZ_BODY_CAPTURE, up to audit.body_max_bytes of body) does not fit the headers
# ext_authz may add to a request (the listener's max_request_headers_kb): the answer carries it in this
# header instead, outside x-ccr-* so it is never copied onto the request. Envoy's
# dynamic_metadata_from_headers puts it into AUTHZ_NS under this name, as the string (base64 Value)
# the audit receiver decodes (audit/bodies.py).
H_AUTHZ_BODY_CAPTURE = "ccr-authz-body-capture"


def authz_md_header(key: str) -> str:
    return H_AUTHZ_MD_PREFIX + key.replace("_", "-")


# An OK answer's headers_to_remove (Envoy's own header name for it on this transport).
H_AUTHZ_HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
# Statuses an HTTP answer cannot carry as a refusal: Envoy reads 200 as "allow" (extauth's own 200
# answers, GET /v1/models) and any 5xx as the authorization server failing (an error: no body, no
# headers, and with failure_mode_allow the request goes through). So the front answers such a refusal
# with a stand-in status, and the listener's local reply mappers (on ext_authz refusals only, response
# flag UAEX) turn it back into the real one. A 5xx not listed goes out as 503's stand-in.
AUTHZ_HTTP_STATUS_STANDINS = {200: 299, 500: 470, 502: 472, 503: 473, 504: 474, 529: 479}
# The client headers extauth's answers may carry besides a policy's declared result_names.response_headers
# (the router's allowed_client_headers and allowed_client_headers_on_success list exactly these, plus
# those): a refusal's or own answer's body type, and the rate limit and budget headers of in-Check
# admission (limits.admission: extauth). extauth/http_wire.py refuses an answer with any other.
AUTHZ_HTTP_CLIENT_HEADERS = ("content-type", "retry-after", "x-envoy-ratelimited", H_BUDGET_WARNING, H_BUDGET,
                             H_BUDGET_RESET)
AUTHZ_HTTP_CLIENT_HEADER_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
# An allow's upstream (request) headers: x-ccr-* (CCR_HEADER_PREFIX, which the router allow-lists as a
# prefix; the x-ccr-md-* metadata headers are among them) and the declared result_names.headers.

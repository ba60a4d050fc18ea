"""What a running gateway resolved at start: addresses, DSNs, file paths.

`ccr up` (and the test harness, through the same code) writes this as JSON and
hands it to every service with `--runtime`; the gateway config stays as the user
wrote it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ccr.config import GatewayConfig, load_config
from ccr.pki import RunPki

# service_endpoints' key for the replicas of extauth's HTTP authorization front.
EXTAUTH_HTTP = "extauth_http"


class UpstreamOverride(BaseModel):
    """Replaces a provider's endpoint and credential variable (the built-in emulator)."""

    model_config = ConfigDict(extra="forbid")
    endpoint: str
    api_key_env: str


class Runtime(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config_path: str
    run_dir: str
    postgres_dsn: str
    redis_url: str
    # The access-log receiver's DSN (an insert-only role, ccr/audit_role.py) when ccr manages
    # PostgreSQL; None: postgres_dsn. Its directory (spool, checkpoint signing key); None: run_dir/audit.
    audit_dsn: str | None = None
    audit_dir: str | None = None
    # host:port of each gRPC service, filled in as they report ready.
    extauth: str | None = None
    # extauth's HTTP authorization front (services.authz_transport: http), host:port.
    extauth_http: str | None = None
    ratelimit: str | None = None
    adapter: str | None = None
    accesslog: str | None = None
    xds: str | None = None
    # Replicas per service (host:port each, DNS names allowed) when there is more than one place
    # to reach it (`ccr serve`); the single address above stays the first of them. Keyed by the
    # field names above: "extauth", ..., and "extauth_http" (EXTAUTH_HTTP) for extauth's HTTP fronts.
    service_endpoints: dict[str, list[str]] = {}
    # The sign-in HTTP service (host:port) and its key directory, when identity.signin is set.
    signin: str | None = None
    signin_key_dir: str | None = None
    # The gateway listener's port (chosen at start when the config says 0).
    listen_port: int | None = None
    # Compiled policy bundle (opa build -t wasm).
    policy_bundle: str | None = None
    upstream_overrides: dict[str, UpstreamOverride] = {}
    # Provider name -> the SDS file holding its credential (ccr/credentials.py), for Envoy only.
    provider_credentials: dict[str, str] = {}
    # The run's mTLS identities (paths only). A service whose identity is issued here serves
    # mutual TLS, and Envoy's cluster for it presents the `envoy` identity.
    mtls: RunPki | None = None
    # The SPIRE agent's Workload API socket (ccr/spire.py, or services.spiffe.agent_socket): when
    # set, every service serves SPIFFE mTLS with its SVID from there, and Envoy gets its SVID and
    # the trust bundle from the same socket over SDS. Takes precedence over `mtls`.
    spiffe_socket: str | None = None
    spiffe_trust_domain: str | None = None
    # Where the process starting Envoy wrote the listener's certificate SDS files (ccr/listener_tls.py);
    # None: the listener's certificate files are inline (read once).
    listener_sds_dir: str | None = None
    # Where each service process serves Prometheus /metrics: "extauth", "extauth.1", ... -> host:port.
    metrics: dict[str, str] = {}
    # Services that follow the run's config versions (ccr/config_sync.py) -> their worker count.
    # Empty: no distribution (a service started on its own reads config_path once).
    config_followers: dict[str, int] = {}

    def config(self) -> GatewayConfig:
        return load_config(self.config_path)

    def save(self, path: str | Path) -> None:
        # 0600: the DSNs carry the embedded stores' passwords.
        tmp = Path(f"{path}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.model_dump_json(indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Runtime:
        return cls.model_validate_json(Path(path).read_text())

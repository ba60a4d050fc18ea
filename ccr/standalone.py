"""`ccr serve NAME`: one part of the gateway on its own, at the address the config fixes.

`ccr up` starts everything on free ports and tells each part where the others are through a
runtime file. A deployment (containers, systemd units, a mesh) instead runs each part as its own
process, possibly several replicas each, at addresses written in the config
(`services.standalone`). This module derives the same runtime from the config alone, so every
process of a deployment agrees on where everything is without talking to the others, then
replaces itself with the service (exec): the orchestrator's PID is the service's, and its
signals (SIGTERM: report NOT_SERVING, drain, exit) reach the service directly.

PostgreSQL and Redis are external here (storage.postgres_dsn, storage.redis_url); providers are
real endpoints with credentials from the environment of `ccr serve envoy` (the only process
that reads them).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from ccr import db
from ccr.config import HOST_PORT, ConfigError, GatewayConfig, StandaloneSettings, load_config
from ccr.contract import RUN_TRUST_DOMAIN
from ccr.credentials import write_secret
from ccr.listener_tls import write_listener_sds
from ccr.pki import load_pki
from ccr.runtime import EXTAUTH_HTTP, Runtime

MODULES = {"extauth": "extauth", "ratelimit": "ratelimit", "adapter": "router.adapter", "accesslog": "audit",
           "router": "router", "signin": "signin"}
# The services that keep state in PostgreSQL: each applies pending migrations before serving
# (under an advisory lock, so replicas starting together apply each migration once).
USES_POSTGRES = frozenset({"extauth", "adapter", "accesslog", "signin"})
REPO = Path(__file__).resolve().parent.parent


def _under(base: Path, value: str) -> Path:
    p = Path(value)
    return (p if p.is_absolute() else base / p).resolve()


def state_dir(config: GatewayConfig, config_path: Path, name: str) -> Path:
    s = config.services.standalone
    assert s is not None
    data = _under(config_path.resolve().parent, config.storage.data_dir)
    return _under(data, s.state_dir) / name


def settings(config: GatewayConfig, source: str) -> StandaloneSettings:
    """services.standalone, with everything `ccr serve` needs checked at once (ConfigError)."""
    s = config.services.standalone
    if s is None:
        raise ConfigError(f"{source}: services.standalone is not set; `ccr serve` needs a fixed address for "
                          "every service (docs/standalone.md). `ccr up` runs everything locally without it.")
    problems = []
    if not config.storage.postgres_dsn:
        problems.append("storage.postgres_dsn is not set: standalone services share an external PostgreSQL")
    if not config.storage.redis_url:
        problems.append("storage.redis_url is not set: standalone services share an external Redis")
    if config.gateway.listen.port == 0:
        problems.append("gateway.listen.port is 0: the router and every Envoy must agree on a fixed port")
    if not s.pki_dir and not spiffe_agent(config):
        problems.append("neither services.spiffe.agent_socket nor services.standalone.pki_dir is set: Envoy and "
                        "the services talk mutual TLS only (point at your SPIRE agent's Workload API socket, or "
                        "create identities with `ccr pki issue DIR`)")
    if config.identity.signin is not None and s.signin is None:
        problems.append("identity.signin is set but services.standalone.signin is not")
    front = s.extauth.authz_http_listen is not None
    if config.services.authz_transport == "http" and not front:
        problems.append("services.authz_transport is http but services.standalone.extauth.authz_http_listen is "
                        "not set: say where each extauth serves its HTTP authorization front (and "
                        "authz_http_endpoints: where Envoy reaches the replicas)")
    if config.services.authz_transport != "http" and front:
        problems.append("services.standalone.extauth.authz_http_listen is set but services.authz_transport is "
                        "grpc: Envoy would never ask that front (set authz_transport: http, or remove it)")
    emulated = [p.name for p in config.providers if p.emulator]
    if emulated:
        problems.append(f"providers {', '.join(emulated)} use `emulator: true`, which only `ccr up` runs; "
                        "give them a real endpoint and api_key_env")
    if problems:
        raise ConfigError("\n".join([f"{source}: cannot serve standalone:", *(f"  - {p}" for p in problems)]))
    return s


def spiffe_agent(config: GatewayConfig) -> str | None:
    """The SPIRE agent's Workload API socket the standalone parts take their SVIDs from, if any.
    (`ccr serve` never starts a SPIRE of its own: that is the deployment's, like PostgreSQL.)"""
    sp = config.services.spiffe
    return sp.agent_socket if sp.mode == "spire" and sp.agent_socket else None


def runtime_for(config_path: Path, name: str, instance: str | None = None) -> tuple[GatewayConfig, Runtime]:
    """The runtime every standalone process derives identically from the config. `instance` names
    one of several replicas on one machine (its own state directory)."""
    config_path = config_path.resolve()
    config = load_config(config_path)
    s = settings(config, str(config_path))
    run_dir = state_dir(config, config_path, name if instance is None else f"{name}-{instance}")
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.chmod(0o700)
    assert config.storage.postgres_dsn and config.storage.redis_url  # settings() checked
    rt = Runtime(config_path=str(config_path), run_dir=str(run_dir), postgres_dsn=config.storage.postgres_dsn,
                 redis_url=config.storage.redis_url, listen_port=config.gateway.listen.port)
    _wire(rt, config, config_path, s)
    # Checkpoint key and spool shared by the receivers on this machine (each spools under its own
    # chain id); the receiver's insert-only DSN, when the operator provides one.
    rt.audit_dir = str(_under(config_path.parent, config.storage.data_dir) / "audit")
    var = config.audit.writer_dsn_env
    if var is not None and name == "accesslog":
        if not os.environ.get(var):
            raise ConfigError(f"audit.writer_dsn_env names {var}, which is not set in this environment")
        rt.audit_dsn = os.environ[var]
    rt.xds = s.router.reach()[0]
    rt.service_endpoints["router"] = s.router.reach()
    if s.signin is not None and config.identity.signin is not None:
        rt.signin = s.signin.reach()[0]
        rt.service_endpoints["signin"] = s.signin.reach()
        key_dir = config.identity.signin.key_dir
        rt.signin_key_dir = str(_under(config_path.parent, key_dir) if key_dir else state_dir(config, config_path,
                                                                                                "signin") / "keys")
    return config, rt


def _wire(rt: Runtime, config: GatewayConfig, config_path: Path, s: StandaloneSettings) -> None:
    """Where Envoy finds the decision services, its mTLS identity, and its credential files."""
    for svc in ("extauth", "ratelimit", "adapter", "accesslog"):
        reach = getattr(s, svc).reach()
        setattr(rt, svc, reach[0])
        rt.service_endpoints[svc] = reach
    if config.services.authz_transport == "http":  # extauth's HTTP fronts (settings() checked one is set)
        fronts = s.extauth.authz_http_reach()
        rt.extauth_http = fronts[0]
        rt.service_endpoints[EXTAUTH_HTTP] = fronts
    agent = spiffe_agent(config)
    if agent is not None:
        # Every hop SPIFFE mTLS: each part's SVID from the agent's Workload API (Envoy: its SDS API),
        # each service accepting only Envoy's ID, Envoy only each service's (as `ccr up` runs it).
        rt.spiffe_socket, rt.spiffe_trust_domain = agent, config.services.spiffe.trust_domain
    else:
        assert s.pki_dir is not None  # settings() checked
        rt.mtls = load_pki(_under(config_path.parent, s.pki_dir))
    # Where `ccr serve envoy` writes each provider's credential and the listener's certificate SDS
    # files; the router points Envoy there.
    creds = state_dir(config, config_path, "envoy") / "credentials"
    if config.gateway.tls is not None:
        rt.listener_sds_dir = str(state_dir(config, config_path, "envoy") / "listener-tls")
    rt.provider_credentials = {p.name: str(creds / f"{p.name}.json") for p in config.providers}


def _host_port(value: str, option: str) -> tuple[str, int]:
    if not re.match(HOST_PORT, value) or not 1 <= int(value.rpartition(":")[2]) <= 65535:
        raise ConfigError(f"{option} {value!r} is not host:port")
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _listen(config: GatewayConfig, name: str, listen: str | None) -> tuple[str, int]:
    s = config.services.standalone
    assert s is not None
    svc = getattr(s, name)
    if svc is None:
        raise ConfigError(f"services.standalone.{name} is not set")
    return _host_port(listen or svc.listen, "--listen")


def _front_port(config: GatewayConfig, name: str, host: str, port: int, listen: str | None,
                front: str | None) -> int | None:
    """The port extauth's HTTP front binds (services.authz_transport: http), on the service's `host`;
    None: no front (another service, or the gRPC transport)."""
    if front is not None and (name != "extauth" or config.services.authz_transport != "http"):
        raise ConfigError("--authz-http-listen is for extauth with services.authz_transport: http only")
    if name != "extauth" or config.services.authz_transport != "http":
        return None
    s = config.services.standalone
    assert s is not None and s.extauth.authz_http_listen is not None  # settings() checked
    if listen is not None and front is None:
        # A second replica on this machine would collide with the first one's front.
        raise ConfigError("--listen for extauth needs --authz-http-listen too (services.authz_transport: http: "
                          "each replica serves its HTTP front on a port of its own)")
    front_host, front_port = _host_port(front or s.extauth.authz_http_listen, "--authz-http-listen")
    if front_host != host:
        raise ConfigError(f"--authz-http-listen host {front_host!r} is not the --listen host {host!r}: the "
                          "service binds its gRPC port and its HTTP front on one host")
    if front_port == port:
        raise ConfigError(f"--authz-http-listen port {front_port} is the gRPC port: the HTTP front needs its own")
    return front_port


def bind_addresses(config: GatewayConfig, name: str, listen: str | None = None,
                   authz_http_listen: str | None = None) -> tuple[str, int, int | None]:
    """(host, gRPC port, HTTP front port or None) that `ccr serve NAME` binds under `config`, given its
    --listen and --authz-http-listen (ConfigError when they do not fit). What a deployment's declared
    ports must match (tests/test_deploy.py)."""
    host, port = _listen(config, name, listen)
    return host, port, _front_port(config, name, host, port, listen, authz_http_listen)


def serve(name: str, config_path: Path, *, listen: str | None = None, instance: str | None = None,
          environ: Mapping[str, str] | None = None, authz_http_listen: str | None = None) -> None:
    """Become service `name` (exec); returns only by raising (ConfigError, OSError).
    `listen` overrides the configured address (a second replica on the same machine), and
    `authz_http_listen` the address of extauth's HTTP front (services.authz_transport: http)."""
    if instance is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", instance):
        raise ConfigError(f"--instance {instance!r}: letters, digits, - and _ only")
    if name == "envoy":
        _serve_envoy(config_path, instance, os.environ if environ is None else environ)
        return
    if name not in MODULES:
        raise ConfigError(f"ccr serve: unknown service {name!r} (one of {', '.join([*MODULES, 'envoy'])})")
    config, rt = runtime_for(config_path, name, instance)
    host, port, front_port = bind_addresses(config, name, listen, authz_http_listen)
    if name in USES_POSTGRES:
        db.migrate(rt.postgres_dsn)
    if name == "accesslog":  # time partitions ahead (docs/audit.md "Retention")
        from audit.retention import make_ahead

        if (warning := make_ahead(config, rt.postgres_dsn)) is not None:
            print(f"warning: {warning}", file=sys.stderr)
    if name == "extauth" and config.policy.bundle is None:
        from extauth.bundle import build_bundle

        policy_dir = _under(Path(rt.config_path).parent, config.policy.dir)
        rt.policy_bundle = str(build_bundle(policy_dir, Path(rt.run_dir) / "policy.tar.gz", config.policy.entrypoint))
    runtime_file = Path(rt.run_dir) / "runtime.json"
    rt.save(runtime_file)
    argv = [sys.executable, "-m", MODULES[name], "--runtime", str(runtime_file), "--host", host, "--port", str(port)]
    part = getattr(settings(config, str(config_path)), name, None)
    if part is not None and part.metrics_listen:
        argv += ["--metrics-listen", part.metrics_listen]
    if front_port is not None:  # extauth's HTTP front, on the same host (ready-file key authz_http)
        argv += ["--authz-http-port", str(front_port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    os.execve(sys.executable, argv, env)


def _serve_envoy(config_path: Path, instance: str | None, environ: Mapping[str, str]) -> None:
    from ccr.supervisor import envoy_binary, provider_credentials, render_bootstrap

    config, rt = runtime_for(config_path, "envoy", instance)
    credentials = provider_credentials(config, str(rt.config_path), environ)
    for p in config.providers:
        assert p.api_key_env is not None  # provider_credentials refused it otherwise
        write_secret(Path(rt.provider_credentials[p.name]), p.name, credentials[p.api_key_env])
    del credentials
    if config.gateway.tls is not None and rt.listener_sds_dir is not None:
        write_listener_sds(config.gateway.tls, config_path.resolve().parent, Path(rt.listener_sds_dir))
    g = config.gateway
    run_dir = Path(rt.run_dir)
    bootstrap = run_dir / "envoy-bootstrap.yaml"
    spiffe = (rt.spiffe_socket, rt.spiffe_trust_domain or RUN_TRUST_DOMAIN) if rt.spiffe_socket else None
    bootstrap.write_text(render_bootstrap(f"ccr-{socket.gethostname()}-{os.getpid()}", g.admin.host, g.admin.port,
                                          rt.service_endpoints["router"], g.overload, spiffe=spiffe,
                                          protocol=g.xds.protocol))
    admin_path = run_dir / "envoy-admin-address"
    admin_path.unlink(missing_ok=True)
    argv = [envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart", "--concurrency",
            str(config.envoy_concurrency()), "--admin-address-path", str(admin_path), "-l", "warning",
            "--drain-time-s", str(int(config.services.drain_timeout_s)), "--drain-strategy", "immediate"]
    os.execv(argv[0], argv)


def _loopback(address: str) -> tuple[str, int]:
    """A listen address as a local prober reaches it: a wildcard host as loopback."""
    host, _, port = address.rpartition(":")
    return {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host), int(port)


def probe(name: str, config_path: Path, timeout_s: float = 2.0) -> str | None:
    """None when service `name` (at its configured listen address, a wildcard as loopback) reports
    SERVING on grpc.health.v1, else what is wrong; asks the adapter over mTLS as Envoy, the only
    caller it accepts. extauth under services.authz_transport: http must also answer 200 on its HTTP
    front's health path (Envoy's checks go there). For container health checks (`ccr probe NAME`)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ccr.contract import ID_ENVOY
    from ccr.service import client_credentials

    config_path = config_path.resolve()
    config = load_config(config_path)
    s = settings(config, str(config_path))
    if name not in MODULES or name == "signin":
        raise ConfigError(f"ccr probe: {name!r} has no gRPC health service (one of extauth, ratelimit, adapter, "
                          "accesslog, router)")
    if spiffe_agent(config) is not None:
        raise ConfigError("ccr probe: with services.spiffe.agent_socket every service answers only Envoy's SVID; "
                          "probe them from the orchestrator with a TCP check, or an mTLS health check that "
                          "presents Envoy's SPIFFE ID")
    host, port = _loopback(getattr(s, name).listen)
    target = f"{host}:{port}"
    if name == "adapter":
        assert s.pki_dir is not None  # settings(): no SPIFFE agent, so a pki_dir
        creds = client_credentials(load_pki(_under(config_path.parent, s.pki_dir)), ID_ENVOY)
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            return f"gRPC health at {target}: {e.code().name}"  # type: ignore[attr-defined]
    if r.status != health_pb2.HealthCheckResponse.SERVING:
        return f"gRPC health at {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}"
    front = s.extauth.authz_http_listen if name == "extauth" else None
    if front is not None:  # settings(): set exactly when services.authz_transport is http
        return _front_health(*_loopback(front), timeout_s)
    return None


def _front_health(host: str, port: int, timeout_s: float) -> str | None:
    """extauth's HTTP front answering 200 on its health path (what Envoy's HTTP health check asks), else
    what it did. Plaintext: the front speaks TLS exactly when extauth's gRPC port does (ccr/service.py
    side_tls), which standalone, without a SPIFFE agent (refused above), never makes it do."""
    import http.client

    from ccr.contract import AUTHZ_HTTP_HEALTH_PATH

    where = f"the HTTP authorization front at {host}:{port}{AUTHZ_HTTP_HEALTH_PATH}"
    conn = http.client.HTTPConnection(host.strip("[]"), port, timeout=timeout_s)
    try:
        conn.request("GET", AUTHZ_HTTP_HEALTH_PATH)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as e:
        return f"{where} did not answer: {e}"
    finally:
        conn.close()
    return None if status == 200 else f"{where} answered {status}"


def static_envoy_config(config_path: Path) -> dict:
    """The gateway's listener, routes and clusters as one static Envoy config, pointing ext_authz,
    rate limit, ext_proc and the access log at the standalone services: for an Envoy that is not
    run by `ccr serve envoy` (a mesh's own, or one managed elsewhere). Provider credentials are
    read from the SDS files `ccr serve envoy` would write (see docs/mesh.md)."""
    from router.resources import static_bootstrap

    config_path = config_path.resolve()
    config = load_config(config_path)
    s = settings(config, str(config_path))
    rt = Runtime(config_path=str(config_path), run_dir=str(state_dir(config, config_path, "envoy")),
                 postgres_dsn="unused", redis_url="unused", listen_port=config.gateway.listen.port)
    _wire(rt, config, config_path, s)
    rt.listener_sds_dir = None  # another Envoy: the listener's certificate files inline (read at load)
    doc = static_bootstrap(config, rt, config.gateway.listen.port)
    doc["node"] = {"id": "ccr-static", "cluster": "ccr-gateway"}
    g = config.gateway
    doc["admin"] = {"address": {"socket_address": {"address": g.admin.host, "port_value": g.admin.port}}}
    return doc


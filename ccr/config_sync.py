"""One gateway config version for every process of a `ccr up` run (docs/config-reload.md).

The router is the distributor: it validates an edit once, gives it the next sequence number,
writes the exact text it validated to `RUN/config/v<seq>.yaml`, and tells each following service
which version to serve in `RUN/config/targets.json`. Every follower process (each worker of
extauth, ratelimit, the adapter and the access-log receiver) watches that file, applies its
target atomically (one reference swap on the thread that serves requests) and acknowledges in
`RUN/config/acks/<service>.<worker>.json`. The router moves to the next step of a change only when
every expected acknowledgement is in (router/config_push.py).

A version is `(seq, digest)`: `seq` increases with every accepted edit of the run, `digest` is the
sha256 of the validated config's canonical JSON (comments and layout do not make a new version).

Only some sections change without a restart (HOT_SECTIONS); an edit to any other is refused
with the field named, like an invalid one, and the last good version keeps serving everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ccr import metrics
from ccr.config import ConfigError, GatewayConfig, ProviderKind, parse_config

log = logging.getLogger("ccr.config_sync")

CONFIG_DIR = "config"  # under the run directory
TARGETS_FILE = "targets.json"  # service -> {seq, digest}: the version each service must serve now
STATUS_FILE = "status.json"  # the distributor's own state (router/config_push.py)
ACKS_DIR = "acks"
# `ccr config apply --actor`: {"digest", "actor"} of the edit it is about to write, so the router's
# admin row names who made it (any other edit of the file is recorded as a file edit).
APPLY_ACTOR_FILE = "apply-actor.json"
POLL_S = 0.05  # how often a follower looks at targets.json (a stat)

# Sections applied without a restart. Everything else is read once, at start.
HOT_SECTIONS = ("gateway", "providers", "models", "limits", "files")
# gateway fields in Envoy's bootstrap or the processes' start (the others are in its xDS resources).
_GATEWAY_AT_START = ("listen", "admin", "concurrency", "overload", "xds", "tls")
# limits fields that are bound at start (the rate-limit rule directory's watcher; which process decides
# the request-time limits: Envoy's routes and extauth must switch together).
_LIMITS_AT_START = ("envoy_config_dir", "reload_interval_s", "admission")
# Provider fields that decide which secrets and processes exist: set at start, never hot.
_PROVIDER_AT_START = ("kind", "api_key_env", "emulator", "aws_access_key_id_env", "aws_secret_access_key_env",
                      "aws_session_token_env", "service_account_file_env")


@dataclass(frozen=True)
class Version:
    seq: int
    digest: str

    def label(self) -> str:
        return f"v{self.seq} ({self.digest[:12]})"

    def as_dict(self) -> dict[str, object]:
        return {"seq": self.seq, "digest": self.digest}


def digest_of(config: GatewayConfig) -> str:
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_text(text: str, source: str) -> GatewayConfig:
    """The config in `text`, validated as load_config does (ConfigError naming `source`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_config(data, source)


def restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """What `new` changes that only a restart applies; empty when the edit can go live."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    out = [f"{k}: changed, but this section is read only at start (restart the gateway to apply it)"
           for k in sorted(a) if k not in HOT_SECTIONS and a[k] != b[k]]
    out += [f"{section}.{k}: changed, but it is read only at start (restart the gateway to apply it)"
            for section, keys in (("gateway", _GATEWAY_AT_START), ("limits", _LIMITS_AT_START))
            for k in keys if a[section][k] != b[section][k]]
    before = {p.name: p for p in old.providers}
    had_pools = bool(old.pool_providers)
    for p in new.providers:
        was = before.get(p.name)
        where = f"providers.{p.name}"
        if was is not None:
            out += [f"{where}.{f}: changed, but a provider's kind and credentials are set at start"
                    for f in _PROVIDER_AT_START if getattr(was, f) != getattr(p, f)]
            if (was.pool is None) != (p.pool is None):
                out.append(f"{where}.pool: a provider becomes or stops being a GPU pool only at start")
            continue
        # Added: only what needs no credential and no process of its own (Envoy's SDS files and
        # the adapter's secrets are written at start).
        if p.kind != ProviderKind.openai or p.api_key_env or p.emulator:
            out.append(f"{where}: a new provider needs its credential (or emulator) set up at start; only an "
                       "openai-kind provider without api_key_env (a self-hosted server) can be added live")
        elif p.pool is not None and not had_pools:
            out.append(f"{where}: the first GPU pool needs the registration API, started only at start")
    return out


# -- files ---------------------------------------------------------------------------------------


def config_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_DIR


def write_json(path: Path, doc: object) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(path)  # readers see the old document or the new one, never half of one


def read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def snapshot_path(run_dir: str | Path, seq: int) -> Path:
    return config_dir(run_dir) / f"v{seq}.yaml"


def write_snapshot(run_dir: str | Path, seq: int, text: str) -> Path:
    d = config_dir(run_dir)
    (d / ACKS_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
    path = snapshot_path(run_dir, seq)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def read_targets(run_dir: str | Path) -> dict[str, Version]:
    doc = read_json(config_dir(run_dir) / TARGETS_FILE) or {}
    return {name: Version(int(v["seq"]), str(v["digest"])) for name, v in doc.items()}


def write_targets(run_dir: str | Path, targets: dict[str, Version]) -> None:
    write_json(config_dir(run_dir) / TARGETS_FILE, {n: v.as_dict() for n, v in targets.items()})


def publish_initial(run_dir: str | Path, config_path: str | Path, followers: dict[str, int]) -> Version:
    """Version 1 of a run: written before any service starts, so every one starts on it."""
    text = Path(config_path).read_text()
    config = parse_text(text, str(config_path))
    v = Version(1, digest_of(config))
    shutil.rmtree(config_dir(run_dir), ignore_errors=True)  # a previous run's versions and acknowledgements
    write_snapshot(run_dir, 1, text)
    write_targets(run_dir, dict.fromkeys(followers, v))
    write_json(config_dir(run_dir) / STATUS_FILE, {"seq": 1, "digest": v.digest, "state": "applied",
                                                   "step": "started", "updated_at": time.time()})
    return v


def load_version(run_dir: str | Path, v: Version) -> GatewayConfig:
    """The config of version `v` from its snapshot; refuses a snapshot whose digest is not `v`'s."""
    path = snapshot_path(run_dir, v.seq)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    config = parse_text(text, str(path))
    if digest_of(config) != v.digest:
        raise ConfigError(f"{path}: digest {digest_of(config)[:12]} is not {v.digest[:12]}")
    return config


def worker_id(service: str, ready_file: str | None) -> str:
    """`extauth.0`, `extauth.1`, ...: from the ready file `ccr up` gives worker i (`extauth.1.ready`)."""
    if ready_file:
        stem = Path(ready_file).name.removesuffix(".ready")
        index = stem.removeprefix(service).lstrip(".")
        if index.isdigit():
            return f"{service}.{index}"
    return f"{service}.0"


def read_acks(run_dir: str | Path) -> dict[str, dict]:
    d = config_dir(run_dir) / ACKS_DIR
    out = {}
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        doc = read_json(p)
        if doc is not None:
            out[p.stem] = doc
    return out


def expected_workers(followers: dict[str, int], services: list[str] | None = None) -> list[str]:
    return [f"{n}.{i}" for n, count in followers.items() if services is None or n in services
            for i in range(count)]


# -- the follower (in each service process) ---------------------------------------------------------

Apply = Callable[[GatewayConfig], None]


class Follower:
    """Applies this process's target version when targets.json changes, and acknowledges it.

    `apply` must swap the service's config-derived state at once (no partial state is ever served);
    it runs on the event loop (async services) or on the follower's own thread (ratelimit, whose
    swap is one attribute assignment).
    """

    def __init__(self, service: str, worker: str, run_dir: str | Path, current: Version | None) -> None:
        self.service, self.worker, self.run_dir = service, worker, Path(run_dir)
        self.current = current
        self.applies: list[Apply] = []
        self._seen: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        if current is not None:
            metrics.config_version(service, current.seq, current.digest)

    def _ack(self, v: Version, error: str | None) -> None:
        doc = {"service": self.service, "worker": self.worker, "pid": os.getpid(), "at": time.time(),
               "seq": (self.current.seq if self.current else 0), "digest": self.current.digest if self.current else "",
               "target_seq": v.seq, "error": error}
        write_json(self.run_dir / CONFIG_DIR / ACKS_DIR / f"{self.worker}.json", doc)

    def _changed(self) -> bool:
        try:
            st = (self.run_dir / CONFIG_DIR / TARGETS_FILE).stat()
        except OSError:
            return False
        key = (st.st_mtime_ns, st.st_ino, st.st_size)
        if key == self._seen:
            return False
        self._seen = key
        return True

    def check(self) -> None:
        """One look at targets.json; applies and acknowledges a new target."""
        if not self._changed():
            return
        target = read_targets(self.run_dir).get(self.service)
        if target is None or target == self.current:
            return
        try:
            config = load_version(self.run_dir, target)
            for fn in self.applies:
                fn(config)
        except Exception as e:  # noqa: BLE001 - refused, reported, and the old version keeps serving
            log.exception("config %s not applied; still serving %s", target.label(),
                          self.current.label() if self.current else "the start-up config")
            self._ack(target, f"{type(e).__name__}: {e}")
            return
        self.current = target
        metrics.config_version(self.service, target.seq, target.digest)
        log.info("config %s applied", target.label())
        self._ack(target, None)

    def _started(self) -> None:
        if self.current is not None:
            self._ack(self.current, None)  # serving: the start-up version is acknowledged

    def start_async(self) -> None:
        self._started()

        async def loop() -> None:
            while True:
                self.check()
                await asyncio.sleep(POLL_S)
        self._task = asyncio.get_running_loop().create_task(loop(), name="config-follower")

    def start_thread(self) -> None:
        self._started()

        def loop() -> None:
            while not self._stop.wait(POLL_S):
                self.check()
        self._thread = threading.Thread(target=loop, name="config-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()


_follower: Follower | None = None


def start_config(service: str, run_dir: str | Path, ready_file: str | None, config_path: str,
                 followed: bool) -> tuple[GatewayConfig, Follower | None]:
    """The config a service starts on: its target version when the run distributes versions
    (`followed`), else the config file. Also makes the process's follower (not yet started)."""
    global _follower
    if not followed:
        return _load_file(config_path), None
    target = read_targets(run_dir).get(service)
    if target is None:
        raise ConfigError(f"{config_dir(run_dir) / TARGETS_FILE}: no config version for {service}")
    config = load_version(run_dir, target)
    _follower = Follower(service, worker_id(service, ready_file), run_dir, target)
    return config, _follower


def _load_file(path: str) -> GatewayConfig:
    from ccr.config import load_config

    return load_config(path)


def on_config(fn: Apply) -> None:
    """Register what this process does with a new config version (called from a service's setup).
    Nothing happens outside a run that distributes versions."""
    if _follower is not None:
        _follower.applies.append(fn)

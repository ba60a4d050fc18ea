"""The config distributor: one edit of the gateway config reaches Envoy and every service as one
version, in an order that never lets Envoy route to a cluster a service does not know
(docs/config-reload.md).

An edit (the config file changed: an editor, or `ccr config apply`) is validated once: YAML and
schema, sections that only a restart applies (ccr.config_sync.restart_only_changes), and the
Envoy resources built from it. A refused edit is logged, counted and recorded in
RUN/config/status.json; the last good version keeps serving everywhere. An accepted one gets the
run's next sequence number and goes out in four steps, each waiting for every acknowledgement:

1. Envoy gets the clusters the new version adds (its routes and the other clusters stay as they
   were). Nothing names them yet: extauth picks the cluster of each request.
2. The adapter, ratelimit and the access-log receiver (every worker) switch to the new version:
   they know every new provider, limit and price before any request can use them. The adapter
   keeps the providers the version removes until the next one, for requests already routed there.
3. extauth (every worker) switches: requests now go to the new version's clusters, and no longer
   to removed ones.
4. Envoy gets exactly the new version: routes, changed clusters, and the removed clusters gone.

A failure before step 4 (a service refuses or does not answer in time, Envoy refuses step 1)
puts every process back on the previous version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from audit.admin_changes import (
    CONFIG_APPLY,
    CONFIG_REFUSED,
    CONFIG_START,
    AdminRecorder,
    NotRecorded,
    config_change,
    reason_text,
)
from ccr import metrics
from ccr.config import ConfigError, GatewayConfig
from ccr.config_sync import (
    APPLY_ACTOR_FILE,
    CONFIG_DIR,
    STATUS_FILE,
    Version,
    digest_of,
    expected_workers,
    load_version,
    parse_text,
    read_acks,
    read_json,
    read_targets,
    restart_only_changes,
    write_json,
    write_snapshot,
    write_targets,
)
from ccr.runtime import Runtime
from router.xds import CDS, EDS, Snapshot

log = logging.getLogger("ccr.config")

EXTAUTH = "extauth"  # switches last: it is the one that names the cluster of each request
ACK_TIMEOUT_S = 30.0
ENVOY_TIMEOUT_S = 30.0
HISTORY = 20


class Refused(Exception):
    """An edit that does not go live; the message says why."""


def grown(old: Snapshot, new: Snapshot) -> Snapshot:
    """`old` plus the clusters (and their endpoints) only `new` has."""
    by_type = dict(old.by_type)
    for t in (CDS, EDS):
        have = {n for n, _ in old.by_type.get(t, [])}
        by_type[t] = list(old.by_type.get(t, [])) + [(n, r) for n, r in new.by_type.get(t, []) if n not in have]
    return Snapshot.from_types(by_type)


def cluster_names(s: Snapshot) -> set[str]:
    return {n for n, _ in s.by_type.get(CDS, [])}


class Distributor:
    """Owns the run's config version. `publisher` is router.__main__.Publisher (base snapshot + pool endpoints)."""

    def __init__(self, publisher, runtime: Runtime, config: GatewayConfig, current: Version,
                 build: Callable[[GatewayConfig], Snapshot], recorder: AdminRecorder | None = None) -> None:
        self.pub, self.runtime, self.config, self.current, self.build = publisher, runtime, config, current, build
        # Every accepted version and every refusal goes to the admin chain (audit/admin_changes.py).
        self.recorder = recorder
        self.run_dir = Path(runtime.run_dir)
        self.status_path = self.run_dir / CONFIG_DIR / STATUS_FILE
        st = read_json(self.status_path) or {}
        self.status: dict = {"seq": current.seq, "digest": current.digest, "state": "applied",
                             "last_allocated": max(int(st.get("last_allocated") or 0), current.seq),
                             "history": st.get("history") or [], "last_error": st.get("last_error"),
                             "last_error_at": st.get("last_error_at"), "refused_digest": st.get("refused_digest"),
                             "refusals": int(st.get("refusals") or 0),
                             "admin_recorded_seq": st.get("admin_recorded_seq")}
        metrics.config_version("router", current.seq, current.digest)
        targets = read_targets(self.run_dir)
        if any(targets.get(n) != current for n in runtime.config_followers):
            # A router that stopped during a change: every service back on the version it applied.
            log.warning("services were left mid-change; putting every one back on %s", current.label())
            write_targets(self.run_dir, dict.fromkeys(runtime.config_followers, current))
        self._save()

    def _save(self, **fields: object) -> None:
        self.status.update(fields, updated_at=time.time(),
                           envoy=[{"node": n, "version": v, "answered": a} for n, v, a in self.pub.ads.streams()])
        write_json(self.status_path, self.status)

    def _refuse(self, message: str, digest: str | None) -> None:
        metrics.CONFIG_REFUSED.inc()
        log.error("config edit refused; %s keeps serving everywhere: %s", self.current.label(), message)
        self._save(state="applied", last_error=message, last_error_at=time.time(), refused_digest=digest,
                   refusals=int(self.status["refusals"]) + 1)

    # -- the admin chain ------------------------------------------------------------------------

    def _actor(self, digest: str | None, source: str) -> str:
        """`ccr config apply` leaves its actor for the digest it writes; any other edit is the file's."""
        path = self.run_dir / CONFIG_DIR / APPLY_ACTOR_FILE
        intent = read_json(path) or {}
        if digest and intent.get("digest") == digest and isinstance(intent.get("actor"), str):
            path.unlink(missing_ok=True)
            return intent["actor"]
        return f"file-edit:{source}"

    async def _record(self, action: str, target: str, before: dict | None, after: dict | None, actor: str,
                      *, must: bool) -> None:
        """must: NotRecorded when the row is not committed (the change then does not go live)."""
        if self.recorder is None:
            return
        if must:
            await asyncio.to_thread(self.recorder.record, actor, action, target, before, after)
        else:
            await asyncio.to_thread(self.recorder.record_or_keep, actor, action, target, before, after)

    async def _refused(self, message: str, digest: str | None, source: str, actor: str | None = None,
                       seq: int | None = None) -> None:
        self._refuse(message, digest)
        after = {"digest": digest, "source": source, "reason": reason_text(message),
                 "serving": self.current.as_dict()}
        if seq is not None:
            after["seq"] = seq  # recorded as config.apply, then rolled back
        await self._record(CONFIG_REFUSED, f"config:v{seq}" if seq else "config", None, after,
                           actor or self._actor(digest, source), must=False)

    async def record_start(self) -> None:
        """The version the run serves, once (a restarted router finds it recorded)."""
        if self.status.get("admin_recorded_seq") == self.current.seq:
            return
        await self._record(CONFIG_START, f"config:v{self.current.seq}", None,
                           {"seq": self.current.seq, "digest": self.current.digest,
                            "source": self.runtime.config_path}, "ccr up", must=False)
        self._save(admin_recorded_seq=self.current.seq)

    # -- one edit -------------------------------------------------------------------------------

    async def consider(self, text: str, source: str) -> None:
        """Validate an edit and, when it is new and valid, distribute it."""
        try:
            new = parse_text(text, source)
        except ConfigError as e:
            return await self._refused(str(e), None, source)
        digest = digest_of(new)
        if digest == self.current.digest:
            return
        if not self.runtime.config_followers:
            # Standalone parts (`ccr serve`) read their file once, at start: a version pushed to Envoy
            # alone would route by a config the services do not hold. Refused, never half-applied.
            return await self._refused(
                f"{source}: live config edits need the services to follow the router's versions, and "
                "standalone parts (ccr serve) read their config at start: roll every part onto the new file "
                "(docs/config-reload.md)", digest, source)
        problems = restart_only_changes(self.config, new)
        if problems:
            return await self._refused(f"{source}: " + "; ".join(problems), digest, source)
        try:
            final = self.build(new)
        except (ValueError, KeyError) as e:  # resources that cannot be built from it
            return await self._refused(f"{source}: the Envoy config cannot be built: {e}", digest, source)
        seq = int(self.status["last_allocated"]) + 1
        self.status["last_allocated"] = seq
        target = Version(seq, digest)
        actor = self._actor(digest, source)
        changed, limits_before, limits_after = config_change(self.config.model_dump(mode="json"),
                                                            new.model_dump(mode="json"))
        before: dict = {"seq": self.current.seq, "digest": self.current.digest}
        after: dict = {"seq": seq, "digest": digest, "source": source, "changed": changed}
        if limits_after is not None:
            before["limits"], after["limits"] = limits_before, limits_after
        try:
            # Recorded before it goes live: a version the admin chain does not hold never serves.
            await self._record(CONFIG_APPLY, f"config:v{seq}", before, after, actor, must=True)
        except NotRecorded as e:
            return await self._refused(f"{source}: not applied: {e}", digest, source, actor)
        self.status["admin_recorded_seq"] = seq
        write_snapshot(self.run_dir, seq, text)
        try:
            await self._apply(new, target, final)
        except Refused as e:
            return await self._refused(f"{source}: {e}", digest, source, actor, seq)

    async def _apply(self, new: GatewayConfig, target: Version, final: Snapshot) -> None:
        old, old_base = self.current, self.pub.base
        steps: list[dict] = []
        entry = {"seq": target.seq, "digest": target.digest, "from_seq": old.seq, "steps": steps,
                 "started_at": time.time()}
        self.status["history"] = (self.status["history"] + [entry])[-HISTORY:]

        def step(name: str) -> None:
            steps.append({"step": name, "at": time.time()})
            self._save(state="applying", target=target.as_dict(), step=name)
            log.info("config %s: %s", target.label(), name)

        added = cluster_names(final) - cluster_names(old_base)
        followers = self.runtime.config_followers
        first = [n for n in followers if n != EXTAUTH]
        try:
            if added:
                step(f"envoy: add clusters {', '.join(sorted(added))}")
                self.pub.base = grown(old_base, final)
                await self._envoy(self.pub.current().version, fatal=True)
            step(f"services: {', '.join(first) or '-'}")
            await self._services(first, target)
            step(f"services: {EXTAUTH if EXTAUTH in followers else '-'}")
            await self._services([EXTAUTH] if EXTAUTH in followers else [], target)
        except Refused:
            entry["result"] = "rolled back"
            await self._roll_back(old, old_base)
            raise
        removed = cluster_names(old_base) - cluster_names(final)
        step("envoy: the new version" + (f" (removes clusters {', '.join(sorted(removed))})" if removed else ""))
        self.pub.base = final
        self.pub.registry.reconfigure(new)
        refused = await self._envoy(self.pub.current().version, fatal=False)
        self.config, self.current = new, target
        metrics.config_version("router", target.seq, target.digest)
        entry["result"] = "applied" if not refused else f"applied; Envoy refused: {refused}"
        entry["done_at"] = time.time()
        self._save(state="applied", seq=target.seq, digest=target.digest, target=None, step="done")
        log.info("config %s applied everywhere (was %s)", target.label(), old.label())

    async def _envoy(self, version: str, fatal: bool) -> str:
        await self.pub.publish()
        try:
            nacks = await self.pub.ads.wait_applied(version, ENVOY_TIMEOUT_S)
        except TimeoutError as e:
            if fatal:
                raise Refused(str(e)) from None
            log.error("%s", e)
            return str(e)
        if nacks:
            msg = "; ".join(f"{n}: {m}" for n, m in sorted(nacks.items()))
            if fatal:
                raise Refused(f"Envoy refused it: {msg}")
            return msg
        return ""

    async def _services(self, names: list[str], target: Version) -> None:
        if not names:
            return
        targets = read_targets(self.run_dir)
        targets.update(dict.fromkeys(names, target))
        write_targets(self.run_dir, targets)
        await self._acked(names, target, ACK_TIMEOUT_S)

    async def _acked(self, names: list[str], target: Version, timeout: float) -> None:
        want = expected_workers({n: self.runtime.config_followers[n] for n in names})
        deadline = time.monotonic() + timeout
        while True:
            acks = read_acks(self.run_dir)
            errors = [f"{w}: {a['error']}" for w in want if (a := acks.get(w)) and a.get("target_seq") == target.seq
                      and a.get("error")]
            if errors:
                raise Refused("not applied by " + "; ".join(errors))
            missing = [w for w in want if (acks.get(w) or {}).get("seq") != target.seq
                       or (acks.get(w) or {}).get("digest") != target.digest]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise Refused(f"no acknowledgement within {timeout:.0f}s from {', '.join(missing)}")
            await asyncio.sleep(0.02)

    async def _roll_back(self, old: Version, old_base: Snapshot) -> None:
        names = list(self.runtime.config_followers)
        write_targets(self.run_dir, dict.fromkeys(names, old))
        try:
            await self._acked(names, old, ACK_TIMEOUT_S)
        except Refused as e:
            log.error("rolling back to %s: %s", old.label(), e)
        self.pub.base = old_base
        await self._envoy(self.pub.current().version, fatal=False)


def current_version(runtime: Runtime) -> tuple[Version, GatewayConfig] | None:
    """The version the run serves (a restarted router continues from it), when the run has one."""
    st = read_json(Path(runtime.run_dir) / CONFIG_DIR / STATUS_FILE)
    if not st or not st.get("seq"):
        return None
    v = Version(int(st["seq"]), str(st["digest"]))
    return v, load_version(runtime.run_dir, v)


async def watch_file(dist: Distributor, path: Path, interval: float = 0.2) -> None:
    """Considers the config file whenever it changes (and once at start: an edit made while the
    gateway started is not missed)."""
    seen: tuple[int, int, int] | None = None
    while True:
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_ino, st.st_size)
            if key != seen:
                seen = key
                await dist.consider(path.read_text(), str(path))
        except OSError as e:
            log.warning("config file %s: %s", path, e)
        except Exception:
            log.exception("config edit not applied")
        await asyncio.sleep(interval)

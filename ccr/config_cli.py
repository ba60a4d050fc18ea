"""`ccr config apply FILE` and `ccr config status`: the admin side of live config versions
(ccr/config_sync.py, router/config_push.py; docs/config-reload.md).

`apply` is authenticated by the file system: it replaces the running gateway's config file, which
only its owner can write (the run directory is 0700). It validates FILE first as the router will,
so a refused edit never reaches the file, then waits until every process serves it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from ccr.config import ConfigError
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
    restart_only_changes,
)
from ccr.runtime import Runtime


def _run(config_path: str) -> tuple[Runtime, dict]:
    from ccr.supervisor import Gateway

    run_dir = Gateway(Path(config_path)).data_dir() / "run"
    try:
        runtime = Runtime.load(run_dir / "runtime.json")
    except (OSError, ValueError):
        raise ConfigError(f"no running gateway for {config_path} (no {run_dir / 'runtime.json'}; is `ccr up` "
                          "running?)") from None
    status = read_json(run_dir / CONFIG_DIR / STATUS_FILE)
    if not status:
        raise ConfigError(f"the gateway at {run_dir} publishes no config versions (a `ccr up` before config "
                          "versions existed?)")
    return runtime, status


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds") if t else "-"


def _record_refusal(runtime: Runtime, actor: str, file: str, current: Version, digest: str | None,
                    reason: str) -> None:
    """An edit this command refuses never reaches the router: record the refusal here (best-effort)."""
    from audit.admin_changes import CONFIG_REFUSED, AdminRecorder, NotRecorded, reason_text

    try:
        AdminRecorder(runtime.postgres_dsn).record(actor, CONFIG_REFUSED, "config", None, {
            "digest": digest, "source": str(Path(file).resolve()), "reason": reason_text(reason),
            "serving": current.as_dict()})
    except NotRecorded as e:
        print(f"(the refusal is not in the admin log: {e})", file=sys.stderr)


def apply(config_path: str, file: str, wait_s: float, actor: str = "cli") -> int:
    runtime, status = _run(config_path)
    text = Path(file).read_text()
    current = Version(int(status["seq"]), str(status["digest"]))
    digest: str | None = None
    try:
        new = parse_text(text, file)  # ConfigError: exit 2, nothing written
        digest = digest_of(new)
        problems = restart_only_changes(load_version(runtime.run_dir, current), new)
        if problems:
            raise ConfigError(f"{file}: not applied (the gateway keeps serving {current.label()}):\n  "
                              + "\n  ".join(problems))
        from router.__main__ import snapshot_for

        try:
            snapshot_for(new, runtime)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{file}: the Envoy config cannot be built: {e}") from None
    except ConfigError as e:
        _record_refusal(runtime, actor, file, current, digest, str(e))
        raise
    assert digest is not None
    if digest == current.digest:
        print(f"{file}: the gateway already serves this config ({current.label()})")
        return 0
    target = Path(runtime.config_path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(target.stat().st_mode & 0o777)
    refusals = int(status.get("refusals") or 0)
    # Who makes this edit, for the router's admin row (the run directory is the owner's only).
    intent = Path(runtime.run_dir) / CONFIG_DIR / APPLY_ACTOR_FILE
    itmp = intent.with_name(f".{intent.name}.{os.getpid()}.tmp")
    itmp.write_text(json.dumps({"digest": digest, "actor": actor}))
    itmp.replace(intent)
    tmp.replace(target)  # the router sees the old file or the new one, never half of one
    status_path = Path(runtime.run_dir) / CONFIG_DIR / STATUS_FILE
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        st = read_json(status_path) or {}
        if st.get("digest") == digest and st.get("state") == "applied":
            print(f"{file}: applied as v{st['seq']} ({digest[:12]}) on Envoy and every service")
            return 0
        if st.get("refused_digest") == digest and int(st.get("refusals") or 0) > refusals:
            print(f"{file}: refused by the gateway (it keeps serving v{st.get('seq')}): {st.get('last_error')}",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"{file}: written to {target}, but not applied everywhere within {wait_s:.0f}s; see `ccr config status`",
          file=sys.stderr)
    return 1


def status(config_path: str, as_json: bool) -> int:
    """Every process's config version; exit 1 when they differ, a change is under way, or one failed."""
    runtime, st = _run(config_path)
    acks = read_acks(runtime.run_dir)
    want = expected_workers(runtime.config_followers)
    behind = [w for w in want if (acks.get(w) or {}).get("digest") != st["digest"]]
    ok = st.get("state") == "applied" and not behind
    if as_json:
        print(json.dumps({"router": st, "services": {w: acks.get(w) for w in want}, "consistent": ok}, indent=1))
        return 0 if ok else 1
    print(f"router     v{st['seq']} {st['digest'][:12]}  {st.get('state')}"
          + (f" (step: {st.get('step')}, to v{(st.get('target') or {}).get('seq')})" if st.get("state") != "applied"
             else ""))
    for e in st.get("envoy") or []:
        print(f"envoy      node {e['node'] or '?'}: xDS {e['version'] or '-'}"
              + ("" if e.get("answered") else " (not yet acknowledged)"))
    for w in want:
        a = acks.get(w) or {}
        line = f"{w:<10} v{a.get('seq', '?')} {str(a.get('digest', ''))[:12] or '-':<12} pid {a.get('pid', '-')}"
        if a.get("error"):
            line += f"  refused v{a.get('target_seq')}: {a['error']}"
        print(line)
    if st.get("last_error"):
        print(f"last refused edit ({_when(st.get('last_error_at'))}): {st['last_error']}")
    print("consistent: every process serves the same version" if ok else
          f"NOT consistent: {', '.join(behind) or 'a change is under way'}")
    return 0 if ok else 1

"""The `ccr` command: start the local gateway, manage API keys, check configs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ccr.config import SERVE_NAMES, ConfigError, json_schema, load_config
from ccr.contract import RUN_TRUST_DOMAIN
from ccr.procs import StartError

if TYPE_CHECKING:
    from ccr.supervisor import Gateway
    from extauth.keys import KeyRecord

DEFAULT_CONFIG = "ccr.yaml" if Path("ccr.yaml").exists() else "ccr.example.yaml"


def _status(name: str, detail: str) -> None:
    print(f"  \u2713 {name:<10} {detail}", flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    from ccr.supervisor import Gateway

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gw = Gateway(Path(args.config), status=_status)
    print(f"ccr: starting the gateway from {args.config}", flush=True)
    try:
        gw.start()
        key = gw.issue_local_key()
    except ConfigError:
        gw.stop()
        raise
    except StartError as e:
        print(f"ccr: failed to start:\n{e}", file=sys.stderr)
        gw.stop()
        return 1
    assert gw.runtime is not None
    from ccr.localservers import redact_url

    print(
        f"\nccr is up.\n"
        f"  gateway URL : {gw.url}\n"
        f"  API key     : {key}   (new for this run; `ccr keys create` makes lasting ones)\n"
        f"  admin       : {gw.admin_url}\n"
        f"  logs        : {gw.runtime.run_dir}/logs\n"
        f"  postgres    : {redact_url(gw.runtime.postgres_dsn)}   (password in runtime.json)\n\n"
        f"Try it:\n"
        f"  ANTHROPIC_BASE_URL={gw.url} ANTHROPIC_API_KEY={key} python -c \"import anthropic; "
        f"print(anthropic.Anthropic().messages.create(model='claude-sonnet-5-5', max_tokens=64, "
        f"messages=[{{'role':'user','content':'hello'}}]).content[0].text)\"\n\n"
        f"{_signin_hint(gw)}"
        f"Ctrl-C stops everything.",
        flush=True,
    )
    code = 0
    while not stop.wait(1.0):
        dead = gw.dead_children()
        if dead:
            for c in dead:
                print(f"ccr: {c.name} (pid {c.pid}) exited with {c.proc.returncode}; stopping.\n"
                      f"{c.log_tail(15)}", file=sys.stderr)
            code = 1
            break
    print("ccr: stopping...", flush=True)
    gw.stop()
    print("ccr: stopped.", flush=True)
    return code


def _signin_hint(gw: Gateway) -> str:
    if gw.config.identity.signin is None:
        return ""
    return (f"People sign in (no key needed): ccr login --gateway {gw.url}\n"
            f"  (device code; --browser for a browser sign-in)\n\n")


@contextlib.contextmanager
def _dsn(config_path: str) -> Iterator[str]:
    """The gateway's database: configured, the running gateway's, or embedded for the command."""
    from ccr import db
    from ccr.runtime import Runtime
    from ccr.supervisor import Gateway

    config = load_config(config_path)
    if config.storage.postgres_dsn:
        db.migrate(config.storage.postgres_dsn)
        yield config.storage.postgres_dsn
        return
    gw = Gateway(Path(config_path))
    runtime_file = gw.data_dir() / "run" / "runtime.json"
    if runtime_file.exists():
        import psycopg

        dsn = Runtime.load(runtime_file).postgres_dsn
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
        except psycopg.OperationalError:
            pass
        else:
            yield dsn
            return
    from ccr.localservers import start_postgres

    data = gw.data_dir()
    pg = start_postgres(data / "pgdata", data / "run" / "logs")
    try:
        db.migrate(str(pg.info["dsn"]))
        yield str(pg.info["dsn"])
    finally:
        pg.stop()


def _actor() -> str:
    """Who runs an admin command, for the admin log: the OS user and host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"


def _when(t: object) -> str:
    return f"{t:%Y-%m-%d %H:%M}" if t is not None else "-"


def _expiry(args: argparse.Namespace) -> dict[str, object]:
    from extauth import keys

    if args.expires_in:
        return {"expires_in": keys.parse_duration(args.expires_in)}
    if args.expires_at:
        return {"expires_at": keys.parse_instant(args.expires_at)}
    return {}


def _print_new_key(rec: KeyRecord, secret: str) -> None:
    print(f"created {rec.id} ({rec.name}) groups={','.join(rec.groups)} rpm={rec.rpm or 'default'}"
          f" owner={rec.owner or '-'} tenant={rec.tenant or '-'} expires={_when(rec.expires_at)}")
    print(f"API key (shown once, stored only as a hash): {secret}")


def cmd_keys(args: argparse.Namespace) -> int:
    from extauth import keys

    actor = getattr(args, "actor", None) or _actor()
    try:
        expiry = _expiry(args) if args.keys_cmd == "create" else {}
        grace = keys.parse_duration(args.grace) if args.keys_cmd == "rotate" else None
    except ValueError as e:
        print(f"ccr keys {args.keys_cmd}: {e}", file=sys.stderr)
        return 2
    with _dsn(args.config) as dsn:
        if args.keys_cmd == "create":
            try:
                rec, secret = keys.create_key(dsn, args.name, args.group or None, args.rpm, owner=args.owner,
                                              tenant=args.tenant, actor=actor, **expiry)  # type: ignore[arg-type]
            except ValueError as e:
                print(f"ccr keys create: {e}", file=sys.stderr)
                return 2
            _print_new_key(rec, secret)
        elif args.keys_cmd == "list":
            rows = keys.list_keys(dsn, include_revoked=args.all)
            print(f"{'id':<18} {'name':<20} {'prefix':<14} {'owner':<14} {'tenant':<10} {'groups':<20} {'rpm':>6}"
                  f"  {'created':<16}  {'expires':<16}  {'last used':<16}  status")
            now = keys.utcnow()
            for k in rows:
                status = ("revoked" if k.revoked_at else "expired" if not k.usable(now)
                          else f"rotated to {k.replaced_by}" if k.replaced_by else "active")
                print(f"{k.id:<18} {k.name:<20} {k.key_prefix:<14} {k.owner or '-':<14} {k.tenant or '-':<10} "
                      f"{','.join(k.groups):<20} {k.rpm or '-':>6}  {_when(k.created_at):<16}  "
                      f"{_when(k.expires_at):<16}  {_when(k.last_used_at):<16}  {status}")
        elif args.keys_cmd == "revoke":
            if not keys.revoke_key(dsn, args.key_id, actor=actor):
                print(f"no active key with id {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
        elif args.keys_cmd == "rotate":
            assert grace is not None
            try:
                old, new, secret = keys.rotate_key(dsn, args.key_id, grace, actor=actor)
            except keys.KeyChangeError as e:
                print(f"ccr keys rotate: {e}", file=sys.stderr)
                return 1
            print(f"rotated {old.id}: it stays valid until {_when(old.expires_at)} UTC, then is refused")
            _print_new_key(new, secret)
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    from signin import admin

    if args.sessions_cmd == "rotate-key":
        from ccr.supervisor import Gateway
        from signin.keys import KeyFileError, rotate_signing_key

        key_dir = Gateway(Path(args.config)).signin_key_dir(load_config(args.config))
        try:
            old, new = rotate_signing_key(key_dir)
        except KeyFileError as e:
            print(f"ccr sessions rotate-key: {e}", file=sys.stderr)
            return 1
        print(f"session tokens are now signed with key {new}; key {old} stays valid for tokens it signed "
              f"until they expire (the running gateway picks this up within a second)")
        return 0
    with _dsn(args.config) as dsn:
        if args.sessions_cmd == "list":
            rows = admin.list_sessions(dsn, include_ended=args.all, subject=args.user)
            print(f"{'id':<22} {'user':<28} {'flow':<12} {'groups':<20} created / refreshed / ends")
            for s in rows:
                ended = f"  revoked {s.revoked_at:%Y-%m-%d %H:%M} ({s.revoked_reason})" if s.revoked_at else ""
                print(f"{s.id:<22} {s.name[:28]:<28} {s.flow:<12} {','.join(s.groups)[:20]:<20} "
                      f"{s.created_at:%Y-%m-%d %H:%M} / {s.refreshed_at:%H:%M} / {s.expires_at:%Y-%m-%d}{ended}")
            return 0
        if (args.session_id is None) == (args.user is None):
            print("name a session id or --user SUBJECT (not both)", file=sys.stderr)
            return 2
        ended = admin.revoke_sessions(dsn, session_id=args.session_id, subject=args.user)
        if not ended:
            print("no live session matched", file=sys.stderr)
            return 1
        print(f"revoked {len(ended)} session(s): {' '.join(ended)}")
    return 0


def _gateway_url(args: argparse.Namespace) -> str:
    """--gateway, else $CCR_GATEWAY_URL, else the gateway `ccr up` runs from this config."""
    if args.gateway:
        return str(args.gateway).rstrip("/")
    if os.environ.get("CCR_GATEWAY_URL"):
        return os.environ["CCR_GATEWAY_URL"].rstrip("/")
    from ccr.runtime import Runtime
    from ccr.supervisor import Gateway

    gw = Gateway(Path(args.config))
    runtime_file = gw.data_dir() / "run" / "runtime.json"
    if runtime_file.exists():
        port = Runtime.load(runtime_file).listen_port
        host = gw.config.gateway.listen.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        if port:
            return f"{'https' if gw.config.gateway.tls else 'http'}://{host}:{port}"
    raise ConfigError("no gateway to sign in to: pass --gateway URL or set CCR_GATEWAY_URL "
                      "(or start one here with `ccr up`)")


def cmd_login(args: argparse.Namespace) -> int:
    from ccr import login

    path = Path(args.session_file).expanduser() if args.session_file else login.default_session_file()
    try:
        if args.print_token:
            print(login.current_token(path))
            return 0
        gateway = _gateway_url(args)
        if args.browser:
            doc = login.browser_login(gateway, sys.stdout, open_browser=not args.no_open)
        else:
            doc = login.device_login(gateway, sys.stdout)
        login.save_session(path, doc)
    except login.LoginError as e:
        print(f"ccr login: {e}", file=sys.stderr)
        return 1
    print(login.usage_text(doc, path), flush=True)
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from ccr import login

    path = Path(args.session_file).expanduser() if args.session_file else login.default_session_file()
    try:
        login.logout(path)
    except login.LoginError as e:
        print(f"ccr logout: {e}", file=sys.stderr)
        return 1
    print(f"signed out; removed {path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_cmd in ("apply", "status"):
        from ccr import config_cli

        if args.config_cmd == "apply":
            return config_cli.apply(args.config, args.file, args.wait, args.actor or _actor())
        return config_cli.status(args.config, args.json)
    if args.config_cmd == "schema":
        print(json_schema())
        return 0
    if args.config_cmd == "envoy":
        from ccr.standalone import static_envoy_config

        print(json.dumps(static_envoy_config(Path(args.config)), indent=2))
        return 0
    cfg = load_config(args.file)
    rules = ""
    if cfg.limits.envoy_config_dir is not None:
        from ratelimit.envoy_config import RuleConfigError, load_dir
        from ratelimit.service import rule_dir

        directory = rule_dir(cfg.limits, args.file)
        assert directory is not None
        try:
            loaded = load_dir(directory)
        except (RuleConfigError, OSError) as e:
            raise ConfigError(f"{args.file}: limits.envoy_config_dir: {e}") from None
        rules = f", {len(loaded.files)} rate limit config file(s) in {directory}"
    print(f"{args.file}: OK ({len(cfg.providers)} provider(s), {len(cfg.models)} model route(s){rules})")
    return 0


def _policy_paths(config_path: str):
    """The config, and `policy.dir` resolved against the config file (as `ccr up` does)."""
    config = load_config(config_path)
    return config, (Path(config_path).resolve().parent / config.policy.dir).resolve()


def _policy_set(config, name: str | None):
    """(bundle source, verification, entrypoint) of the global set, or of the `policy.sets` entry `name`."""
    from ccr.contract import POLICY_GLOBAL_SET

    if name is None or name == POLICY_GLOBAL_SET:
        return config.policy.bundle, config.policy.verification, config.policy.entrypoint
    for s in config.policy.sets:
        if s.name == name:
            return s.bundle, s.verification, s.decision_path
    known = ", ".join([POLICY_GLOBAL_SET, *(s.name for s in config.policy.sets)])
    raise ConfigError(f"no policy set {name!r} in the config (sets: {known})")


def cmd_policy(args: argparse.Namespace) -> int:
    from extauth.bundle import BundleError, build_bundle, find_opa, read_bundle

    try:
        if args.policy_cmd == "build":
            config, pdir = _policy_paths(args.config)
            _, ver, entrypoint = _policy_set(config, args.set)
            entrypoint = args.entrypoint or entrypoint
            if args.dir:
                pdir = Path(args.dir).resolve()
            alg = args.alg or (ver.alg if ver else "RS256")
            key_id = args.key_id or (ver.key_id if ver and ver.key_id != "default" else None)
            if args.signing_key is None and (args.alg or args.key_id or args.scope):
                print("ccr policy build: --alg/--key-id/--scope need --signing-key", file=sys.stderr)
                return 2
            out = build_bundle(pdir, args.out, entrypoint, revision=args.revision,
                               signing_key=args.signing_key, signing_alg=alg, key_id=key_id, scope=args.scope)
            b = read_bundle(out)
            print(f"built {out}: revision {b.revision or '(none)'}, sha256 {b.digest[:12]}, "
                  f"entrypoint {entrypoint}, " + (f"signed ({alg})" if b.signed else "unsigned"))
            return 0
        if args.policy_cmd == "verify":
            from extauth.bundle_signing import BundleVerifier

            config = load_config(args.config)
            _, ver, _ = _policy_set(config, args.set)
            if ver is None:
                where = f"policy set {args.set!r}" if args.set else "policy"
                print(f"ccr policy verify: no verification for {where} in the config", file=sys.stderr)
                return 2
            key_file = Path(args.config).resolve().parent / ver.key_file
            b = read_bundle(args.bundle, BundleVerifier.from_file(key_file, ver.alg, ver.key_id, ver.scope))
            print(f"{args.bundle}: signature OK ({ver.alg}, key id {ver.key_id}), "
                  f"revision {b.revision or '(none)'}, {len(b.files)} files, sha256 {b.digest[:12]}")
            return 0
        if args.policy_cmd == "push":
            return _policy_push(args)
        if args.policy_cmd == "sign":
            return _policy_sign(args)
        if args.policy_cmd == "test":
            import subprocess

            _, pdir = _policy_paths(args.config)
            return subprocess.run([find_opa(), "test", *(["-v"] if args.verbose else []), str(pdir)]).returncode
    except BundleError as e:
        print(f"ccr policy {args.policy_cmd}: {e}", file=sys.stderr)
        return 1
    return _policy_status(args)


def _policy_push(args: argparse.Namespace) -> int:
    """PUT a bundle to the bundle server, or install it at the bundle path extauth watches, after
    checking it as extauth will (signature, WASM)."""
    from extauth.bundle import read_bundle
    from extauth.bundle_signing import BundleVerifier

    config = load_config(args.config)
    base = Path(args.config).resolve().parent
    source, ver, _ = _policy_set(config, args.set)
    if args.url and args.path:
        print("ccr policy push: give --url or --path, not both", file=sys.stderr)
        return 2
    url = args.url or (source.url if source and not args.path else None)
    dest = None if url else (Path(args.path) if args.path else base / source.path if source and source.path else None)
    if not url and dest is None:
        print("ccr policy push: no --url/--path and no bundle url or path for this set in the config",
              file=sys.stderr)
        return 2
    verifier = BundleVerifier.from_file(base / ver.key_file, ver.alg, ver.key_id, ver.scope) if ver else None
    b = read_bundle(args.bundle, verifier)  # BundleError: refused here, not by every extauth later
    signed = verifier is not None

    def push() -> int:
        if dest is not None:
            return _install_bundle(Path(args.bundle), dest, b, signed)
        assert url is not None
        return _put_bundle(args, url, b, signed)

    return _recorded_push(args, b, str(dest or url), push)


def _recorded_push(args: argparse.Namespace, b, destination: str, push) -> int:
    """The push and its `policy.push` admin row commit together: the row is written first, in a
    transaction that commits only after the bundle is installed or uploaded (a failed push leaves no
    row). extauth records the revision again when it goes live (`policy.activate`)."""
    import psycopg

    from audit.admin import append_admin
    from audit.admin_changes import POLICY_PUSH
    from ccr.contract import POLICY_GLOBAL_SET
    from extauth.policy_admin import policy_target

    name = args.set or POLICY_GLOBAL_SET
    with _dsn(args.config) as dsn:
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn, conn.transaction():
                append_admin(conn, args.actor or _actor(), POLICY_PUSH, policy_target(name), None, {
                    "set": name, "revision": b.revision, "digest": b.digest, "signed": b.signed,
                    "destination": destination})
                code = push()
                if code != 0:
                    raise _PushFailed(code)
        except _PushFailed as e:
            return e.code
        except psycopg.Error as e:
            print(f"ccr policy push: the admin log write failed ({str(e).strip()}); the bundle may be live without "
                  "its policy.push row (extauth records its activation)", file=sys.stderr)
            return 1
    return 0


class _PushFailed(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _put_bundle(args: argparse.Namespace, url: str, b, signed: bool) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=Path(args.bundle).read_bytes(), method="PUT",
                                 headers={"Content-Type": "application/gzip"})
    if args.token_file:
        req.add_header("Authorization", f"Bearer {Path(args.token_file).read_text().strip()}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            code = resp.status
    except urllib.error.HTTPError as e:
        print(f"ccr policy push: {url} answered HTTP {e.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"ccr policy push: {url}: {e}", file=sys.stderr)
        return 1
    print(f"pushed {args.bundle} (revision {b.revision or '(none)'}, sha256 {b.digest[:12]}"
          f"{', signature OK' if signed else ''}) to {url}: HTTP {code}")
    return 0


def _install_bundle(bundle: Path, dest: Path, b, signed: bool) -> int:
    """Put a checked bundle where a `bundle.path` source reads it: written beside it, then renamed over
    it, so extauth (which re-reads the file when it changes) never sees half a bundle."""
    import tempfile

    if dest.is_dir():
        print(f"ccr policy push: {dest} is a bundle directory; push installs a .tar.gz bundle file "
              "(point bundle.path at a file)", file=sys.stderr)
        return 2
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bundle.read_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        print(f"ccr policy push: {dest}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"pushed {bundle} (revision {b.revision or '(none)'}, sha256 {b.digest[:12]}"
          f"{', signature OK' if signed else ''}) to {dest}")
    return 0


def _policy_sign(args: argparse.Namespace) -> int:
    """Sign an existing bundle (`opa build` output, or one from elsewhere) as `opa build --signing-key` does."""
    from extauth.bundle import BundleError, read_bundle
    from extauth.bundle_signing import sign_bundle_file

    config = load_config(args.config)
    _, ver, _ = _policy_set(config, args.set)
    alg = args.alg or (ver.alg if ver else "RS256")
    key_id = args.key_id or (ver.key_id if ver and ver.key_id != "default" else None)
    out = Path(args.out or args.bundle)
    try:
        key = Path(args.signing_key).read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read signing key {args.signing_key}: {e.strerror}") from None
    sign_bundle_file(Path(args.bundle), out, key, alg, key_id=key_id, scope=args.scope)
    b = read_bundle(out)
    print(f"signed {out} ({alg}{f', key id {key_id}' if key_id else ''}): revision {b.revision or '(none)'}, "
          f"{len(b.files)} files, sha256 {b.digest[:12]}")
    return 0


def _policy_status(args: argparse.Namespace) -> int:
    import datetime as dt

    import orjson

    from ccr.supervisor import Gateway
    from extauth.bundle_source import STATUS_FILE

    path = Gateway(Path(args.config)).data_dir() / "run" / STATUS_FILE
    try:
        st = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        print(f"ccr policy status: no policy status at {path} (is `ccr up` running?)", file=sys.stderr)
        return 1
    sets = st.get("sets") or {}  # policy.sets (extauth/policy_sets.py), next to the global set
    failing = bool(st.get("last_error")) or any(s.get("last_error") for s in sets.values())
    if args.json:
        print(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode())
        return 1 if failing else 0

    def when(t: float | None) -> str:
        return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds") if t else "-"

    def show(s: dict) -> None:
        print(f"revision   : {s.get('revision') or '(none)'}\n"
              f"sha256     : {s.get('digest') or '-'}\n"
              f"signed     : {s.get('signed')}\n"
              f"source     : {s.get('source')}\n"
              f"entrypoint : {s.get('entrypoint')}\n"
              f"loaded at  : {when(s.get('loaded_at'))}\n"
              f"checked at : {when(s.get('last_check_at'))}")
        if s.get("last_error"):
            print(f"last error : {s['last_error']} (at {when(s.get('last_error_at'))}); "
                  + ("the revision above keeps serving" if s.get("digest") else "no bundle serves this set yet"))

    if sets:
        print("set global")
    show(st)
    for name, s in sets.items():
        tenants = s.get("tenants")
        print(f"\nset {name} ({s.get('mode')}{', shadow' if s.get('shadow') else ''}, "
              + (f"tenants {', '.join(tenants)}" if tenants else "every principal") + ")")
        show(s)
    return 1 if failing else 0


def cmd_policy_why(args: argparse.Namespace) -> int:
    """The decision(s) recorded for a request id (Envoy's x-request-id) or a decision id."""
    from datetime import UTC

    from extauth.decisions import why

    with _dsn(args.config) as dsn:
        decisions, audit = why(dsn, args.request_id)
    if not decisions:
        print(f"ccr policy why: no decision recorded for {args.request_id!r} (decisions are written within "
              "a second; a request refused by Envoy itself never reached the policy)", file=sys.stderr)
        return 1
    for d in decisions:
        principal = f"{d['principal_name']} ({d['principal_kind']} {d['principal_id']})" if d["principal_id"] else "-"
        ts = d["ts"].astimezone(UTC)
        print(f"decision {d['decision_id']}  {ts:%Y-%m-%d %H:%M:%S.%f}Z  request {d['request_id'] or '-'}\n"
              f"  result    : {'allow' if d['allow'] else 'deny'} (HTTP {d['status']}, {d['phase']} check)\n"
              f"  reason    : {d['reason'] or '-'}\n"
              f"  principal : {principal}\n"
              f"  request   : {d['method']} {d['path']}  endpoint {d['endpoint'] or '-'}  model {d['model'] or '-'}\n"
              f"  policy    : set {d.get('policy_set') or 'global'}"
              f"{' (shadow: logged, not enforced)' if d.get('shadow') else ''}"
              f"  bundle {d['bundle_revision'] or (d['bundle_digest'] or '-')[:12]}  input sha256 "
              f"{d['input_sha256'] or '- (policy not reached)'}  "
              f"eval {'-' if d['eval_us'] is None else str(d['eval_us']) + ' us'}")
    if audit is None:
        print("request_log: no row (yet) for this request")
    else:
        print(f"request_log: status {audit['status']}  model {audit['model'] or '-'}  "
              f"cluster {audit['upstream_cluster'] or '-'}  usage {audit['usage_status'] or '-'}")
    return 0


def add_policy_why(sub: argparse._SubParsersAction) -> None:
    """`ccr policy why REQUEST_ID` (the `policy` group may already hold other subcommands)."""
    pol = sub.choices.get("policy")
    if pol is None:
        pol = sub.add_parser("policy", help="Rego policy tools")
        pol.add_subparsers(dest="policy_cmd", required=True)
    ps = next(a for a in pol._actions if isinstance(a, argparse._SubParsersAction))
    w = ps.add_parser("why", help="print the decision recorded for a request id (x-request-id) or decision id")
    w.add_argument("request_id", help="the request's x-request-id (response header), or a dec_... decision id")
    w.set_defaults(func=cmd_policy_why)
    w.add_argument("-c", "--config", default=argparse.SUPPRESS, help="gateway config YAML (as `ccr -c`)")


def cmd_serve(args: argparse.Namespace) -> int:
    from ccr.standalone import serve

    serve(args.service, Path(args.config), listen=args.listen, instance=args.instance,
          authz_http_listen=args.authz_http_listen)  # execs the service
    return 1


def cmd_probe(args: argparse.Namespace) -> int:
    from ccr.standalone import probe

    problem = probe(args.service, Path(args.config))
    print(f"{args.service}: SERVING" if problem is None else f"{args.service}: not serving ({problem})")
    return 0 if problem is None else 1


def cmd_pki_issue(args: argparse.Namespace) -> int:
    from ccr.contract import ID_ADAPTER, ID_ENVOY
    from ccr.pki import PKI_FILE, issue_run_pki, save_pki

    directory = Path(args.dir)
    if args.keep and (directory / PKI_FILE).is_file():
        print(f"{directory} already holds identities; kept")
        return 0
    if directory.exists() and any(directory.iterdir()) and not args.force:
        print(f"{directory} is not empty; --force replaces what is there (new CA: every part needs the new files)",
              file=sys.stderr)
        return 2
    pki = issue_run_pki(directory, [ID_ENVOY, ID_ADAPTER], trust_domain=args.trust_domain, extra_ips=args.ip)
    save_pki(pki, directory)
    print(f"issued {', '.join(i.spiffe_id for i in pki.identities.values())} under {directory} "
          f"(CA {pki.ca}; its key was not kept)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ccr", description="Envoy-native gateway for LLM traffic")
    ap.add_argument("-c", "--config", default=os.environ.get("CCR_CONFIG", DEFAULT_CONFIG),
                    help="gateway config YAML (default: ./ccr.yaml, else ./ccr.example.yaml)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start the whole gateway locally; Ctrl-C stops it").set_defaults(func=cmd_up)

    keys = sub.add_parser("keys", help="gateway API keys")
    keys.set_defaults(func=cmd_keys)
    ks = keys.add_subparsers(dest="keys_cmd", required=True)
    c = ks.add_parser("create", help="create a key; the key is printed once")
    c.add_argument("name")
    c.add_argument("--group", action="append", help="policy group (repeatable; default: default)")
    c.add_argument("--rpm", type=int, help="requests per minute for this key")
    lst = ks.add_parser("list", help="list keys (never the keys themselves)")
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    c.add_argument("--owner", help="who answers for the key (a person or team)")
    c.add_argument("--tenant", help="tenant the key belongs to")
    exp = c.add_mutually_exclusive_group()
    exp.add_argument("--expires-in", metavar="DURATION", help="lifetime, e.g. 90d, 12h, 1h30m")
    exp.add_argument("--expires-at", metavar="TIME",
                     help="expiry instant, ISO 8601 with offset, e.g. 2027-01-31T00:00Z")
    r = ks.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    rot = ks.add_parser("rotate", help="issue a successor key; the old one stays valid for the grace period")
    rot.add_argument("key_id")
    rot.add_argument("--grace", default="0s", metavar="DURATION",
                     help="how long the old key keeps working, e.g. 1h (default: 0s, refused at once)")
    for p in (c, r, rot):
        p.add_argument("--actor", help="who is making the change, for the admin log (default: cli:USER@HOST)")

    ss = sub.add_parser("sessions", help="sign-in sessions (`ccr login`): list, revoke")
    ss.set_defaults(func=cmd_sessions)
    sss = ss.add_subparsers(dest="sessions_cmd", required=True)
    sl = sss.add_parser("list", help="live sessions (--all: ended ones too)")
    sl.add_argument("--all", action="store_true")
    sl.add_argument("--user", help="only this subject (the IdP's user id)")
    sr = sss.add_parser("revoke", help="end a session, or every session of --user; effective within a second")
    sr.add_argument("session_id", nargs="?")
    sr.add_argument("--user", help="revoke every live session of this subject (offboarding)")
    sss.add_parser("rotate-key", help="sign session tokens with a new key (the previous one keeps verifying)")

    lg = sub.add_parser("login", help="sign in through the gateway's identity provider (short-lived session)")
    lg.set_defaults(func=cmd_login)
    lg.add_argument("--gateway", help="gateway URL (default: $CCR_GATEWAY_URL, else the local `ccr up`)")
    lg.add_argument("--session-file", help="where the session is kept (default: ~/.config/ccr/session.json)")
    lg.add_argument("--browser", action="store_true",
                    help="sign in in a browser (authorization code + PKCE, loopback redirect) instead of with a code")
    lg.add_argument("--no-open", action="store_true", help="with --browser: print the URL, do not open a browser")
    lg.add_argument("--print-token", action="store_true",
                    help="print only a valid session token, refreshing it if needed (for Claude Code's apiKeyHelper)")
    lo = sub.add_parser("logout", help="end the session `ccr login` started")
    lo.set_defaults(func=cmd_logout)
    lo.add_argument("--session-file", help="default: ~/.config/ccr/session.json")

    pol = sub.add_parser("policy", help="OPA policy bundles: build, sign, verify, push, test, status")
    pol.set_defaults(func=cmd_policy)
    ps = pol.add_subparsers(dest="policy_cmd", required=True)
    pb = ps.add_parser("build", help="compile policy.dir with `opa build -t wasm` (the configured entrypoint)")
    pb.add_argument("--out", default="bundle.tar.gz", help="bundle file to write (default: bundle.tar.gz)")
    pb.add_argument("--revision", help="the bundle's .manifest revision")
    pb.add_argument("--signing-key", help="sign the bundle: PEM private key (RS*/PS*/ES*) or HS* secret file")
    pb.add_argument("--alg", help="signing algorithm (default: policy.verification.alg, else RS256)")
    pb.add_argument("--key-id", help="key id in the signature (default: policy.verification.key_id)")
    pb.add_argument("--scope", help="scope claim in the signature")
    pb.add_argument("--dir", help="Rego sources to compile (default: policy.dir)")
    pb.add_argument("--entrypoint", help="default: the set's entrypoint (policy.entrypoint for the global set)")
    pv = ps.add_parser("verify", help="check a bundle's signature with policy.verification, as extauth will")
    pv.add_argument("bundle", help="bundle .tar.gz or directory")
    pp = ps.add_parser("push", help="verify a bundle as extauth will, then PUT it to the bundle server "
                       "(or install it at the bundle path)")
    pp.add_argument("bundle", help="bundle .tar.gz")
    pp.add_argument("--url", help="where to PUT it (default: policy.bundle.url)")
    pp.add_argument("--path", help="install it at this file instead (default, with no url: policy.bundle.path)")
    pp.add_argument("--token-file", help="file with a bearer token for the bundle server")
    pp.add_argument("--actor", help="who is pushing, for the admin log (default: cli:USER@HOST)")
    psg = ps.add_parser("sign", help="sign an existing bundle (.tar.gz) as `opa build --signing-key` does")
    psg.add_argument("bundle", help="bundle .tar.gz")
    psg.add_argument("--signing-key", required=True, help="PEM private key (RS*/PS*/ES*) or HS* secret file")
    psg.add_argument("--out", help="signed bundle to write (default: replace BUNDLE)")
    psg.add_argument("--alg", help="signing algorithm (default: policy.verification.alg, else RS256)")
    psg.add_argument("--key-id", help="key id in the signature (default: policy.verification.key_id)")
    psg.add_argument("--scope", help="scope claim in the signature")
    pt = ps.add_parser("test", help="run `opa test` on policy.dir")
    pt.add_argument("-v", "--verbose", action="store_true")
    pst = ps.add_parser("status", help="the bundle revision extauth is serving, and its last refusal")
    pst.add_argument("--json", action="store_true", help="print RUN/policy-status.json as is")
    for p in (pb, pv, pp, psg):
        p.add_argument("--set", help="a policy.sets name: its verification (and url, entrypoint) are the defaults")
    for p in (pb, pv, pp, psg, pt, pst):
        p.add_argument("-c", "--config", default=argparse.SUPPRESS, help="gateway config YAML (as `ccr -c`)")

    cfg = sub.add_parser("config", help="gateway config tools")
    cfg.set_defaults(func=cmd_config)
    cs = cfg.add_subparsers(dest="config_cmd", required=True)
    chk = cs.add_parser("check", help="validate a config file")
    chk.add_argument("file")
    cs.add_parser("schema", help="print the config's JSON Schema")
    ap_ = cs.add_parser("apply", help="validate FILE and make it the running gateway's config, with no restart "
                                      "(waits until Envoy and every service serve it)")
    ap_.add_argument("file")
    ap_.add_argument("--wait", type=float, default=60.0, help="seconds to wait for every process (default 60)")
    ap_.add_argument("--actor", help="who is making the change, for the admin log (default: cli:USER@HOST)")
    cst = cs.add_parser("status", help="the config version Envoy, the router and every service process serve")
    cst.add_argument("--json", action="store_true")
    cs.add_parser("envoy", help="print a static Envoy config (JSON) that uses the standalone services "
                                "(services.standalone): for an Envoy you run yourself, e.g. a mesh's")

    srv = sub.add_parser("serve", help="run one part of the gateway on its own, at the address "
                                       "services.standalone fixes (containers, systemd, a mesh)")
    srv.add_argument("service", choices=SERVE_NAMES)
    srv.add_argument("--listen", help="host:port to bind instead of the configured one (another replica)")
    srv.add_argument("--instance", help="name of this replica on this machine (its own state directory)")
    srv.add_argument("--authz-http-listen", help="extauth with services.authz_transport: http: host:port of this "
                     "replica's HTTP front instead of the configured one (with --listen)")
    srv.set_defaults(func=cmd_serve)
    prb = sub.add_parser("probe", help="exit 0 when a standalone service reports SERVING (container health checks; "
                         "with services.authz_transport: http, extauth's HTTP front must also answer 200)")
    prb.add_argument("service", choices=("extauth", "ratelimit", "adapter", "accesslog", "router"))
    prb.set_defaults(func=cmd_probe)
    pki = sub.add_parser("pki", help="mTLS identities for standalone services")
    pkis = pki.add_subparsers(dest="pki_cmd", required=True)
    pi = pkis.add_parser("issue", help="issue a fresh CA and the Envoy and adapter identities into DIR")
    pi.add_argument("dir")
    pi.add_argument("--trust-domain", default=RUN_TRUST_DOMAIN)
    pi.add_argument("--ip", action="append", default=[], help="an IP SAN to add (the adapter's address)")
    keep = pi.add_mutually_exclusive_group()
    keep.add_argument("--force", action="store_true", help="replace identities already in DIR")
    keep.add_argument("--keep", action="store_true", help="exit 0 without change if DIR already holds identities "
                      "(an init step run on every start)")
    pi.set_defaults(func=cmd_pki_issue)

    add_policy_why(sub)
    from audit.cli import add_parser as add_audit_parser
    from ccr import limits_cli, spend_cli

    add_audit_parser(sub)
    spend_cli.add_parsers(sub, _dsn, _actor)
    limits_cli.add_parsers(sub, _actor)
    config_on_every_command(ap)
    return ap


def config_on_every_command(parser: argparse.ArgumentParser) -> None:
    """Accept -c/--config after any subcommand too (`ccr up -c my.yaml`, `ccr keys list -c x.yaml`),
    where users type it. SUPPRESS keeps the top-level value (or its default) when it is not repeated."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in set(action.choices.values()):
            if "--config" not in child._option_string_actions:
                child.add_argument("-c", "--config", default=argparse.SUPPRESS,
                                   help="gateway config YAML (as `ccr -c`)")
            config_on_every_command(child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `ccr` command: start the local gateway, manage API keys, check configs."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ccr.config import ConfigError, json_schema, load_config
from ccr.procs import StartError

if TYPE_CHECKING:
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
        f"print(anthropic.Anthropic().messages.create(model='claude-sonnet-4-5', max_tokens=64, "
        f"messages=[{{'role':'user','content':'hello'}}]).content[0].text)\"\n\n"
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


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_cmd == "schema":
        print(json_schema())
        return 0
    cfg = load_config(args.file)
    print(f"{args.file}: OK ({len(cfg.providers)} provider(s), {len(cfg.models)} model route(s))")
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

    cfg = sub.add_parser("config", help="gateway config tools")
    cfg.set_defaults(func=cmd_config)
    cs = cfg.add_subparsers(dest="config_cmd", required=True)
    chk = cs.add_parser("check", help="validate a config file")
    chk.add_argument("file")
    cs.add_parser("schema", help="print the config's JSON Schema")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

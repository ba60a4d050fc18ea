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

from ccr.config import ConfigError, json_schema, load_config
from ccr.procs import StartError

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


def cmd_keys(args: argparse.Namespace) -> int:
    from extauth import keys

    with _dsn(args.config) as dsn:
        if args.keys_cmd == "create":
            rec, secret = keys.create_key(dsn, args.name, args.group or None, args.rpm)
            print(f"created {rec.id} ({rec.name}) groups={','.join(rec.groups)} rpm={rec.rpm or 'default'}")
            print(f"API key (shown once, stored only as a hash): {secret}")
        elif args.keys_cmd == "list":
            rows = keys.list_keys(dsn, include_revoked=args.all)
            print(f"{'id':<18} {'name':<20} {'prefix':<14} {'groups':<20} {'rpm':>6}  created / revoked")
            for k in rows:
                revoked = f" revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else ""
                print(f"{k.id:<18} {k.name:<20} {k.key_prefix:<14} {','.join(k.groups):<20} "
                      f"{k.rpm or '-':>6}  {k.created_at:%Y-%m-%d %H:%M}{revoked}")
        elif args.keys_cmd == "revoke":
            if not keys.revoke_key(dsn, args.key_id):
                print(f"no active key with id {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
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
    r = ks.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")

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

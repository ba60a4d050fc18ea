"""`ccr audit verify | query | export` (registered by ccr/cli.py)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg import sql

from audit.chain import CHECKPOINT_LOG, PUBLIC_KEY_FILE, canonical, load_public_key
from audit.entry import COLUMNS

_RELATIVE = re.compile(r"(\d+)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO-8601 (a date alone is midnight UTC; no zone means UTC) or a span back from now (30m, 2h, 7d)."""
    m = _RELATIVE.fullmatch(text.strip())
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=int(m[1]) * _UNIT[m[2]])
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (ISO-8601 like 2025-11-25T12:00Z, or 30m, 2h, 7d)"
                                          ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _audit_dir(config_path: str) -> Path:
    from ccr.supervisor import Gateway

    return Gateway(Path(config_path)).data_dir() / "audit"


def cmd_verify(args: argparse.Namespace) -> int:
    from audit.verify import verify
    from ccr.cli import _dsn

    key_files = [Path(p) for p in args.public_key] or [_audit_dir(args.config) / PUBLIC_KEY_FILE]
    missing = [str(p) for p in key_files if not p.exists()]
    if missing:
        print(f"no public key at {', '.join(missing)} (the access-log receiver writes signing.pub on its first "
              "start; pass --public-key FILE)", file=sys.stderr)
        return 2
    keys = [load_public_key(p) for p in key_files]
    copy = Path(args.checkpoints) if args.checkpoints else _audit_dir(args.config) / CHECKPOINT_LOG
    if args.checkpoints and not copy.exists():
        print(f"no checkpoint copy at {copy}", file=sys.stderr)
        return 2
    with _dsn(args.config) as dsn:
        report = verify(dsn, keys, args.since, copy if copy.exists() else None)
    if args.format == "json":
        print(json.dumps({"ok": report.ok, "chains": report.chains, "rows": report.rows,
                          "checkpoints": report.checkpoints, "legacy_rows": report.legacy_rows,
                          "retained_rows": report.retained_rows,
                          "unsigned_tail": report.unsigned_tail,
                          "problems": [{**vars(p), "message": str(p)} for p in report.problems]}, indent=2))
    else:
        for p in report.problems:
            print(f"TAMPERED: {p}")
        tail = sum(report.unsigned_tail.values())
        print(f"{'FAILED' if report.problems else 'OK'}: {report.chains} chain(s), {report.rows} row(s), "
              f"{report.checkpoints} checkpoint(s) checked"
              + (f"; {tail} newest row(s) not yet covered by a checkpoint" if tail else "")
              + (f"; {report.legacy_rows} row(s) from before the chains (not covered)" if report.legacy_rows else "")
              + (f"; {report.retained_rows} row(s) exported and dropped by retention (recorded in the admin chain)"
                 if report.retained_rows else ""))
    return 1 if report.problems else 0


_QUERY_COLUMNS = ("ts", "request_id", "principal", "key_id", "model", "method", "path", "status",
                  "input_tokens", "output_tokens", "latency_ms", "usage_status", "provider", "cost_micro_usd")
# --format json: every column of the row (audit/entry.py COLUMNS, after the id).
_JSON_COLUMNS = ("id", *COLUMNS)


def _status_arg(text: str) -> str:
    if not (re.fullmatch(r"[1-5]xx", text) or (text.isdigit() and len(text) == 3)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a status (429) or a class (5xx)")
    return text


def _status_filter(text: str) -> sql.Composable:
    if re.fullmatch(r"[1-5]xx", text):
        base = int(text[0]) * 100
        return sql.SQL("status >= {} AND status < {}").format(sql.Literal(base), sql.Literal(base + 100))
    return sql.SQL("status = {}").format(sql.Literal(int(text)))


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.astimezone(UTC).isoformat()
    if isinstance(v, bytes | memoryview):
        return bytes(v).hex()
    return v


def cmd_query(args: argparse.Namespace) -> int:
    from ccr.cli import _dsn

    where: list[sql.Composable] = []
    params: list[Any] = []
    for col, val in (("principal", args.principal), ("model", args.model), ("key_id", args.key),
                     ("tenant", args.tenant), ("provider", args.provider), ("decision_id", args.decision)):
        if val is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(col)))
            params.append(val)
    if args.since is not None:
        where.append(sql.SQL("ts >= %s"))
        params.append(args.since)
    if args.until is not None:
        where.append(sql.SQL("ts < %s"))
        params.append(args.until)
    if args.status is not None:
        where.append(_status_filter(args.status))
    if args.show_body:
        args.format = "json"  # bodies are shown in the JSON lines only
    columns = _JSON_COLUMNS if args.format == "json" else _QUERY_COLUMNS
    q = sql.SQL("SELECT {cols} FROM request_log {where} ORDER BY ts DESC, id DESC LIMIT %s").format(
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
    keys = _body_keys(args.config, args.body_key) if args.show_body else None
    if args.show_body and keys is None:
        return 2
    docs: list[dict[str, Any]] = []
    refused = False
    with _dsn(args.config) as dsn:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(q, [*params, args.limit]).fetchall()
        if args.format == "json":
            for r in rows:
                doc = {c: _json_value(v) for c, v in zip(columns, r, strict=True)}
                if keys is not None:
                    doc["body"], bad = _body_doc(dsn, doc["request_id"], keys)
                    refused = refused or bad
                docs.append(doc)
    if args.format == "json":
        for doc in docs:
            print(json.dumps(doc))
        return 1 if refused else 0
    shown = [["-" if v is None else (f"{v:%Y-%m-%d %H:%M:%S}" if isinstance(v, datetime) else
                                     f"{v:.0f}" if isinstance(v, float) else str(v)) for v in r] for r in rows]
    widths = [max([len(c), *(len(r[i]) for r in shown)]) for i, c in enumerate(_QUERY_COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(_QUERY_COLUMNS, widths, strict=True)).rstrip())
    for r in shown:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    print(f"({len(rows)} row(s){', limit reached' if len(rows) == args.limit else ''})", file=sys.stderr)
    return 0


def export(dsn: str, before: datetime, out: TextIO, public_key_pem: str | None) -> dict[str, int]:
    """JSON Lines: the public key, the chains, every row older than `before` (chain order), and
    the checkpoints of those chains, each line a canonical-JSON object with a `kind`."""
    counts = {"request_log": 0, "admin_log": 0, "checkpoint": 0, "chain": 0}

    def line(kind: str, obj: dict[str, Any]) -> None:
        out.write(canonical({"kind": kind, **obj}).decode() + "\n")

    if public_key_pem is not None:
        line("public_key", {"pem": public_key_pem})
    with psycopg.connect(dsn) as conn:
        chains: set[str] = set()
        for table in ("request_log", "admin_log"):
            with conn.cursor(name=f"export_{table}", row_factory=psycopg.rows.dict_row) as cur:
                cur.itersize = 2000
                cur.execute(sql.SQL("SELECT * FROM {} WHERE ts < %s ORDER BY chain_id NULLS FIRST, chain_seq, id"
                                    ).format(sql.Identifier(table)), (before,))
                for r in cur:
                    line(table, r)
                    counts[table] += 1
                    if r["chain_id"]:
                        chains.add(r["chain_id"])
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            for r in cur.execute("SELECT * FROM audit_chains WHERE chain_id = ANY(%s) ORDER BY chain_id",
                                 (sorted(chains),)):
                line("chain", r)
                counts["chain"] += 1
            for r in cur.execute("SELECT * FROM audit_checkpoints WHERE chain_id = ANY(%s)"
                                 " ORDER BY chain_id, chain_seq", (sorted(chains),)):
                line("checkpoint", r)
                counts["checkpoint"] += 1
    return counts


def cmd_export(args: argparse.Namespace) -> int:
    from ccr.cli import _dsn

    pub = Path(args.public_key) if args.public_key else _audit_dir(args.config) / PUBLIC_KEY_FILE
    pem = pub.read_text() if pub.exists() else None
    with _dsn(args.config) as dsn:
        if args.output in (None, "-"):
            counts = export(dsn, args.before, sys.stdout, pem)
        else:
            with open(args.output, "w") as f:
                counts = export(dsn, args.before, f, pem)
    print("exported " + ", ".join(f"{n} {k}" for k, n in counts.items()), file=sys.stderr)
    return 0


def cmd_retain(args: argparse.Namespace) -> int:
    from audit.retention import PartitionError, ensure_partitions, retain
    from ccr.cli import _dsn
    from ccr.config import load_config

    r = load_config(args.config).audit.retention
    now = args.now or datetime.now(UTC)
    export_dir = Path(r.export_dir)
    if not export_dir.is_absolute():
        from ccr.supervisor import Gateway

        export_dir = Gateway(Path(args.config)).data_dir() / export_dir
    pub = _audit_dir(args.config) / PUBLIC_KEY_FILE
    with _dsn(args.config) as dsn:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                made = [] if args.dry_run else ensure_partitions(conn, r.partition, r.premake, now)
        except PartitionError as e:
            print(f"error: {e}; move those rows out of request_log_default (as the owner) and run again",
                  file=sys.stderr)
            return 1
        for name in made:
            print(f"made partition {name}")
        if not args.dry_run:  # captured bodies (audit.bodies): each row has its own expiry
            from audit.bodies import drop_expired

            gone = drop_expired(dsn, now)
            if gone:
                print(f"deleted {gone} captured body row(s) past their retention")
        if r.keep_days is None:
            print("audit.retention.keep_days is unset: nothing is dropped", file=sys.stderr)
            return 0
        done = retain(dsn, keep_days=r.keep_days, export_dir=export_dir, now=now, dry_run=args.dry_run,
                      public_key_pem=pub.read_text() if pub.exists() else None)
    for d in done:
        if args.dry_run:
            print(f"would export and drop {d.partition} to {d.export}")
        else:
            print(f"exported {d.rows} row(s) of {d.partition} to {d.export} (sha256 {d.sha256}); dropped")
    return 0


def _body_keys(config: str, files: list[str]) -> list[bytes] | None:
    """The body keys in `files` (default <data_dir>/audit/bodies.key); None (said why) when missing."""
    from audit.bodies import KEY_FILE, BodyError, load_key

    key_files = [Path(p) for p in files] or [_audit_dir(config) / KEY_FILE]
    missing = [str(p) for p in key_files if not p.exists()]
    if missing:
        print(f"no body key at {', '.join(missing)} (the access-log receiver makes bodies.key when audit.bodies "
              "names someone; pass --key FILE)", file=sys.stderr)
        return None
    try:
        return [load_key(p) for p in key_files]
    except BodyError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _body_doc(dsn: str, request_id: str, keys: list[bytes]) -> tuple[dict[str, Any] | None, bool]:
    """A row's captured bodies for `query --show-body` (None: none stored), and whether refused."""
    from audit.bodies import BodyError, read_body

    try:
        b = read_body(dsn, request_id, keys)
    except BodyError as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return {"error": str(e)}, True
    if b is None:
        return None, False
    return {"key_id": b.key_id, "expires_at": _json_value(b.expires_at), "request_bytes": b.request_bytes,
            "request_truncated": b.request_truncated, "request": b.request.decode("utf-8", "replace"),
            "response_bytes": b.response_bytes, "response_truncated": b.response_truncated,
            "response": b.response.decode("utf-8", "replace") if b.response is not None else None}, False


def cmd_body(args: argparse.Namespace) -> int:
    from audit.bodies import BodyError, read_body
    from ccr.cli import _dsn

    keys = _body_keys(args.config, args.key)
    if keys is None:
        return 2
    try:
        with _dsn(args.config) as dsn:
            b = read_body(dsn, args.request_id, keys)
    except BodyError as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return 1
    if b is None:
        print(f"no stored bodies for request {args.request_id} (not captured, or past retention)", file=sys.stderr)
        return 1
    if args.part is not None:  # the exact bytes, for piping
        data = b.request if args.part == "request" else b.response
        if data is None:
            print(f"no {args.part} body was captured for {args.request_id}", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    print(json.dumps({
        "request_id": b.request_id, "ts": b.ts.isoformat(), "expires_at": b.expires_at.isoformat(),
        "key_id": b.key_id, "request_bytes": b.request_bytes, "request_truncated": b.request_truncated,
        "request": b.request.decode("utf-8", "replace"), "response_bytes": b.response_bytes,
        "response_truncated": b.response_truncated,
        "response": b.response.decode("utf-8", "replace") if b.response is not None else None,
    }, indent=2))
    return 0


def cmd_verify_export(args: argparse.Namespace) -> int:
    from audit.verify import verify_export

    path = Path(args.file)
    key_files = [Path(p) for p in args.public_key]
    if not key_files:
        print("pass --public-key FILE (a key kept apart from the database and the exports)", file=sys.stderr)
        return 2
    problems, counts, sha = verify_export(path, [load_public_key(p) for p in key_files])
    for p in problems:
        print(f"TAMPERED: {p}")
    print(f"{'FAILED' if problems else 'OK'}: {counts['rows']} row(s) of {counts['chains']} chain(s), "
          f"{counts['checkpoints']} checkpoint(s) checked; sha256 {sha} (compare with the audit.retain record: "
          "ccr audit verify checks that record)")
    return 1 if problems else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    au = sub.add_parser("audit", help="the audit trail: verify the hash chains, query, export")
    aus = au.add_subparsers(dest="audit_cmd", required=True)
    v = aus.add_parser("verify", help="walk every chain and checkpoint; name the first changed, removed or "
                                      "reordered row (exit 1)")
    v.add_argument("--since", type=parse_time, help="start at the last checkpoint signed before this time")
    v.add_argument("--public-key", action="append", default=[],
                   help="checkpoint public key (PEM; default <data_dir>/audit/signing.pub); repeatable")
    v.add_argument("--checkpoints", help="the receivers' checkpoint copy (default <data_dir>/audit/"
                                          "checkpoints.jsonl, when it exists)")
    v.add_argument("--format", choices=("text", "json"), default="text")
    v.set_defaults(func=cmd_verify)
    q = aus.add_parser("query", help="request_log rows by principal, model, key, time range, status")
    q.add_argument("--principal")
    q.add_argument("--model")
    q.add_argument("--key", help="key id")
    q.add_argument("--tenant")
    q.add_argument("--provider", help="the provider that served (providers[].name)")
    q.add_argument("--decision", help="policy decision id (dec_...)")
    q.add_argument("--since", type=parse_time, help="ISO-8601 time or a span back from now (30m, 2h, 7d)")
    q.add_argument("--until", type=parse_time)
    q.add_argument("--status", type=_status_arg, help="a status (429) or a class (5xx)")
    q.add_argument("--limit", type=int, default=100)
    q.add_argument("--format", choices=("table", "json"), default="table")
    q.add_argument("--show-body", action="store_true",
                   help="JSON lines with each row's captured bodies decrypted (audit.bodies); exit 1 if one is refused")
    q.add_argument("--body-key", action="append", default=[],
                   help="with --show-body: body key file (default <data_dir>/audit/bodies.key); repeatable")
    q.set_defaults(func=cmd_query)
    e = aus.add_parser("export", help="rows older than --before, with their chains' checkpoints, as JSON Lines")
    e.add_argument("--before", type=parse_time, required=True)
    e.add_argument("--format", choices=("jsonl",), default="jsonl")
    e.add_argument("--output", "-o", help="file (default: stdout)")
    e.add_argument("--public-key", help="included in the export (default <data_dir>/audit/signing.pub)")
    e.set_defaults(func=cmd_export)
    r = aus.add_parser("retain", help="make request_log partitions ahead; export and drop those older than "
                                      "audit.retention.keep_days (run it from a daily timer)")
    r.add_argument("--now", type=parse_time, help=argparse.SUPPRESS)  # tests and back-fills: the clock
    r.add_argument("--dry-run", action="store_true", help="say what would be exported and dropped")
    r.set_defaults(func=cmd_retain)
    b = aus.add_parser("body", help="decrypt a request's captured bodies (audit.bodies); a changed or moved "
                                    "ciphertext is refused (exit 1)")
    b.add_argument("request_id", help="the gateway's request id (request_log.request_id)")
    b.add_argument("--part", choices=("request", "response"), help="write that body's exact bytes to stdout")
    b.add_argument("--key", action="append", default=[],
                   help="body key file (default <data_dir>/audit/bodies.key); repeatable, for rotated keys")
    b.set_defaults(func=cmd_body)
    x = aus.add_parser("verify-export", help="check a retention export file on its own (hashes, links, "
                                             "checkpoint signatures)")
    x.add_argument("file")
    x.add_argument("--public-key", action="append", default=[], help="checkpoint public key (PEM); repeatable")
    x.set_defaults(func=cmd_verify_export)

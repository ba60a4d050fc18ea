"""`ccr spend report` and `ccr budgets list|set|remove` (docs/spend.md).

Reports read the ledger (spend_ledger, the truth); budget changes go to the budgets table with
an admin_log row in the same transaction, and reach the rate limit service within spend.refresh_s.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import redis

from ccr.budget_usage import budget_usage
from ccr.budgets import Budget, Period, SubjectKind, load_budgets, remove_budget, set_budget, window
from ccr.config import GatewayConfig, load_config
from ccr.pricing import parse_usd, usd

DsnOf = Callable[[str], AbstractContextManager[str]]

BY = {
    "user": ("principal_id", "principal_id"),
    "key": ("COALESCE(key_id, '-')", "key_id"),
    "model": ("COALESCE(model, '-')", "model"),
    "group": ("g", "group"),
    "tenant": ("COALESCE(tenant, '-')", "tenant"),
}
RANGE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.\.(\d{4}-\d{2}-\d{2})$")


def period_bounds(text: str, tz: str, now: float | None = None) -> tuple[str, int, int]:
    """(label, start, end) epoch seconds for day|week|month (the current one) or FROM..TO (inclusive dates)."""
    now = time.time() if now is None else now
    if text in ("day", "week", "month"):
        w = window(Period(text), tz, now)
        return w.label, w.start, w.end
    m = RANGE.match(text)
    if not m:
        raise ValueError(f"--period must be day, week, month or YYYY-MM-DD..YYYY-MM-DD, got {text!r}")
    first, last = date.fromisoformat(m[1]), date.fromisoformat(m[2])
    if last < first:
        raise ValueError(f"--period {text}: the end is before the start")
    zone = ZoneInfo(tz)

    def midnight(d: date) -> int:
        return int(datetime(d.year, d.month, d.day, tzinfo=zone).timestamp())

    return text, midnight(first), midnight(last + timedelta(days=1))


def report_rows(conn: psycopg.Connection, by: str, start: int, end: int) -> list[dict[str, Any]]:
    expr, name = BY[by]
    source = "spend_ledger, unnest(CASE WHEN groups = '{}' THEN ARRAY['-'] ELSE groups END) AS g" \
        if by == "group" else "spend_ledger"
    sql = (f"SELECT {expr} AS k, count(*), COALESCE(sum(input_tokens), 0), COALESCE(sum(output_tokens), 0), "
           "COALESCE(sum(cache_write_5m_tokens), 0) + COALESCE(sum(cache_write_1h_tokens), 0), "
           "COALESCE(sum(cache_read_tokens), 0), COALESCE(sum(cost_micro_usd), 0) "
           f"FROM {source} WHERE ts >= to_timestamp(%s) AND ts < to_timestamp(%s) "
           "GROUP BY 1 ORDER BY 7 DESC, 1")
    out = []
    for k, n, i, o, w, r, cost in conn.execute(sql, (start, end)).fetchall():
        out.append({name: k, "requests": n, "input_tokens": int(i), "output_tokens": int(o),
                    "cache_write_tokens": int(w), "cache_read_tokens": int(r), "cost_micro_usd": int(cost),
                    "cost_usd": usd(int(cost))})
    return out


def _print(rows: list[dict[str, Any]], fmt: str, columns: list[str], meta: dict[str, Any] | None = None) -> None:
    if fmt == "json":
        print(json.dumps({**(meta or {}), "rows": rows}, indent=2, default=str))
        return
    if fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return
    if meta:
        print("  ".join(f"{k}: {v}" for k, v in meta.items()))
    table = [columns] + [["-" if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    if not rows:
        print("(no spend in this period)")


def cmd_spend(args: argparse.Namespace, dsn_of: DsnOf) -> int:
    config = load_config(args.config)
    try:
        label, start, end = period_bounds(args.period, config.spend.timezone)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    with dsn_of(args.config) as dsn, psycopg.connect(dsn) as conn:
        rows = report_rows(conn, args.by, start, end)
    name = BY[args.by][1]
    total = sum(r["cost_micro_usd"] for r in rows) if args.by != "group" else None
    meta: dict[str, Any] = {"period": label, "timezone": config.spend.timezone}
    if total is not None:
        meta["total_usd"] = usd(total)
    _print(rows, args.format, [name, "requests", "input_tokens", "output_tokens", "cache_write_tokens",
                               "cache_read_tokens", "cost_usd"], meta)
    return 0


def budget_status(conn: psycopg.Connection, b: Budget, config: GatewayConfig, now: float | None = None,
                  client: redis.Redis | None = None) -> dict[str, Any]:
    """A budget with its current period's spend (ledger), reservations in flight and counter (Redis, when
    reachable), percent used and reset. Per-seat: the seat nearest its cap (ccr/budget_usage.py)."""
    u = budget_usage(conn, b, config.spend.timezone, time.time() if now is None else now, client)
    cap = b.amount_micro_usd
    pct = f"{u.used * 100 / cap:.1f}%" if cap else "-"
    reserved = u.reserved
    return {"name": b.name, "subject": f"{b.subject_kind}:{b.subject}", "period": str(b.period),
            "amount_usd": usd(cap), "amount_micro_usd": cap, "mode": b.mode, "scope": b.scope,
            "on_redis_down": b.on_redis_down, "timezone": b.timezone or config.spend.timezone,
            "current_period": u.window.label, "spent_usd": usd(u.spent), "spent_micro_usd": u.spent,
            "reserved_usd": "-" if reserved is None else usd(reserved), "reserved_micro_usd": reserved,
            "counter_micro_usd": u.counter, "used": pct,
            "left_usd": usd(max(cap - u.used, 0)), "seat": u.seat, "seats": u.seats,
            "resets_at": datetime.fromtimestamp(u.window.end, ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%SZ")}


BUDGET_COLUMNS = ["name", "subject", "period", "amount_usd", "mode", "scope", "current_period", "spent_usd",
                  "reserved_usd", "left_usd", "used", "resets_at", "seat"]


@contextmanager
def _counters(config_path: str, config: GatewayConfig) -> Iterator[redis.Redis | None]:
    """The counters' Redis: storage.redis_url, else the running gateway's (`ccr up`); None without one
    (the list then shows the ledger only)."""
    url = config.storage.redis_url
    if url is None:
        from ccr.runtime import Runtime
        from ccr.supervisor import Gateway

        runtime_file = Gateway(Path(config_path)).data_dir() / "run" / "runtime.json"
        if runtime_file.exists():
            url = Runtime.load(runtime_file).redis_url or None
    if url is None:
        yield None
        return
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        try:
            client.ping()
        except (redis.RedisError, OSError) as e:  # e.g. the gateway stopped: its Redis went with it
            print(f"counters not readable ({type(e).__name__}); reserved_usd is unknown", file=sys.stderr)
            yield None
            return
        yield client
    finally:
        client.close()


def _subject(args: argparse.Namespace) -> tuple[SubjectKind, str]:
    for kind, attr in ((SubjectKind.TENANT, "tenant"), (SubjectKind.GROUP, "group"), (SubjectKind.USER, "user"),
                       (SubjectKind.KEY, "key"), (SubjectKind.SPIFFE, "spiffe_id")):
        v = getattr(args, attr)
        if v:
            return kind, v
    raise ValueError("name whom the budget is for: --tenant, --group, --user, --key or --spiffe-id")


def cmd_budgets(args: argparse.Namespace, dsn_of: DsnOf, actor: Callable[[], str]) -> int:
    config = load_config(args.config)
    with dsn_of(args.config) as dsn, psycopg.connect(dsn) as conn:
        if args.budgets_cmd in ("list", "status"):
            with _counters(args.config, config) as client:
                rows = [budget_status(conn, b, config, client=client) for b in load_budgets(conn)
                        if not args.names or b.name in args.names]
            _print(rows, args.format, BUDGET_COLUMNS)
            return 0
        who = args.actor or actor()
        if args.budgets_cmd == "remove":
            old = remove_budget(conn, args.name, who)
            if old is None:
                print(f"no budget named {args.name!r}", file=sys.stderr)
                return 1
            print(f"removed budget {args.name} ({old.subject_kind}:{old.subject})")
            return 0
        try:
            kind, subject = _subject(args)
            b = Budget(args.name, kind, subject, Period(args.period), parse_usd(args.amount), mode=args.mode,
                       scope=args.scope or "single", on_redis_down=args.on_redis_down, timezone=args.timezone)
        except (ValueError, KeyError) as e:
            print(f"budgets set: {e}", file=sys.stderr)
            return 2
        old = set_budget(conn, b, who)
        verb = "updated" if old else "created"
        print(f"{verb} budget {b.name}: {kind}:{subject} ${usd(b.amount_micro_usd)} per {b.period} "
              f"({b.mode}, {b.scope}, on redis down: {b.on_redis_down}); in force within "
              f"{config.spend.refresh_s:g}s")
        return 0


def add_parsers(sub: argparse._SubParsersAction, dsn_of: DsnOf, actor: Callable[[], str]) -> None:
    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=argparse.SUPPRESS, help="gateway config YAML (as `ccr -c`)")

    sp = sub.add_parser("spend", help="spend from the ledger")
    sps = sp.add_subparsers(dest="spend_cmd", required=True)
    rep = sps.add_parser("report", help="cost by user, group, model, key or tenant for a period")
    rep.add_argument("--by", choices=sorted(BY), default="user")
    rep.add_argument("--period", default="month", help="day | week | month (the current one, in spend.timezone) "
                     "or YYYY-MM-DD..YYYY-MM-DD (both days included)")
    rep.add_argument("--format", choices=["table", "csv", "json"], default="table")
    config_arg(rep)
    rep.set_defaults(func=lambda a: cmd_spend(a, dsn_of))

    bp = sub.add_parser("budgets", help="USD budgets: list (with current spend), set, remove")
    bs = bp.add_subparsers(dest="budgets_cmd", required=True)
    bl = bs.add_parser("list", aliases=["status"], help="budgets with their current period's spend (ledger), "
                       "reservations in flight (Redis), what is left and when the period resets")
    bl.add_argument("names", nargs="*", help="only these budgets")
    bl.add_argument("--format", choices=["table", "csv", "json"], default="table")
    st = bs.add_parser("set", help="create or change a budget (in force within spend.refresh_s, no restart)")
    st.add_argument("name")
    who = st.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant")
    who.add_argument("--group")
    who.add_argument("--user", help="a person's principal id, oidc:<issuer>#<sub>")
    who.add_argument("--key", help="an API key id")
    who.add_argument("--spiffe-id")
    st.add_argument("--period", choices=[p.value for p in Period], required=True)
    st.add_argument("--amount", required=True, help="USD per period, e.g. 20 or 0.50")
    st.add_argument("--mode", choices=["hard", "soft"], default="hard",
                    help="hard: refuse what does not fit (402); soft: admit, warn, alert")
    st.add_argument("--scope", choices=["shared", "per_seat"],
                    help="group/tenant budgets (required there): one pool, or the amount for each member")
    st.add_argument("--on-redis-down", choices=["open", "closed"], default="closed",
                    help="while the counters are unreachable: refuse (closed, default) or admit unchecked")
    st.add_argument("--timezone", help="IANA zone of the calendar periods (default: spend.timezone)")
    rm = bs.add_parser("remove", help="delete a budget")
    rm.add_argument("name")
    for p in (st, rm):
        p.add_argument("--actor", help="who is making the change, for the admin log (default: cli:USER@HOST)")
    for p in (bl, st, rm):
        config_arg(p)
    bp.set_defaults(func=lambda a: cmd_budgets(a, dsn_of, actor))


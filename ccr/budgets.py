"""USD budgets: what they are, whom they apply to, their calendar periods, where they are stored.

A budget caps spend of one subject (tenant, group, user, SPIFFE ID, API key) per calendar day,
week (from Monday) or month in a time zone. A group or tenant budget says explicitly whether it is
one `shared` pool for all members or a `per_seat` amount for each member (principal). All budgets
that apply to a request must have room for it: the tightest one decides.

Budgets live in PostgreSQL (table `budgets`, migration 7) so they change at runtime; every change
writes an admin_log row (a link of the admin hash chain) in the same transaction. The rate limit
service re-reads the table every `spend.refresh_s` (ratelimit/spend.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from audit.admin import append_admin
from ccr.contract import AUTHZ_SPEND


class SubjectKind(StrEnum):
    TENANT = "tenant"
    GROUP = "group"
    USER = "user"  # an OIDC person: the principal id oidc:<issuer>#<sub>
    SPIFFE = "spiffe"
    KEY = "key"  # an API key id


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")  # as the budgets table's CHECK
POOLED = (SubjectKind.TENANT, SubjectKind.GROUP)  # kinds that must say shared or per_seat


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    subject_kind: SubjectKind
    subject: str
    period: Period
    amount_micro_usd: int
    mode: str = "hard"  # hard: refuse what does not fit; soft: warn, log and alert
    scope: str = "single"  # shared | per_seat for group/tenant budgets, single otherwise
    on_redis_down: str = "closed"  # closed: refuse while counters are unreachable; open: admit
    timezone: str | None = None  # None: spend.timezone

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"budget name {self.name!r}: letters, digits and _.:- only (at most 128)")
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"mode must be hard or soft, got {self.mode!r}")
        if self.on_redis_down not in ("open", "closed"):
            raise ValueError(f"on_redis_down must be open or closed, got {self.on_redis_down!r}")
        pooled = self.subject_kind in POOLED
        if pooled and self.scope not in ("shared", "per_seat"):
            raise ValueError(f"a {self.subject_kind} budget must say --scope shared (one pool for all members) "
                             "or --scope per_seat (the amount for each member)")
        if not pooled and self.scope != "single":
            raise ValueError(f"--scope applies to group and tenant budgets only, not {self.subject_kind}")
        if self.amount_micro_usd < 0:
            raise ValueError("amount must not be negative")
        if self.timezone is not None:
            ZoneInfo(self.timezone)  # raises on an unknown zone

    @property
    def hard(self) -> bool:
        return self.mode == "hard"

    @property
    def identity(self) -> str:
        """What a counter belongs to: a change of subject, scope, period or zone starts new counters
        (rebuilt from the ledger); a change of amount or mode keeps them."""
        raw = f"{self.subject_kind}\0{self.subject}\0{self.scope}\0{self.period}\0{self.timezone or ''}"
        return hashlib.sha256(raw.encode()).hexdigest()[:10]

    def as_row(self) -> dict[str, Any]:
        d = asdict(self)
        d["subject_kind"], d["period"] = str(self.subject_kind), str(self.period)
        return d


@dataclass(frozen=True, slots=True)
class Facts:
    """Who a request is charged to (extauth's AUTHZ_SPEND, or the audit row's AUTHZ_NS)."""

    principal_id: str
    principal_kind: str | None = None
    key_id: str | None = None
    groups: tuple[str, ...] = ()
    tenant: str | None = None
    spiffe_id: str | None = None


def parse_spend_facts(text: str) -> tuple[int, Facts, str | None]:
    """(worst-case micro-USD, facts, model) from extauth's AUTHZ_SPEND string; ValueError if malformed.
    A `"c": 1` (charge only) is read by charge_only()."""
    d = json.loads(text)
    if not isinstance(d, dict) or d.get("v") != 1:
        raise ValueError(f"{AUTHZ_SPEND}: not a version-1 object")
    r, p, g = d.get("r"), d.get("p"), d.get("g", [])
    if not isinstance(r, int) or r < 0 or not isinstance(p, str) or not p:
        raise ValueError(f"{AUTHZ_SPEND}: needs a non-negative integer r and a principal p")
    if not isinstance(g, list) or not all(isinstance(x, str) for x in g):
        raise ValueError(f"{AUTHZ_SPEND}: g must be a list of group names")

    def opt(k: str) -> str | None:
        v = d.get(k)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{AUTHZ_SPEND}: {k} must be a string")
        return v

    return r, Facts(p, opt("pk"), opt("k"), tuple(g), opt("t"), opt("w")), opt("m")


def charge_only(text: str) -> bool:
    """Whether the request is charged to its budgets but never refused (batch results: spent already)."""
    return '"c":1' in text


def batch_hold(text: str) -> str | None:
    """The batch create request id whose budget hold a batch-results request releases (`"hb"`), if any."""
    try:
        d = json.loads(text)
    except ValueError:
        return None
    hb = d.get("hb") if isinstance(d, dict) else None
    return hb if isinstance(hb, str) and hb else None


def spend_facts_json(reserve_micro: int, f: Facts, model: str | None, *, charge_only: bool = False,
                     releases_hold: str | None = None) -> str:
    d: dict[str, Any] = {"v": 1, "r": reserve_micro, "p": f.principal_id, "g": list(f.groups)}
    if charge_only:
        d["c"] = 1
    if releases_hold:
        d["hb"] = releases_hold
    for k, v in (("pk", f.principal_kind), ("k", f.key_id), ("t", f.tenant), ("w", f.spiffe_id), ("m", model)):
        if v is not None:
            d[k] = v
    return json.dumps(d, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Window:
    label: str  # "2026-11-26", "2026-W48" (ISO week, from Monday), "2026-11"
    start: int  # epoch seconds, inclusive
    end: int  # epoch seconds, exclusive


def window(period: Period, tz: str, now: float) -> Window:
    """The calendar period containing `now` in zone `tz` (DST-aware: a day may be 23 or 25 hours)."""
    zone = ZoneInfo(tz)
    local = datetime.fromtimestamp(now, zone)
    day = local.date()
    if period is Period.DAY:
        first, nxt, label = day, day + timedelta(days=1), day.isoformat()
    elif period is Period.WEEK:
        first = day - timedelta(days=day.weekday())  # Monday
        nxt = first + timedelta(days=7)
        y, w, _ = first.isocalendar()
        label = f"{y}-W{w:02d}"
    else:
        first = day.replace(day=1)
        nxt = (first.replace(year=first.year + 1, month=1) if first.month == 12
               else first.replace(month=first.month + 1))
        label = f"{first:%Y-%m}"

    def midnight(d: Any) -> int:
        return int(datetime(d.year, d.month, d.day, tzinfo=zone).timestamp())

    return Window(label, midnight(first), midnight(nxt))


class BudgetIndex:
    """Budgets by (subject kind, subject): the budgets of a request in a few dict lookups."""

    def __init__(self, budgets: Iterable[Budget] = ()) -> None:
        self.all = tuple(budgets)
        self._by: dict[tuple[str, str], list[Budget]] = {}
        for b in self.all:
            self._by.setdefault((str(b.subject_kind), b.subject), []).append(b)

    def __len__(self) -> int:
        return len(self.all)

    def applicable(self, f: Facts) -> list[tuple[Budget, str]]:
        """(budget, seat) pairs: seat is the principal for per-seat budgets, "" for pools."""
        if not self._by:
            return []
        wanted: list[tuple[str, str]] = []
        if f.tenant:
            wanted.append((SubjectKind.TENANT, f.tenant))
        wanted += [(SubjectKind.GROUP, g) for g in f.groups]
        if f.principal_kind == "user":
            wanted.append((SubjectKind.USER, f.principal_id))
        if f.key_id:
            wanted.append((SubjectKind.KEY, f.key_id))
        if f.spiffe_id:
            wanted.append((SubjectKind.SPIFFE, f.spiffe_id))
        out: list[tuple[Budget, str]] = []
        for k in wanted:
            for b in self._by.get(k, ()):
                out.append((b, f.principal_id if b.scope == "per_seat" else ""))
        return out


COUNTER_PREFIX = "ccr:spend:c:"


def counter_key(b: Budget, seat: str, w: Window) -> str:
    """Redis key of one budget's spend (micro-USD, reserved + settled) in one period, per seat."""
    return f"{COUNTER_PREFIX}{b.name}:{b.identity}:{w.label}:{seat}"


# -- the ledger side of a counter (rebuild after Redis lost its data) --------------------------


# What a batch create the provider took still holds: its reservation, until its results are metered
# (provider_objects.metered_at; the results' own row then carries the cost).
OPEN_BATCH_HOLD = ("endpoint = 'batches.create' AND status BETWEEN 200 AND 299 AND EXISTS (SELECT 1 FROM "
                   "provider_objects o WHERE o.kind = 'batch' AND o.create_request_id = spend_ledger.request_id "
                   "AND o.metered_at IS NULL)")


def ledger_sum_query(b: Budget, seat: str, holds: bool = False) -> tuple[str, list[Any]]:
    """SQL summing the ledger rows a counter covers (ts in [start, end) appended by the caller); with
    `holds`, plus the worst cases batches still hold (a counter rebuilt after Redis lost its data)."""
    k = b.subject_kind
    if k is SubjectKind.TENANT:
        where, args = "tenant = %s", [b.subject]
    elif k is SubjectKind.GROUP:
        where, args = "%s = ANY(groups)", [b.subject]
    elif k is SubjectKind.USER:
        where, args = "principal_id = %s AND principal_kind = 'user'", [b.subject]
    elif k is SubjectKind.KEY:
        where, args = "key_id = %s", [b.subject]
    else:
        where, args = "spiffe_id = %s", [b.subject]
    if seat:
        where += " AND principal_id = %s"
        args.append(seat)
    held = (f" + COALESCE(sum(reserved_micro_usd) FILTER (WHERE {OPEN_BATCH_HOLD}), 0)" if holds else "")
    return (f"SELECT COALESCE(sum(cost_micro_usd), 0){held} FROM spend_ledger WHERE {where} "
            "AND ts >= to_timestamp(%s) AND ts < to_timestamp(%s)"), args


def ledger_sum(conn: psycopg.Connection, b: Budget, seat: str, w: Window, holds: bool = False) -> int:
    sql, args = ledger_sum_query(b, seat, holds)
    row = conn.execute(sql, [*args, w.start, w.end]).fetchone()
    return int(row[0]) if row else 0


# -- the budgets table ----------------------------------------------------------------------------

_COLS = ("name", "subject_kind", "subject", "period", "amount_micro_usd", "mode", "scope", "on_redis_down",
         "timezone")


def _budget(row: tuple[Any, ...]) -> Budget:
    d = dict(zip(_COLS, row, strict=True))
    return Budget(**{**d, "subject_kind": SubjectKind(d["subject_kind"]), "period": Period(d["period"])})


def load_budgets(conn: psycopg.Connection) -> list[Budget]:
    rows = conn.execute(f"SELECT {', '.join(_COLS)} FROM budgets ORDER BY name").fetchall()
    return [_budget(r) for r in rows]


def set_budget(conn: psycopg.Connection, b: Budget, actor: str) -> Budget | None:
    """Create or replace a budget; returns the one it replaced. One transaction with its admin_log row."""
    with conn.transaction():
        old = conn.execute(f"SELECT {', '.join(_COLS)} FROM budgets WHERE name = %s FOR UPDATE",
                           (b.name,)).fetchone()
        before = _budget(old) if old else None
        row = b.as_row()
        conn.execute(
            f"INSERT INTO budgets ({', '.join(_COLS)}) VALUES ({', '.join(['%s'] * len(_COLS))}) "
            "ON CONFLICT (name) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in _COLS[1:]) + ", updated_at = now()",
            [row[c] for c in _COLS])
        # A link of the admin hash chain (audit/admin.py), committed with the change.
        append_admin(conn, actor, "budget.update" if before else "budget.create", f"budget:{b.name}",
                     before.as_row() if before else None, row)
    return before


def remove_budget(conn: psycopg.Connection, name: str, actor: str) -> Budget | None:
    with conn.transaction():
        old = conn.execute(f"DELETE FROM budgets WHERE name = %s RETURNING {', '.join(_COLS)}", (name,)).fetchone()
        if old is None:
            return None
        before = _budget(old)
        append_admin(conn, actor, "budget.remove", f"budget:{name}", before.as_row(), None)
    return before

"""Where a budget stands in its current period: spent, reserved, cap, reset (CLI and metrics).

Two sources, each the truth of one thing:
- PostgreSQL's ledger (spend_ledger) holds what was spent: settled requests' actual cost;
- Redis's counter (ccr/budgets.py counter_key) is what admission compares with the cap: the settled
  cost plus the worst cases of requests still in flight. `reserved` is the difference.

A per-seat budget has one counter per member; its figures are those of the seat nearest its cap
(the highest counter, else the highest ledger spend), with the number of seats that spent this
period: one line (one metric series) per budget however many members it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
import redis
from redis.exceptions import RedisError

from ccr.budgets import Budget, SubjectKind, Window, counter_key, ledger_sum, window

# A per-seat budget's counters are read for at most this many seats (the biggest spenders in the
# ledger): one MGET of bounded size, however many members a tenant has.
MAX_SEATS_READ = 1000


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    budget: Budget
    window: Window
    spent: int  # micro-USD settled in the ledger this period (per seat: the seat shown)
    counter: int | None  # micro-USD on the Redis counter (settled + reserved); None: Redis not read
    seat: str | None = None  # per-seat budgets: the seat shown (the one nearest its cap)
    seats: int = 0  # per-seat budgets: members with spend this period

    @property
    def reserved(self) -> int | None:
        """Worst cases of requests in flight (never negative: a settlement may land before its ledger row)."""
        return None if self.counter is None else max(self.counter - self.spent, 0)

    @property
    def used(self) -> int:
        """What counts against the cap: the counter when known, else the ledger."""
        return self.counter if self.counter is not None else self.spent


def _seat_spend(conn: psycopg.Connection, b: Budget, w: Window) -> list[tuple[str, int]]:
    member = "tenant = %s" if b.subject_kind is SubjectKind.TENANT else "%s = ANY(groups)"
    rows = conn.execute(
        f"SELECT principal_id, sum(cost_micro_usd) FROM spend_ledger WHERE {member} AND ts >= to_timestamp(%s) "
        "AND ts < to_timestamp(%s) GROUP BY 1 ORDER BY 2 DESC, 1", (b.subject, w.start, w.end)).fetchall()
    return [(str(p), int(s)) for p, s in rows]


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def budget_usage(conn: psycopg.Connection, b: Budget, tz: str, now: float,
                 client: redis.Redis | None = None) -> BudgetUsage:
    """`b` in the period containing `now` (its own zone, else `tz`). Redis errors leave `counter` None."""
    w = window(b.period, b.timezone or tz, now)
    if b.scope != "per_seat":
        spent = ledger_sum(conn, b, "", w)
        counter = None
        if client is not None:
            try:
                counter = _int(client.get(counter_key(b, "", w)))
            except (RedisError, OSError):
                counter = None  # unreachable; a missing key is None too (nothing admitted this period yet)
        return BudgetUsage(b, w, spent, counter)
    seats = _seat_spend(conn, b, w)
    if not seats:
        return BudgetUsage(b, w, 0, None, None, 0)
    top_seat, top_spent = seats[0]
    if client is None:
        return BudgetUsage(b, w, top_spent, None, top_seat, len(seats))
    read = seats[:MAX_SEATS_READ]
    try:
        values = client.mget([counter_key(b, s, w) for s, _ in read])
    except (RedisError, OSError):
        return BudgetUsage(b, w, top_spent, None, top_seat, len(seats))
    best = max(((_int(v) or 0, spent, seat) for (seat, spent), v in zip(read, values, strict=True)),
               key=lambda t: (t[0], t[1]))
    return BudgetUsage(b, w, best[1], best[0], best[2], len(seats))

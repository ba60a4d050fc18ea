"""Admin actions (`admin_log`) as links of the admin hash chain.

One chain, `admin`, for every process that records admin actions (`ccr keys ...` and the
like: short-lived and rare), serialised by a transaction-level advisory lock so two writers
never link to the same head. Call `append_admin` inside the transaction that makes the change:
the change and its link commit together or not at all. The access-log receivers sign the
admin chain's head in their checkpoints.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from audit.chain import ADMIN_CHAIN, ADMIN_COLUMNS, CHAIN_COLUMNS, Head, link_rows

# pg_advisory_xact_lock key: "ccr" admin chain.
ADMIN_CHAIN_LOCK = 0x636372_01


def append_admin(conn: psycopg.Connection, actor: str, action: str, target: str,
                 before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADMIN_CHAIN_LOCK,))
    last = conn.execute("SELECT chain_seq, row_hash FROM admin_log WHERE chain_id = %s"
                        " ORDER BY chain_seq DESC LIMIT 1", (ADMIN_CHAIN,)).fetchone()
    head = Head(last[0], bytes(last[1])) if last else Head()
    # The JSON values as PostgreSQL will give them back (jsonb normalises), so verify
    # recomputes the very same hash from what it reads.
    row = conn.execute("SELECT nextval('admin_log_id_seq'), now(), %s::jsonb, %s::jsonb",
                       (None if before is None else Jsonb(before), None if after is None else Jsonb(after))).fetchone()
    assert row is not None
    rid, ts, b, a = row
    (linked,), _ = link_rows("admin_log", ADMIN_CHAIN, ADMIN_COLUMNS, head, [(rid, ts, actor, action, target, b, a)])
    cols = ", ".join((*ADMIN_COLUMNS, *CHAIN_COLUMNS))
    marks = ", ".join(["%s"] * len(linked))
    values = list(linked)
    values[5] = None if b is None else Jsonb(b)
    values[6] = None if a is None else Jsonb(a)
    conn.execute(f"INSERT INTO admin_log ({cols}) VALUES ({marks})", values)  # noqa: S608 - fixed names

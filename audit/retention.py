"""Retention of `request_log`: time partitions made ahead, old ones exported and dropped.

`request_log` is range-partitioned on `ts` (migration 12). `ensure_partitions` makes partitions
(UTC months or days, `audit.retention.partition`) up to `premake` periods ahead of now. `retain`
takes every partition whose whole range is older than `keep_days` and, in one transaction holding
the partition locked:

1. writes it to `<export_dir>/<partition>.jsonl` (canonical JSON lines: the public key, the
   partition, its rows in chain order, the chains' registrations and checkpoints; fsync'd);
2. records an `audit.retain` action in the admin chain naming the file's SHA-256, the row count
   and, per chain, the runs of seqs that leave with it and the hash of each run's last link;
3. drops the partition.

`ccr audit verify` reads those records: a chain's seqs missing exactly as a run says are not a
removal, and the next link must carry that run's last hash. A partition's rows are not always a
prefix of a chain (a request that started before the boundary may be linked after one that started
after it), hence runs rather than one boundary per chain.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from audit.admin import append_admin
from audit.chain import canonical

if TYPE_CHECKING:
    from ccr.config import GatewayConfig

RETAIN_ACTION = "audit.retain"
DEFAULT_PARTITION = "request_log_default"
_BOUND = re.compile(r"FOR VALUES FROM \('([^']+)'\) TO \('([^']+)'\)")


class PartitionError(Exception):
    """A partition could not be made; the rows keep going to the default partition meanwhile."""


@dataclass(frozen=True)
class Partition:
    name: str
    lo: datetime | None  # None: the default partition
    hi: datetime | None


def partitions(conn: psycopg.Connection) -> list[Partition]:
    """request_log's partitions, oldest first (the default one last)."""
    conn.execute("SET TIME ZONE 'UTC'")
    out = []
    for name, bound in conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'request_log'::regclass"):
        m = _BOUND.fullmatch(bound)
        if m is None:
            out.append(Partition(name, None, None))
        else:
            out.append(Partition(name, datetime.fromisoformat(m[1]), datetime.fromisoformat(m[2])))
    return sorted(out, key=lambda p: (p.lo is None, p.lo or datetime.min.replace(tzinfo=UTC)))


def _floor(t: datetime, unit: str) -> datetime:
    t = t.astimezone(UTC)
    return datetime(t.year, t.month, 1 if unit == "month" else t.day, tzinfo=UTC)


def _next(t: datetime, unit: str) -> datetime:
    t = _floor(t, unit)
    if unit == "day":
        return t + timedelta(days=1)
    return datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)


def ensure_partitions(conn: psycopg.Connection, unit: str, premake: int, now: datetime) -> list[str]:
    """Make partitions from the end of the last one (or this period) to `premake` periods after now's.

    Safe to run from several processes at once (a partition another one made is skipped)."""
    ranged = [p for p in partitions(conn) if p.hi is not None]
    target = _floor(now, unit)
    for _ in range(premake + 1):
        target = _next(target, unit)
    start = max((p.hi for p in ranged if p.hi is not None), default=_floor(now, unit))
    made = []
    while start < target:
        # After partitions of a coarser unit the first one may be shorter: it ends on the next boundary.
        end = _next(start, unit)
        name = f"request_log_{start:%Y%m%d}"
        try:
            with conn.transaction():
                conn.execute("SELECT audit_add_partition(%s, %s, %s)", (name, start, end))
        except psycopg.errors.DuplicateTable:
            pass  # another process (a replica starting at the same time) made it
        except psycopg.errors.CheckViolation as e:
            # Rows of that range already sit in the default partition (no partition was made in time).
            raise PartitionError(f"cannot make {name} ({start:%Y-%m-%d} to {end:%Y-%m-%d}): request_log_default "
                                 f"holds rows of that range ({e.diag.message_primary})") from None
        made.append(name)
        start = end
    return made


def runs(seqs: list[tuple[int, bytes]]) -> list[list[Any]]:
    """Maximal runs of consecutive seqs: [[first, last, hex hash of last], ...] (input sorted by seq)."""
    out: list[list[Any]] = []
    for seq, h in seqs:
        if out and out[-1][1] == seq - 1:
            out[-1][1], out[-1][2] = seq, h.hex()
        else:
            out.append([seq, seq, h.hex()])
    return out


def _write_export(conn: psycopg.Connection, p: Partition, path: Path, public_key_pem: str | None
                  ) -> tuple[int, str, dict[str, list[list[Any]]]]:
    """The partition as JSON Lines at `path` (fsync'd, then renamed into place): rows, sha256, chain runs."""
    tmp = path.with_name(f".{path.name}.tmp")
    digest = hashlib.sha256()
    n = 0
    seqs: dict[str, list[tuple[int, bytes]]] = {}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        def line(kind: str, obj: dict[str, Any]) -> None:
            data = canonical({"kind": kind, **obj}) + b"\n"
            digest.update(data)
            f.write(data)

        if public_key_pem is not None:
            line("public_key", {"pem": public_key_pem})
        line("partition", {"table": "request_log", "name": p.name, "from": p.lo, "to": p.hi})
        with conn.cursor(name=f"retain_{p.name}", row_factory=dict_row) as cur:
            cur.itersize = 2000
            cur.execute(sql.SQL("SELECT * FROM {} ORDER BY chain_id NULLS FIRST, chain_seq, id").format(
                sql.Identifier(p.name)))
            for r in cur:
                line("request_log", r)
                n += 1
                if r["chain_id"] is not None:
                    seqs.setdefault(r["chain_id"], []).append((r["chain_seq"], bytes(r["row_hash"])))
        chains = sorted(seqs)
        with conn.cursor(row_factory=dict_row) as cur:
            for r in cur.execute("SELECT * FROM audit_chains WHERE chain_id = ANY(%s) ORDER BY chain_id", (chains,)):
                line("chain", r)
            for r in cur.execute("SELECT * FROM audit_checkpoints WHERE chain_id = ANY(%s)"
                                 " ORDER BY chain_id, chain_seq", (chains,)):
                line("checkpoint", r)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return n, digest.hexdigest(), {c: runs(s) for c, s in seqs.items()}


@dataclass
class Retained:
    partition: str
    rows: int
    export: Path
    sha256: str


def retain(dsn: str, *, keep_days: int, export_dir: Path, now: datetime, public_key_pem: str | None = None,
           actor: str = "ccr audit retain", dry_run: bool = False,
           on_export: Callable[[Partition], None] | None = None) -> list[Retained]:
    """Export and drop every partition wholly older than `now - keep_days` (oldest first)."""
    cutoff = now - timedelta(days=keep_days)
    export_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    done = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for p in partitions(conn):
            if p.hi is None or p.hi > cutoff:
                continue
            if dry_run:
                done.append(Retained(p.name, -1, export_dir / f"{p.name}.jsonl", ""))
                continue
            path = export_dir / f"{p.name}.jsonl"
            with conn.transaction():
                # Nothing is written to it between the export and the drop.
                conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(p.name)))
                n, sha, chain_runs = _write_export(conn, p, path, public_key_pem)
                if on_export is not None:
                    on_export(p)
                append_admin(conn, actor, RETAIN_ACTION, p.name, None, {
                    "table": "request_log", "partition": p.name, "from": p.lo.isoformat() if p.lo else None,
                    "to": p.hi.isoformat(), "rows": n, "export": path.name, "sha256": sha, "chains": chain_runs})
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(p.name)))
            done.append(Retained(p.name, n, path, sha))
    return done


def retained_runs(conn: psycopg.Connection) -> dict[str, list[tuple[int, int, bytes]]]:
    """Per chain, the runs of seqs retention dropped (from the admin chain), merged and sorted."""
    raw: dict[str, list[tuple[int, int, bytes]]] = {}
    for (after,) in conn.execute("SELECT after FROM admin_log WHERE action = %s", (RETAIN_ACTION,)):
        for chain, rs in ((after or {}).get("chains") or {}).items():
            for first, last, h in rs:
                raw.setdefault(chain, []).append((int(first), int(last), bytes.fromhex(h)))
    out: dict[str, list[tuple[int, int, bytes]]] = {}
    for chain, rs in raw.items():
        merged: list[tuple[int, int, bytes]] = []
        for first, last, h in sorted(rs):
            if merged and merged[-1][1] == first - 1:
                merged[-1] = (merged[-1][0], last, h)
            else:
                merged.append((first, last, h))
        out[chain] = merged
    return out


def make_ahead(config: GatewayConfig, dsn: str, now: datetime | None = None) -> str | None:
    """At a gateway's start (`ccr up`, `ccr serve accesslog`): partitions ahead per audit.retention, so one
    whose `ccr audit retain` timer is missing still writes into time partitions for a while. A warning
    to show when a partition could not be made (rows still go to the default partition), else None."""
    r = config.audit.retention
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ensure_partitions(conn, r.partition, r.premake, now or datetime.now(UTC))
    except PartitionError as e:
        return f"audit partitions: {e}"
    return None

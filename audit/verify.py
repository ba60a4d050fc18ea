"""`ccr audit verify`: walk every hash chain and check the signed checkpoints.

For each chain (audit_chains) the links are read in sequence order and each must:
- follow the previous one (seq + 1: otherwise rows were removed),
- hash to its stored row_hash from its own content (otherwise it was changed; when the hash
  matches the same content at another position it was moved: reordered),
- carry the previous link's hash as prev_hash (otherwise a row before it was removed or moved).
Every checkpoint's Ed25519 signature must verify with the public key, and the link it names
must exist with the hash it signed (otherwise rows were removed from the end, or the chain was
rewritten with recomputed hashes). Rows without a chain link, other than those written before
the chains existed, are reported too. The first problem of each chain is named; walking stops
there for that chain (everything after it is in doubt).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from psycopg import sql

from audit.chain import GENESIS, checkpoint_message, key_id, link_hash
from audit.retention import retained_runs

TABLES = ("request_log", "admin_log")
MOVE_WINDOW = 2000
# The column that names a row for a person, per table.
_LABEL = {"request_log": "request_id", "admin_log": "target"}


@dataclass
class Problem:
    table: str
    chain_id: str | None
    seq: int | None
    row_id: int | None
    label: str | None
    what: str

    def __str__(self) -> str:
        where = f"{self.table}"
        if self.row_id is not None:
            where += f" row id={self.row_id}"
        if self.label is not None:
            where += f" ({_LABEL[self.table]}={self.label!r})"
        if self.chain_id is not None:
            where += f" chain {self.chain_id}"
        if self.seq is not None:
            where += f" seq {self.seq}"
        return f"{where}: {self.what}"


@dataclass
class Report:
    chains: int = 0
    rows: int = 0
    checkpoints: int = 0
    unsigned_tail: dict[str, int] = field(default_factory=dict)  # chain -> links after its last checkpoint
    legacy_rows: int = 0
    retained_rows: int = 0  # links exported and dropped by retention (recorded in the admin chain)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Checkpoint:
    ts: datetime
    table: str
    chain_id: str
    seq: int
    row_hash: bytes
    key_id: str
    signature: bytes
    valid: bool = False


def _checkpoints(conn: psycopg.Connection, keys: dict[str, Ed25519PublicKey], report: Report
                 ) -> dict[str, list[_Checkpoint]]:
    out: dict[str, list[_Checkpoint]] = {}
    for row in conn.execute("SELECT ts, log_table, chain_id, chain_seq, row_hash, key_id, signature"
                            " FROM audit_checkpoints ORDER BY chain_id, chain_seq"):
        cp = _Checkpoint(row[0], row[1], row[2], row[3], bytes(row[4]), row[5], bytes(row[6]))
        report.checkpoints += 1
        key = keys.get(cp.key_id)
        if key is None:
            report.problems.append(Problem(cp.table, cp.chain_id, cp.seq, None, None,
                                           f"checkpoint signed by unknown key {cp.key_id!r}"))
        else:
            try:
                key.verify(cp.signature, checkpoint_message(cp.table, cp.chain_id, cp.seq, cp.row_hash, cp.ts))
                cp.valid = True
            except InvalidSignature:
                report.problems.append(Problem(cp.table, cp.chain_id, cp.seq, None, None,
                                               "checkpoint signature does not verify (checkpoint forged or altered)"))
        out.setdefault(cp.chain_id, []).append(cp)
    return out


def _local_checkpoints(path: Path, keys: dict[str, Ed25519PublicKey], db: dict[str, list[_Checkpoint]],
                       report: Report) -> None:
    """Checkpoints from the receivers' local copy that the database no longer has, added to `db`.

    Only those whose signature verifies count: the file is a second witness, not an authority.
    """
    have = {(c.chain_id, c.seq) for cps in db.values() for c in cps}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            d = json.loads(line)
            cp = _Checkpoint(datetime.fromisoformat(d["ts"]), d["table"], d["chain"], int(d["seq"]),
                             bytes.fromhex(d["hash"]), d["key_id"], bytes.fromhex(d["signature"]))
        except (ValueError, KeyError, TypeError):
            report.problems.append(Problem("audit_checkpoints", None, None, None, None,
                                           f"{path}:{n}: unreadable checkpoint copy"))
            continue
        if (cp.chain_id, cp.seq) in have:
            continue
        key = keys.get(cp.key_id)
        try:
            if key is None:
                raise InvalidSignature
            key.verify(cp.signature, checkpoint_message(cp.table, cp.chain_id, cp.seq, cp.row_hash, cp.ts))
        except InvalidSignature:
            continue  # not ours: says nothing about the database
        cp.valid = True
        have.add((cp.chain_id, cp.seq))
        report.checkpoints += 1
        report.problems.append(Problem(cp.table, cp.chain_id, cp.seq, None, None,
                                       f"checkpoint signed at {cp.ts.isoformat()} is in {path.name} but not in the "
                                       "database (checkpoints removed)"))
        db.setdefault(cp.chain_id, []).append(cp)
    for cps in db.values():
        cps.sort(key=lambda c: c.seq)


def _links(conn: psycopg.Connection, table: str, chain_id: str, columns: list[str], start: int
           ) -> Iterator[tuple[dict[str, Any], int, bytes, bytes]]:
    q = sql.SQL("SELECT {cols}, chain_seq, prev_hash, row_hash FROM {t} WHERE chain_id = %s AND chain_seq >= %s"
                " ORDER BY chain_seq").format(cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
                                              t=sql.Identifier(table))
    with conn.cursor(name=f"verify_{table}") as cur:  # server-side: chains can be long
        cur.itersize = 2000
        cur.execute(q, (chain_id, start))
        for r in cur:
            n = len(columns)
            yield dict(zip(columns, r[:n], strict=True)), r[n], bytes(r[n + 1] or b""), bytes(r[n + 2] or b""),


def _moved_from(table: str, chain_id: str, row: dict[str, Any], seq: int, prev: bytes, stored: bytes) -> int | None:
    """The position a link was written at, when its content still hashes there (it was moved).

    The hash covers the position, so trying the positions around this one finds a local
    reordering; a link moved further than MOVE_WINDOW reads as changed.
    """
    for d in range(1, MOVE_WINDOW + 1):
        for s in (seq - d, seq + d):
            if s >= 1 and link_hash(table, chain_id, s, prev, row) == stored:
                return s
    return None


def _walk(conn: psycopg.Connection, table: str, chain_id: str, columns: list[str],
          checkpoints: list[_Checkpoint], since: datetime | None, report: Report,
          retained: list[tuple[int, int, bytes]] | None = None) -> None:
    signed = [c for c in checkpoints if c.valid]
    dropped = retained or []
    anchor = None
    if since is not None:
        anchor = next((c for c in reversed(signed) if c.ts <= since), None)
    start = anchor.seq if anchor else 1
    want = {c.seq: c for c in signed if c.seq >= start}
    expected, prev = start, (None if anchor else GENESIS)
    last = start - 1

    def problem(row: dict[str, Any], seq: int | None, what: str) -> None:
        report.problems.append(Problem(table, chain_id, seq, row.get("id"), row.get(_LABEL[table]), what))

    def run_from(first: int, at_anchor: bool) -> tuple[int, int, bytes] | None:
        """The run retention dropped that starts at `first` (or, at the walk's anchor, covers it)."""
        return next((r for r in dropped if r[0] == first or (at_anchor and r[0] <= first <= r[1])), None)

    retained_to = 0  # the last seq of the retained run just crossed (0: none)
    for row, seq, prev_hash, stored in _links(conn, table, chain_id, columns, start):
        report.rows += 1
        if seq != expected:
            # Exported and dropped by `ccr audit retain` (recorded in the admin chain): not a removal,
            # and this link must carry the hash of the run's last one.
            run = run_from(expected, prev is None)
            if run is None or run[1] != seq - 1:
                if run is not None and run[1] < seq - 1:
                    expected = run[1] + 1  # what retention accounts for is not the problem
                gap = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
                problem(row, seq, f"{gap} missing before this row (removed)")
                return
            expected, prev, retained_to = seq, run[2], run[1]
            report.retained_rows += run[1] - run[0] + 1
        else:
            retained_to = 0
        if link_hash(table, chain_id, seq, prev_hash, row) != stored:
            moved = _moved_from(table, chain_id, row, seq, prev_hash, stored)
            problem(row, seq, f"was written at seq {moved}: rows reordered" if moved
                    else "content changed (hash does not match the row)")
            return
        if prev is not None and prev_hash != prev:
            problem(row, seq, f"does not link to the last exported row (seq {retained_to}) its retention recorded"
                    if retained_to else
                    f"does not link to seq {seq - 1} (a row before it was removed, changed or reordered)")
            return
        cp = want.get(seq)
        if cp is not None and cp.row_hash != stored:
            problem(row, seq, f"differs from the checkpoint signed at {cp.ts.isoformat()} (chain rewritten)")
            return
        prev, expected, last = stored, seq + 1, seq
    tail = run_from(last + 1, prev is None)
    if tail is not None:  # the chain's newest links left with a partition
        report.retained_rows += tail[1] - last
        last = tail[1]
    for c in signed:
        r = next((r for r in dropped if r[1] == c.seq), None)
        if r is not None and c.row_hash != r[2]:
            report.problems.append(Problem(table, chain_id, c.seq, None, None,
                                           f"the checkpoint signed at {c.ts.isoformat()} differs from the hash "
                                           "retention recorded for this exported row (export or record altered)"))
            return
    beyond = [c for c in signed if c.seq > last and not any(r[0] <= c.seq <= r[1] for r in dropped)]
    if beyond:
        c = beyond[0]
        report.problems.append(Problem(table, chain_id, last + 1, None, None,
                                       f"rows from seq {last + 1} to at least {c.seq} removed (checkpoint signed "
                                       f"at {c.ts.isoformat()} names seq {c.seq})"))
        return
    covered = max((c.seq for c in signed), default=0)
    if last > covered:
        report.unsigned_tail[chain_id] = last - covered


def verify(dsn: str, keys: list[Ed25519PublicKey], since: datetime | None = None,
           checkpoint_copy: Path | None = None) -> Report:
    report = Report()
    by_id = {key_id(k): k for k in keys}
    with psycopg.connect(dsn) as conn:
        checkpoints = _checkpoints(conn, by_id, report)
        if checkpoint_copy is not None:
            _local_checkpoints(checkpoint_copy, by_id, checkpoints, report)
        chains = conn.execute("SELECT chain_id, log_table, columns FROM audit_chains ORDER BY started_at, chain_id"
                              ).fetchall()
        known = {c[0] for c in chains}
        for chain_id in sorted(set(checkpoints) - known):
            report.problems.append(Problem(checkpoints[chain_id][0].table, chain_id, None, None, None,
                                           "chain has signed checkpoints but is not registered (chain removed)"))
        retained = retained_runs(conn)
        for chain_id, table, columns in chains:
            report.chains += 1
            _walk(conn, table, chain_id, list(columns), checkpoints.get(chain_id, []), since, report,
                  retained.get(chain_id) if table == "request_log" else None)
        for table in TABLES:
            t = sql.Identifier(table)
            legacy = conn.execute(sql.SQL("SELECT coalesce(max(max_id), 0) FROM audit_unchained_before"
                                          " WHERE log_table = %s"), (table,)).fetchone()
            bound = legacy[0] if legacy else 0
            (n,) = conn.execute(sql.SQL("SELECT count(*) FROM {t} WHERE chain_id IS NULL AND id <= %s").format(t=t),
                                (bound,)).fetchone() or (0,)
            report.legacy_rows += n
            for rid, label in conn.execute(
                    sql.SQL("SELECT id, {l} FROM {t} WHERE chain_id IS NULL AND id > %s ORDER BY id LIMIT 1").format(
                        t=t, l=sql.Identifier(_LABEL[table])), (bound,)):
                report.problems.append(Problem(table, None, None, rid, label,
                                               "has no chain link (inserted outside the audit writers)"))
            for (chain_id,) in conn.execute(
                    sql.SQL("SELECT DISTINCT chain_id FROM {t} WHERE chain_id IS NOT NULL"
                            " AND chain_id NOT IN (SELECT chain_id FROM audit_chains)").format(t=t)):
                report.problems.append(Problem(table, chain_id, None, None, None,
                                               "rows of an unregistered chain (registration removed)"))
    return report


def verify_export(path: Path, keys: list[Ed25519PublicKey]) -> tuple[list[str], dict[str, int], str]:
    """Check a retention export on its own: every row hashes to its link from its content, consecutive
    links of a chain follow each other, every checkpoint's signature verifies and, where it names a row
    in the file, matches it. Returns (problems, counts, the file's SHA-256 to compare with the admin
    chain's `audit.retain` record)."""
    import hashlib

    problems: list[str] = []
    counts = {"rows": 0, "chains": 0, "checkpoints": 0}
    chains: dict[str, list[str]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    cps: list[dict[str, Any]] = []
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            digest.update(raw)
            try:
                d = json.loads(raw)
                kind = d.pop("kind")
            except (ValueError, KeyError, AttributeError):
                problems.append(f"{path.name}:{n}: not an export line")
                continue
            if kind == "chain":
                chains[d["chain_id"]] = list(d["columns"])
            elif kind == "request_log" and d.get("chain_id"):
                rows.setdefault(d["chain_id"], []).append(d)
            elif kind == "checkpoint":
                cps.append(d)
    by_id = {key_id(k): k for k in keys}
    hashes: dict[tuple[str, int], bytes] = {}
    for chain, rs in rows.items():
        counts["chains"] += 1
        columns = chains.get(chain)
        if columns is None:
            problems.append(f"chain {chain}: rows without the chain's registration")
            continue
        prev: tuple[int, bytes] | None = None
        for r in sorted(rs, key=lambda r: r["chain_seq"]):
            counts["rows"] += 1
            seq, stored, prev_hash = r["chain_seq"], bytes.fromhex(r["row_hash"]), bytes.fromhex(r["prev_hash"])
            if link_hash("request_log", chain, seq, prev_hash, {c: r[c] for c in columns}) != stored:
                problems.append(f"request_log row id={r['id']} (request_id={r['request_id']!r}) chain {chain} "
                                f"seq {seq}: content changed (hash does not match the row)")
            elif prev is not None and prev[0] == seq - 1 and prev[1] != prev_hash:
                problems.append(f"request_log row id={r['id']} chain {chain} seq {seq}: does not link to seq {seq - 1}")
            prev = (seq, stored)
            hashes[(chain, seq)] = stored
    for c in cps:
        counts["checkpoints"] += 1
        ts = datetime.fromisoformat(c["ts"])
        h = bytes.fromhex(c["row_hash"])
        key = by_id.get(c["key_id"])
        try:
            if key is None:
                raise InvalidSignature
            key.verify(bytes.fromhex(c["signature"]), checkpoint_message(c["log_table"], c["chain_id"],
                                                                         c["chain_seq"], h, ts))
        except InvalidSignature:
            problems.append(f"checkpoint chain {c['chain_id']} seq {c['chain_seq']}: signature does not verify"
                            + (f" (unknown key {c['key_id']!r})" if key is None else ""))
            continue
        got = hashes.get((c["chain_id"], c["chain_seq"]))
        if got is not None and got != h:
            problems.append(f"request_log chain {c['chain_id']} seq {c['chain_seq']}: differs from the checkpoint "
                            f"signed at {c['ts']} (chain rewritten)")
    return problems, counts, digest.hexdigest()

"""Retention of the audit trail: request_log partitioned by time, old partitions exported (verifiable on
their own) and dropped, `ccr audit verify` still passing afterwards and still catching tampering; the
append-only guarantees hold on every partition. The clock is injected (`now=` / `--now`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml

from audit.chain import signing_key
from audit.entry import entry_to_row
from audit.retention import RETAIN_ACTION, _next, ensure_partitions, partitions
from audit.verify import verify, verify_export
from audit.writer import RequestLogWriter
from ccr import db
from ccr.audit_role import audit_role_dsn
from ccr.cli import main
from tests.harness import create_database
from tests.test_audit import entry

MONTH0 = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
MONTH1 = _next(MONTH0, "month")


def _write(dsn: str, audit_dir: Path, starts: list[datetime]) -> tuple[str, list[str]]:
    """One receiver's chain, one committed (and signed) batch per row, in this order: (chain, request ids)."""
    rids = [f"ret-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(starts))]

    async def run() -> str:
        w = RequestLogWriter(dsn, signer=signing_key(audit_dir), checkpoint_every_rows=1)
        w.start()
        for rid, ts in zip(rids, starts, strict=True):
            row = entry_to_row(entry(rid, start=ts))
            assert row is not None
            await w.put(row)
            await w.flush()
        await w.stop()
        return w.chain_id

    return asyncio.run(run()), rids


@pytest.fixture
def trail(postgres_server: dict[str, object], tmp_path: Path) -> tuple[str, Path]:
    dsn = create_database(str(postgres_server["admin_dsn"]), prefix="retain")
    db.migrate(dsn)
    return dsn, tmp_path / "audit"


def _config(tmp_path: Path, dsn: str, **retention: object) -> Path:
    cfg = {"version": 1, "providers": [{"name": "anthropic"}],
           "models": [{"match": "claude-*", "provider": "anthropic"}],
           "storage": {"postgres_dsn": dsn, "data_dir": str(tmp_path / "data")},
           "audit": {"retention": retention}}
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_partitions_are_made_ahead_at_the_configured_granularity(trail: tuple[str, Path]) -> None:
    dsn, _ = trail
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = partitions(conn)
        assert before[-1].lo is None and before[-1].name == "request_log_default"
        months = [p for p in before if p.lo is not None]
        assert months[0].lo == MONTH0 and len(months) == 3  # this month and two ahead (migration 12)
        # Days after the months, up to three days ahead of an injected "now" well past them.
        now = months[-1].hi + timedelta(days=1, hours=5)
        made = ensure_partitions(conn, "day", 3, now)
        after = [p for p in partitions(conn) if p.lo is not None]
    assert made == [f"request_log_{(months[-1].hi + timedelta(days=i)):%Y%m%d}" for i in range(5)]
    assert [(p.hi - p.lo) for p in after[3:]] == [timedelta(days=1)] * 5
    assert after[-1].hi == months[-1].hi + timedelta(days=5)  # day of now, then 3 more, from the gap's start
    assert all(a.hi == b.lo for a, b in zip(after, after[1:], strict=False))  # contiguous


def test_retention_exports_drops_and_verify_still_passes(trail: tuple[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    dsn, audit_dir = trail
    late = MONTH1 - timedelta(microseconds=1)  # a request that began just before the boundary ...
    # ... linked after one that began after it: month 0's rows are seqs 1, 2 and 4.
    starts = [MONTH0 + timedelta(hours=1), MONTH0 + timedelta(hours=2), MONTH1 + timedelta(seconds=1), late,
              MONTH1 + timedelta(hours=1), MONTH1 + timedelta(hours=2)]
    chain, rids = _write(dsn, audit_dir, starts)
    keys = [signing_key(audit_dir).public_key()]
    assert verify(dsn, keys).ok

    config = _config(tmp_path, dsn, keep_days=30, export_dir=str(tmp_path / "exports"))
    now = MONTH1 + timedelta(days=31)  # month 0 is wholly older than 30 days; month 1 is not
    capsys.readouterr()
    assert main(["audit", "retain", "-c", str(config), "--now", now.isoformat()]) == 0
    out = capsys.readouterr().out
    name = f"request_log_{MONTH0:%Y%m%d}"
    assert f"exported 3 row(s) of {name}" in out and "dropped" in out, out
    with psycopg.connect(dsn) as conn:
        names = {p.name for p in partitions(conn)}
        left = [r for (r,) in conn.execute("SELECT request_id FROM request_log WHERE chain_id = %s ORDER BY chain_seq",
                                           (chain,))]
        (after,) = conn.execute("SELECT after FROM admin_log WHERE action = %s AND target = %s",
                                (RETAIN_ACTION, name)).fetchone() or (None,)
    assert name not in names and f"request_log_{MONTH1:%Y%m%d}" in names
    assert left == [rids[2], rids[4], rids[5]]
    assert after["rows"] == 3 and [r[:2] for r in after["chains"][chain]] == [[1, 2], [4, 4]]

    # The chain restarts from the recorded boundaries; the admin record itself is a link of the admin chain.
    report = verify(dsn, keys)
    assert report.ok, [str(p) for p in report.problems]
    assert report.retained_rows == 3 and report.rows == 3 + 1  # three request links left, one admin link
    # --since anchored on a checkpoint whose row left with the partition: the walk crosses the run.
    with psycopg.connect(dsn) as conn:
        (signed_at,) = conn.execute("SELECT ts FROM audit_checkpoints WHERE chain_id = %s AND chain_seq = 2",
                                    (chain,)).fetchone() or (None,)
    since = verify(dsn, keys, since=signed_at)
    assert since.ok and since.rows == 3 + 1, [str(p) for p in since.problems]

    capsys.readouterr()
    assert main(["audit", "verify", "-c", str(config), "--public-key", str(audit_dir / "signing.pub")]) == 0
    assert "3 row(s) exported and dropped by retention" in capsys.readouterr().out

    # The export verifies on its own, and is the file the admin chain names.
    export = tmp_path / "exports" / f"{name}.jsonl"
    problems, counts, sha = verify_export(export, keys)
    assert problems == [] and counts["rows"] == 3 and counts["checkpoints"] >= 6
    assert sha == after["sha256"]
    lines = [json.loads(x) for x in export.read_text().splitlines()]
    assert [x["request_id"] for x in lines if x["kind"] == "request_log"] == [rids[0], rids[1], rids[3]]

    # An edited export is named ...
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(export.read_text().replace('"status":200', '"status":201', 1))
    problems, _, _ = verify_export(tampered, keys)
    assert len(problems) == 1 and "content changed" in problems[0] and rids[0] in problems[0], problems

    # ... and so is a row removed from what remains (not a retention gap).
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE request_log DISABLE TRIGGER request_log_append_only")
        conn.execute("DELETE FROM request_log WHERE request_id = %s", (rids[4],))
        conn.execute("ALTER TABLE request_log ENABLE TRIGGER request_log_append_only")
    report = verify(dsn, keys)
    assert [str(p) for p in report.problems] and "seq 5 missing before this row (removed)" in str(report.problems[0])
    assert report.problems[0].label == rids[5]


def test_a_forged_retention_record_is_caught(trail: tuple[str, Path], tmp_path: Path) -> None:
    """Rows removed by hand and passed off as retention: the forged record breaks the admin chain, and
    a run that does not end on the hash the next link carries is named."""
    dsn, audit_dir = trail
    chain, rids = _write(dsn, audit_dir, [MONTH0 + timedelta(hours=i) for i in range(1, 4)])
    keys = [signing_key(audit_dir).public_key()]
    from audit.admin import append_admin

    with psycopg.connect(dsn) as conn:
        # A proper admin link (the admin chain stays valid), with a made-up hash for the run.
        append_admin(conn, "mallory", RETAIN_ACTION, "request_log_fake", None,
                     {"chains": {chain: [[1, 1, "00" * 32]]}})
        conn.execute("ALTER TABLE request_log DISABLE TRIGGER request_log_append_only")
        conn.execute("DELETE FROM request_log WHERE request_id = %s", (rids[0],))
        conn.execute("ALTER TABLE request_log ENABLE TRIGGER request_log_append_only")
    problems = [str(p) for p in verify(dsn, keys).problems]
    assert any("does not link to the last exported row (seq 1)" in p and rids[1] in p for p in problems), problems


def test_append_only_on_every_partition(trail: tuple[str, Path], tmp_path: Path) -> None:
    dsn, audit_dir = trail
    _, rids = _write(dsn, audit_dir, [MONTH0 + timedelta(hours=1)])
    with psycopg.connect(dsn, autocommit=True) as conn:
        made = ensure_partitions(conn, "day", 1, MONTH1 + timedelta(days=70))
    assert made
    part = f"request_log_{MONTH0:%Y%m%d}"
    role = audit_role_dsn(dsn, tmp_path / "audit.password")
    with psycopg.connect(role, autocommit=True) as conn:
        for p in (part, made[-1], "request_log_default"):
            for stmt in (f"UPDATE {p} SET status = 500", f"DELETE FROM {p}", f"TRUNCATE {p}",
                         f"INSERT INTO {p} (ts, request_id, method, path, status) VALUES (now(), 'x', 'GET', '/', 1)"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                    conn.execute(stmt)  # type: ignore[arg-type]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"DROP TABLE {part}")  # type: ignore[arg-type]
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Row triggers fire per row (the partition holding the row, and the parent); TRUNCATE on each.
        for p in (part, "request_log"):
            for stmt in (f"UPDATE {p} SET status = 500", f"DELETE FROM {p}"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                    conn.execute(stmt)  # type: ignore[arg-type]
        for p in (part, made[-1], "request_log_default", "request_log"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(f"TRUNCATE {p}")  # type: ignore[arg-type]
        assert conn.execute("SELECT status FROM request_log WHERE request_id = %s", (rids[0],)).fetchone() == (200,)


def test_nothing_is_dropped_without_keep_days(trail: tuple[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    dsn, audit_dir = trail
    _write(dsn, audit_dir, [MONTH0 + timedelta(hours=1)])
    config = _config(tmp_path, dsn)
    capsys.readouterr()
    assert main(["audit", "retain", "-c", str(config), "--now", (MONTH1 + timedelta(days=400)).isoformat()]) == 0
    assert "nothing is dropped" in capsys.readouterr().err
    with psycopg.connect(dsn) as conn:
        assert f"request_log_{MONTH0:%Y%m%d}" in {p.name for p in partitions(conn)}
        assert conn.execute("SELECT count(*) FROM request_log").fetchone() == (1,)


def test_upgrade_keeps_every_older_chain_verifiable(postgres_server: dict[str, object], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A database with a chain from before migration 11 (fewer columns) and one from before 12 (not
    partitioned) is upgraded: rows are copied into time partitions and both chains still verify."""
    from audit.chain import Head, checkpoint_message, key_id, link_rows
    from audit.entry import COLUMNS

    dsn = create_database(str(postgres_server["admin_dsn"]), prefix="upgrade")
    full = list(db.MIGRATIONS)
    monkeypatch.setattr(db, "MIGRATIONS", [m for m in full if m[0] <= 10])
    db.migrate(dsn)
    signer = signing_key(tmp_path / "audit")
    # The columns before migration 11 (later migrations only add columns after them).
    old_cols = ("id", *COLUMNS[:COLUMNS.index("client_request_id") + 1])
    old_rows = []
    for i, ts in enumerate([datetime(2025, 11, 3, tzinfo=UTC), MONTH0 + timedelta(hours=1)]):
        r = entry_to_row(entry(f"v10-{uuid.uuid4().hex[:6]}-{i}", start=ts))
        assert r is not None
        old_rows.append(r[:len(old_cols) - 1])
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO audit_chains (chain_id, log_table, columns) VALUES ('v10', 'request_log', %s)",
                     (list(old_cols),))
        ids = [i for (i,) in conn.execute("SELECT nextval('request_log_id_seq') FROM generate_series(1, 2)")]
        linked, head = link_rows("request_log", "v10", old_cols, Head(), [(i, *r) for i, r in zip(ids, old_rows,
                                                                                                  strict=True)])
        cols = ", ".join((*old_cols, "chain_id", "chain_seq", "prev_hash", "row_hash"))
        conn.cursor().executemany(f"INSERT INTO request_log ({cols}) VALUES ({', '.join(['%s'] * len(linked[0]))})",
                                  linked)
        ts = datetime.now(UTC)
        conn.execute("INSERT INTO audit_checkpoints (ts, log_table, chain_id, chain_seq, row_hash, key_id, signature)"
                     " VALUES (%s, 'request_log', 'v10', %s, %s, %s, %s)",
                     (ts, head.seq, head.hash, key_id(signer.public_key()),
                      signer.sign(checkpoint_message("request_log", "v10", head.seq, head.hash, ts))))
    # Every migration but the partitioning: this receiver's columns (11 and later), one table.
    monkeypatch.setattr(db, "MIGRATIONS", [m for m in full if m[0] != 12])
    db.migrate(dsn)
    chain11, _ = _write(dsn, tmp_path / "audit", [MONTH0 + timedelta(hours=2), MONTH0 + timedelta(hours=3)])
    keys = [signer.public_key()]
    assert verify(dsn, keys).ok

    monkeypatch.setattr(db, "MIGRATIONS", full)
    db.migrate(dsn)
    report = verify(dsn, keys)
    assert report.ok, [str(p) for p in report.problems]
    assert report.chains == 3 and report.rows == 4  # two request_log chains, the (empty) admin chain
    with psycopg.connect(dsn) as conn:
        names = {p.name for p in partitions(conn)}
        assert {"request_log_20251101", f"request_log_{MONTH0:%Y%m%d}"} <= names
        assert conn.execute("SELECT count(*) FROM request_log_20251101").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM request_log_default").fetchone() == (0,)
        # The sequence goes on from the copied rows.
        (nxt,) = conn.execute("SELECT nextval('request_log_id_seq')").fetchone() or (0,)
        assert nxt > max(ids) + 2
    assert chain11


def test_rows_beyond_every_partition_go_to_the_default_and_block_only_that_range(
        trail: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from audit.retention import PartitionError

    dsn, audit_dir = trail
    far = _next(_next(_next(_next(MONTH0, "month"), "month"), "month"), "month") + timedelta(days=2)
    _, rids = _write(dsn, audit_dir, [far])  # past the partitions migration 12 made: kept, in the default one
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT request_id FROM request_log_default").fetchall() == [(rids[0],)]
        with pytest.raises(PartitionError, match="request_log_default holds rows"):
            ensure_partitions(conn, "month", 3, far)
    config = _config(tmp_path, dsn, keep_days=30)
    from audit.retention import make_ahead
    from ccr.config import load_config

    warning = make_ahead(load_config(config), dsn, far)  # what `ccr up` / `ccr serve accesslog` print, and go on
    assert warning is not None and "request_log_default holds rows" in warning
    assert make_ahead(load_config(config), dsn, MONTH0) is None  # nothing to make: no warning
    capsys.readouterr()
    assert main(["audit", "retain", "-c", str(config), "--now", far.isoformat()]) == 1
    assert "request_log_default" in capsys.readouterr().err
    assert verify(dsn, [signing_key(audit_dir).public_key()]).ok

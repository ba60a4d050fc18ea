"""The audit trail holds up: insert-only role, hash chains verified, tampering named, nothing lost
while PostgreSQL is down (issue 11, audit part). Real receiver process, real PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import yaml
from envoy.service.accesslog.v3 import als_pb2_grpc

from audit.spool import Spool, SpoolFull
from ccr import db
from ccr.audit_role import AUDIT_ROLE, audit_role_dsn
from ccr.cli import main
from ccr.localservers import start_postgres
from ccr.procs import Child
from extauth.keys import create_key, revoke_key
from tests.harness import create_database, running_service
from tests.test_audit import entry, messages

CONFIG: dict[str, Any] = {
    "version": 1,
    "providers": [{"name": "anthropic"}],
    "models": [{"match": "claude-*", "provider": "anthropic"}],
    # Every committed batch is signed: the tail a test removes is covered.
    "audit": {"checkpoint_every_rows": 1},
}


def wait_for(cond: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_service_role_may_insert_but_not_change_or_remove(postgres_dsn: str, tmp_path: Path) -> None:
    role_dsn = audit_role_dsn(postgres_dsn, tmp_path / "audit.password")
    assert (tmp_path / "audit.password").stat().st_mode & 0o777 == 0o600
    rid = f"role-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(role_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (AUDIT_ROLE,)
        conn.execute("INSERT INTO audit_chains (chain_id, log_table, columns) VALUES (%s, 'request_log', '{}')",
                     (rid,))
        conn.execute("INSERT INTO request_log (ts, request_id, method, path, status, chain_id, chain_seq)"
                     " VALUES (now(), %s, 'POST', '/v1/messages', 200, %s, 1)", (rid, rid))
        for stmt in ("UPDATE request_log SET status = 500 WHERE request_id = %(r)s",
                     "DELETE FROM request_log WHERE request_id = %(r)s",
                     "TRUNCATE request_log",
                     "UPDATE admin_log SET actor = 'x'",
                     "DELETE FROM audit_checkpoints",
                     "DELETE FROM audit_chains WHERE chain_id = %(r)s"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(stmt, {"r": rid})
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO admin_log (actor, action, target) VALUES ('x', 'y', 'z')")
    # Second line: even the owner is refused while the trigger is on.
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for stmt in ("UPDATE request_log SET status = 500 WHERE request_id = %(r)s",
                     "DELETE FROM request_log WHERE request_id = %(r)s", "TRUNCATE request_log"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(stmt, {"r": rid})
        assert conn.execute("SELECT status FROM request_log WHERE request_id = %s", (rid,)).fetchone() == (200,)


# -- the chain, verified and tampered with ------------------------------------------------


@dataclass
class Trail:
    dsn: str
    config: Path
    audit_dir: Path
    child: Child
    stub: als_pb2_grpc.AccessLogServiceStub


@pytest.fixture
def trail(postgres_server: dict[str, object], tmp_path: Path) -> Iterator[Trail]:
    dsn = create_database(str(postgres_server["admin_dsn"]), prefix="chain")
    db.migrate(dsn)
    role = audit_role_dsn(dsn, tmp_path / "audit.password")
    cfg = {**CONFIG, "storage": {"postgres_dsn": dsn}}
    config = tmp_path / "ccr.yaml"
    config.write_text(yaml.safe_dump(cfg))
    audit_dir = tmp_path / "audit"
    run = tmp_path / "run"
    run.mkdir()
    with running_service("audit", run, yaml.safe_dump(cfg), postgres_dsn=dsn, audit_dsn=role,
                         audit_dir=str(audit_dir)) as child, \
            grpc.insecure_channel(str(child.info["address"])) as channel:
        yield Trail(dsn, config, audit_dir, child, als_pb2_grpc.AccessLogServiceStub(channel))


def verify(t: Trail, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["audit", "verify", "-c", str(t.config), "--public-key", str(t.audit_dir / "signing.pub")])
    return code, capsys.readouterr().out


def tamper(dsn: str, table: str, *statements: tuple[str, tuple[object, ...]]) -> None:
    """As a database owner would: switch the append-only trigger off, change, switch it on."""
    with psycopg.connect(dsn) as conn:
        conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER {table}_append_only")
        for stmt, params in statements:
            conn.execute(stmt, params)
        conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER {table}_append_only")


def row_at(dsn: str, seq: int, chain: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        r = cur.execute("SELECT * FROM request_log WHERE chain_id = %s AND chain_seq = %s", (chain, seq)).fetchone()
    assert r is not None
    return r


def test_verify_names_the_changed_removed_or_reordered_row(trail: Trail, capsys: pytest.CaptureFixture[str]) -> None:
    rec, _ = create_key(trail.dsn, "chained", actor="alice")
    revoke_key(trail.dsn, rec.id, actor="bob")
    p = f"req-{uuid.uuid4().hex[:8]}-"
    for i in range(10):  # one stream per entry: one committed batch, one checkpoint each
        trail.stub.StreamAccessLogs(messages([entry(f"{p}{i}", usage={"input_tokens": i})], 1), timeout=60)
    with psycopg.connect(trail.dsn) as conn:
        (chain,) = conn.execute("SELECT DISTINCT chain_id FROM request_log").fetchone() or (None,)
        n_cp = conn.execute("SELECT count(*) FROM audit_checkpoints WHERE chain_id = %s", (chain,)).fetchone()
    assert n_cp is not None and n_cp[0] >= 9
    code, out = verify(trail, capsys)
    assert code == 0, out
    assert "OK: 2 chain(s), 12 row(s)" in out

    # Changed: one column of one row.
    victim = row_at(trail.dsn, 4, chain)
    tamper(trail.dsn, "request_log", ("UPDATE request_log SET status = 201 WHERE id = %s", (victim["id"],)))
    code, out = verify(trail, capsys)
    assert code == 1
    assert f"request_log row id={victim['id']} (request_id='{victim['request_id']}') chain {chain} seq 4: " \
           "content changed" in out
    tamper(trail.dsn, "request_log", ("UPDATE request_log SET status = 200 WHERE id = %s", (victim["id"],)))
    assert verify(trail, capsys)[0] == 0

    # Removed: a row in the middle.
    gone, after = row_at(trail.dsn, 6, chain), row_at(trail.dsn, 7, chain)
    tamper(trail.dsn, "request_log", ("DELETE FROM request_log WHERE id = %s", (gone["id"],)))
    code, out = verify(trail, capsys)
    assert code == 1
    assert f"row id={after['id']} (request_id='{after['request_id']}') chain {chain} seq 7: " \
           "seq 6 missing before this row (removed)" in out
    cols = list(gone)
    restore = (f"INSERT INTO request_log ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
               tuple(gone.values()))
    tamper(trail.dsn, "request_log", restore)
    assert verify(trail, capsys)[0] == 0

    # Reordered: two rows swap places.
    a, b = row_at(trail.dsn, 2, chain), row_at(trail.dsn, 3, chain)
    swap = [("UPDATE request_log SET chain_seq = -1 WHERE id = %s", (a["id"],)),
            ("UPDATE request_log SET chain_seq = 2 WHERE id = %s", (b["id"],)),
            ("UPDATE request_log SET chain_seq = 3 WHERE id = %s", (a["id"],))]
    tamper(trail.dsn, "request_log", *swap)
    code, out = verify(trail, capsys)
    assert code == 1
    assert f"row id={b['id']} (request_id='{b['request_id']}') chain {chain} seq 2: was written at seq 3: " \
           "rows reordered" in out
    tamper(trail.dsn, "request_log", ("UPDATE request_log SET chain_seq = -1 WHERE id = %s", (b["id"],)),
           ("UPDATE request_log SET chain_seq = 2 WHERE id = %s", (a["id"],)),
           ("UPDATE request_log SET chain_seq = 3 WHERE id = %s", (b["id"],)))
    assert verify(trail, capsys)[0] == 0

    # Removed from the end: the signed checkpoint still names the last row.
    last = row_at(trail.dsn, 10, chain)
    tamper(trail.dsn, "request_log", ("DELETE FROM request_log WHERE id = %s", (last["id"],)))
    code, out = verify(trail, capsys)
    assert code == 1 and f"chain {chain} seq 10: rows from seq 10 to at least 10 removed" in out

    # An admin action rewritten: the admin chain names it.
    tamper(trail.dsn, "admin_log", ("UPDATE admin_log SET actor = 'mallory' WHERE action = 'key.revoke'", ()))
    code, out = verify(trail, capsys)
    assert code == 1 and f"admin_log row id=2 (target='{rec.id}') chain admin seq 2: content changed" in out


def test_verify_catches_a_rewritten_chain_and_a_forged_checkpoint(trail: Trail,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An owner who recomputes every hash after an edit still cannot sign: the checkpoint disagrees."""
    from audit.chain import link_hash
    from audit.writer import CHAIN_COVERS

    p = f"req-{uuid.uuid4().hex[:8]}-"
    trail.stub.StreamAccessLogs(messages([entry(f"{p}{i}") for i in range(5)], 5), timeout=60)
    with psycopg.connect(trail.dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        links = cur.execute("SELECT * FROM request_log ORDER BY chain_seq").fetchall()
    chain = links[0]["chain_id"]
    prev = links[0]["prev_hash"]
    stmts = []
    for r in links:
        if r["chain_seq"] == 2:
            r["status"] = 418
        h = link_hash("request_log", chain, r["chain_seq"], bytes(prev), {c: r[c] for c in CHAIN_COVERS})
        stmts.append(("UPDATE request_log SET status = %s, prev_hash = %s, row_hash = %s WHERE id = %s",
                      (r["status"], prev, h, r["id"])))
        prev = h
    tamper(trail.dsn, "request_log", *stmts)
    code, out = verify(trail, capsys)
    assert code == 1 and f"chain {chain} seq 5: differs from the checkpoint signed at" in out

    with psycopg.connect(trail.dsn) as conn:
        conn.execute("ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_append_only")
        conn.execute("UPDATE audit_checkpoints SET row_hash = %s WHERE chain_id = %s", (prev, chain))
    code, out = verify(trail, capsys)
    assert code == 1 and f"chain {chain} seq 5: checkpoint signature does not verify" in out


def test_query_and_export(trail: Trail, capsys: pytest.CaptureFixture[str]) -> None:
    p = f"req-{uuid.uuid4().hex[:8]}-"
    trail.stub.StreamAccessLogs(messages([
        entry(p + "a", principal="carol"), entry(p + "b", principal="carol", status=429),
        entry(p + "c", principal="dave", model="claude-haiku-4-5")], 3), timeout=60)
    create_key(trail.dsn, "exported", actor="alice")
    capsys.readouterr()
    assert main(["audit", "query", "-c", str(trail.config), "--principal", "carol", "--status", "4xx",
                 "--format", "json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["request_id"], r["status"]) for r in got] == [(p + "b", 429)]
    assert got[0]["error_type"] == "rate_limit_error" and got[0]["provider"] == "anthropic"  # every column
    assert main(["audit", "query", "-c", str(trail.config), "--provider", "anthropic", "--principal", "dave",
                 "--format", "json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["request_id"], r["error_kind"], r["ratelimit"]) for r in got] == [(p + "c", None, "not_checked")]
    assert main(["audit", "query", "-c", str(trail.config), "--provider", "elsewhere", "--format", "json"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "query", "-c", str(trail.config), "--model", "claude-haiku-4-5",
                 "--since", "2025-11-25T11:00Z", "--until", "2025-11-25T13:00Z"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["ts", "request_id", "principal"] and len(table) == 2 and p + "c" in table[1]

    out = trail.config.parent / "export.jsonl"
    assert main(["audit", "export", "-c", str(trail.config), "--before", "2025-11-26", "-o", str(out),
                 "--public-key", str(trail.audit_dir / "signing.pub")]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [x["kind"] for x in lines]
    assert kinds[0] == "public_key" and "BEGIN PUBLIC KEY" in lines[0]["pem"]
    # Rows before the date only (the entries' time is T0, the key's is now); with their chain and checkpoints.
    assert sorted(x["request_id"] for x in lines if x["kind"] == "request_log") == [p + "a", p + "b", p + "c"]
    assert "admin_log" not in kinds and "chain" in kinds and "checkpoint" in kinds
    assert all(x["ts"] < "2025-11-26" for x in lines if x["kind"] == "request_log")


# -- the spool ---------------------------------------------------------------------------


def test_spool_is_bounded_durable_and_adopted_after_a_crash(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    row = (datetime(2025, 1, 1, tzinfo=UTC), "r1", None, "p", "m", "POST", "/", 200)
    first = Spool(tmp_path, "0001-a", max_bytes=4096)
    first.open()
    first.append([row, (*row[:1], "r2", *row[2:])])
    with pytest.raises(SpoolFull):
        first.append([row] * 100)
    # A crash: the lock goes with the process, the file stays, a torn record at its end.
    seg = next((tmp_path / "0001-a").glob("*.seg"))
    with seg.open("ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")
    assert first._lock_fd is not None
    import os
    os.close(first._lock_fd)
    first._lock_fd = None

    second = Spool(tmp_path, "0002-b", max_bytes=4096)
    second.open()
    assert not (tmp_path / "0001-a").exists()
    got = second.peek()
    assert got is not None and [r[1] for r in got] == ["r1", "r2"] and got[0][0] == row[0]
    second.consume(len(got))
    assert second.empty() and second.peek() is None
    second.close()
    assert list(tmp_path.iterdir()) == []


def test_postgres_outage_under_load_loses_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL stops while entries stream in; they are spooled, then written once it is back:
    every request exactly one row, the chain verifies."""
    pgdata, logs = tmp_path / "pgdata", tmp_path / "logs"
    pg = start_postgres(pgdata, logs)
    try:
        dsn = str(pg.info["dsn"])
        port = int(dsn.rsplit(":", 1)[1].split("/")[0])
        db.migrate(dsn)
        role = audit_role_dsn(dsn, tmp_path / "audit.password")
        cfg = {**CONFIG, "audit": {"checkpoint_every_rows": 50, "write_timeout_s": 2},
               "storage": {"postgres_dsn": dsn}}
        (tmp_path / "ccr.yaml").write_text(yaml.safe_dump(cfg))
        run = tmp_path / "run"
        run.mkdir()
        sent: list[str] = []
        errors: list[BaseException] = []
        stop = threading.Event()
        with running_service("audit", run, yaml.safe_dump(cfg), postgres_dsn=dsn, audit_dsn=role,
                             audit_dir=str(tmp_path / "audit")) as child, \
                grpc.insecure_channel(str(child.info["address"])) as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)

            def load() -> None:
                n = 0
                while not stop.is_set():
                    batch = [f"out-{n + i:06d}" for i in range(10)]
                    n += 10
                    try:
                        stub.StreamAccessLogs(messages([entry(r) for r in batch], 5), timeout=60)
                    except BaseException as e:  # noqa: BLE001 - reported to the test
                        errors.append(e)
                        return
                    sent.extend(batch)  # answered: durable (committed or spooled)

            sender = threading.Thread(target=load)
            sender.start()
            try:
                wait_for(lambda: len(sent) >= 100, "100 entries written")
                pg.stop()
                down = len(sent)
                # Everything answered from now on was spooled: PostgreSQL is not there.
                wait_for(lambda: len(sent) >= down + 300 or errors, "300 entries spooled")
                assert not errors, errors
                assert list((tmp_path / "audit" / "spool").glob("*/*.seg"))
                pg = start_postgres(pgdata, logs, port=port)
                back = len(sent)
                wait_for(lambda: len(sent) >= back + 100 or errors, "100 more entries after the restart")
            finally:
                stop.set()
                sender.join(60)
            assert not errors, errors

            def all_written() -> bool:
                with psycopg.connect(dsn) as conn:
                    n = conn.execute("SELECT count(*) FROM request_log").fetchone()
                return n is not None and n[0] >= len(sent)
            wait_for(all_written, "every spooled row in PostgreSQL")
            wait_for(lambda: "access log spool drained" in child.log_path.read_text(), "the drained log line")
        log = child.log_path.read_text()
        assert "spooling rows to" in log
        with psycopg.connect(dsn) as conn:
            got = conn.execute("SELECT request_id, count(*) FROM request_log GROUP BY request_id").fetchall()
        assert dict(got) == dict.fromkeys(sent, 1)
        capsys.readouterr()
        code = main(["audit", "verify", "-c", str(tmp_path / "ccr.yaml"),
                     "--public-key", str(tmp_path / "audit" / "signing.pub")])
        out = capsys.readouterr().out
        assert code == 0 and f"OK: 2 chain(s), {len(sent)} row(s)" in out, out
    finally:
        pg.stop()


def test_admin_rows_are_linked(postgres_dsn: str) -> None:
    rec, _ = create_key(postgres_dsn, "linked", actor="alice")
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT chain_id, chain_seq, prev_hash, row_hash, after FROM admin_log"
                            " WHERE target = %s", (rec.id,)).fetchall()
        (prev_seq,) = conn.execute("SELECT max(chain_seq) - 1 FROM admin_log").fetchone() or (None,)
        before = conn.execute("SELECT row_hash FROM admin_log WHERE chain_seq = %s", (prev_seq,)).fetchone()
    (chain, seq, prev, h, after), = rows
    assert chain == "admin" and seq >= 1 and len(h) == 32 and isinstance(after, dict)
    assert bytes(prev) == (bytes(before[0]) if before else bytes(32))


def test_two_live_spools_never_adopt_each_other(tmp_path: Path) -> None:
    a, b = Spool(tmp_path, "0001-a", max_bytes=1 << 20), Spool(tmp_path, "0002-b", max_bytes=1 << 20)
    a.open()
    a.append([("2025-01-01", "r1")])
    b.open()
    assert (tmp_path / "0001-a").is_dir() and b.empty() and not a.empty()
    a.close()  # rows left: its directory stays for the next receiver
    b.close()
    assert [p.name for p in tmp_path.iterdir()] == ["0001-a"]


def test_a_live_spool_adopts_what_a_stopped_receiver_left(tmp_path: Path) -> None:
    """A receiver drained while PostgreSQL was slow stops with rows spooled; a live receiver takes
    them over (RequestLogWriter asks every adopt_every_s), not only the next one to start. Its own
    rows spooled before, the adopted ones, and its later appends all come back, in that order."""
    live, stopping = Spool(tmp_path, "0001-live", max_bytes=1 << 20), Spool(tmp_path, "0002-stop", max_bytes=1 << 20)
    live.open()
    stopping.open()
    live.append([("2025-01-01", "own-1")])
    stopping.append([("2025-01-01", "left-1"), ("2025-01-01", "left-2")])
    assert live.adopt_orphans() == 0  # held by a running process: never taken
    stopping.close()  # rows left, lock released
    assert live.adopt_orphans() == 2
    assert not (tmp_path / "0002-stop").exists()
    live.append([("2025-01-01", "own-2")])
    seen = []
    while (batch := live.peek()) is not None:
        seen += [r[1] for r in batch]
        live.consume(len(batch))
    assert seen == ["own-1", "left-1", "left-2", "own-2"]
    assert live.empty()
    live.close()
    assert list(tmp_path.iterdir()) == []


def test_a_full_spool_holds_the_stream_back_then_writes_everything_in_order(
        postgres_server: dict[str, object], tmp_path: Path) -> None:
    """PostgreSQL away and the spool full: flush waits (nothing dropped); once PostgreSQL answers,
    spooled and waiting rows land in the order they were put."""
    import asyncio

    from audit.entry import entry_to_row
    from audit.writer import RequestLogWriter

    dsn = create_database(str(postgres_server["admin_dsn"]), prefix="full")
    db.migrate(dsn)
    rows = [entry_to_row(entry(f"full-{i:03d}")) for i in range(40)]

    async def scenario() -> list[tuple[str, int]]:
        spool = Spool(tmp_path / "spool", "0001-w", max_bytes=4096)
        spool.open()
        writer = RequestLogWriter("postgresql://nobody:x@127.0.0.1:1/none", spool=spool,
                                  backoff_initial=0.01, backoff_max=0.05)
        writer.start()
        for r in rows:
            assert r is not None
            await writer.put(r)
        flushed = asyncio.create_task(writer.flush())
        while not spool._full_logged:  # the condition itself: the spool refused a batch
            await asyncio.sleep(0.01)
        assert not flushed.done() and spool.bytes <= 4096
        writer.dsn = dsn  # PostgreSQL is back
        await asyncio.wait_for(flushed, 60)
        await writer.stop()
        with psycopg.connect(dsn) as conn:
            return [(r, s) for r, s in conn.execute("SELECT request_id, chain_seq FROM request_log ORDER BY chain_seq")]

    got = asyncio.run(scenario())
    assert [r for r, _ in got] == [f"full-{i:03d}" for i in range(40)]
    assert [s for _, s in got] == list(range(1, 41))


def test_link_hash_is_the_documented_canonical_encoding() -> None:
    """The hot path builds the JSON itself; it must be byte for byte the documented encoding."""
    from datetime import UTC, datetime, timedelta, timezone

    from audit.chain import canonical, link_hash, link_hash_reference

    rows: list[dict[str, Any]] = [
        {"id": 7, "ts": datetime(2025, 11, 25, 12, 0, 0, 123456, tzinfo=UTC), "path": "/v1/m?q=ü\"\\\n\u2028",
         "latency_ms": 1234.567, "status": 0, "principal": None, "big": 2**63 - 1, "tiny": 1e-7},
        {"id": 1, "ts": datetime(2025, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1))), "actor": "ünï",
         "before": None, "after": {"groups": ["a", "b"], "rpm": 60, "n": 1.5, "z": {"y": None, "x": True}},
         "flag": False},
    ]
    for row in rows:
        assert link_hash("admin_log", "admin", 3, b"\x01" * 32, row) == \
            link_hash_reference("admin_log", "admin", 3, b"\x01" * 32, row)
    assert canonical({"b": 1, "a": datetime(2025, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1)))}) == \
        b'{"a":"2025-01-01T00:00:00.000000Z","b":1}'
    with pytest.raises(ValueError):
        link_hash("request_log", "c", 1, bytes(32), {"latency_ms": float("nan")})


def test_verify_since_starts_at_the_last_checkpoint_before(trail: Trail, capsys: pytest.CaptureFixture[str]) -> None:
    p = f"req-{uuid.uuid4().hex[:8]}-"
    for i in range(4):
        trail.stub.StreamAccessLogs(messages([entry(f"{p}{i}")], 1), timeout=60)
    with psycopg.connect(trail.dsn) as conn:
        (chain, signed_at) = conn.execute("SELECT chain_id, ts FROM audit_checkpoints WHERE chain_seq = 4"
                                          " AND log_table = 'request_log'").fetchone() or (None, None)
    assert chain is not None
    early = row_at(trail.dsn, 2, chain)
    tamper(trail.dsn, "request_log", ("UPDATE request_log SET status = 299 WHERE id = %s", (early["id"],)))
    since = ["--since", signed_at.isoformat()]
    capsys.readouterr()
    assert main(["audit", "verify", "-c", str(trail.config), "--public-key", str(trail.audit_dir / "signing.pub"),
                 *since]) == 0  # seq 2 lies before the checkpoint it starts from
    assert verify(trail, capsys)[0] == 1  # a full walk sees it
    last = row_at(trail.dsn, 4, chain)
    tamper(trail.dsn, "request_log", ("UPDATE request_log SET status = 299 WHERE id = %s", (last["id"],)))
    capsys.readouterr()
    assert main(["audit", "verify", "-c", str(trail.config), "--public-key", str(trail.audit_dir / "signing.pub"),
                 *since]) == 1
    assert "seq 4: content changed" in capsys.readouterr().out


def test_rows_before_a_quiet_spell_are_signed(postgres_dsn: str, tmp_path: Path) -> None:
    """No more traffic after some rows: the writer still wakes up and signs them."""
    import asyncio

    from audit.chain import signing_key
    from audit.entry import entry_to_row
    from audit.writer import RequestLogWriter

    async def scenario() -> int:
        writer = RequestLogWriter(postgres_dsn, signer=signing_key(tmp_path / "audit"), checkpoint_every_s=0.2,
                                  checkpoint_every_rows=1_000_000)
        writer.start()
        for i in range(3):
            r = entry_to_row(entry(f"quiet-{uuid.uuid4().hex[:6]}-{i}"))
            assert r is not None
            await writer.put(r)
        await writer.flush()
        deadline = time.monotonic() + 20
        try:
            while True:
                async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
                    cur = await conn.execute("SELECT max(chain_seq) FROM audit_checkpoints WHERE chain_id = %s",
                                             (writer.chain_id,))
                    row = await cur.fetchone()
                if row and row[0]:
                    return int(row[0])
                assert time.monotonic() < deadline, "no checkpoint after the quiet spell"
                await asyncio.sleep(0.05)
        finally:
            await writer.stop()

    assert asyncio.run(scenario()) == 3


def test_external_postgres_audit_dsn_comes_from_the_named_variable(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ccr.config import ConfigError, parse_config
    from ccr.supervisor import Gateway

    config = parse_config({**CONFIG, "storage": {"postgres_dsn": "postgresql://admin@db/ccr"},
                           "audit": {"writer_dsn_env": "MY_AUDIT_DSN"}})
    monkeypatch.delenv("MY_AUDIT_DSN", raising=False)
    with pytest.raises(ConfigError, match="MY_AUDIT_DSN, which is not set"):
        Gateway._audit_dsn(config, "postgresql://admin@db/ccr", tmp_path)
    monkeypatch.setenv("MY_AUDIT_DSN", "postgresql://ccr_audit_writer:pw@db/ccr")
    assert Gateway._audit_dsn(config, "postgresql://admin@db/ccr", tmp_path) == "postgresql://ccr_audit_writer:pw@db/ccr"
    plain = parse_config({**CONFIG, "storage": {"postgres_dsn": "postgresql://admin@db/ccr"}})
    assert Gateway._audit_dsn(plain, "postgresql://admin@db/ccr", tmp_path) is None


def test_the_local_checkpoint_copy_reveals_a_chain_removed_whole(trail: Trail,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    p = f"req-{uuid.uuid4().hex[:8]}-"
    for i in range(3):
        trail.stub.StreamAccessLogs(messages([entry(f"{p}{i}")], 1), timeout=60)
    copy = trail.audit_dir / "checkpoints.jsonl"
    assert copy.stat().st_mode & 0o777 == 0o600
    with psycopg.connect(trail.dsn) as conn:
        (chain,) = conn.execute("SELECT DISTINCT chain_id FROM request_log").fetchone() or (None,)
    for table, stmt in (("request_log", "DELETE FROM request_log WHERE chain_id = %s"),
                        ("audit_checkpoints", "DELETE FROM audit_checkpoints WHERE chain_id = %s"),
                        ("audit_chains", "DELETE FROM audit_chains WHERE chain_id = %s")):
        tamper(trail.dsn, table, (stmt, (chain,)))
    # The database alone cannot tell (docs/audit.md) ...
    assert verify(trail, capsys)[0] == 0
    # ... the receivers' copy of their checkpoints can.
    code = main(["audit", "verify", "-c", str(trail.config), "--public-key", str(trail.audit_dir / "signing.pub"),
                 "--checkpoints", str(copy)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"chain {chain}: chain has signed checkpoints but is not registered (chain removed)" in out
    assert f"chain {chain} seq 3: checkpoint signed at" in out and "not in the database (checkpoints removed)" in out

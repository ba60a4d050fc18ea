"""Captured bodies are as durable as the rows: while PostgreSQL does not take them they go, sealed,
to their own fsync'd spool, are adopted by another receiver, and land exactly once when it returns."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psycopg
from envoy.service.accesslog.v3 import als_pb2_grpc

from audit.bodies import (
    BODY_SPOOL_DIR,
    DROPPED,
    INSERT,
    KEY_FILE,
    BodyWriter,
    Captured,
    load_key,
    load_or_create_key,
    read_body,
    sealed_row,
)
from audit.spool import SEGMENT_SUFFIX, Spool, _decode, _read_records
from ccr.contract import AUTHZ_BODY_CAPTURE, AUTHZ_NS, CAPTURE_NS
from ccr.procs import Child
from tests.harness import running_service
from tests.test_audit import Audit, entry, send

CONFIG = """
version: 1
providers: [{name: anthropic}]
models: [{match: "claude-*", provider: anthropic}]
audit:
  bodies: [{tenant: legal-hold, retention_days: 7}]
  write_timeout_s: 1
"""


def _request(p: str, i: int) -> bytes:
    return f'{{"messages":[{{"role":"user","content":"SECRET-PROMPT {p}{i} the merger closes friday"}}]}}'.encode()


def _response(p: str, i: int) -> bytes:
    return f"event: message_start\ndata: SECRET-REPLY {p}{i} keep it quiet\n\n".encode()


def _captured_entry(rid: str, request: bytes, response: bytes):  # noqa: ANN202 - an HTTPAccessLogEntry
    """An entry as Envoy sends it for a captured request: extauth's body_capture and the meter's ccr.capture."""
    e = entry(rid)
    md = e.common_properties.metadata
    md.filter_metadata[AUTHZ_NS].fields[AUTHZ_BODY_CAPTURE].struct_value.update({
        "retention_days": 7, "request": base64.b64encode(request).decode(), "request_bytes": len(request),
        "request_truncated": False})
    md.filter_metadata[CAPTURE_NS].update({
        "response": base64.b64encode(response).decode(), "response_bytes": len(response), "response_truncated": False})
    return e


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _logged(child: Child, text: str) -> Callable[[], bool]:
    return lambda: text in child.log_path.read_text()


def _body_ids(dsn: str, table: str, prefix: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(f"SELECT request_id FROM {table} WHERE request_id LIKE %s",  # noqa: S608
                                           (prefix + "%",)).fetchall()]


def _spooled(root: Path) -> tuple[list[str], bytes]:
    """The request ids in every body spool segment under `root`, and the segments' raw bytes."""
    ids, raw = [], b""
    for seg in sorted(root.glob("*/*" + SEGMENT_SUFFIX)):
        data = seg.read_bytes()
        raw += data
        records, _ = _read_records(seg)
        for offset, length in records:
            ids += [r[0] for r in _decode(data[offset:offset + length])]
    return ids, raw


def test_bodies_spool_while_postgres_refuses_them_then_land_exactly_once(tmp_path: Path, postgres_dsn: str) -> None:
    p = f"body-{uuid.uuid4().hex[:8]}-"
    n = 12
    audit_dir = tmp_path / "audit"
    spool_root = audit_dir / BODY_SPOOL_DIR
    want = {f"{p}{i}" for i in range(n)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        try:
            with running_service("audit", tmp_path / "a", CONFIG, postgres_dsn=postgres_dsn,
                                 audit_dir=str(audit_dir)) as a, \
                    grpc.insecure_channel(str(a.info["address"])) as channel:
                rx = Audit(als_pb2_grpc.AccessLogServiceStub(channel), a, postgres_dsn)
                send(rx, [_captured_entry(p + "before", _request(p, -1), _response(p, -1))])
                _wait(lambda: _body_ids(postgres_dsn, "request_body", p) == [p + "before"], "the first body")

                admin.execute("ALTER TABLE request_body RENAME TO request_body_away")
                # Answered once the bodies are durable: here, in the spool (PostgreSQL refuses them).
                send(rx, [_captured_entry(f"{p}{i}", _request(p, i), _response(p, i)) for i in range(n)], per_msg=5)
                assert _logged(a, "captured-body spool: PostgreSQL unavailable or slow; spooling rows to")()
                ids, raw = _spooled(spool_root)
                assert sorted(ids) == sorted(want)
                for i in range(n):  # sealed before it touched the disk: no plaintext, not even base64
                    for body in (_request(p, i), _response(p, i)):
                        assert body not in raw and base64.b64encode(body) not in raw
                    assert f"SECRET-PROMPT {p}{i}".encode() not in raw and f"SECRET-REPLY {p}{i}".encode() not in raw
                # The rows were never held back for the bodies.
                with psycopg.connect(postgres_dsn) as conn:
                    (rows,) = conn.execute("SELECT count(*) FROM request_log WHERE request_id LIKE %s",
                                           (p + "%",)).fetchone() or (0,)
                assert rows == n + 1
            # Receiver a stopped with its bodies still spooled.
            assert _logged(a, f"captured-body spool: {n} row(s)")()
            assert sorted(_spooled(spool_root)[0]) == sorted(want)

            # Another receiver (same audit directory) adopts them and writes them once PostgreSQL takes them.
            with running_service("audit", tmp_path / "b", CONFIG, postgres_dsn=postgres_dsn,
                                 audit_dir=str(audit_dir)) as b:
                assert _logged(b, f"captured-body spool: adopted {n} row(s)")()
                assert _body_ids(postgres_dsn, "request_body_away", p) == [p + "before"]
                admin.execute("ALTER TABLE request_body_away RENAME TO request_body")
                _wait(_logged(b, "captured-body spool drained"), "the body spool to drain")
                assert not list(spool_root.glob("*/*" + SEGMENT_SUFFIX))
        finally:
            admin.execute("ALTER TABLE IF EXISTS request_body_away RENAME TO request_body")

    ids = _body_ids(postgres_dsn, "request_body", p)
    assert sorted(ids) == sorted(want | {p + "before"})  # exactly once each
    key = load_key(audit_dir / KEY_FILE)
    for i in range(n):
        opened = read_body(postgres_dsn, f"{p}{i}", [key])
        assert opened is not None
        assert (opened.request, opened.response) == (_request(p, i), _response(p, i))


def _capture(rid: str) -> Captured:
    body = f"prompt of {rid}".encode()
    return Captured(rid, datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC), 3, body, len(body), False, b"reply", 5, False)


async def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_replayed_record_whose_bodies_are_stored_changes_nothing(tmp_path: Path, postgres_dsn: str) -> None:
    """A crash between the commit and the record's removal replays it: no duplicate, no failure, and
    the adopting writer stores the rest of the record."""
    key = load_or_create_key(tmp_path)
    p = f"replay-{uuid.uuid4().hex[:8]}-"
    stored, fresh = sealed_row(key, _capture(p + "stored")), sealed_row(key, _capture(p + "fresh"))
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(INSERT, stored)
    crashed = Spool(tmp_path / "spool", "crashed", 1024 * 1024, label="captured-body spool")
    crashed.open()
    crashed.append([stored, fresh])
    crashed.close()  # left behind, not empty
    dropped = DROPPED._value.get()

    async def run() -> Spool:
        spool = Spool(tmp_path / "spool", "live", 1024 * 1024, label="captured-body spool")
        spool.open()  # adopts "crashed"
        assert spool.rows == 2
        w = BodyWriter(postgres_dsn, key, spool=spool)
        w.start()
        await _until(spool.empty, "the adopted record to be written")
        await w.stop()
        return spool

    asyncio.run(run())
    assert sorted(_body_ids(postgres_dsn, "request_body", p)) == [p + "fresh", p + "stored"]
    assert DROPPED._value.get() == dropped
    opened = read_body(postgres_dsn, p + "fresh", [key])
    assert opened is not None and opened.request == f"prompt of {p}fresh".encode()


def test_a_slow_postgres_sends_bodies_to_the_spool_and_they_follow(tmp_path: Path, postgres_dsn: str) -> None:
    """request_body locked (PostgreSQL slower than write_timeout): flush returns once they are spooled,
    and they are written when the lock goes."""
    key = load_or_create_key(tmp_path)
    p = f"slow-{uuid.uuid4().hex[:8]}-"
    want = sorted(f"{p}{i}" for i in range(5))

    async def run() -> None:
        spool = Spool(tmp_path / "spool", "w", 1024 * 1024, label="captured-body spool")
        spool.open()
        w = BodyWriter(postgres_dsn, key, spool=spool, write_timeout=0.5)
        w.start()
        locker = await psycopg.AsyncConnection.connect(postgres_dsn)
        try:
            await locker.execute("LOCK TABLE request_body IN ACCESS EXCLUSIVE MODE")
            for rid in want:
                await w.put(_capture(rid))
            await w.flush()  # durable: in the spool, since the table does not answer
            assert spool.rows == len(want)
        finally:
            await locker.rollback()
            await locker.close()
        await _until(spool.empty, "the spool to drain")
        await w.stop()

    asyncio.run(run())
    assert sorted(_body_ids(postgres_dsn, "request_body", p)) == want


def test_a_full_body_spool_drops_bodies_counted_and_returns(tmp_path: Path) -> None:
    """Bounded: what does not fit is dropped (counted), and flush still returns (rows are never held)."""
    key = load_or_create_key(tmp_path)
    dropped = DROPPED._value.get()

    async def run() -> None:
        spool = Spool(tmp_path / "spool", "w", 64, label="captured-body spool")
        spool.open()
        w = BodyWriter("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", key, spool=spool)
        w.start()
        for i in range(3):
            await w.put(_capture(f"full-{i}"))
        await w.flush()
        assert spool.empty()
        await w.stop()

    asyncio.run(run())
    assert DROPPED._value.get() == dropped + 3


def test_bodies_spooled_before_capture_was_switched_off_are_still_written(tmp_path: Path, postgres_dsn: str) -> None:
    """audit.bodies emptied while a body spool was left behind: the next receiver still writes it back
    (sealed records need no key), and captures nothing itself."""
    audit_dir = tmp_path / "audit"
    key = load_or_create_key(audit_dir)
    p = f"off-{uuid.uuid4().hex[:8]}-"
    left = Spool(audit_dir / BODY_SPOOL_DIR, "20260101T000000-stopped", 1024 * 1024, label="captured-body spool")
    left.open()
    left.append([sealed_row(key, _capture(f"{p}{i}")) for i in range(3)])
    left.close()
    no_bodies = CONFIG.split("audit:")[0]
    (tmp_path / "rx").mkdir()
    with running_service("audit", tmp_path / "rx", no_bodies, postgres_dsn=postgres_dsn,
                         audit_dir=str(audit_dir)) as rx, \
            grpc.insecure_channel(str(rx.info["address"])) as channel:
        assert _logged(rx, "captured-body spool: adopted 3 row(s)")()
        _wait(_logged(rx, "captured-body spool drained"), "the left body spool to drain")
        # Capture is off now: an entry carrying capture metadata stores no body.
        send(Audit(als_pb2_grpc.AccessLogServiceStub(channel), rx, postgres_dsn),
             [_captured_entry(p + "after", b"new prompt", b"new reply")])
    assert sorted(_body_ids(postgres_dsn, "request_body", p)) == [f"{p}{i}" for i in range(3)]
    for i in range(3):
        opened = read_body(postgres_dsn, f"{p}{i}", [key])
        assert opened is not None and opened.request == f"prompt of {p}{i}".encode()

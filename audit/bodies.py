"""Captured request and response bodies (audit.bodies; docs/audit.md "Bodies"): encrypted here, in
the access-log receiver, the one process that holds the key, and stored in `request_body`
(migration 19), joinable to `request_log` on `request_id`.

Encryption: AES-256-GCM (`cryptography`), a fresh 96-bit nonce per body. The associated data binds
each ciphertext to its request id and to which body it is ("request" or "response"), so a
ciphertext moved to another row, or the two bodies swapped, fails to decrypt. The key is 32 random
bytes at `<data_dir>/audit/bodies.key` (0600, directory 0700), made by the first receiver that
starts; `key_id` (first 16 hex digits of its SHA-256) is stored with each row so that a rotated key
is still found by `ccr audit body --key OLD_FILE`.

Bodies are written by their own task on their own connection, apart from the hash-chained rows: a
body is held in a bounded queue while PostgreSQL is away, and dropped with an error log (and the
`ccr_audit_bodies_dropped_total` counter) when that queue is full; the row is never held back for it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2
from prometheus_client import Counter

from ccr import metrics
from ccr.contract import AUTHZ_BODY_CAPTURE, AUTHZ_NS, CAPTURE_NS

log = logging.getLogger("ccr.audit")

KEY_FILE = "bodies.key"
_AAD = b"ccr-audit-body-v1\n"
REQUEST, RESPONSE = "request", "response"

DROPPED = Counter("ccr_audit_bodies_dropped", "Captured bodies not stored (queue full or refused by PostgreSQL)",
                  registry=metrics.REGISTRY)
STORED = Counter("ccr_audit_bodies_stored", "Captured request/response body pairs stored encrypted",
                 registry=metrics.REGISTRY)


class BodyError(Exception):
    """A stored body that cannot be decrypted: wrong key, or changed ciphertext, nonce or request id."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def load_or_create_key(audit_dir: Path) -> bytes:
    """The body key, made on first use (atomically: concurrent receivers end up with one key)."""
    audit_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = audit_dir / KEY_FILE
    if not path.exists():
        tmp = audit_dir / f".{KEY_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(AESGCM.generate_key(bit_length=256))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # fails when another receiver got there first: use its key
        tmp.unlink()
    return load_key(path)


def load_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != 32:
        raise BodyError(f"{path}: not a 32-byte AES-256 key")
    return key


def _aad(request_id: str, part: str) -> bytes:
    return _AAD + request_id.encode() + b"\n" + part.encode()


def seal(key: bytes, request_id: str, part: str, plaintext: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(12)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, _aad(request_id, part))


def open_sealed(key: bytes, request_id: str, part: str, nonce: bytes, ciphertext: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _aad(request_id, part))
    except InvalidTag:
        raise BodyError(f"the {part} body of {request_id} does not decrypt: changed, moved, or another key"
                        ) from None


@dataclass(frozen=True)
class Captured:
    """One request's bodies as the gateway saw them (plaintext, only inside this process)."""

    request_id: str
    ts: datetime
    retention_days: int
    request: bytes
    request_bytes: int
    request_truncated: bool
    response: bytes | None  # None: no reply was captured (refused upstream, or the client went away)
    response_bytes: int | None
    response_truncated: bool | None


def _fields(md, ns: str) -> dict[str, struct_pb2.Value]:
    return dict(md.filter_metadata[ns].fields) if ns in md.filter_metadata else {}


def _b64(v: struct_pb2.Value) -> bytes:
    try:
        return base64.b64decode(v.string_value, validate=True)
    except binascii.Error as e:
        raise ValueError(f"body is not base64: {e}") from None


def captured(e: accesslog_pb2.HTTPAccessLogEntry) -> Captured | None:
    """The bodies an entry carries, or None (the common case: nothing was captured)."""
    md = e.common_properties.metadata
    if AUTHZ_NS not in md.filter_metadata:
        return None
    cap = md.filter_metadata[AUTHZ_NS].fields.get(AUTHZ_BODY_CAPTURE)
    if cap is None or cap.WhichOneof("kind") != "struct_value":
        return None
    req = dict(cap.struct_value.fields)
    resp = _fields(md, CAPTURE_NS)
    has_resp = "response" in resp
    return Captured(
        request_id=e.request.request_id,
        ts=e.common_properties.start_time.ToDatetime(tzinfo=UTC),
        retention_days=int(req["retention_days"].number_value),
        request=_b64(req["request"]),
        request_bytes=int(req["request_bytes"].number_value),
        request_truncated=req["request_truncated"].bool_value,
        response=_b64(resp["response"]) if has_resp else None,
        response_bytes=int(resp["response_bytes"].number_value) if has_resp else None,
        response_truncated=resp["response_truncated"].bool_value if has_resp else None,
    )


INSERT = ("INSERT INTO request_body (request_id, ts, expires_at, key_id, request_nonce, request_ct, request_bytes,"
          " request_truncated, response_nonce, response_ct, response_bytes, response_truncated)"
          " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING")


def sealed_row(key: bytes, c: Captured) -> tuple:
    rn, rct = seal(key, c.request_id, REQUEST, c.request)
    sn, sct = seal(key, c.request_id, RESPONSE, c.response) if c.response is not None else (None, None)
    return (c.request_id, c.ts, c.ts + timedelta(days=c.retention_days), key_id(key), rn, rct, c.request_bytes,
            c.request_truncated, sn, sct, c.response_bytes, c.response_truncated)


class BodyWriter:
    """Encrypts and inserts captured bodies on its own task and connection (never holds a row back)."""

    def __init__(self, dsn: str, key: bytes, queue_max: int = 1000, backoff_max: float = 5.0) -> None:
        self.dsn = dsn
        self.key = key
        self.backoff_max = backoff_max
        self._queue: asyncio.Queue[tuple] = asyncio.Queue(queue_max)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="request_body_writer")

    def put(self, c: Captured) -> None:
        try:
            self._queue.put_nowait(sealed_row(self.key, c))  # sealed at once: no plaintext waits in memory
        except asyncio.QueueFull:
            DROPPED.inc()
            log.error("captured bodies of %s dropped: %d wait for PostgreSQL already", c.request_id,
                      self._queue.qsize())

    async def flush(self) -> None:
        """Returns once every body put before it is stored or dropped."""
        await self._queue.join()

    async def _run(self) -> None:
        conn: psycopg.AsyncConnection | None = None
        delay = 0.1
        while True:
            row = await self._queue.get()
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                    await conn.execute(INSERT, row)
                    STORED.inc()
                    delay = 0.1
                    break
                except (psycopg.errors.DataError, psycopg.errors.IntegrityError):
                    DROPPED.inc()
                    log.exception("captured bodies of %s refused by PostgreSQL; dropped", row[0])
                    break
                except (psycopg.Error, OSError):
                    log.warning("request_body insert failed; retrying in %.1fs", delay, exc_info=True)
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
            self._queue.task_done()

    async def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def drop_expired(dsn: str, now: datetime) -> int:
    """Delete the bodies whose retention has run out (`ccr audit retain`); how many went."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("DELETE FROM request_body WHERE expires_at <= %s", (now,)).rowcount


@dataclass(frozen=True)
class Opened:
    request_id: str
    ts: datetime
    expires_at: datetime
    key_id: str
    request: bytes
    request_bytes: int
    request_truncated: bool
    response: bytes | None
    response_bytes: int | None
    response_truncated: bool | None


def read_body(dsn: str, request_id: str, keys: list[bytes]) -> Opened | None:
    """A request's stored bodies, decrypted with whichever of `keys` made them (BodyError otherwise)."""
    with psycopg.connect(dsn) as conn:
        r = conn.execute("SELECT ts, expires_at, key_id, request_nonce, request_ct, request_bytes, request_truncated,"
                         " response_nonce, response_ct, response_bytes, response_truncated"
                         " FROM request_body WHERE request_id = %s", (request_id,)).fetchone()
    if r is None:
        return None
    ts, expires_at, kid, rn, rct, rbytes, rtrunc, sn, sct, sbytes, strunc = r
    key = next((k for k in keys if key_id(k) == kid), None)
    if key is None:
        raise BodyError(f"the bodies of {request_id} were sealed with key {kid}, which none of the keys given is")
    return Opened(request_id, ts, expires_at, kid, open_sealed(key, request_id, REQUEST, bytes(rn), bytes(rct)),
                  rbytes, rtrunc,
                  open_sealed(key, request_id, RESPONSE, bytes(sn), bytes(sct)) if sct is not None else None,
                  sbytes, strunc)

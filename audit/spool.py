"""A durable, bounded, in-order local spool of access-log rows for when PostgreSQL is away.

Used for the access-log rows (audit/writer.py) and, under a root of their own, for the sealed
captured bodies (audit/bodies.py). Each receiver process owns one directory under the spool
root (named after its chain id, so names sort by start time) and holds an exclusive flock on
it for its lifetime. The directory holds numbered segment files of records:

    4-byte big-endian payload length | 4-byte big-endian CRC-32 of the payload | payload

where the payload is one batch of rows as JSON (timestamps as {"$t": ISO-8601}, bytes as
{"$b": base64}). Every append is fsync'd before it counts as durable. A record is removed only
after its rows are committed: a segment file is deleted once all its records are; a crash
between the commit and the delete replays the record, which the writer's request_id
de-duplication makes harmless.

On start a process adopts the directories no live process holds (a crashed or stopped worker,
or a worker index that no longer exists): their segments are moved, oldest first, ahead of its
own, so nothing spooled is ever stranded.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import struct
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("ccr.audit")

_HEADER = struct.Struct(">II")
LOCK_FILE = "lock"
SEGMENT_SUFFIX = ".seg"

Row = tuple[Any, ...]


_ROWS_WHEN_FULL = ("the receiver stops reading Envoy's streams until PostgreSQL is back; Envoy buffers, then "
                   "drops (its stat access_logs.grpc_access_log.logs_dropped counts them)")


class SpoolFull(Exception):
    """The spool has no room for this batch. The rows' writer waits (back-pressure), never drops; the
    captured-body writer drops the bodies that do not fit, counted (audit/bodies.py)."""


def _encode(rows: list[Row]) -> bytes:
    def enc(v: Any) -> Any:
        if isinstance(v, datetime):
            return {"$t": v.isoformat()}
        if isinstance(v, bytes):  # the body spool's nonces and ciphertexts (audit/bodies.py)
            return {"$b": base64.b64encode(v).decode()}
        return v
    return json.dumps([[enc(v) for v in r] for r in rows], separators=(",", ":"), allow_nan=False).encode()


def _decode(payload: bytes) -> list[Row]:
    def dec(v: Any) -> Any:
        if isinstance(v, dict):
            return datetime.fromisoformat(v["$t"]) if "$t" in v else base64.b64decode(v["$b"])
        return v
    return [tuple(dec(v) for v in r) for r in json.loads(payload)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_records(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(offset, length) of each whole record in a segment, and where the valid data ends."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if start + length > len(data) or zlib.crc32(data[start:start + length]) != crc:
            break
        out.append((start, length))
        pos = start + length
    return out, pos


class Spool:
    def __init__(self, root: Path, owner: str, max_bytes: int, segment_bytes: int = 4 * 1024 * 1024, *,
                 label: str = "access log spool", when_full: str = _ROWS_WHEN_FULL) -> None:
        self.root = root
        self.label = label  # names this spool in its log lines (the rows' or the captured bodies')
        self.when_full = when_full  # what the owner does with what does not fit, for the FULL log line
        self.dir = root / owner
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock_fd: int | None = None
        # Segments in order: [path, records [(offset, length)], next record to read]
        self._segments: list[list[Any]] = []
        self._next_number = 1
        self._write_file: Any = None
        self.bytes = 0  # on disk, not yet consumed segments included
        self.rows = 0  # rows waiting (exact for this process's appends and adopted records)
        self._logged_step = 0
        self._full_logged = False

    # -- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        # Made under a hidden name and locked before it gets its real one, so a process starting
        # at the same moment never takes it for an orphan.
        tmp = self.root / f".{self.dir.name}.new"
        tmp.mkdir(mode=0o700)
        self._lock_fd = self._lock(tmp)
        assert self._lock_fd is not None
        tmp.rename(self.dir)
        _fsync_dir(self.root)
        self.adopt_orphans()

    def adopt_orphans(self) -> int:
        """Take over the spool directories no live process holds (their segments go behind ours);
        the rows adopted. At start, and periodically while running (RequestLogWriter): a receiver
        that stopped with rows spooled (PostgreSQL slow as it drained) leaves them to a live one,
        not only to the next receiver to start on this machine."""
        before = self.rows
        for other in sorted(p for p in self.root.iterdir()
                            if p.is_dir() and p != self.dir and not p.name.startswith(".")):
            fd = self._lock(other)
            if fd is None:
                continue  # a live process's spool
            try:
                if self._write_file is not None:  # our next append starts a segment behind the adopted ones
                    self._write_file.close()
                    self._write_file = None
                self._adopt(other)
            except FileNotFoundError:
                pass  # another process adopted it first
            finally:
                os.close(fd)
        adopted = self.rows - before
        if adopted:
            log.warning("%s: adopted %d row(s) spooled by a process no longer running; "
                        "they are written to PostgreSQL with this receiver's", self.label, adopted)
        return adopted

    def close(self) -> None:
        if self._write_file is not None:
            self._write_file.close()
            self._write_file = None
        if self.empty():
            for p in self.dir.iterdir():
                if p.name != LOCK_FILE:
                    p.unlink()
            (self.dir / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # someone looking for orphans put a lock file in it
                self.dir.rmdir()
        elif self.rows:
            log.warning("%s: %d row(s) (%d bytes) left in %s; the next receiver writes them",
                        self.label, self.rows, self.bytes, self.dir)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _lock(path: Path) -> int | None:
        try:
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the directory went away (adopted or closed meanwhile)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _adopt(self, other: Path) -> None:
        for seg in sorted(other.glob("*" + SEGMENT_SUFFIX)):
            records, end = _read_records(seg)
            if end != seg.stat().st_size:
                log.error("%s: %s ends with %d byte(s) of an incomplete record (never "
                          "acknowledged: the process stopped while writing it); ignored",
                          self.label, seg, seg.stat().st_size - end)
                os.truncate(seg, end)
            if not records:
                seg.unlink()
                continue
            target = self.dir / f"{self._next_number:012d}{SEGMENT_SUFFIX}"
            self._next_number += 1
            os.rename(seg, target)
            self._segments.append([target, records, 0])
            self.bytes += end
            self.rows += sum(self._count(target, o, n) for o, n in records)
        for p in other.iterdir():
            p.unlink()
        other.rmdir()
        _fsync_dir(self.dir)
        _fsync_dir(self.root)

    @staticmethod
    def _count(path: Path, offset: int, length: int) -> int:
        with path.open("rb") as f:
            f.seek(offset)
            return len(json.loads(f.read(length)))

    # -- writing -----------------------------------------------------------------------

    def empty(self) -> bool:
        return not self._segments

    def append(self, rows: list[Row]) -> None:
        """Durably append one batch (fsync'd when this returns); SpoolFull if it does not fit."""
        payload = _encode(rows)
        size = _HEADER.size + len(payload)
        if self.bytes + size > self.max_bytes:
            if not self._full_logged:
                log.error("%s FULL (%d of %d bytes, %d rows waiting for PostgreSQL): %s",
                          self.label, self.bytes, self.max_bytes, self.rows, self.when_full)
                self._full_logged = True
            raise SpoolFull
        seg = self._segments[-1] if self._segments else None
        if seg is None or self._write_file is None or self._write_file.tell() >= self.segment_bytes:
            seg = self._new_segment()
        start = self._write_file.tell()
        try:
            data = memoryview(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            while data:
                data = data[self._write_file.write(data):]
            os.fsync(self._write_file.fileno())
        except OSError as e:
            # A disk full or failing: cut the partial record off so later ones stay readable,
            # and hold the rows back (the caller waits) instead of losing them.
            log.error("%s write failed (%s); waiting for PostgreSQL or space", self.label, e)
            with contextlib.suppress(OSError):
                self._write_file.truncate(start)
                self._write_file.seek(start)
            raise SpoolFull from e
        offset = start + _HEADER.size
        seg[1].append((offset, len(payload)))
        was_empty = self.rows == 0
        self.bytes += size
        self.rows += len(rows)
        self._report_growth(was_empty)

    def _new_segment(self) -> list[Any]:
        if self._write_file is not None:
            self._write_file.close()
        path = self.dir / f"{self._next_number:012d}{SEGMENT_SUFFIX}"
        self._next_number += 1
        self._write_file = path.open("ab", buffering=0)  # unbuffered: a failed write leaves nothing behind
        _fsync_dir(self.dir)
        seg: list[Any] = [path, [], 0]
        self._segments.append(seg)
        return seg

    def _report_growth(self, was_empty: bool) -> None:
        step = self.bytes * 10 // self.max_bytes  # each tenth of the bound, once
        if was_empty:
            log.warning("%s: PostgreSQL unavailable or slow; spooling rows to %s", self.label, self.dir)
        if step > self._logged_step:
            log.warning("%s grew to %d bytes (%d%% of %d), %d rows waiting",
                        self.label, self.bytes, step * 10, self.max_bytes, self.rows)
        self._logged_step = max(self._logged_step, step)

    # -- draining ----------------------------------------------------------------------

    def peek(self) -> list[Row] | None:
        """The oldest batch not yet written, or None."""
        while self._segments:
            path, records, i = self._segments[0]
            if i < len(records):
                offset, length = records[i]
                with path.open("rb") as f:
                    f.seek(offset)
                    return _decode(f.read(length))
            if self._segments[0] is self._segments[-1] and self._write_file is not None:
                return None  # the segment being written has no unread record
            self._drop_first()
        return None

    def consume(self, rows: int) -> None:
        """The batch `peek` returned is committed: forget it."""
        seg = self._segments[0]
        offset, length = seg[1][seg[2]]
        seg[2] += 1
        self.rows -= rows
        if seg[2] == len(seg[1]):
            self._drop_first()
        if not self._segments:
            log.warning("%s drained: every spooled row is in PostgreSQL", self.label)
            self._logged_step = 0
            self._full_logged = False
            self.rows = 0

    def _drop_first(self) -> None:
        path, records, _ = self._segments.pop(0)
        if not self._segments and self._write_file is not None:
            self._write_file.close()
            self._write_file = None
        self.bytes -= path.stat().st_size
        path.unlink()

"""The decision log: one row per policy decision extauth makes, written off the hot path.

`DecisionLog.record` runs inside every Check, so it only takes references (the principal,
the endpoint match, the bundle) into a plain tuple and appends it to a bounded in-memory
queue: no JSON, no hashing, no I/O (~1 us). A background task drains the queue every
`flush_ms` or as soon as `batch_rows` are waiting, computes the input digest and writes the
batch with one COPY into `policy_decisions` (and, when configured, OPA-shaped JSON lines to
a file, and the same events to an HTTP service: extauth/decision_upload.py). A full queue
drops the new decision and counts it; the request never waits for the log. `close()` flushes
what is queued (graceful shutdown).

Nothing credential-like is queued: the principal carries ids and names, never a key or a
token, and the input's headers have credentials removed (extauth/policy_input.py). The request
text, when a bundle asks for it, counts in the input digest; it is written (into the file's and
the HTTP service's events, never PostgreSQL) only with `include_text`, within a queue budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from ccr.contract import POLICY_GLOBAL_SET
from ccr.metrics import DECISION_LOG_DROPPED
from extauth.decision_upload import DecisionUploader
from extauth.endpoints import EndpointMatch
from extauth.policy_input import RequestFacts, document
from extauth.principal import Principal

log = logging.getLogger(__name__)

# Which check made the decision: the full one (with the body), or the headers-only identity
# check Envoy makes before buffering a large body. The latter is logged only when it denies:
# when it passes, the full check follows and logs the request's one decision.
PHASE_FULL = "full"
PHASE_IDENTITY = "identity"

_COLUMNS = ("decision_id", "ts", "request_id", "phase", "principal_id", "principal_name", "principal_kind",
            "endpoint", "method", "path", "model", "input_sha256", "bundle_revision", "bundle_digest",
            "allow", "status", "reason", "eval_us", "policy_set", "shadow")
_COPY = f"COPY policy_decisions ({', '.join(_COLUMNS)}) FROM STDIN"  # noqa: S608 (constant names)

_MAX_TEXT = 2048  # path and reason come partly from clients: a row stays small whatever they send

# A queued decision, as record() builds it (a plain tuple: the cheapest thing to make):
# (decision_id, unix time, request_id, phase, principal|None, method, path, model|None,
#  endpoint|None, bundle|None, allow, status, reason, eval_ns|-1, the policy's Decision|None,
#  the PII findings (extauth/pii.py) or None when the text was not scanned,
#  the rest of the input (extauth/policy_input.py RequestFacts) or None,
#  the policy set's evaluation (extauth/policy_sets.py SetEval) or None for the global set)
Pending = tuple


def policy_input(principal: Principal, method: str, path: str, model: str | None,
                 endpoint: EndpointMatch | None, pii: tuple | None = None,
                 facts: RequestFacts | None = None) -> dict[str, Any]:
    """The input document PolicyEngine.decide evaluates, rebuilt here (off the hot path) for its digest."""
    return document(principal, method, path, model, endpoint, pii, facts)


def canonical(doc: Any) -> bytes:
    """Canonical JSON: sorted keys, no insignificant whitespace (orjson's compact form)."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


class DecisionLog:
    def __init__(self, dsn: str | None, *, file: str | Path | None = None, include_input: bool = False,
                 include_text: bool = False, text_queue_chars: int = 16 << 20,
                 entrypoint: str = "ccr/authz/decision", queue_size: int = 10_000, batch_rows: int = 500,
                 flush_ms: int = 200, clock: Callable[[], float] = time.time,
                 http: DecisionUploader | None = None) -> None:
        self.dsn = dsn
        self.file = Path(file) if file else None
        self.http = http
        self.include_input = include_input
        self.include_text = include_input and include_text
        self._text_max = text_queue_chars
        self._text_chars = 0  # request text characters held by queued decisions
        self.entrypoint = entrypoint
        self._max = queue_size
        self._batch = batch_rows
        self._every = flush_ms / 1000
        self._clock = clock
        self._queue: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one flush at a time (the loop, close(), tests)
        # Decision ids: a random per-process prefix and a counter, unique without a uuid per request.
        self._prefix = "dec_" + os.urandom(6).hex()
        self._seq = itertools.count(1)
        self._digests: dict[tuple, str] = {}  # the input digest by the facts it is made of
        self.dropped = 0  # decisions refused by a full queue, since start
        self.failed = 0  # decisions lost to a database or file error, since start
        self.written = 0
        self._dropped_reported = 0

    # -- hot path ---------------------------------------------------------------

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._seq):08x}"

    def record(self, decision_id: str, request_id: str, phase: str, principal: Principal | None, method: str,
               path: str, model: str | None, endpoint: EndpointMatch | None, bundle: Any, allow: bool,
               status: int, reason: str, eval_ns: int, policy_result: Any = None, pii: tuple | None = None,
               facts: RequestFacts | None = None, set_eval: Any = None) -> None:
        """Queue one decision; never blocks, never raises for a full queue (the decision is counted)."""
        q = self._queue
        if len(q) >= self._max:
            self.dropped += 1
            DECISION_LOG_DROPPED.labels("queue").inc()
            return
        if facts is not None and facts.text is not None:
            # The queue holds request text only for include_text, and only so much of it.
            n = sum(len(t.text) for t in facts.text) if self.include_text else 0
            if self.include_text and self._text_chars + n <= self._text_max:
                self._text_chars += n
            else:
                facts = dataclasses.replace(facts, text=None, text_truncated=self.include_text)
        q.append((decision_id, self._clock(), request_id, phase, principal, method, path, model, endpoint,
                  bundle, allow, status, reason, eval_ns, policy_result, pii, facts, set_eval))
        if len(q) >= self._batch:
            self._wake.set()

    # -- background ---------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="decision-log")
        if self.http is not None:
            self.http.start()

    async def _loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._every)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # never let the writer die: the next tick tries again
                log.exception("decision log flush failed")

    def _digest(self, p: Pending) -> str | None:
        principal, method, path, model, endpoint, eval_ns = p[4], p[5], p[6], p[7], p[8], p[13]
        if principal is None or eval_ns < 0:
            return None  # the policy was not reached: there is no input to digest
        se = p[17]
        if se is not None and se.input is not None:  # an OPA-Envoy set's own input (the CheckRequest)
            return hashlib.sha256(canonical(se.input)).hexdigest()
        known = getattr(p[14], "input_sha256", None)
        if known is not None:  # PolicyEngine.decide hashed the input it evaluated (any ccr-mode set)
            return known
        pii, facts = p[15], p[16]
        key = (principal, method, path, model, endpoint.name if endpoint else None,
               endpoint.params if endpoint else None, pii, facts)
        d = self._digests.get(key)
        if d is None:
            doc = policy_input(principal, method, path, model, endpoint, pii, facts)
            d = hashlib.sha256(canonical(doc)).hexdigest()
            if len(self._digests) >= 10_000:
                self._digests.clear()
            self._digests[key] = d
        return d

    @staticmethod
    def _row(p: Pending, digest: str | None) -> tuple:
        (did, ts, rid, phase, principal, method, path, model, endpoint, bundle, allow, status, reason, eval_ns,
         _, _, _, se) = p
        return (did, datetime.fromtimestamp(ts, UTC), rid or None, phase,
                principal.id if principal else None, principal.name if principal else None,
                str(principal.kind) if principal else None, endpoint.name if endpoint else None,
                method, path[:_MAX_TEXT], model[:_MAX_TEXT] if model else model, digest,
                getattr(bundle, "revision", None) if bundle else None,
                bundle.digest if bundle else None, allow, status, reason[:_MAX_TEXT],
                eval_ns // 1000 if eval_ns >= 0 else None,
                se.name if se is not None else POLICY_GLOBAL_SET, se.shadow if se is not None else False)

    def _opa_event(self, p: Pending, row: tuple) -> bytes:
        """One decision in OPA's decision-log shape (plus `request_id`, to join the audit row), as JSON."""
        se = p[17]
        if se is not None:
            return self._set_event(p, row, se)
        doc: dict[str, Any] = {
            "decision_id": row[0],
            "request_id": row[2],
            "path": self.entrypoint,
            # What the policy answered (a later check, e.g. object ownership, may still refuse).
            "result": {"allow": p[14].allow, "reason": p[14].reason} if p[14] is not None
            else {"allow": p[10], "reason": p[12]},
            "timestamp": row[1].isoformat().replace("+00:00", "Z"),
            "metrics": {"timer_rego_query_eval_ns": p[13]},
            "bundles": {"ccr": {"revision": row[12] or row[13] or ""}},
        }
        if self.include_input:  # the request's text only with include_text (record() dropped it otherwise)
            doc["input"] = self._input(p)
        return orjson.dumps(doc)

    def _input(self, p: Pending) -> dict[str, Any]:
        facts = p[16]
        doc = policy_input(p[4], p[5], p[6], p[7], p[8], p[15], facts)
        if self.include_text and facts is not None and facts.text is None and facts.text_truncated:
            doc["request"]["text_dropped"] = True  # the policy saw text; the queue's text budget was spent
        return doc

    def _set_event(self, p: Pending, row: tuple, se: Any) -> bytes:
        """A policy set's decision (extauth/policy_sets.py) in OPA's shape; `shadow` marks one not enforced."""
        doc: dict[str, Any] = {
            "decision_id": row[0],
            "request_id": row[2],
            "path": se.entrypoint,
            "result": se.result if se.error is None else {"error": se.error},
            "timestamp": row[1].isoformat().replace("+00:00", "Z"),
            "metrics": {"timer_rego_query_eval_ns": p[13]},
            "bundles": {se.name: {"revision": row[12] or row[13] or ""}},
            "labels": {"policy_set": se.name, "shadow": se.shadow, "mode": se.mode},
        }
        if self.include_input:
            if se.input is not None:  # OPA-Envoy input: credential headers and the body left out
                from extauth.opa_envoy import redacted

                doc["input"] = redacted(se.input)
            else:
                doc["input"] = self._input(p)
        return orjson.dumps(doc, default=str)

    async def flush(self) -> int:
        """Write everything queued now; returns the number of decisions written."""
        async with self._lock:
            if self.dropped != self._dropped_reported:
                log.warning("decision log queue full (%d): %d decision(s) dropped, %d since start",
                            self._max, self.dropped - self._dropped_reported, self.dropped)
                self._dropped_reported = self.dropped
            q = self._queue
            if not q:
                return 0
            batch = [q.popleft() for _ in range(len(q))]
            if self.include_text:
                self._text_chars -= sum(len(t.text) for p in batch if p[16] is not None and p[16].text
                                        for t in p[16].text)
            digests = [self._digest(p) for p in batch]
            rows = [self._row(p, d) for p, d in zip(batch, digests, strict=True)]
            if self.file is not None or self.http is not None:
                # OPA logs policy queries: decisions refused before the policy ran are in PostgreSQL only.
                events = [self._opa_event(p, r) for p, r in zip(batch, rows, strict=True) if r[11] is not None]
                if self.http is not None:
                    self.http.offer(events)  # buffered; uploaded by its own task
                if events and self.file is not None:
                    try:
                        await asyncio.to_thread(_append, self.file, b"\n".join(events) + b"\n")
                    except OSError as e:
                        DECISION_LOG_DROPPED.labels("file").inc(len(events))
                        log.error("decision log file %s: %s", self.file, e)
            if self.dsn is None:
                self.written += len(rows)
                return len(rows)
            try:
                await self._copy(rows)
            except (psycopg.Error, OSError) as e:
                self.failed += len(rows)
                DECISION_LOG_DROPPED.labels("postgres").inc(len(rows))
                log.error("decision log: %d decision(s) not written to PostgreSQL (%s); %d lost since start",
                          len(rows), e, self.failed)
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                    self._conn = None
                return 0
            self.written += len(rows)
            return len(rows)

    async def _copy(self, rows: list[tuple]) -> None:
        if self._conn is None or self._conn.closed:
            assert self.dsn is not None
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=5)
        async with self._conn.cursor() as cur, cur.copy(_COPY) as copy:
            for r in rows:
                await copy.write_row(r)

    async def close(self) -> None:
        """Stop the writer and flush what is still queued.

        The writer is asked to stop, not cancelled: cancelling it inside a COPY would leave the
        connection mid-protocol. A database that does not answer gets 10 s, then is given up on."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except TimeoutError:
                log.error("decision log writer did not finish within 10 s; %d decision(s) not written",
                          len(self._queue))
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()
        if self.http is not None:
            await self.http.close()  # one last upload of what is buffered, bounded by its timeout
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)


def why(dsn: str, request_id: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The decisions recorded for a request id (or one decision id), and the request's audit row if any."""
    from psycopg.rows import dict_row

    col = "decision_id" if request_id.startswith("dec_") else "request_id"
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT * FROM policy_decisions WHERE {col} = %s ORDER BY ts, decision_id",  # noqa: S608
                    (request_id,))
        decisions = cur.fetchall()
        rid = decisions[0]["request_id"] if decisions and col == "decision_id" else request_id
        audit = None
        if rid:
            cur.execute("SELECT request_id, status, model, path, upstream_cluster, usage_status, ts"
                        " FROM request_log WHERE request_id = %s", (rid,))
            audit = cur.fetchone()
    return decisions, audit

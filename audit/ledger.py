"""Spend at completion: each request's cost into the PostgreSQL ledger, and its reservation settled.

For every final access-log entry of an authorized request (AUTHZ_NS carries principal_id):

- cost (ccr/pricing.py) from the metered usage in USAGE_NS and the model's prices; usage that
  could not be read (`unknown`) is charged the worst case extauth computed (AUTHZ_SPEND), never 0;
- a `spend_ledger` row (LedgerWriter): batched inserts, idempotent by request id; a batch
  PostgreSQL does not take is written to a spool file (fsync'd, then its directory) and replayed
  until it is in, so a row is never dropped (also across restarts: start() replays what is left);
- settlement (Settler), once the request's ledger row is durable: one Lua script moves every
  counter the reservation named by (actual - reserved), deletes the reservation and marks the request settled (a retried
  settlement is a no-op); threshold alerts (spend.alert_thresholds) are claimed in the same
  script with SET NX, once per counter (budget, seat, period) and threshold, and POSTed to
  spend.webhook_url.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis.asyncio as aioredis
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import json_format
from redis.exceptions import NoScriptError, RedisError

from audit.entry import _FINAL_TYPES, Namespaces, _clean, _count, _text
from ccr.budgets import batch_hold, parse_spend_facts
from ccr.config import GatewayConfig
from ccr.contract import (
    AUTHZ_NS,
    AUTHZ_SPEND,
    AUTHZ_SPEND_WORST,
    RATELIMIT_NS,
    SPEND_COUNTERS,
    SPEND_RESERVED,
    USAGE_CACHE_1H,
    USAGE_CACHE_5M,
    USAGE_NS,
    USAGE_STATUS,
    UsageStatus,
)
from ccr.pricing import ANY_PROMPT, PriceTable, Rates, Usage, cost_micro, usd
from ratelimit.spend import RESERVATION_PREFIX, SETTLED_PREFIX

log = logging.getLogger("ccr.spend")

LEDGER_COLUMNS = (
    "request_id", "ts", "principal_id", "principal", "principal_kind", "key_id", "tenant", "groups", "spiffe_id",
    "model", "endpoint", "status", "usage_status", "input_tokens", "output_tokens", "cache_write_5m_tokens",
    "cache_write_1h_tokens", "cache_read_tokens", "batch", "cost_micro_usd", "reserved_micro_usd",
)
INSERT = (f"INSERT INTO spend_ledger ({', '.join(LEDGER_COLUMNS)}) VALUES ({', '.join(['%s'] * len(LEDGER_COLUMNS))})"
          " ON CONFLICT (request_id) DO NOTHING")
# A batch goes in with one COPY (executemany was one INSERT execution per row: bench/audit_writes.py,
# docs/hot-path.md). The ledger is idempotent by request id: a batch holding an id already there (a
# spool replay, a repeat) fails with a unique violation and is written again without those ids.
COPY = f"COPY spend_ledger ({', '.join(LEDGER_COLUMNS)}) FROM STDIN"
SETTLED_TTL_S = 3 * 86400
ALERT_TTL_S = 40 * 86400  # longer than any period; the alert key names its period anyway

# KEYS: reservation, settled marker, counters 1..n (as the reservation named them).
# ARGV: actual, settled ttl, alert ttl, number of thresholds t, thresholds 1..t, caps 1..n.
# Returns {"done"} when already settled, else {"settled", "<i>:<threshold>:<value>"...} for each
# threshold newly crossed. When the reservation is gone (Redis lost its data) the actual cost is
# added to the counters that exist again: they may already hold it from the ledger, so this can
# count a request twice but never zero times (caps hold; the ledger stays the truth).
SETTLE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'done'} end
local actual = tonumber(ARGV[1])
local held = redis.call('HGETALL', KEYS[1])
local amounts = {}
for i = 1, #held, 2 do amounts[held[i]] = tonumber(held[i + 1]) end
local lost = #held == 0
local nthr = tonumber(ARGV[4])
local out = {'settled'}
for i = 3, #KEYS do
  local k = KEYS[i]
  local v = nil
  if redis.call('EXISTS', k) == 1 then
    if amounts[k] then v = redis.call('INCRBY', k, actual - amounts[k])
    elseif lost then v = redis.call('INCRBY', k, actual) end
  end
  local cap = tonumber(ARGV[4 + nthr + i - 2])
  if v and cap > 0 then
    for t = 1, nthr do
      local thr = tonumber(ARGV[4 + t])
      if v * 100 >= thr * cap and redis.call('SET', k .. ':alert:' .. thr, '1', 'NX', 'EX', ARGV[3]) then
        out[#out + 1] = (i - 2) .. ':' .. thr .. ':' .. v
      end
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return out
"""

# A successful batch create's reservation becomes a hold (KEYS: reservation, settled marker, hold;
# ARGV: settled ttl, hold ttl): the counters keep the batch's worst case until its results are
# charged. Returns {"done"} when already settled, {"held"} otherwise (also when the reservation
# is gone: Redis lost it, and the counters were rebuilt from the ledger without it).
HOLD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'done'} end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[3])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return {'held'}
"""

# Releases a batch's hold (KEYS: hold, then the counters it names): each counter that still exists
# goes down by what the hold put on it; the hold is deleted, so a second release moves nothing.
RELEASE = """
local n = 0
for i = 2, #KEYS do
  local amount = redis.call('HGET', KEYS[1], KEYS[i])
  if amount and redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('DECRBY', KEYS[i], amount)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
return n
"""
HOLD_PREFIX = "ccr:spend:h:"
# A batch may run 24 hours and its results are kept 29 days: a hold lasts longer than that; one never
# released (results never fetched) goes with it, or with its counter at the period's end.
HOLD_TTL_S = 31 * 86400

# Errors one row causes by its content: retrying its batch would never succeed.
_ROW_ERRORS = (psycopg.errors.DataError, psycopg.errors.IntegrityError)
_BILLED = frozenset({UsageStatus.COMPLETE, UsageStatus.PARTIAL, UsageStatus.ESTIMATED, UsageStatus.NOT_BILLABLE})
_BATCH_ENDPOINTS = frozenset({"batches.results"})
_BATCH_CREATE = "batches.create"


@dataclass(frozen=True, slots=True)
class Settlement:
    request_id: str
    actual: int
    reserved: int
    counters: list[dict[str, Any]]
    hold: bool = False  # a batch create the provider took: keep the reservation until its results
    release: str | None = None  # batch results: the create request id whose hold they release


def _value(v: Any) -> Any:
    return json_format.MessageToDict(v) if hasattr(v, "DESCRIPTOR") else v


def _list(v: Any) -> list[Any]:
    """A metadata list (the principal's groups) as Python values, without json_format (which costs
    more than the rest of the entry's ledger row); anything but a list of scalars goes through it."""
    if v is None:
        return []
    if v.WhichOneof("kind") == "list_value":
        items = v.list_value.values
        if all(x.WhichOneof("kind") == "string_value" for x in items):
            return [x.string_value for x in items]
    out = _value(v)
    return out if isinstance(out, list) else [out]


_STATUSES = frozenset(s.value for s in UsageStatus)


class Spend:
    """Cost, ledger row and settlement of access-log entries (one per audit process)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.prices = PriceTable(config)
        rates = [Rates.of(m.price) for m in config.models]
        # A batch's results name no model here: priced at the dearest model (never under-billed).
        # (Compared at their dearest, long-context rates included; the cost then applies the prompt's own rates.)
        self._dearest = max(rates, key=lambda r: (r.at_most(ANY_PROMPT).output, r.at_most(ANY_PROMPT).dearest_input))

    def rates(self, model: str | None) -> Rates:
        r = self.prices.rates(model)
        return r if r is not None else self._dearest

    def of_entry(self, e: accesslog_pb2.HTTPAccessLogEntry, ns: Namespaces | None = None,
                 ts: datetime | None = None) -> tuple[tuple[Any, ...] | None, Settlement | None]:
        """`ns`, `ts`: the entry's namespaces and start time when the caller has read them already."""
        common = e.common_properties
        if common.intermediate_log_entry or common.access_log_type not in _FINAL_TYPES:
            return None, None
        ns = ns or Namespaces(common)
        authz = ns(AUTHZ_NS)
        principal_id = _text(authz, "principal_id")
        request_id = e.request.request_id
        if principal_id is None or not request_id or not common.HasField("start_time"):
            return None, None
        rl = ns(RATELIMIT_NS)
        if SPEND_RESERVED in authz:  # extauth reserved it in its Check (limits.admission: extauth)
            rl = authz
        reserved = _count(rl, SPEND_RESERVED) if SPEND_RESERVED in rl else None
        worst = _count(authz, AUTHZ_SPEND_WORST) if AUTHZ_SPEND_WORST in authz else None
        spend_text = _text(authz, AUTHZ_SPEND)
        if worst is None and spend_text:
            with contextlib.suppress(ValueError):
                worst = parse_spend_facts(spend_text)[0]
        usage = ns(USAGE_NS)
        status_text = _text(usage, USAGE_STATUS) if usage else None
        ustatus = status_text if status_text in _STATUSES else (
            UsageStatus.NOT_FORWARDED.value if not common.HasField("time_to_first_upstream_tx_byte")
            else UsageStatus.UNKNOWN.value)
        counts = {f: (_count(usage, f) if usage else None) for f in (
            "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
            USAGE_CACHE_5M, USAGE_CACHE_1H)}
        model = _text(authz, "model")
        endpoint = _text(authz, "endpoint")
        batch = endpoint in _BATCH_ENDPOINTS
        code = e.response.response_code.value
        if endpoint == _BATCH_CREATE:
            # Creating a batch bills nothing: its results are charged when first fetched. What it
            # reserved is held (below) until then.
            cost = 0
        elif ustatus in _BILLED:
            u = Usage(counts["input_tokens"] or 0, counts["output_tokens"] or 0,
                      counts["cache_creation_input_tokens"] or 0, counts["cache_read_input_tokens"] or 0,
                      counts[USAGE_CACHE_5M], counts[USAGE_CACHE_1H])
            cost = cost_micro(u, self.rates(model), batch=batch)
        elif ustatus == UsageStatus.UNKNOWN:
            # A provider was called and we could not read what it billed: charge the worst case.
            cost = reserved if reserved is not None else (worst or 0)
        else:
            cost = 0
        groups = _list(authz.get("groups"))
        w5 = counts[USAGE_CACHE_5M]
        w1 = counts[USAGE_CACHE_1H]
        writes = counts["cache_creation_input_tokens"]
        if writes is not None and writes > (w5 or 0) + (w1 or 0):
            # Writes the provider did not split are priced, and listed, as 1-hour writes.
            w5, w1 = w5 or 0, (w1 or 0) + writes - (w5 or 0) - (w1 or 0)
        row = (
            request_id, ts or common.start_time.ToDatetime(tzinfo=UTC), principal_id, _text(authz, "principal"),
            _text(authz, "principal_kind"), _text(authz, "key_id"), _text(authz, "tenant"),
            [_clean(str(g)) for g in groups], _text(authz, "spiffe_id"), model, endpoint,
            code,
            ustatus, counts["input_tokens"], counts["output_tokens"], w5, w1, counts["cache_read_input_tokens"],
            batch, cost, reserved,
        )
        settlement = None
        counters = _value(rl[SPEND_COUNTERS]) if reserved is not None and SPEND_COUNTERS in rl else None
        counters = counters if isinstance(counters, list) and counters else []
        ok = 200 <= code < 300
        release = batch_hold(spend_text) if batch and spend_text and ok and ustatus in _BILLED else None
        if counters or release:
            # A failed batch create releases (settles to 0) like any failed request.
            settlement = Settlement(request_id, cost, reserved or 0, counters,
                                    hold=endpoint == _BATCH_CREATE and ok, release=release)
        return row, settlement


# -- ledger rows: PostgreSQL, else a durable spool -----------------------------------------------


def _encode(row: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(LEDGER_COLUMNS, row, strict=True))
    d["ts"] = d["ts"].isoformat()
    return d


def _decode(d: dict[str, Any]) -> tuple[Any, ...]:
    d = dict(d)
    d["ts"] = datetime.fromisoformat(d["ts"])
    return tuple(d[c] for c in LEDGER_COLUMNS)


class Spool:
    """Ledger rows PostgreSQL did not take: one file per failed batch, fsync'd before it counts."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._seq = itertools.count()

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("ledger-*.jsonl"))

    def write(self, rows: list[tuple[Any, ...]], kind: str = "ledger") -> Path:
        """`kind` ledger: replayed until PostgreSQL takes it; rejected: kept for an operator, not replayed."""
        final = self.dir / f"{kind}-{os.getpid()}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{next(self._seq)}.jsonl"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for r in rows:
                f.write(json.dumps(_encode(r), separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)  # a file is whole or absent
        self._sync_dir()
        return final

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replay(self, dsn: str) -> int:
        """Insert every spooled file (idempotent), deleting each once committed; rows replayed."""
        n = 0
        for path in self.files():
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another worker is replaying it
                except BlockingIOError:
                    continue
                if not path.exists():
                    continue  # replayed and removed while we waited for the lock
                rows = [_decode(json.loads(line)) for line in f if line.strip()]
                with psycopg.connect(dsn, connect_timeout=5, application_name="ccr-audit-spool") as conn, \
                        conn.transaction(), conn.cursor() as cur:
                    cur.executemany(INSERT, rows)
                path.unlink()
            self._sync_dir()
            n += len(rows)
        return n


class LedgerWriter:
    """Batched inserts into spend_ledger; failures go to the spool and are replayed."""

    def __init__(self, dsn: str, spool: Spool, *, batch_max: int = 1000, queue_max: int = 50_000,
                 replay_every_s: float = 1.0) -> None:
        self.dsn = dsn
        self.spool = spool
        self.batch_max = batch_max
        self.replay_every_s = replay_every_s
        self._queue: asyncio.Queue[tuple[tuple[Any, ...] | None, Settlement | None] | asyncio.Future[None]] = \
            asyncio.Queue(queue_max)
        self._conn: psycopg.AsyncConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Called with the settlements of each batch once its rows are durable.
        self.after_write: Callable[[list[Settlement]], Awaitable[None]] | None = None
        self.written = 0
        self.spooled = 0
        self.replayed = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(), name="ledger_writer"),
                       asyncio.create_task(self._replay_loop(), name="ledger_spool_replay")]

    async def put(self, row: tuple[Any, ...] | None, settlement: Settlement | None = None) -> None:
        await self._queue.put((row, settlement))

    async def flush(self) -> None:
        """Return once every row put before this call is committed or spooled (durable either way)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(done)
        await done

    async def stop(self) -> None:
        await self.flush()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    async def _run(self) -> None:
        while True:
            batch: list[tuple[Any, ...]] = []
            after: list[Settlement] = []
            waiters: list[asyncio.Future[None]] = []
            item = await self._queue.get()
            while True:
                if isinstance(item, asyncio.Future):
                    waiters.append(item)
                    break
                row, settlement = item
                if row is not None:
                    batch.append(row)
                if settlement is not None:
                    after.append(settlement)
                if len(batch) >= self.batch_max or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._write(batch)
            # Settled only once their rows are durable (committed or spooled): a counter rebuilt
            # from the ledger after Redis lost its data then never misses a settled request.
            if after and self.after_write is not None:
                await self.after_write(after)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _write(self, batch: list[tuple[Any, ...]]) -> None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(self.dsn, application_name="ccr-audit-ledger",
                                                                   connect_timeout=5)
            try:
                try:
                    await self._insert(self._conn, batch)
                except psycopg.errors.UniqueViolation:
                    await self._insert(self._conn, batch, lookup=True)
                self.written += len(batch)
            except _ROW_ERRORS as e:
                # A row PostgreSQL refuses by its content would block its whole batch forever.
                log.warning("spend_ledger batch of %d rejected (%s); writing rows one by one", len(batch), e)
                await self._write_each(batch)
        except (psycopg.Error, OSError) as e:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            path = await asyncio.to_thread(self.spool.write, batch)
            self.spooled += len(batch)
            log.warning("spend_ledger write failed (%s: %s); %d row(s) spooled to %s for replay",
                        type(e).__name__, e, len(batch), path)

    @staticmethod
    async def _insert(conn: psycopg.AsyncConnection, batch: list[tuple[Any, ...]], lookup: bool = False) -> None:
        """The rows of `batch` whose request id is not in the ledger yet (the first of a batch wins);
        `lookup`: read which ids are there first (else a row already there fails the batch)."""
        async with conn.transaction(), conn.cursor() as cur:
            have: set[Any] = set()
            if lookup:
                await cur.execute("SELECT request_id FROM spend_ledger WHERE request_id = ANY(%s)",
                                  ([r[0] for r in batch],))
                have = {r[0] for r in await cur.fetchall()}
            fresh = []
            for r in batch:
                if r[0] not in have:
                    have.add(r[0])
                    fresh.append(r)
            if fresh:
                async with cur.copy(COPY) as copy:
                    for r in fresh:
                        await copy.write_row(r)

    async def _write_each(self, batch: list[tuple[Any, ...]]) -> None:
        assert self._conn is not None
        refused = []
        for row in batch:
            try:
                async with self._conn.transaction(), self._conn.cursor() as cur:
                    await cur.execute(INSERT, row)
                self.written += 1
            except _ROW_ERRORS as e:
                log.error("spend_ledger refused request_id=%r (%s); kept in the spool's rejected file", row[0], e)
                refused.append(row)
        if refused:
            await asyncio.to_thread(self.spool.write, refused, "rejected")

    async def _replay_loop(self) -> None:
        while True:
            if self.spool.files():
                try:
                    n = await asyncio.to_thread(self.spool.replay, self.dsn)
                    if n:
                        self.replayed += n
                        log.info("replayed %d spooled spend_ledger row(s)", n)
                except (psycopg.Error, OSError) as e:
                    log.debug("spool replay not yet possible: %s", e)
            await asyncio.sleep(self.replay_every_s)


# -- settlement and alerts -----------------------------------------------------------------------


class Settler:
    """Settles reservations in Redis; a settlement Redis could not take is retried (bounded)."""

    def __init__(self, redis_url: str, thresholds: list[int], webhook_url: str | None,
                 retry_every_s: float = 1.0) -> None:
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.thresholds = sorted(set(thresholds))
        self.webhook_url = webhook_url
        self.retry_every_s = retry_every_s
        self._shas: dict[str, str] = {}
        self._pending: deque[Settlement] = deque(maxlen=100_000)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: httpx.AsyncClient | None = None
        self.settled = 0
        self.released = 0  # batch holds released by their results
        self.alerts_sent = 0

    def start(self) -> None:
        self._spawn(self._retry_loop())

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def settle(self, s: Settlement) -> None:
        try:
            await self._settle(s)
        except (RedisError, OSError) as e:
            # The reservation stays counted meanwhile: over-counting, never under.
            log.warning("settlement of %s deferred (Redis: %s)", s.request_id, e)
            self._pending.append(s)

    async def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        sha = self._shas.get(script)
        if sha is not None:
            try:
                return await self.redis.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                pass  # nothing ran: loading it and running again cannot count twice
        sha = self._shas[script] = await self.redis.script_load(script)
        return await self.redis.evalsha(sha, len(keys), *keys, *args)

    async def _settle(self, s: Settlement) -> None:
        if s.counters and s.hold:
            await self._eval(HOLD, [RESERVATION_PREFIX + s.request_id, SETTLED_PREFIX + s.request_id,
                                    HOLD_PREFIX + s.request_id], [SETTLED_TTL_S, HOLD_TTL_S])
            self.settled += 1
        elif s.counters:
            await self._settle_counters(s)
        if s.release:
            # Charged first, released after: for a moment over, never under.
            for hold in (HOLD_PREFIX + s.release, RESERVATION_PREFIX + s.release):
                # The create's own entry may not be settled yet (another receiver worker has it): its
                # reservation is released instead, and holding it later finds nothing to hold.
                names = [k.decode() if isinstance(k, bytes) else str(k) for k in await self.redis.hkeys(hold)]
                if names:
                    break
            if names:
                await self._eval(RELEASE, [hold, *names], [])
                self.released += 1

    async def _settle_counters(self, s: Settlement) -> None:
        keys = [RESERVATION_PREFIX + s.request_id, SETTLED_PREFIX + s.request_id,
                *(str(c["key"]) for c in s.counters)]
        args: list[Any] = [s.actual, SETTLED_TTL_S, ALERT_TTL_S, len(self.thresholds), *self.thresholds,
                           *(int(c.get("cap", 0)) for c in s.counters)]
        out = await self._eval(SETTLE, keys, args)
        self.settled += 1
        for item in out[1:]:
            i, thr, value = (int(x) for x in (item.decode() if isinstance(item, bytes) else item).split(":"))
            self._spawn(self._alert(s.counters[i - 1], thr, value))

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retry_every_s)
            while self._pending:
                s = self._pending[0]
                try:
                    await self._settle(s)
                except (RedisError, OSError):
                    break
                self._pending.popleft()

    async def _alert(self, counter: dict[str, Any], threshold: int, value: int) -> None:
        cap = int(counter.get("cap", 0))
        payload = {
            "type": "ccr.budget.threshold", "budget": counter.get("budget"), "subject": counter.get("subject"),
            "seat": counter.get("seat") or None, "period": counter.get("period"), "threshold_percent": threshold,
            "spent_micro_usd": value, "cap_micro_usd": cap, "spent_usd": usd(value), "cap_usd": usd(cap),
            "mode": counter.get("mode"),
            "resets_at": datetime.fromtimestamp(int(counter.get("end", 0)), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        log.warning("budget %s at %d%% (%s of %s, period %s)", payload["budget"], threshold, payload["spent_usd"],
                    payload["cap_usd"], payload["period"])
        if not self.webhook_url:
            return
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=5.0)
        for attempt in range(3):
            try:
                r = await self._http.post(self.webhook_url, json=payload)
                if r.status_code < 300:
                    self.alerts_sent += 1
                    return
                log.warning("budget webhook answered %d", r.status_code)
            except httpx.HTTPError as e:
                log.warning("budget webhook failed (attempt %d): %s", attempt + 1, e)
            await asyncio.sleep(0.5 * (attempt + 1))
        log.error("budget alert not delivered: %s", payload)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
        await self.redis.aclose()


class SpendRecorder:
    """The audit receiver's one hook: ledger row and settlement for each access-log entry."""

    def __init__(self, config: GatewayConfig, dsn: str, redis_url: str, spool_dir: Path) -> None:
        self.spend = Spend(config)
        self.ledger = LedgerWriter(dsn, Spool(spool_dir))
        s = config.spend
        self.settler = Settler(redis_url, s.alert_thresholds, s.webhook_url)

    def start(self) -> None:
        self.ledger.after_write = self._settle_all
        self.ledger.start()
        self.settler.start()

    async def _settle_all(self, settlements: list[Settlement]) -> None:
        for s in settlements:
            await self.settler.settle(s)

    async def on_entry(self, e: accesslog_pb2.HTTPAccessLogEntry, ns: Namespaces | None = None,
                       ts: datetime | None = None) -> None:
        row, settlement = self.spend.of_entry(e, ns, ts)
        if row is not None or settlement is not None:
            await self.ledger.put(row, settlement)

    async def flush(self) -> None:
        await self.ledger.flush()

    async def stop(self) -> None:
        await self.ledger.stop()
        await self.settler.stop()

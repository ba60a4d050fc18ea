"""Counters in Redis: fixed windows, sliding windows and token buckets, all in one script call.

One EVALSHA decides every counter of a request (one Redis round trip per decision), on
Redis's clock (TIME inside the script), so replicas with skewed clocks share one window.

- FIXED: envoyproxy/ratelimit's semantics. One key per window (`<key>:<window start>`),
  INCRBY the hits whatever the outcome, OVER when the count after the increment exceeds the
  limit. What envoyproxy-compatible descriptors use.
- SLIDING: the window before now, kept as SLOTS slots in a hash with their running sum (`s`), the
  oldest slot that may remain (`lo`) and the newest written (`hi`); a slot counts until the whole
  window has passed its end, so any `period`-long interval holds at most the limit (no 2x burst at
  a window edge; the price is answering "over" up to one slot early). Allowing reads three
  fields and drops the slots that left the window one by one; only a refusal reads every slot
  (for its retry-after).
- BUCKET: a token bucket of `burst` capacity refilled at limit/period; a request takes hits.

SLIDING and BUCKET are all-or-nothing per request: they are committed only when no counter
that gates the request said OVER, so a refused request does not use up other limits. A
`charge` counter (usage at stream end) is always committed, even past its limit: the tokens
were spent. `hits == 0` is a check without counting: OVER when the budget is already used up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import redis
from redis import exceptions as rx

try:  # redis[hiredis]: its C packer directly, without redis-py's per-argument normalising (≈ 5 µs a call)
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is a dependency
    _pack = None
from redis.connection import Connection

from ratelimit.redis_pipe import RedisPipe

log = logging.getLogger("ccr.ratelimit")

# After a call times out (Redis accepts but does not answer), calls fail at once for this long
# instead of each waiting out the timeout: extauth decides on its event loop, so a hung store
# would otherwise hold every Check for the timeout in turn. The limits' on_redis_down applies as
# for a store that refuses connections; the first call after the hold asks Redis again.
STALL_HOLD_S = 1.0

SLOTS = 60  # slots per sliding window: a minute in seconds, an hour in minutes, a day in 24-minute slots


class Algorithm(IntEnum):
    FIXED = 1
    SLIDING = 2
    BUCKET = 3


# Flags per counter.
CHARGE = 1  # always commit (usage already spent); never gates
NO_GATE = 2  # its OVER does not refuse the request (shadow mode)

# ARGV[1]: now in ms, or -1 for Redis's TIME (tests pass a clock); ARGV[2]: 1 when the request is
# already refused (an over-limit answer from the local cache), so nothing but charges is committed.
# Then per counter 6 args: algorithm, hits, period_ms, limit, burst (bucket capacity), flags.
# Returns now_ms, then per counter: over (0/1), used-or-remaining (see below), reset_ms, retry_ms.
#   FIXED: remaining = limit - count (may be negative); reset = to the window's end.
#   SLIDING / BUCKET: remaining after this request (if committed); reset = until fully replenished;
#   retry = until this request would fit (0 when it fits).
SCRIPT = """
local now
if tonumber(ARGV[1]) >= 0 then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local refused = ARGV[2] == '1'
local n = #KEYS
local out = {now}
local pending = {}
for i = 1, n do
  local a = 2 + (i - 1) * 6
  local algo, hits = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local period, limit = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local burst, flags = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local key = KEYS[i]
  local over, remaining, reset, retry = 0, 0, 0, 0
  if algo == 1 then
    local start = now - now % period
    local k = key .. ':' .. math.floor(start / 1000)
    local count
    if hits > 0 then
      count = redis.call('INCRBY', k, hits)
      if redis.call('PTTL', k) == -1 then redis.call('PEXPIRE', k, period) end
    else
      count = tonumber(redis.call('GET', k) or '0')
    end
    if count > limit then over = 1 end
    remaining = limit - count
    reset = start + period - now
    retry = reset
  elseif algo == 2 then
    local slot = math.floor(period / 60)
    local cur = math.floor(now / slot)
    -- The hash holds the slots' counts and their running sum `s`, the oldest slot that may still be
    -- there `lo` and the newest one written `hi`: the allow path reads three fields, not 60 slots.
    local st = redis.call('HMGET', key, 's', 'lo', 'hi')
    local used, lo, hi = tonumber(st[1]) or 0, tonumber(st[2]) or cur, tonumber(st[3])
    if lo < cur - 60 then
      if cur - lo > 200 then
        -- Cannot happen while the hash lives (it expires a window after its last write); rebuilt anyway.
        local vals = redis.call('HGETALL', key)
        used = 0
        for j = 1, #vals, 2 do
          local sl = tonumber(vals[j])
          if vals[j] ~= 's' and vals[j] ~= 'lo' and vals[j] ~= 'hi' then
            if sl < cur - 60 then redis.call('HDEL', key, vals[j]) else used = used + tonumber(vals[j + 1]) end
          end
        end
      else
        -- Slots that left the window: each subtracted and deleted once (usually none or one per call).
        for j = lo, cur - 61 do
          local v = redis.call('HGET', key, j)
          if v then used = used - tonumber(v); redis.call('HDEL', key, j) end
        end
      end
      lo = cur - 60
      redis.call('HSET', key, 's', used, 'lo', lo)
    end
    local need
    if hits > 0 then
      if used + hits > limit then over = 1 end
      need = used + hits - limit
    else
      if used >= limit then over = 1 end
      need = used - limit + 1
    end
    if need > 0 then
      -- Refused (or at the limit): when does enough of the window free up? Oldest slots first.
      local vals = redis.call('HGETALL', key)
      local idx, cnt = {}, {}
      for j = 1, #vals, 2 do
        local sl = tonumber(vals[j])
        if vals[j] ~= 's' and vals[j] ~= 'lo' and vals[j] ~= 'hi' and sl >= cur - 60 then
          idx[#idx + 1] = sl; cnt[sl] = tonumber(vals[j + 1])
        end
      end
      table.sort(idx)
      local dropped = 0
      retry = period
      for _, sl in ipairs(idx) do
        dropped = dropped + cnt[sl]
        if dropped >= need then retry = (sl + 61) * slot - now; break end
      end
    end
    if hi and hi >= cur - 60 and used > 0 then reset = (hi + 61) * slot - now end
    remaining = limit - used - hits
    if hits > 0 then pending[#pending + 1] = {i, key, cur, hits, flags, period + slot} end
  else
    local rate = limit / period
    local st = redis.call('HMGET', key, 't', 'ts')
    local tokens = burst
    if st[1] then
      tokens = math.min(burst, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * rate)
    end
    if hits > 0 then
      if hits > tokens then over = 1; retry = math.ceil((hits - tokens) / rate) end
    elseif tokens <= 0 then
      over = 1; retry = math.ceil((1 - tokens) / rate)
    end
    remaining = math.floor(tokens - hits)
    reset = math.ceil((burst - tokens + hits) / rate)
    pending[#pending + 1] = {i, key, tokens, hits, flags, burst, rate}
  end
  if flags % 2 == 1 then over = 0 end
  if over == 1 and math.floor(flags / 2) % 2 == 0 then refused = true end
  out[#out + 1] = over
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
for _, p in ipairs(pending) do
  local i, key, flags = p[1], p[2], p[5]
  local algo = tonumber(ARGV[2 + (i - 1) * 6 + 1])
  if not refused or flags % 2 == 1 then
    if algo == 2 then
      redis.call('HINCRBY', key, p[3], p[4])
      redis.call('HINCRBY', key, 's', p[4])
      redis.call('HSET', key, 'hi', p[3])
      redis.call('HSETNX', key, 'lo', p[3])
      redis.call('PEXPIRE', key, p[6])
    elseif p[4] > 0 then
      local left = p[3] - p[4]
      redis.call('HSET', key, 't', tostring(left), 'ts', now)
      redis.call('PEXPIRE', key, math.ceil((p[6] - left) / p[7]) + 1000)
    end
  else
    -- not committed: what remains is what there was
    local o = 3 + (i - 1) * 4
    if algo == 2 then out[o] = out[o] + p[4] else out[o] = math.floor(p[3]) end
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    over: bool
    remaining: int  # never negative
    reset_ms: int  # until the window ends / the budget is fully back
    retry_ms: int  # until this request would have fitted (for OVER)
    left: int  # remaining before clamping (a fixed window's count is limit - left)


@dataclass(frozen=True, slots=True)
class CounterOp:
    key: str
    algorithm: Algorithm
    hits: int
    period_ms: int
    limit: int
    burst: int = 0
    flags: int = 0


def script_args(now_ms: int, ops: list[CounterOp], refused: bool) -> list[int | str]:
    """SCRIPT's ARGV for `ops` (KEYS are the ops' keys, in order)."""
    args: list[int | str] = [now_ms, 1 if refused else 0]
    for op in ops:
        args += [int(op.algorithm), op.hits, op.period_ms, op.limit, op.burst, op.flags]
    return args


def read_outcomes(raw: list[int], n: int) -> tuple[int, list[Outcome]]:
    """(Redis's now in ms, one Outcome per op) from SCRIPT's reply for n ops."""
    return int(raw[0]), [Outcome(bool(raw[1 + 4 * i]), max(int(raw[2 + 4 * i]), 0), max(int(raw[3 + 4 * i]), 0),
                                 max(int(raw[4 + 4 * i]), 0), int(raw[2 + 4 * i])) for i in range(n)]


class Counters:
    """The Redis side of a decision: one EVALSHA for all of a request's counters.

    Each deciding thread keeps its own connection from the client's pool settings and talks on it
    directly (pack, send, read): redis-py's client and blocking pool cost more CPU per call
    (≈ 70 µs) than the call itself (≈ 30 µs), on a path that runs once per request.
    """

    def __init__(self, client: redis.Redis, now_ms: int = -1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.now_ms = now_ms  # -1: Redis's clock; tests set a fixed one
        self.clock = clock
        self._stalled_until = 0.0  # clock() before which calls fail at once (STALL_HOLD_S)
        self._script = SCRIPT.encode()
        self._sha: str | None = None
        self._local = threading.local()
        self._opened: list[Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> Connection:
        held = getattr(self._local, "held", None)
        if held is not None and held[0] is self.redis:
            return held[1]  # type: ignore[no-any-return]
        conn = self.redis.connection_pool.make_connection()
        with self._lock:
            self._opened.append(conn)
        self._local.held = (self.redis, conn)
        return conn  # type: ignore[no-any-return]

    def _call(self, *args: object) -> object:
        if self._stalled_until and self.clock() < self._stalled_until:
            raise rx.ConnectionError("redis timed out recently; not asked again until the hold ends")
        conn = self._connection()
        try:
            conn.send_packed_command([_pack(args)] if _pack else conn.pack_command(*args), check_health=False)
            return conn.read_response()
        except rx.TimeoutError:
            conn.disconnect()
            self._stalled_until = self.clock() + STALL_HOLD_S
            raise
        except (rx.ConnectionError, OSError):
            conn.disconnect()  # reconnects on the next call; never re-sent here (it might have run)
            raise

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.disconnect()
            self._opened.clear()

    def run(self, ops: list[CounterOp], refused: bool = False) -> tuple[int, list[Outcome]]:
        """(Redis's now in ms, one Outcome per op)."""
        return read_outcomes(self._evalsha([op.key for op in ops], script_args(self.now_ms, ops, refused)), len(ops))

    def _evalsha(self, keys: list[str], args: list[int | str]) -> list[int]:
        """On NOSCRIPT (Redis restarted or SCRIPT FLUSH) load the script and retry: a NOSCRIPT
        reply means nothing ran, so the retry cannot count twice."""
        if self._sha is not None:
            try:
                return self._call("EVALSHA", self._sha, len(keys), *keys, *args)  # type: ignore[return-value]
            except rx.NoScriptError:
                log.info("rate limit script not in Redis; loading it again")
        sha = self._call("SCRIPT", "LOAD", self._script)
        self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        return self._call("EVALSHA", self._sha, len(keys), *keys, *args)  # type: ignore[return-value]


class AsyncCounters:
    """Counters for a caller on an asyncio loop (extauth's in-Check admission): the same script and
    replies as Counters, through a RedisPipe (ratelimit/redis_pipe.py), so the loop never waits on Redis."""

    def __init__(self, pipe: RedisPipe, now_ms: int = -1) -> None:
        self.pipe = pipe
        self.now_ms = now_ms  # -1: Redis's clock; tests set a fixed one

    async def run(self, ops: list[CounterOp], refused: bool = False) -> tuple[int, list[Outcome]]:
        """(Redis's now in ms, one Outcome per op)."""
        raw = await self.pipe.run_script(SCRIPT, [op.key for op in ops], script_args(self.now_ms, ops, refused))
        return read_outcomes(raw, len(ops))

    def close(self) -> None:
        self.pipe.close()

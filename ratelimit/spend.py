"""Budget admission: reserve a request's worst-case cost on every budget it falls under, or refuse.

Envoy's second rate limit filter (domain SPEND_DOMAIN, stage SPEND_STAGE) sends one descriptor
[(spend, <extauth's AUTHZ_SPEND JSON>), (request_id, <x-request-id>)]. This module:

1. resolves the applicable budgets (ccr/budgets.py; the table is re-read every spend.refresh_s);
2. in ONE Lua script (one Redis round trip, atomic across every budget: all or nothing) checks
   that Redis's clock (TIME) is inside each budget's calendar period, that every counter exists,
   and that every hard budget has room for the worst case; then adds the worst case to each
   counter and records the reservation under the request id (`ccr:spend:r:<id>`);
3. answers OK with RATELIMIT_NS metadata (SPEND_RESERVED, SPEND_COUNTERS) that the access log
   carries to the audit receiver, which settles to the actual cost (audit/ledger.py); or
   OVER_LIMIT (402 billing_error, named budget, reset time) when a hard budget has no room.

A counter missing from Redis (new period, or Redis lost its data) is rebuilt from the ledger in
PostgreSQL (the truth) with SET NX, then the script runs again. While Redis is unreachable each
budget's `on_redis_down` decides: any applicable `closed` one refuses (UNAVAILABLE: Envoy answers
503), otherwise the request is admitted with a warning header and nothing reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg
import redis
from envoy.service.ratelimit.v3 import rls_pb2
from redis.exceptions import NoScriptError, RedisError

from ccr.budgets import (
    Budget,
    BudgetIndex,
    Window,
    charge_only,
    counter_key,
    ledger_sum,
    load_budgets,
    parse_spend_facts,
    window,
)
from ccr.config import SpendSettings
from ccr.contract import (
    H_BUDGET,
    H_BUDGET_RESET,
    H_BUDGET_WARNING,
    RL_REQUEST_ID_KEY,
    RL_SPEND_KEY,
    SPEND_COUNTERS,
    SPEND_DOMAIN,
    SPEND_RESERVED,
)
from ccr.errors import error_body
from ccr.pricing import usd
from ratelimit.redis_pipe import RedisPipe

log = logging.getLogger("ccr.spend")

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
RESERVATION_PREFIX = "ccr:spend:r:"
SETTLED_PREFIX = "ccr:spend:s:"
# A reservation never settled (Envoy died before logging) is forgotten after this; what it
# reserved stays counted until the period ends (over-counting, never under).
RESERVATION_TTL_S = 2 * 86400
# Counters outlive their period a little, for settlements of requests that started before its end.
COUNTER_GRACE_S = 2 * 86400

# KEYS: reservation, counter 1..n. ARGV: amount, reservation ttl, then per counter: start, end,
# cap (-1: soft), ttl. Returns {"ok", value 1..n} | {"dup"} | {"clock", now} | {"missing", i...}
# | {"over", i, value}. TIME makes the script non-deterministic: effects replication is needed on
# Redis 6.2 (the default from 7).
RESERVE = """
if redis.replicate_commands then redis.replicate_commands() end
local now = tonumber(redis.call('TIME')[1])
local n = #KEYS - 1
local amount = tonumber(ARGV[1])
for i = 1, n do
  local b = 2 + 4 * (i - 1)
  if now < tonumber(ARGV[b + 1]) or now >= tonumber(ARGV[b + 2]) then return {'clock', now} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'dup'} end
local values = {}
local missing = {'missing'}
for i = 1, n do
  local v = redis.call('GET', KEYS[i + 1])
  if not v then missing[#missing + 1] = i else values[i] = tonumber(v) end
end
if #missing > 1 then return missing end
for i = 1, n do
  local cap = tonumber(ARGV[2 + 4 * (i - 1) + 3])
  if cap >= 0 and values[i] + amount > cap then return {'over', i, values[i]} end
end
local out = {'ok'}
for i = 1, n do
  out[i + 1] = redis.call('INCRBY', KEYS[i + 1], amount)
  redis.call('HSET', KEYS[1], KEYS[i + 1], amount)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return out
"""

# KEYS: counters; ARGV: value, ttl per counter. A counter is created only if still absent, so a
# rebuild racing another (or live reservations) never overwrites what is there.
REBUILD = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[2 * i - 1], 'NX', 'EX', ARGV[2 * i])
end
return #KEYS
"""


class Unavailable(Exception):
    """Budgets apply that must not be admitted blind (on_redis_down closed), and the store is down."""


@dataclass(slots=True)
class _Charge:
    budget: Budget
    seat: str
    window: Window
    key: str


@dataclass(slots=True)
class _Eval:
    """A step of a decision: run `script` (EVALSHA, loaded on NOSCRIPT); its reply is sent back."""

    script: str
    keys: list[str]
    args: list[object]


@dataclass(slots=True)
class _Sums:
    """A step of a decision: the ledger's sum for each charge's period; the list is sent back."""

    charges: list[_Charge]


_Io = _Eval | _Sums


@dataclass(slots=True)
class _Asked:
    """What one request asks the budgets for (SpendGate._asked)."""

    resp: rls_pb2.RateLimitResponse
    request_id: str
    amount: int
    applicable: list[tuple[Budget, str]]
    never_refuse: bool


class BudgetSource:
    """The budgets table, re-read every `refresh_s` by a daemon thread (changes need no restart)."""

    def __init__(self, dsn: str, refresh_s: float) -> None:
        self.dsn = dsn
        self.refresh_s = refresh_s
        self.index: BudgetIndex | None = None  # None until the first successful read
        self.loads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Kept open between refreshes (autocommit: never idle in a transaction): a new connection each
        # second cost this process ~3 ms of CPU (SCRAM) and PostgreSQL a backend start (docs/hot-path.md).
        self._conn: psycopg.Connection | None = None

    def load_once(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = psycopg.connect(self.dsn, connect_timeout=2, autocommit=True,
                                                application_name="ccr-ratelimit-budgets")
        try:
            budgets = load_budgets(conn)
        except (psycopg.Error, OSError):
            self._conn = None
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self.index = BudgetIndex(budgets)
        self.loads += 1

    def start(self) -> None:
        try:
            self.load_once()
        except (psycopg.Error, OSError) as e:
            log.warning("budgets not readable yet (%s); refusing budgeted requests until they are", e)
        self._thread = threading.Thread(target=self._run, name="budgets-refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.refresh_s):
            try:
                self.load_once()
                if failing:
                    log.info("budgets readable again")
                failing = False
            except (psycopg.Error, OSError) as e:
                if not failing:  # once per outage, not once per refresh
                    log.warning("budgets refresh failed, keeping the last good set: %s", e)
                failing = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(b: Budget, seat: str) -> str:
    who = f"{b.subject_kind} {b.subject}"
    if seat:
        who += f", for each member (this one: {seat})"
    return f"budget {b.name!r} ({who}: ${usd(b.amount_micro_usd)} per {b.period})"


class SpendGate:
    def close(self) -> None:
        self.budgets.stop()
        with self._pg_lock:
            if self._pg is not None:
                self._pg.close()

    def __init__(self, client: redis.Redis, dsn: str, settings: SpendSettings, budgets: BudgetSource,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.dsn = dsn
        self.settings = settings
        self.budgets = budgets
        self.clock = clock
        self.offset = 0.0  # Redis's clock minus ours, learned when the script says the period is wrong
        self._sha: dict[str, str] = {}
        self._pg: psycopg.Connection | None = None
        self._pg_lock = threading.Lock()
        self.rebuilds = 0

    # -- Redis ------------------------------------------------------------------------------------

    def _eval(self, script: str, keys: list[str], args: list[object]) -> list:
        sha = self._sha.get(script)
        if sha is not None:
            try:
                return self.redis.evalsha(sha, len(keys), *keys, *args)  # type: ignore[no-any-return]
            except NoScriptError:
                pass  # nothing ran: loading it and running again cannot count twice
        sha = self._sha[script] = self.redis.script_load(script)
        return self.redis.evalsha(sha, len(keys), *keys, *args)  # type: ignore[no-any-return]

    def _ledger_sums(self, charges: list[_Charge]) -> list[int]:
        with self._pg_lock:
            for attempt in (1, 2):
                try:
                    if self._pg is None or self._pg.closed:
                        self._pg = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2,
                                                   application_name="ccr-ratelimit-rebuild")
                    return [ledger_sum(self._pg, c.budget, c.seat, c.window, holds=True) for c in charges]
                except (psycopg.Error, OSError):
                    self._pg = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _rebuilding(self, charges: list[_Charge]) -> Generator[_Io, Any, None]:
        """Counters Redis does not have: the ledger's sum for their period (PostgreSQL is the truth)."""
        sums = yield _Sums(charges)
        args: list[object] = []
        for c, s in zip(charges, sums, strict=True):
            args += [s, max(int(c.window.end - self.clock() - self.offset), 1) + COUNTER_GRACE_S]
        yield _Eval(REBUILD, [c.key for c in charges], args)
        self.rebuilds += len(charges)
        log.info("rebuilt %d budget counter(s) from the ledger: %s", len(charges),
                 ", ".join(f"{c.key}={s}" for c, s in zip(charges, sums, strict=True)))

    def _run(self, steps: Generator[_Io, Any, rls_pb2.RateLimitResponse]) -> rls_pb2.RateLimitResponse:
        """Carry out a decision's steps with blocking calls (the rate limit service's threads)."""
        try:
            step = next(steps)
            while True:
                if isinstance(step, _Eval):
                    step = steps.send(self._eval(step.script, step.keys, step.args))
                else:
                    step = steps.send(self._ledger_sums(step.charges))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _run_async(self, steps: Generator[_Io, Any, rls_pb2.RateLimitResponse],
                         pipe: RedisPipe) -> rls_pb2.RateLimitResponse:
        """Carry out a decision's steps on an asyncio loop (extauth): Redis awaited through `pipe`; the ledger's
        sums (a rebuild after Redis lost its data: rare) in a thread, as psycopg's calls block."""
        try:
            step = next(steps)
            while True:
                if isinstance(step, _Eval):
                    step = steps.send(await pipe.run_script(step.script, step.keys, step.args))
                else:
                    step = steps.send(await asyncio.to_thread(self._ledger_sums, step.charges))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    # -- a decision -----------------------------------------------------------------------------

    def decide(self, req: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
        asked = self._asked(req)
        if isinstance(asked, rls_pb2.RateLimitResponse):
            return asked
        try:
            return self._run(self._reserving(asked))
        except (RedisError, OSError, psycopg.Error) as e:
            return self._store_down(asked, e)

    async def decide_async(self, req: rls_pb2.RateLimitRequest, pipe: RedisPipe) -> rls_pb2.RateLimitResponse:
        """decide for a caller on an asyncio loop: the same decision, its Redis calls awaited through `pipe`."""
        asked = self._asked(req)
        if isinstance(asked, rls_pb2.RateLimitResponse):
            return asked
        try:
            return await self._run_async(self._reserving(asked), pipe)
        except (RedisError, OSError, psycopg.Error) as e:
            return self._store_down(asked, e)

    def _asked(self, req: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse | _Asked:
        """What a request asks to reserve, or the answer when nothing needs reserving."""
        resp = rls_pb2.RateLimitResponse(overall_code=OK)
        for _ in req.descriptors:
            resp.statuses.add(code=OK)
        spend_text = request_id = None
        for d in req.descriptors:
            for e in d.entries:
                if e.key == RL_SPEND_KEY:
                    spend_text = e.value
                elif e.key == RL_REQUEST_ID_KEY:
                    request_id = e.value
        if spend_text is None:
            return resp  # nothing billable named (Envoy sends the descriptor only with AUTHZ_SPEND)
        if not request_id:
            raise ValueError("spend descriptor without a request_id")
        amount, facts, _model = parse_spend_facts(spend_text)
        never_refuse = charge_only(spend_text)
        index = self.budgets.index
        if index is None:
            raise Unavailable("budgets not loaded yet")
        applicable = index.applicable(facts)
        if not applicable:
            return resp
        return _Asked(resp, request_id, amount, applicable, never_refuse)

    def _store_down(self, asked: _Asked, e: Exception) -> rls_pb2.RateLimitResponse:
        closed = [b.name for b, _ in asked.applicable if b.on_redis_down == "closed"]
        if closed:
            log.error("budget store unavailable (%s: %s); refusing: budgets %s fail closed",
                      type(e).__name__, e, closed)
            raise Unavailable(str(e)) from e
        log.warning("budget store unavailable (%s: %s); admitting unchecked (budgets fail open)",
                    type(e).__name__, e)
        resp = asked.resp
        resp.response_headers_to_add.add(
            key=H_BUDGET_WARNING, value="budgets could not be checked (store unavailable); admitted unchecked")
        return resp

    def _charges(self, applicable: list[tuple[Budget, str]], now: float) -> list[_Charge]:
        out = []
        for b, seat in applicable:
            w = window(b.period, b.timezone or self.settings.timezone, now)
            out.append(_Charge(b, seat, w, counter_key(b, seat, w)))
        return out

    def _reserving(self, asked: _Asked) -> Generator[_Io, Any, rls_pb2.RateLimitResponse]:
        """The reservation, as steps for a driver (_run, _run_async): each Redis script or ledger read it
        needs is yielded, and its result sent back."""
        resp, request_id, amount = asked.resp, asked.request_id, asked.amount
        applicable, never_refuse = asked.applicable, asked.never_refuse
        rkey = RESERVATION_PREFIX + request_id
        for _attempt in range(4):
            now = self.clock() + self.offset
            charges = self._charges(applicable, now)
            args: list[object] = [amount, RESERVATION_TTL_S]
            for c in charges:
                cap = c.budget.amount_micro_usd if c.budget.hard and not never_refuse else -1
                args += [c.window.start, c.window.end, cap,
                         max(int(c.window.end - now), 1) + COUNTER_GRACE_S]
            out = yield _Eval(RESERVE, [rkey] + [c.key for c in charges], args)
            tag = out[0].decode() if isinstance(out[0], bytes) else out[0]
            if tag == "ok":
                return self._admitted(resp, amount, charges, [int(v) for v in out[1:]])
            if tag == "dup":
                log.warning("request %s already holds a reservation; not reserving twice", request_id)
                return resp
            if tag == "clock":
                self.offset = int(out[1]) + 0.5 - self.clock()
                continue
            if tag == "missing":
                yield from self._rebuilding([charges[int(i) - 1] for i in out[1:]])
                continue
            if tag == "over":
                c = charges[int(out[1]) - 1]
                return self._refused(resp, c, int(out[2]), amount, now)
            raise RuntimeError(f"unexpected reply from the reserve script: {out!r}")
        raise RedisError("budget counters kept changing under the reservation; giving up")

    def _admitted(self, resp: rls_pb2.RateLimitResponse, amount: int, charges: list[_Charge],
                  values: list[int]) -> rls_pb2.RateLimitResponse:
        md = resp.dynamic_metadata
        md.fields[SPEND_RESERVED].number_value = amount
        counters = md.fields[SPEND_COUNTERS].list_value
        warnings = []
        for c, v in zip(charges, values, strict=True):
            b = c.budget
            counters.values.add().struct_value.update({
                "key": c.key, "budget": b.name, "cap": b.amount_micro_usd, "mode": b.mode,
                "period": c.window.label, "end": c.window.end, "seat": c.seat,
                "subject": f"{b.subject_kind}:{b.subject}"})
            if not b.hard and b.amount_micro_usd >= 0 and v * 100 >= self.settings.warn_at_percent * max(
                    b.amount_micro_usd, 1):
                pct = math.floor(v * 100 / b.amount_micro_usd) if b.amount_micro_usd else 100
                warnings.append(f"{b.name}: {pct}% of ${usd(b.amount_micro_usd)} per {b.period} "
                                f"(soft; resets {_rfc3339(c.window.end)})")
        if warnings:
            log.warning("soft budget warning: %s", "; ".join(warnings))
            resp.response_headers_to_add.add(key=H_BUDGET_WARNING, value="; ".join(warnings))
        return resp

    def _refused(self, resp: rls_pb2.RateLimitResponse, c: _Charge, value: int, amount: int,
                 now: float) -> rls_pb2.RateLimitResponse:
        b = c.budget
        retry_after = max(math.ceil(c.window.end - now), 1)
        reset = _rfc3339(c.window.end)
        message = (f"Spend limit reached: {_describe(b, c.seat)} has ${usd(max(b.amount_micro_usd - value, 0))} "
                   f"left this {b.period} ({c.window.label}) and this request may cost up to ${usd(amount)}. "
                   f"It resets at {reset}. Lower max_tokens or the request size, or ask a gateway "
                   "administrator to raise the budget (`ccr budgets set`).")
        log.info("refused by %s: counter %d + %d > %d", b.name, value, amount, b.amount_micro_usd)
        resp.overall_code = OVER_LIMIT
        resp.raw_body = error_body("billing_error", message)
        for k, v in (("retry-after", str(retry_after)), ("content-type", "application/json"),
                     (H_BUDGET, b.name), (H_BUDGET_RESET, reset)):
            resp.response_headers_to_add.add(key=k, value=v)
        for st in resp.statuses:
            st.code = OVER_LIMIT
        return resp


def is_spend_request(req: rls_pb2.RateLimitRequest) -> bool:
    return req.domain == SPEND_DOMAIN


def make_gate(client: redis.Redis, dsn: str, settings: SpendSettings) -> SpendGate | None:
    """The gate the rate limit service consults for SPEND_DOMAIN requests (None: spend is off)."""
    if not settings.enabled:
        return None
    source = BudgetSource(dsn, settings.refresh_s)
    source.start()
    return SpendGate(client, dsn, settings, source)


def serve(gate: SpendGate | None, req: rls_pb2.RateLimitRequest, context: grpc.ServicerContext,
          decide: Callable[[SpendGate, rls_pb2.RateLimitRequest], rls_pb2.RateLimitResponse] | None = None
          ) -> rls_pb2.RateLimitResponse:
    """ShouldRateLimit for SPEND_DOMAIN. Anything it cannot decide is refused, never admitted.
    `decide`: how to ask the gate (the service's counts its answers: ratelimit/service.py decide_budgets)."""
    if gate is None:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "spend budgets are disabled (spend.enabled)")
    try:
        return decide(gate, req) if decide is not None else gate.decide(req)
    except Unavailable as e:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {e}")
    except ValueError as e:
        log.error("malformed spend descriptor: %s", e)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed spend descriptor: {e}")
    raise AssertionError("unreachable: abort raises")

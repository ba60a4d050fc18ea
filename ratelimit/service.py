"""Envoy rate limit service (RateLimitService/ShouldRateLimit) on Redis.

A decision, in order (docs/ratelimit.md):

1. LimitPlanner (ratelimit/limits.py) maps the request's descriptors to counters: descriptor
   overrides and envoyproxy/ratelimit YAML rules (fixed windows, its semantics), the gateway
   default per principal, and ccr's own rules (sliding windows / token buckets).
2. Fixed-window counters this process has already seen over their limit in the current window
   are answered from the over-limit cache (a fixed window's count only grows until it ends).
3. Counters (ratelimit/counters.py) runs all the others in one EVALSHA on Redis's clock.
4. The response: a status per descriptor (Envoy derives x-ratelimit-* from them), the
   anthropic-ratelimit-* headers, and on OVER_LIMIT the Anthropic 429 body with retry-after.
5. Admission steps (ratelimit/admission.py `AdmissionStep`, listed by `admission_steps`) run
   after the limits allowed a request, with the same request and the response being built.

Spend budgets (issue 8, docs/spend.md) are not a step: Envoy asks for them in a call of their own,
from a second rate limit filter (domain SPEND_DOMAIN, stage SPEND_STAGE, 402 on refusal), after
the limits allowed the request. Calls in that domain go to ratelimit/spend.py (reserve the worst
case in one script); the audit receiver settles to the metered cost (audit/ledger.py).

Redis unreachable: counters whose limit is `fail_open` are skipped; if any other counter was
needed the call fails UNAVAILABLE and Envoy (failure_mode_deny) refuses with 503.

grpcio's sync server with a thread pool: a decision only waits on Redis, and that server costs
less CPU per call than grpc.aio (bench/profiles.md). Several worker processes may share the port
(services.workers): the counters are in Redis, each process's cache only holds Redis's answers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from ccr import metrics
from ccr.config import GatewayConfig, Limits
from ccr.config_sync import on_config
from ccr.runtime import Runtime
from ratelimit import spend
from ratelimit.admission import AdmissionStep, admission_steps
from ratelimit.budget_metrics import BudgetMetrics
from ratelimit.counters import CHARGE, NO_GATE, STALL_HOLD_S, AsyncCounters, CounterOp, Counters, Outcome
from ratelimit.envoy_config import RuleDir, RuleSet
from ratelimit.limits import FIXED, WORD_OF_UNIT, LimitPlanner, Planned
from ratelimit.redis_pipe import RedisPipe
from ratelimit.replies import over_limit_reply, quota_headers, seconds

log = logging.getLogger("ccr.ratelimit")

UNLIMITED_REMAINING = 2**32 - 1  # what envoyproxy/ratelimit reports for unlimited descriptors
OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT

# The over-limit cache is swept of ended windows when it reaches this size, and
# dropped whole if it is still that big (it only saves Redis calls; losing it is safe).
CACHE_SWEEP_AT = 50_000


class RedisDown(Exception):
    """Redis was needed for a fail-closed limit and is unreachable."""


@dataclass(slots=True)
class _Decision:
    """One decision between its plan and its answer (Decider._begin, then Redis, then _finish)."""

    resp: rls_pb2.RateLimitResponse
    planned: list[Planned]
    outcomes: list[Outcome | None]
    mono: float
    now_ms: int = 0
    refused: bool = False
    run: list[int] = field(default_factory=list)  # indexes into planned that Redis decides
    where: list[int] = field(default_factory=list)  # for each of run, its op in ops
    ops: list[CounterOp] = field(default_factory=list)


class Decider:
    def __init__(self, counters: Counters, planner: LimitPlanner,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.counters = counters
        self.planner = planner  # replaced whole when the YAML rules reload
        self.monotonic = monotonic
        # fixed-window counter key -> (local monotonic deadline, a count it has reached): while
        # that count exceeds the limit the answer is OVER_LIMIT, until the window ends.
        self.over_limit: dict[str, tuple[float, int]] = {}
        self._sweep = threading.Lock()
        self._last_down_log = 0.0
        # Redis's clock at the last answer, against ours: the time of answers made without Redis.
        self._redis_base: tuple[int, float] = (int(time.time() * 1000), monotonic())

    def _remember_over(self, key: str, deadline: float, count: int) -> None:
        cache = self.over_limit
        if len(cache) >= CACHE_SWEEP_AT:
            with self._sweep:
                now = self.monotonic()
                for k in [k for k, (end, _) in list(cache.items()) if end <= now]:
                    cache.pop(k, None)
                if len(cache) >= CACHE_SWEEP_AT:
                    cache.clear()
        cache[key] = (deadline, count)

    def should_rate_limit(self, req: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
        d = self._begin(req)
        if d.ops:
            try:
                now_ms, results = self.counters.run(d.ops, d.refused)
            except (RedisError, OSError) as e:
                d.now_ms = self._down(d, e)
            else:
                self._counted(d, now_ms, results)
        return self._finish(req, d)

    async def should_rate_limit_async(self, req: rls_pb2.RateLimitRequest,
                                      counters: AsyncCounters) -> rls_pb2.RateLimitResponse:
        """should_rate_limit for a caller on an asyncio loop: the same decision, its Redis call awaited."""
        d = self._begin(req)
        if d.ops:
            try:
                now_ms, results = await counters.run(d.ops, d.refused)
            except (RedisError, OSError) as e:
                d.now_ms = self._down(d, e)
            else:
                self._counted(d, now_ms, results)
        return self._finish(req, d)

    def _begin(self, req: rls_pb2.RateLimitRequest) -> _Decision:
        """The plan, what the over-limit cache answers, and the ops left for Redis."""
        planned = self.planner.plan(req)
        resp = rls_pb2.RateLimitResponse(overall_code=OK)
        # As envoyproxy/ratelimit answers: a descriptor no limit applies to has remaining 0 and no
        # current_limit; an `unlimited` one has remaining 2^32-1.
        for _ in req.descriptors:
            resp.statuses.add(code=OK)
        mono = self.monotonic()
        outcomes: list[Outcome | None] = [None] * len(planned)
        d = _Decision(resp, planned, outcomes, mono)
        if not planned:
            return d
        run = d.run
        cache = self.over_limit
        for j, p in enumerate(planned):
            lim = p.limit
            if lim.unlimited:
                resp.statuses[p.desc].limit_remaining = UNLIMITED_REMAINING
                continue
            if lim.algorithm == FIXED:
                hit = cache.get(p.key)
                if hit is not None and hit[0] > mono and hit[1] > lim.amount:
                    left_ms = int((hit[0] - mono) * 1000)
                    outcomes[j] = Outcome(True, 0, left_ms, left_ms, lim.amount - hit[1])
                    d.refused = d.refused or not lim.shadow
                    continue
            run.append(j)
        base_ms, base_mono = self._redis_base
        d.now_ms = base_ms + int((mono - base_mono) * 1000)  # Redis's clock, as of its last answer
        # Counters named twice in one request (two descriptors, one key) are one op with the hits summed.
        index: dict[str, int] = {}
        ops = d.ops
        for j in run:
            p = planned[j]
            lim = p.limit
            at = index.get(p.key)
            if at is not None:
                op = ops[at]
                ops[at] = CounterOp(op.key, op.algorithm, op.hits + p.hits, op.period_ms, op.limit, op.burst, op.flags)
                d.where.append(at)
                continue
            flags = (CHARGE if p.charge else 0) | (NO_GATE if lim.shadow else 0)
            index[p.key] = len(ops)
            d.where.append(len(ops))
            ops.append(CounterOp(p.key, lim.algorithm, p.hits, lim.period_ms, lim.amount, lim.burst, flags))
        return d

    def _down(self, d: _Decision, e: Exception) -> int:
        """Redis failed: RedisDown when a fail-closed limit needed it, else the time to answer with (uncounted)."""
        needed = [d.planned[j].limit for j in d.run if not d.planned[j].limit.fail_open]
        if needed:
            raise RedisDown(f"{type(e).__name__}: {e}") from e
        if d.mono - self._last_down_log > 10:
            self._last_down_log = d.mono
            log.warning("redis unavailable (%s); allowing uncounted: every limit involved is fail-open", e)
        base_ms, base_mono = self._redis_base
        return base_ms + int((d.mono - base_mono) * 1000)

    def _counted(self, d: _Decision, now_ms: int, results: list[Outcome]) -> None:
        self._redis_base = (now_ms, d.mono)
        d.now_ms = now_ms
        for j, at in zip(d.run, d.where, strict=True):
            o = results[at]
            d.outcomes[j] = o
            p = d.planned[j]
            if o.over and p.limit.algorithm == FIXED:
                # The key is the same for any limit on these entries: keep the count, not "over".
                self._remember_over(p.key, d.mono + o.reset_ms / 1000, p.limit.amount - o.left)

    def _finish(self, req: rls_pb2.RateLimitRequest, d: _Decision) -> rls_pb2.RateLimitResponse:
        if d.planned:
            self._respond(req, d.resp, d.planned, d.outcomes, d.now_ms)
        return d.resp

    def _respond(self, req: rls_pb2.RateLimitRequest, resp: rls_pb2.RateLimitResponse, planned: list[Planned],
                 outcomes: list[Outcome | None], now_ms: int) -> None:
        statuses = resp.statuses
        binding: dict[int, tuple[Planned, Outcome]] = {}  # descriptor -> the counter its status shows
        tightest: dict[str, tuple[Planned, Outcome]] = {}  # metric -> the counter with least remaining
        worst: tuple[Planned, Outcome] | None = None  # the refusing counter that frees up last
        for p, o in zip(planned, outcomes, strict=True):
            if o is None or p.charge:
                continue
            lim = p.limit
            gating = o.over and not lim.shadow
            if gating and (worst is None or o.retry_ms > worst[1].retry_ms):
                worst = (p, o)
            b = binding.get(p.desc)
            if b is None or _tighter(p, o, *b):
                binding[p.desc] = (p, o)
            t = tightest.get(lim.metric)
            if t is None or _fraction(o, lim.amount) < _fraction(t[1], t[0].limit.amount):
                tightest[lim.metric] = (p, o)
        for i, (p, o) in binding.items():
            st = statuses[i]
            st.current_limit.requests_per_unit = p.limit.amount
            st.current_limit.unit = p.limit.unit
            st.limit_remaining = o.remaining
            st.duration_until_reset.seconds = seconds(o.retry_ms if o.over else o.reset_ms)
            if o.over and not p.limit.shadow:
                st.code = OVER_LIMIT
        add = resp.response_headers_to_add.add
        for metric, (p, o) in tightest.items():
            for k, v in quota_headers(metric, p.limit.amount, o.remaining,
                                      math.ceil((now_ms + o.reset_ms) / 1000)):
                add(key=k, value=v)
        if worst is not None:
            p, o = worst
            lim = p.limit
            retry_after = seconds(o.retry_ms)
            body, headers = over_limit_reply(lim.name, lim.about, lim.amount, lim.metric, WORD_OF_UNIT[lim.unit],
                                             retry_after, math.ceil((now_ms + o.retry_ms) / 1000))
            resp.overall_code = OVER_LIMIT
            resp.raw_body = body
            for k, v in headers:
                add(key=k, value=v)


def _fraction(o: Outcome, amount: int) -> float:
    return o.remaining / amount if amount else 0.0


def _tighter(p: Planned, o: Outcome, bp: Planned, bo: Outcome) -> bool:
    """Which counter a descriptor's status shows: a refusal first, then requests over tokens
    (x-ratelimit-* speak of requests), then the least remaining."""
    a = (not (o.over and not p.limit.shadow), p.limit.metric != "requests", o.remaining)
    b = (not (bo.over and not bp.limit.shadow), bp.limit.metric != "requests", bo.remaining)
    return a < b


# ccr_ratelimit_decisions_total children, bound once (docs/observability.md).
_LIMITS_OK, _LIMITS_OVER, _LIMITS_ERROR = (
    metrics.RATELIMIT_DECISIONS.labels("limits", r) for r in ("ok", "over_limit", "error"))
_BUDGET_OK, _BUDGET_OVER, _BUDGET_ERROR = (
    metrics.RATELIMIT_DECISIONS.labels("budgets", r) for r in ("ok", "over_limit", "error"))


def decide_limits(decider: Decider, steps: list[AdmissionStep], request: rls_pb2.RateLimitRequest
                  ) -> rls_pb2.RateLimitResponse:
    """A request's limits, then the admission steps, counted in ccr_ratelimit_decisions_total; the one
    code path for the service's ShouldRateLimit and extauth's in-process decision (extauth/admission.py).
    Raises RedisDown / RedisError / OSError when the store is needed and down (counted as errors)."""
    try:
        return _admitted(decider.should_rate_limit(request), steps, request)
    except BaseException:
        _LIMITS_ERROR.inc()
        raise


async def decide_limits_async(decider: Decider, counters: AsyncCounters, steps: list[AdmissionStep],
                              request: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
    """decide_limits for a caller on an asyncio loop (extauth): Redis is awaited through `counters`."""
    try:
        return _admitted(await decider.should_rate_limit_async(request, counters), steps, request)
    except BaseException:
        _LIMITS_ERROR.inc()
        raise


def _admitted(resp: rls_pb2.RateLimitResponse, steps: list[AdmissionStep], request: rls_pb2.RateLimitRequest
              ) -> rls_pb2.RateLimitResponse:
    if resp.overall_code == OK:
        for step in steps:
            step.admit(request, resp)
            if resp.overall_code != OK:
                break
    (_LIMITS_OK if resp.overall_code == OK else _LIMITS_OVER).inc()
    return resp


def decide_budgets(gate: spend.SpendGate, request: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
    """A spend reservation (ratelimit/spend.py), counted; raises spend.Unavailable / ValueError / RedisError."""
    try:
        resp = gate.decide(request)
    except BaseException:
        _BUDGET_ERROR.inc()
        raise
    (_BUDGET_OK if resp.overall_code == OK else _BUDGET_OVER).inc()
    return resp


async def decide_budgets_async(gate: spend.SpendGate, pipe: RedisPipe, request: rls_pb2.RateLimitRequest
                               ) -> rls_pb2.RateLimitResponse:
    """decide_budgets for a caller on an asyncio loop (extauth): Redis awaited through `pipe`."""
    try:
        resp = await gate.decide_async(request, pipe)
    except BaseException:
        _BUDGET_ERROR.inc()
        raise
    (_BUDGET_OK if resp.overall_code == OK else _BUDGET_OVER).inc()
    return resp


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, decider: Decider, steps: list[AdmissionStep] | None = None,
                 spend_gate: spend.SpendGate | None = None) -> None:
        self.decider = decider
        self.steps = steps or []  # run after the limits allowed a request (AdmissionStep)
        self.spend_gate = spend_gate  # budgets: their own domain, from their own filter (ratelimit/spend.py)

    def ShouldRateLimit(  # noqa: N802 - gRPC method name
        self, request: rls_pb2.RateLimitRequest, context: grpc.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        if not request.descriptors:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rate limit request has no descriptors")
        # --- spend seam (issue 8): budget reservations have their own domain; ratelimit/spend.py ---
        if spend.is_spend_request(request):
            if self.spend_gate is None:
                _BUDGET_ERROR.inc()
            return spend.serve(self.spend_gate, request, context, decide_budgets)
        try:
            return decide_limits(self.decider, self.steps, request)
        except (RedisDown, RedisError, OSError) as e:
            # Never a silent allow: Envoy runs with failure_mode_deny and turns this into an error reply.
            log.error("redis unavailable, refusing to decide: %s: %s", type(e).__name__, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, "rate limit store (Redis) unavailable")
            raise  # unreachable: abort raises


# Threads deciding at once; more calls wait in grpcio's queue. Each holds at most one Redis
# connection for one round trip (~0.1 ms), so 4 keep up with thousands of decisions a second,
# and fewer threads contend less for the GIL: 4 cost less CPU per call than 16 (bench/profiles.md).
# When Redis hangs, calls beyond 4 wait, Envoy's deadline passes, and it denies: fail closed.
THREADS = 4


def make_redis(url: str, connections: int = THREADS, timeout_s: float = 1.0) -> redis.Redis:
    # Short timeouts and no client retries: Envoy's own deadline is tens of ms, and
    # re-sending a script after a broken connection could count a request twice.
    # A blocking pool queues callers beyond its size instead of failing them.
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=connections, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
    )
    return redis.Redis(connection_pool=pool)


def rule_dir(limits: Limits, config_path: str | None) -> Path | None:
    if limits.envoy_config_dir is None:
        return None
    d = Path(limits.envoy_config_dir)
    if not d.is_absolute() and config_path:
        d = Path(config_path).resolve().parent / d
    return d


@dataclass
class Deciders:
    """What makes a request-time decision: the limits (Decider, kept current with the config and the
    YAML rule directory), the admission steps, and the budgets' gate (None: spend off). Built the same
    way by the rate limit service and by extauth (limits.admission: extauth)."""

    decider: Decider
    steps: list[AdmissionStep]
    gate: spend.SpendGate | None
    close: Callable[[], None]
    # For a caller on an asyncio loop (deciders(on_loop=True)): the limits' Redis calls, awaited.
    acounters: AsyncCounters | None = None


def deciders(config: GatewayConfig, runtime: Runtime, connections: int = THREADS, gauges: bool = True,
             redis_timeout_s: float = 1.0, on_loop: bool = False) -> Deciders:
    """`gauges`: this process serves the ccr_budget_* gauges (the rate limit service does).
    `redis_timeout_s`: how long one Redis call may take. `on_loop`: the caller decides on an asyncio loop
    (extauth): the limits' calls go through a pipelined asyncio connection (Deciders.acounters)."""
    client = make_redis(runtime.redis_url, connections, redis_timeout_s)
    try:
        client.ping()
    except (RedisError, OSError) as e:
        # Keep serving: requests fail UNAVAILABLE until Redis is back, and Envoy denies meanwhile.
        log.warning("redis at start-up not reachable (%s); will answer UNAVAILABLE until it is", e)
    counters = Counters(client)
    acounters = AsyncCounters(RedisPipe(runtime.redis_url, redis_timeout_s, STALL_HOLD_S)) if on_loop else None
    decider = Decider(counters, LimitPlanner(config.limits))
    watcher: RuleDir | None = None
    directory = rule_dir(config.limits, runtime.config_path)
    # The limits in use and the rule directory's last rules: either changing makes a new planner,
    # swapped in by one assignment (threads of the server read decider.planner once per call).
    state: dict[str, Any] = {"limits": config.limits, "rules": None}
    lock = threading.Lock()

    def replan(limits: Limits | None = None, rules: RuleSet | None = None) -> None:
        with lock:
            if limits is not None:
                state["limits"] = limits
            if rules is not None:
                state["rules"] = rules
            decider.planner = LimitPlanner(state["limits"], state["rules"])

    if directory is not None:
        watcher = RuleDir(directory, config.limits.reload_interval_s, lambda rules: replan(rules=rules)).start()
    on_config(lambda new: replan(limits=new.limits))  # new config versions (ccr/config_sync.py)
    steps = admission_steps(config, runtime, client)
    gate = spend.make_gate(client, runtime.postgres_dsn, config.spend)  # budgets (issue 8; None: spend off)
    metrics_ = None
    if gate is not None and gauges:  # where each budget stands, at scrape time (ccr_budget_* gauges)
        metrics_ = BudgetMetrics(gate.budgets, runtime.postgres_dsn, client, config.spend.timezone).install()

    def close() -> None:
        if watcher is not None:
            watcher.stop()
        if metrics_ is not None:
            metrics_.uninstall()
        if gate is not None:
            gate.close()
        counters.close()
        if acounters is not None:
            acounters.close()
        client.close()
        client.connection_pool.disconnect()

    return Deciders(decider, steps, gate, close, acounters)


def setup(server: grpc.Server, config: GatewayConfig, runtime: Runtime) -> Callable[[], None]:
    parts = deciders(config, runtime)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(parts.decider, parts.steps, parts.gate),
                                                        server)
    return parts.close

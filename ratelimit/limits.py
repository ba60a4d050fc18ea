"""Which limits a request's descriptors fall under: the three sources, as counters to run.

1. A descriptor's own `limit` (Envoy's override; ccr sends the principal's requests per
   minute from extauth): a fixed window, as envoyproxy/ratelimit does.
2. envoyproxy/ratelimit YAML rules (limits.envoy_config_dir): fixed windows.
3. ccr's own rules (limits.rules): sliding windows or token buckets, on the one-entry
   descriptors the route sends (ccr/contract.py RL_FACTS), and the usage descriptors
   (RL_USAGE_KEY) that charge metered tokens at stream end.
And in domain `ccr`, a `principal` descriptor with neither 1 nor 2 gets the gateway default
(limits.requests_per_minute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from ccr.config import LimitRule, Limits, LimitScope
from ccr.contract import (
    RL_DOMAIN,
    RL_GROUP_SEPARATOR,
    RL_GROUPS_KEY,
    RL_KEY_KEY,
    RL_MODEL_KEY,
    RL_PRINCIPAL_KEY,
    RL_SPIFFE_KEY,
    RL_TENANT_KEY,
    RL_USAGE_KEY,
    RL_USER_KEY,
)
from ratelimit.counters import Algorithm
from ratelimit.envoy_config import UNITS, RuleSet, YamlLimit

KEY_PREFIX = "ccr:rl"
FIXED = int(Algorithm.FIXED)
PLAN_CACHE_SIZE = 100_000
Unit = rls_pb2.RateLimitResponse.RateLimit
UNIT_OF_WORD: dict[str, int] = {"second": Unit.SECOND, "minute": Unit.MINUTE, "hour": Unit.HOUR, "day": Unit.DAY,
                                "week": Unit.WEEK, "month": Unit.MONTH, "year": Unit.YEAR}
WORD_OF_UNIT: dict[int, str] = {v: k for k, v in UNIT_OF_WORD.items()}

SCOPE_OF_KEY: dict[str, LimitScope] = {
    RL_PRINCIPAL_KEY: LimitScope.PRINCIPAL, RL_KEY_KEY: LimitScope.KEY, RL_USER_KEY: LimitScope.USER,
    RL_GROUPS_KEY: LimitScope.GROUP, RL_TENANT_KEY: LimitScope.TENANT, RL_SPIFFE_KEY: LimitScope.SPIFFE_ID,
    RL_MODEL_KEY: LimitScope.MODEL,
}
_SCOPE_WORDS: dict[LimitScope, str] = {
    LimitScope.PRINCIPAL: "principal", LimitScope.KEY: "API key", LimitScope.USER: "user",
    LimitScope.GROUP: "group", LimitScope.TENANT: "tenant", LimitScope.SPIFFE_ID: "workload",
    LimitScope.MODEL: "model",
}


class Limit(NamedTuple):
    """What one counter enforces, and how a refusal names it.

    Plain values only (the algorithm too is a plain int): the planner's cache keeps each as a plain
    tuple, which the cyclic GC stops tracking (it does so for exact tuples of atoms only), so a
    cache of 100k descriptors adds nothing to what a full collection walks. (With dataclasses,
    40k entries made a full collection take 43 ms, a stall for every call in flight.)"""

    algorithm: int  # an Algorithm
    amount: int
    unit: int  # RateLimitResponse.RateLimit.Unit
    metric: str  # "requests" | "tokens"
    about: str  # "principal key_1", "group eng", "descriptor edge:path=/login"
    name: str = ""
    burst: int = 0
    shadow: bool = False
    fail_open: bool = False
    replaces: tuple[str, ...] = ()
    unlimited: bool = False

    @property
    def period_ms(self) -> int:
        return UNITS[WORD_OF_UNIT[self.unit]] * 1000


@dataclass(slots=True)
class Planned:
    """One counter of this decision."""

    desc: int  # index of the request descriptor whose status it feeds
    limit: Limit
    key: str  # Redis key (fixed windows: the script appends the window start)
    hits: int
    charge: bool = False  # usage at stream end: always counted, never refuses


_as_limit = tuple.__new__  # (Limit, fields): a Limit from the plain tuple the cache keeps


def _parts(entries: Sequence[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in entries)


class LimitPlanner:
    """Turns a request into its counters; immutable, swapped whole when the YAML reloads."""

    def __init__(self, limits: Limits, rules: RuleSet | None = None) -> None:
        self.default_rpm = limits.requests_per_minute
        self.default_open = limits.on_redis_down == "open"
        self.rules = rules or RuleSet()
        self.weights = {"input": limits.tokens.input, "output": limits.tokens.output,
                        "cache_read": limits.tokens.cache_read, "cache_creation": limits.tokens.cache_creation}
        self.by_scope: dict[LimitScope, list[tuple[LimitRule, Limit]]] = {}
        for r in limits.rules:
            about = f"{_SCOPE_WORDS[r.per]} {{value}}"
            algo = Algorithm.SLIDING if r.algorithm == "sliding_window" else Algorithm.BUCKET
            open_ = (r.on_redis_down or limits.on_redis_down) == "open"
            lim = Limit(int(algo), r.amount, UNIT_OF_WORD[r.unit], r.metric, about, r.name,
                        (r.burst or r.amount) if algo is Algorithm.BUCKET else 0, r.shadow_mode, open_)
            self.by_scope.setdefault(r.per, []).append((r, lim))
        # (domain, entries[, override]) -> what plan() makes of such a descriptor (_templates, a Limit
        # as a plain tuple: see Limit); bounded, rebuilt on demand.
        self._cache: dict[tuple, tuple[tuple[tuple, str, bool], ...]] = {}

    def plan(self, req: rls_pb2.RateLimitRequest) -> list[Planned]:
        out: list[Planned] = []
        domain = req.domain
        ccr = domain == RL_DOMAIN
        request_hits = req.hits_addend or 1  # Envoy: 0 means 1
        cache = self._cache
        any_replaces = False
        for i, d in enumerate(req.descriptors):
            entries = tuple((e.key, e.value) for e in d.entries)
            # A per-descriptor hits_addend may be 0 (check without counting).
            hits = d.hits_addend.value if d.HasField("hits_addend") else request_hits
            if ccr and entries and entries[0][0] == RL_USAGE_KEY:
                # Only its own count charges: without one (the usage was unknown) nothing is charged,
                # never the request's default of 1.
                if d.HasField("hits_addend"):
                    self._usage(i, entries, d.hits_addend.value, out)
                continue
            has_limit = d.HasField("limit")
            ck = (domain, entries, d.limit.requests_per_unit, d.limit.unit) if has_limit else (domain, entries)
            found = cache.get(ck)
            if found is None:
                found = self._templates(domain, d if has_limit else None, entries)
                if len(cache) >= PLAN_CACHE_SIZE:
                    cache.clear()
                cache[ck] = found
            for fields, key, counts in found:
                lim = _as_limit(Limit, fields)
                out.append(Planned(i, lim, key, hits if counts else 0))
                any_replaces = any_replaces or bool(lim.replaces)
        if any_replaces:
            replaced = {n for p in out for n in p.limit.replaces}
            out = [p for p in out if not (p.limit.name and p.limit.name in replaced)]
        return out

    def _templates(self, domain: str, d: ratelimit_pb2.RateLimitDescriptor | None,
                   entries: tuple[tuple[str, str], ...]) -> tuple[tuple[tuple, str, bool], ...]:
        """(limit's fields as a plain tuple, counter key, counts the request's hits) for one descriptor;
        memoised by plan()."""
        out: list[tuple[tuple, str, bool]] = []
        fixed = self._fixed(domain, d, entries)
        if fixed is not None:
            key = "" if fixed.unlimited else f"{KEY_PREFIX}:{domain}:{_parts(entries)}:{WORD_OF_UNIT[fixed.unit]}"
            out.append((tuple(fixed), key, True))
        if domain == RL_DOMAIN and len(entries) == 1 and (scope := SCOPE_OF_KEY.get(entries[0][0])) in self.by_scope:
            for value in self._values(scope, entries[0][1]):
                for rule, lim in self.by_scope[scope]:
                    if rule.value is None or rule.value == value:
                        # Token limits are only checked at the request (hits 0); usage charges them.
                        out.append((tuple(_named(lim, value)), _rule_key(rule, value), rule.metric == "requests"))
        return tuple(out)

    def _fixed(self, domain: str, d: ratelimit_pb2.RateLimitDescriptor | None,
               entries: tuple[tuple[str, str], ...]) -> Limit | None:
        if d is not None:
            rpu, unit = d.limit.requests_per_unit, d.limit.unit
            if rpu > 0 and unit in WORD_OF_UNIT:
                about = (f"principal {entries[0][1]}" if len(entries) == 1 and entries[0][0] == RL_PRINCIPAL_KEY
                         else _descr(domain, entries))
                return Limit(FIXED, rpu, unit, "requests", about, fail_open=self.default_open)
        y = self.rules.match(domain, entries)
        if y is not None:
            return _from_yaml(y, domain, entries, self.default_open)
        if domain == RL_DOMAIN and len(entries) == 1 and entries[0][0] == RL_PRINCIPAL_KEY:
            return Limit(FIXED, self.default_rpm, Unit.MINUTE, "requests", f"principal {entries[0][1]}",
                         fail_open=self.default_open)
        return None

    @staticmethod
    def _values(scope: LimitScope, value: str) -> list[str]:
        if scope is LimitScope.GROUP:
            return [g for g in dict.fromkeys(value.split(RL_GROUP_SEPARATOR)) if g]
        return [value] if value else []

    def _usage(self, i: int, entries: tuple[tuple[str, str], ...], hits: int, out: list[Planned]) -> None:
        """Stream end: charge `hits` tokens of one kind (weighted) to every token rule that applies."""
        charged = round(hits * self.weights.get(entries[0][1], 0.0))
        if charged <= 0:
            return
        for k, v in entries[1:]:
            scope = SCOPE_OF_KEY.get(k)
            if scope is None or scope not in self.by_scope:
                continue
            for value in self._values(scope, v):
                for rule, lim in self.by_scope[scope]:
                    if rule.metric == "tokens" and (rule.value is None or rule.value == value):
                        out.append(Planned(i, _named(lim, value), _rule_key(rule, value), charged, charge=True))


def _named(lim: Limit, value: str) -> Limit:
    return Limit(lim.algorithm, lim.amount, lim.unit, lim.metric, lim.about.format(value=value), lim.name,
                 lim.burst, lim.shadow, lim.fail_open)


# The state layout is part of the key: a bucket's state and a window's slots never share a hash,
# and the sliding window's hash with a running sum (ratelimit/counters.py) is `sliding_window.2`
# (a replica still on the former layout keeps its own hashes, rather than misreading these).
_LAYOUT = {"sliding_window": "sliding_window.2"}


def _rule_key(rule: LimitRule, value: str) -> str:
    algo = _LAYOUT.get(rule.algorithm, rule.algorithm)
    return f"{KEY_PREFIX}:rule:{rule.name}:{algo}:{rule.unit}:{rule.per}={value}"


def _descr(domain: str, entries: Sequence[tuple[str, str]]) -> str:
    return f"descriptor {domain}:{_parts(entries)}"


def _from_yaml(y: YamlLimit, domain: str, entries: tuple[tuple[str, str], ...], fail_open: bool) -> Limit:
    if y.unlimited:
        return Limit(FIXED, 0, 0, "requests", "", y.name, unlimited=True, replaces=y.replaces)
    return Limit(FIXED, y.requests_per_unit, UNIT_OF_WORD[y.unit], "requests", _descr(domain, entries),
                 y.name, shadow=y.shadow_mode, fail_open=fail_open, replaces=y.replaces)

"""Several policy sets at once: the global set plus the sets of `policy.sets`.

The global set (`policy.dir` / `policy.bundle`) is the Authorizer's own PolicyEngine, untouched.
Each further set has its own bundle source, verification key, BundleLoader (own hot swap, own
last good bundle) and entry in the status file and the metrics. A set applies to every principal,
or only to the principals of its `tenants` (Principal.tenant: from the key or the IdP, never from
a request header). Every enforced set that applies must allow; a shadow set is evaluated on the
same traffic, its would-be denials logged (policy_decisions.shadow), never enforced, and its
failures change nothing for the request.

A set runs in `ccr` mode (the global set's input v1 and validated result, extauth/policy_input.py and
extauth/policy.py, cached per input digest), or in `opa-envoy` mode (extauth/opa_envoy.py: OPA-Envoy's
input and result, headers included). A refusing `ccr` set's status and reason are the request's; an
allowing enforced one's headers, labels, rate-limit values and region join the global set's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from ccr import metrics as metrics_hooks
from ccr.config import GatewayConfig
from ccr.config import PolicySet as PolicySetConfig
from ccr.contract import POLICY_GLOBAL_SET, POLICY_STATUS_FILE
from ccr.runtime import Runtime
from extauth.bundle import BundleError
from extauth.bundle_signing import BundleVerifier
from extauth.bundle_source import BundleLoader, source_from
from extauth.decisions import PHASE_FULL, DecisionLog
from extauth.deny import Deny
from extauth.endpoints import Kind
from extauth.opa_envoy import OpaEnvoyEngine, Result, check_input, deny_status, response_headers, result_of
from extauth.pii import scan
from extauth.policy import DENY_STATUS, Decision, PolicyEngine
from extauth.policy_input import RequestFacts, request_text
from extauth.principal import Principal

log = logging.getLogger("extauth.policy_sets")

_ERR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


def err_type(status: int) -> str:
    """The Anthropic error type for a status a policy chose."""
    return _ERR_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error")


def ccr_result(d: Decision) -> dict[str, Any]:
    """A ccr-mode set's validated result as the decision log's file line shows it."""
    out: dict[str, Any] = {"allow": d.allow, "reason": d.reason}
    if not d.allow:
        out["status"] = d.status
    if d.headers:
        out["headers"] = dict(d.headers)
    md = {k: v for k, v in (("region", d.region), ("labels", dict(d.labels) or None),
                            ("ratelimit", dict(d.ratelimit) or None)) if v is not None}
    if md:
        out["metadata"] = md
    return out


class ResultConflict(Exception):
    """Two enforced policies' allowing results cannot both be applied (they bind different regions)."""


def joined(base: Decision, other: Decision, name: str) -> Decision:
    """The global set's allowing result with what an allowing enforced ccr-mode set adds: its headers,
    labels and rate-limit values (the set's win on a name both set: it is the narrower policy) and its
    region. Two different regions cannot both be kept: ResultConflict (the request is refused)."""
    region = base.region
    if other.region is not None:
        if region is not None and region != other.region:
            raise ResultConflict(f"policy set {name!r} binds the request to region {other.region!r}, "
                                 f"another policy to {region!r}")
        region = other.region
    if not (other.headers or other.labels or other.ratelimit) and region == base.region:
        return base

    def merge(a: tuple, b: tuple) -> tuple:
        return tuple(sorted((dict(a) | dict(b)).items()))

    return dataclasses.replace(base, headers=merge(base.headers, other.headers), region=region,
                               labels=merge(base.labels, other.labels),
                               ratelimit=merge(base.ratelimit, other.ratelimit))


class _SetFacts:
    """The input v1 facts each ccr-mode set evaluates for one request: the global set's, with the
    request's text as far as that set's bundle reads it (data.policy_input.text), built once per limit."""

    def __init__(self, base: RequestFacts | None, doc: dict | None, text_of: Any, messages: bool) -> None:
        self.base, self.doc, self.text_of, self.messages = base, doc, text_of, messages
        self._by_chars: dict[int | None, RequestFacts | None] = {}

    def get(self, text_chars: int | None) -> RequestFacts | None:
        try:
            return self._by_chars[text_chars]
        except KeyError:
            pass
        f = self.base
        if f is not None:
            if text_chars is None or not self.messages or self.doc is None:
                if f.text is not None:
                    f = dataclasses.replace(f, text=None, text_truncated=False)
            else:
                text, truncated = request_text(self.doc, self.text_of, text_chars)
                f = dataclasses.replace(f, text=text, text_truncated=truncated)
        self._by_chars[text_chars] = f
        return f


@dataclass(frozen=True, slots=True)
class SetEval:
    """What one set (not the global one) said about one request: the decision log row's set facts."""

    name: str
    shadow: bool
    mode: str
    entrypoint: str
    input: dict[str, Any] | None  # the OPA-Envoy input (digested, logged redacted); None in ccr mode
    result: Any  # the policy's raw answer
    error: str | None = None


class LoadedSet:
    """One configured set and the engine serving it (rebound by its BundleLoader on a new bundle)."""

    def __init__(self, cfg: PolicySetConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.shadow = cfg.is_shadow
        self.mode = cfg.mode
        self.tenants = frozenset(cfg.tenants) if cfg.tenants is not None else None
        self.policy: Any = None  # PolicyEngine | OpaEnvoyEngine; None only for a shadow set with no good bundle yet
        self.loader: BundleLoader

    def applies(self, principal: Principal) -> bool:
        return self.tenants is None or (principal.tenant is not None and principal.tenant in self.tenants)


class SetDeny(Deny):
    """An enforced set's denial; an OPA-Envoy result may add response headers."""

    def __init__(self, status: int, err_type: str, message: str, headers: list | None = None) -> None:
        super().__init__(status, err_type, message)
        self.headers = headers or []


class StatusBoard:
    """Every set's loader status in one file (RUN/policy-status.json: the global set at the top level,
    as before, and the others under "sets"), and in the metrics."""

    def __init__(self, path: Path | None, global_loader: BundleLoader, sets: list[LoadedSet]) -> None:
        self.path, self.global_loader, self.sets = path, global_loader, sets
        self._names = {id(global_loader): POLICY_GLOBAL_SET} | {id(s.loader): s.name for s in sets}

    def changed(self, loader: BundleLoader, event: str) -> None:
        name = self._names.get(id(loader), "?")
        st = loader.status
        if event == "loaded":
            metrics_hooks.bundle_loaded(name, st.revision or "", st.digest or "", st.loaded_at or 0.0)
        elif event == "refused":
            metrics_hooks.bundle_refused(name)
        self.write()

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = asdict(self.global_loader.status)
        doc["set"] = POLICY_GLOBAL_SET
        doc["sets"] = {s.name: {**asdict(s.loader.status), "shadow": s.shadow, "mode": s.mode,
                                "tenants": sorted(s.tenants) if s.tenants is not None else None}
                       for s in self.sets}
        return doc

    def write(self) -> None:
        if self.path is None:
            return
        try:  # atomically: a reader sees the old file or the new one
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(orjson.dumps(self.document(), option=orjson.OPT_INDENT_2))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot write %s: %s", self.path, e)


class PolicySets:
    def __init__(self, sets: list[LoadedSet], board: StatusBoard) -> None:
        self.sets = sets
        self.board = board
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(cls, config: GatewayConfig, runtime: Runtime, global_loader: BundleLoader) -> PolicySets:
        """Loaders for `policy.sets`, and one status board for them and the global set's loader."""
        base = Path(runtime.config_path).resolve().parent
        sets: list[LoadedSet] = []
        for c in config.policy.sets:
            verifier = None
            if c.verification is not None:
                v = c.verification
                verifier = BundleVerifier.from_file(base / v.key_file, v.alg, v.key_id, v.scope)
            s = LoadedSet(c)
            s.loader = BundleLoader(s, source_from(c.bundle, base), c.decision_path, verifier=verifier,
                                    make_engine=OpaEnvoyEngine if c.mode == "opa-envoy" else PolicyEngine)
            sets.append(s)
        board = StatusBoard(Path(runtime.run_dir) / POLICY_STATUS_FILE, global_loader, sets)
        for loader in (global_loader, *(s.loader for s in sets)):
            loader.on_status = board.changed
        return cls(sets, board)

    async def load_initial(self) -> None:
        """Each set's first bundle. An enforced set without one fails start-up (it could only deny);
        a shadow set without one starts empty and is evaluated once a good bundle arrives."""
        for s in self.sets:
            try:
                s.policy = await s.loader.load_initial()
            except BundleError as e:
                if not s.shadow:
                    raise BundleError(f"policy set {s.name!r}: {e}") from None
                log.error("shadow policy set %r has no bundle yet (%s); it is evaluated once one loads", s.name, e)
            else:
                log.info("policy set %r (%s%s, %s) from %s: revision %r", s.name, s.mode,
                         ", shadow" if s.shadow else "", "tenants " + ",".join(sorted(s.tenants))
                         if s.tenants is not None else "every principal", s.loader.source.describe,
                         s.policy.bundle.revision)

    def start(self) -> None:
        for s in self.sets:
            self._tasks.append(asyncio.create_task(s.loader.run(s.cfg.bundle.poll_interval_s),
                                                   name=f"bundle-watch-{s.name}"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for s in self.sets:
            await s.loader.close()
            if s.policy is not None:
                s.policy.close()

    # -- per request ------------------------------------------------------------

    def check(self, req: Any, body: Any, seen: Any, method: str, request_id: str, doc: dict | None, text_of: Any,
              global_allow: bool, decisions: DecisionLog | None) -> list[Result]:
        """Evaluate the sets that apply to `seen.principal`: shadow ones always (never raising),
        enforced ones while every set before allowed (the global one first). Raises SetDeny (or Deny
        503 for a set that failed) for the first enforced denial, once every shadow set has run,
        after putting its facts into `seen` for the request's row. Returns the allowing OPA-Envoy
        results whose headers and metadata the response must carry."""
        principal = seen.principal
        additions: list[Result] = []
        inputs: dict[tuple, dict[str, Any]] = {}  # OPA-Envoy inputs by their body settings, built once per request
        messages = doc is not None and seen.endpoint.endpoint.kind is Kind.MESSAGES
        set_facts = _SetFacts(seen.facts, doc, text_of, messages)
        merged = seen.decision  # the global set's result joined with each allowing enforced ccr-mode set's
        refusal: Deny | None = None  # the first enforced denial, raised after the shadow sets ran
        for s in self.sets:
            engine = s.policy
            if engine is None or not s.applies(principal) or not (s.shadow or (global_allow and refusal is None)):
                continue
            t0 = time.perf_counter_ns()
            result: Result | None = None
            opa_input: dict[str, Any] | None = None
            d: Decision | None = None  # a ccr-mode set's validated result
            pii = facts = None
            try:
                if s.mode == "opa-envoy":
                    shape = (s.cfg.with_body, s.cfg.max_body_bytes)
                    opa_input = inputs.get(shape)
                    if opa_input is None:
                        opa_input = inputs[shape] = check_input(req, body, *shape)
                    raw = engine.evaluate(opa_input)
                    se = SetEval(s.name, s.shadow, s.mode, engine.entrypoint, opa_input, raw)
                    result = result_of(raw)
                    allow = result.allowed
                    status = 200 if allow else deny_status(result)
                    reason = "" if allow else (result.body or f"denied by policy set {s.name!r}")
                else:  # the global set's input v1, with this set's own PII scan and text
                    if engine.pii is not None and messages:
                        pii = tuple(scan(doc, engine.pii.patterns, engine.pii.kinds, text_of))
                    facts = set_facts.get(engine.text_chars)
                    d = engine.decide(principal, method, seen.path, seen.model, seen.endpoint, pii, facts)
                    se = SetEval(s.name, s.shadow, s.mode, engine.entrypoint, None, ccr_result(d))
                    allow, status = d.allow, 200 if d.allow else d.status
                    reason = d.reason or ("" if d.allow else f"denied by policy set {s.name!r}")
                    if allow and not s.shadow and merged is not None:
                        try:
                            merged = joined(merged, d, s.name)
                        except ResultConflict as e:  # both cannot be honoured: refused, by this set
                            allow, status, reason = False, 403, str(e)
                            d = dataclasses.replace(d, allow=False, reason=reason, status=status)
            except Exception as e:  # fail closed when enforced; a shadow set's failure is only logged
                log.warning("policy set %r failed%s: %s", s.name,
                            " (shadow: request unaffected)" if s.shadow else "", e)
                se = SetEval(s.name, s.shadow, s.mode, engine.entrypoint, opa_input, None, str(e))
                allow, status, reason = False, 503, f"policy set {s.name!r} failed: {e}"
                result = d = None
                if s.mode != "opa-envoy":  # the input it was given, for the row's digest
                    facts = set_facts.get(getattr(engine, "text_chars", None))
            eval_ns = time.perf_counter_ns() - t0
            if s.shadow or allow:
                _log(decisions, request_id, seen, method, engine.bundle, se, allow, status, reason, eval_ns,
                     d, pii, facts)
                if not s.shadow and result is not None and _has_additions(result):
                    additions.append(result)
                continue
            # The request's own row names the set that refused it, with that set's bundle; the global
            # set's allow (it allowed, or this set would not have run) gets a row of its own.
            g = seen.decision
            _log(decisions, request_id, seen, method, seen.bundle, None, True, 200, g.reason if g else "",
                 seen.eval_ns, g, seen.pii, seen.facts)
            seen.bundle, seen.eval_ns, seen.set_eval = engine.bundle, eval_ns, se
            if d is not None:  # a ccr-mode set: its input (digest, PII, text) and its validated denial
                seen.pii, seen.facts = pii, facts
                seen.decision = dataclasses.replace(d, reason=reason)
            else:
                seen.decision = Decision(False, reason, status)
            if se.error is not None:
                refusal = Deny(503, "api_error", f"the gateway could not authorize this request: policy set "
                                                 f"{s.name!r} failed; contact your gateway administrator")
                refusal.log_reason = reason  # the detail goes to the log, not to the client
            else:
                refusal = SetDeny(status, DENY_STATUS.get(status) or err_type(status), reason,
                                  response_headers(result) if result is not None else None)
        if refusal is not None:
            raise refusal
        seen.decision = merged  # every enforced set allowed: the request carries what each one's result asks
        return additions

    def batch_decide(self, principal: Principal, base: Any, for_engine: Any = None) -> Any:
        """The decide function for each request of a batch: the global set's (`base`), then every
        enforced `ccr`-mode set that applies (an OPA-Envoy set sees the batch create request itself).
        `for_engine(engine)` gives a set's decide function with the batch's input v1 facts (the
        Check handler's); without it a set's PolicyEngine.decide is called with the same arguments.
        A refusing set's status and reason are the request's."""
        sets = [s for s in self.sets
                if s.mode == "ccr" and not s.shadow and s.policy is not None and s.applies(principal)]
        if not sets:
            return base

        def decide(p: Principal, method: str, path: str, model: str | None, endpoint: Any = None,
                   pii: Any = None, *rest: Any) -> Decision:
            d = base(p, method, path, model, endpoint, pii, *rest)
            for s in sets:
                if not d.allow:
                    break
                fn = for_engine(s.policy) if for_engine is not None else s.policy.decide
                sd = fn(p, method, path, model, endpoint, pii, *rest)
                if not sd.allow:
                    d = dataclasses.replace(sd, reason=sd.reason or f"denied by policy set {s.name!r}")
            return d

        return decide


def _has_additions(r: Result) -> bool:
    return bool(r.headers or r.response_headers_to_add or r.request_headers_to_remove or r.dynamic_metadata)


def _log(dl: DecisionLog | None, request_id: str, seen: Any, method: str, bundle: Any, se: SetEval | None,
         allow: bool, status: int, reason: str, eval_ns: int, policy_result: Any = None, pii: Any = None,
         facts: RequestFacts | None = None) -> None:
    """A row of its own for an evaluation that is not the request's decision (a shadow one, an allow;
    `se` None: the global set's allow when another set refused the request)."""
    if dl is None:
        return
    try:
        dl.record(dl.new_id(), request_id, PHASE_FULL, seen.principal, method, seen.path, seen.model, seen.endpoint,
                  bundle, allow, status, reason, eval_ns, policy_result, pii, facts, set_eval=se)
    except Exception:  # the log never changes a decision
        log.exception("could not record policy set %r's decision", se.name if se is not None else POLICY_GLOBAL_SET)

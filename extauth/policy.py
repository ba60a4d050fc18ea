"""Rego (compiled to WASM) decisions with a cache keyed by the input they were made from.

The input is the versioned document of extauth/policy_input.py; the result is validated here
(`parse_result`: allow, reason, status, headers, metadata) and anything else fails closed.

One evaluation costs ~150-300 us of wasmtime FFI, so decisions are cached, keyed by the sha256
of the canonical input (sorted keys): every fact the result can depend on, and nothing a
policy cannot see. Building and hashing the input costs a few microseconds (more when the
bundle asks for the request's text), and the key stays 64 characters however large the input
(a cache of 50,000 entries must not hold 50,000 request texts). The same bytes are what the
policy evaluates and the same digest is the decision log's `input_sha256`. Facts that vary per
request (the byte size, above all) make hits rarer: the cache then serves retries and identical
calls, and the uncached time is what bounds a decision (bench/policy_decision.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from opapywasm import OpaWasmPolicy, PolicyConfig

from ccr.contract import CCR_HEADER_PREFIX, H_REGION_HINT, H_REQUEST_ID
from extauth import wasm_calls
from extauth.bundle import Bundle, BundleError, read_bundle
from extauth.endpoints import EndpointMatch, match
from extauth.pii import KINDS, Finding, Pattern, compile_patterns
from extauth.policy_input import CREDENTIAL_HEADERS, DEFAULT_MAX_TEXT_CHARS, MAX_REGION_LEN, RequestFacts, document
from extauth.principal import Principal


@dataclass(frozen=True, slots=True)
class PiiScan:
    """What the bundle's data.pii asks extauth to look for (the policy decides what a finding means)."""

    mode: str  # "block" | "log"; "off" and absent settings make no PiiScan at all
    kinds: frozenset[str]
    patterns: list[Pattern]


def pii_settings(data: dict) -> PiiScan | None:
    """data.pii as scan settings; None when scanning is off (the hot path then pays nothing).
    Settings extauth cannot use make the bundle invalid (BundleError): it is refused, not half-applied."""
    pii = data.get("pii") if isinstance(data, dict) else None
    if pii is None:
        return None
    if not isinstance(pii, dict):
        raise BundleError("data.pii must be an object {mode, kinds, patterns, exempt_groups}")
    mode = pii.get("mode", "off")
    if mode not in ("block", "log", "off"):
        raise BundleError(f"data.pii.mode must be block, log or off, not {mode!r}")
    if mode == "off":
        return None
    kinds = pii.get("kinds", list(KINDS))
    if not isinstance(kinds, list) or any(k not in KINDS for k in kinds):
        raise BundleError(f"data.pii.kinds must be a list of {', '.join(KINDS)}; got {kinds!r}")
    try:
        patterns = compile_patterns(pii.get("patterns"))
    except ValueError as e:
        raise BundleError(f"data.{e}") from None
    if not kinds and not patterns:
        return None
    return PiiScan(mode, frozenset(kinds), patterns)


def text_settings(data: dict) -> int | None:
    """data.policy_input.text: whether the bundle's policy reads the request's text, and at most
    how many characters of it (`max_text_chars`); None when it does not (the default)."""
    pi = data.get("policy_input") if isinstance(data, dict) else None
    if pi is None:
        return None
    if not isinstance(pi, dict) or set(pi) - {"text", "max_text_chars"}:
        raise BundleError("data.policy_input must be an object {text: bool, max_text_chars: int}")
    text = pi.get("text", False)
    if not isinstance(text, bool):
        raise BundleError("data.policy_input.text must be true or false")
    limit = pi.get("max_text_chars", DEFAULT_MAX_TEXT_CHARS)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_TEXT_CHARS:
        raise BundleError(f"data.policy_input.max_text_chars must be an integer from 1 to {MAX_TEXT_CHARS}")
    return limit if text else None


# The largest text a bundle may ask for, and the input bound that follows (JSON escaping can
# make a character up to 6 bytes; the rest of the input is small).
MAX_TEXT_CHARS = 1024 * 1024
MAX_INPUT_BYTES = 6 * MAX_TEXT_CHARS + 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's validated result (policies/README.md, "Result")."""

    allow: bool
    reason: str
    status: int = 403  # HTTP status of a denial
    headers: tuple[tuple[str, str], ...] = ()  # added to the upstream request (allowed requests only)
    region: str | None = None  # AUTHZ_REGION / H_REGION: the region routing must keep the request in
    labels: tuple[tuple[str, str], ...] = ()  # AUTHZ_LABELS: for the audit row
    ratelimit: tuple[tuple[str, str], ...] = ()  # AUTHZ_RATELIMIT: rate-limit descriptor values
    # sha256 of the canonical input it was made from (the decision log's input_sha256); not part of
    # equality: two inputs with the same answer make the same response.
    input_sha256: str | None = field(default=None, compare=False)


class PolicyError(Exception):
    """The policy could not produce a usable decision (fail closed)."""


# Denial statuses a policy may choose (Envoy accepts only defined HttpStatus codes) and the
# Anthropic error type each is answered with.
DENY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "api_error"}
MAX_HEADERS = 32
MAX_LABELS = 32
MAX_VALUE = 1024
_TOKEN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
# Headers a policy may not set upstream: the gateway's identity and routing headers (x-ccr-*),
# credentials, the audit key, Envoy's own, framing and hop-by-hop headers, and the region hint.
_RESERVED_HEADERS = CREDENTIAL_HEADERS | {
    H_REQUEST_ID, H_REGION_HINT, "host", "content-length", "content-type", "content-encoding",
    "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection",
}
_RESERVED_PREFIXES = (CCR_HEADER_PREFIX, "x-envoy-", ":")
_RESULT_KEYS = frozenset({"allow", "reason", "status", "headers", "metadata"})
_METADATA_KEYS = frozenset({"region", "labels", "ratelimit"})


def _name(v: object) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64 and set(v) <= _TOKEN


def _value(v: object) -> bool:
    return isinstance(v, str) and len(v) <= MAX_VALUE and not any(c in v for c in "\r\n\0")


def _pairs(obj: object, what: str, limit: int) -> tuple[tuple[str, str], ...]:
    if not isinstance(obj, dict) or len(obj) > limit:
        raise PolicyError(f"{what} must be an object of at most {limit} string values")
    for k, v in obj.items():
        if not _name(k):
            raise PolicyError(f"{what}: {k!r} is not a lower-case name (a-z, 0-9, '-', '_', '.'; at most 64)")
        if not _value(v):
            raise PolicyError(f"{what}.{k} must be a string of at most {MAX_VALUE} characters without CR/LF/NUL")
    return tuple(sorted(obj.items()))


def parse_result(result: object, entrypoint: str = "") -> Decision:
    """The policy's answer as a Decision; any other shape raises PolicyError (the request is denied
    with 503 and the error logged: a policy that says something extauth does not understand must
    not be half-applied)."""
    if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
        raise PolicyError(f"policy {entrypoint} returned {str(result)[:200]}, not {{allow: bool, reason, ...}}")
    unknown = set(result) - _RESULT_KEYS
    if unknown:
        raise PolicyError(f"policy {entrypoint} result has unknown field(s) {sorted(unknown)}")
    allow = result["allow"]
    reason = result.get("reason") or ""
    if not isinstance(reason, str):
        raise PolicyError(f"policy {entrypoint} result: reason must be a string")
    status = result.get("status")
    if allow:
        if status not in (None, 200):
            raise PolicyError(f"policy {entrypoint} allowed with status {status!r}: an allow has no denial status")
        status = 403
    elif status is None:
        status = 403
    elif isinstance(status, bool) or status not in DENY_STATUS:
        raise PolicyError(f"policy {entrypoint} result: status must be one of {sorted(DENY_STATUS)}, not {status!r}")
    headers: tuple[tuple[str, str], ...] = ()
    if result.get("headers") is not None:
        headers = _pairs(result["headers"], "result.headers", MAX_HEADERS)
        for k, _ in headers:
            if k in _RESERVED_HEADERS or k.startswith(_RESERVED_PREFIXES):
                raise PolicyError(f"policy {entrypoint} may not set header {k!r}: it is the gateway's "
                                  "(identity, routing, credentials or framing)")
    region = None
    labels: tuple[tuple[str, str], ...] = ()
    ratelimit: tuple[tuple[str, str], ...] = ()
    md = result.get("metadata")
    if md is not None:
        if not isinstance(md, dict) or set(md) - _METADATA_KEYS:
            raise PolicyError(f"policy {entrypoint} result.metadata must be an object with only "
                              f"{sorted(_METADATA_KEYS)}")
        region = md.get("region")
        if region is not None and not (_name(region) and len(region) <= MAX_REGION_LEN):
            raise PolicyError(f"policy {entrypoint} result.metadata.region must be a region name, not {region!r}")
        if md.get("labels") is not None:
            labels = _pairs(md["labels"], "result.metadata.labels", MAX_LABELS)
        if md.get("ratelimit") is not None:
            ratelimit = _pairs(md["ratelimit"], "result.metadata.ratelimit", MAX_LABELS)
    return Decision(allow, reason, status, headers, region, labels, ratelimit)


class PolicyEngine:
    def __init__(self, bundle: Bundle, entrypoint: str, cache_size: int = 50_000) -> None:
        self.bundle = bundle
        self.entrypoint = entrypoint
        # The input arrives as orjson bytes (see decide): no second serialisation, no re-parse.
        self._policy = OpaWasmPolicy.from_wasm_bytes(bundle.wasm, PolicyConfig(
            pool_size=2, parse_raw_json_input=False, max_input_bytes=MAX_INPUT_BYTES))
        # 5 calls into WASM per evaluation, each ~10-35 us cheaper (extauth/wasm_calls.py).
        self.fast_calls = wasm_calls.install(self._policy)
        if entrypoint not in self._policy.entrypoints:
            known = sorted(self._policy.entrypoints)
            self._policy.close()
            raise BundleError(
                f"{bundle.path}: entrypoint {entrypoint!r} not in bundle (has {known}); "
                f"rebuild with `opa build -t wasm -e {entrypoint}`"
            )
        try:
            self.pii = pii_settings(bundle.data)
            self.text_chars = text_settings(bundle.data)  # None: the policy does not read the text
        except BundleError:
            self._policy.close()
            raise
        self._policy.set_data(bundle.data)
        self._cache: dict[str, Decision] = {}  # by the input's sha256
        self._by_facts: dict[tuple, Decision] = {}  # by the facts the input is made of (decide)
        self._cache_size = cache_size

    @classmethod
    def load(cls, path: str | Path, entrypoint: str) -> PolicyEngine:
        return cls(read_bundle(path), entrypoint)

    @property
    def host_builtins(self) -> dict[str, int]:
        """Builtins the policy calls back into Python for (ideally none)."""
        return self._policy.builtins

    def decide(
        self, principal: Principal, method: str, path: str, model: str | None,
        endpoint: EndpointMatch | None = None, pii: tuple[Finding, ...] | None = None,
        facts: RequestFacts | None = None,
    ) -> Decision:
        """`endpoint` defaults to the registry's match for (method, path); pass it to decide
        a request as another endpoint (e.g. a request inside a batch as messages.create).
        `pii`: what extauth/pii.py found in the request's text (None: not scanned); it becomes
        `input.request.pii`. `facts`: the rest of the input (extauth/policy_input.py). The
        cache key is the digest of all of it."""
        if endpoint is None:
            endpoint = match(method, path)
        # The facts themselves are hashable and make the document exactly: a request like an earlier one
        # is answered without building, serialising and hashing its input again. Not when the input
        # carries the request's text (large; the digest then is the key).
        key = (principal, method, path, model, endpoint, pii, facts) if facts is None or facts.text is None else None
        if key is not None:
            hit = self._by_facts.get(key)
            if hit is not None:
                return hit
        raw = orjson.dumps(document(principal, method, path, model, endpoint, pii, facts), option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(raw).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None:
            self._remember(key, hit)
            return hit
        try:
            result = self._policy.evaluate(raw, self.entrypoint)
        except Exception as e:
            raise PolicyError(f"policy evaluation failed: {e}") from e
        decision = dataclasses.replace(parse_result(result, self.entrypoint), input_sha256=digest)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[digest] = decision
        self._remember(key, decision)
        return decision

    def _remember(self, key: tuple | None, decision: Decision) -> None:
        if key is None:
            return
        if len(self._by_facts) >= self._cache_size:
            self._by_facts.clear()  # keys hold client-sent facts: keep the map bounded
        self._by_facts[key] = decision

    def close(self) -> None:
        self._policy.close()

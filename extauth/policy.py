"""Rego (compiled to WASM) decisions with a cache keyed by the facts they depend on.

One evaluation costs ~150-300 us of wasmtime FFI, so decisions are cached by
(bundle digest, principal, method, path, model, endpoint, path params): exactly the
input facts, and the digest changes with every new bundle. The whole principal is part of the cache key
because a policy may name principals (and the reason quotes the name); per
principal the hit rate is still ~100%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opapywasm import OpaWasmPolicy, PolicyConfig

from extauth.bundle import Bundle, BundleError, read_bundle
from extauth.endpoints import EndpointMatch, match
from extauth.pii import KINDS, Finding, Pattern, compile_patterns
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


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    reason: str


class PolicyError(Exception):
    """The policy could not produce a usable decision (fail closed)."""


class PolicyEngine:
    def __init__(self, bundle: Bundle, entrypoint: str, cache_size: int = 50_000) -> None:
        self.bundle = bundle
        self.entrypoint = entrypoint
        self._policy = OpaWasmPolicy.from_wasm_bytes(bundle.wasm, PolicyConfig(pool_size=2))
        if entrypoint not in self._policy.entrypoints:
            known = sorted(self._policy.entrypoints)
            self._policy.close()
            raise BundleError(
                f"{bundle.path}: entrypoint {entrypoint!r} not in bundle (has {known}); "
                f"rebuild with `opa build -t wasm -e {entrypoint}`"
            )
        try:
            self.pii = pii_settings(bundle.data)
        except BundleError:
            self._policy.close()
            raise
        self._policy.set_data(bundle.data)
        self._cache: dict[tuple, Decision] = {}
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
    ) -> Decision:
        """`endpoint` defaults to the registry's match for (method, path); pass it to decide
        a request as another endpoint (e.g. a request inside a batch as messages.create).
        `pii`: what extauth/pii.py found in the request's text (None: not scanned); it becomes
        `input.request.pii` and is part of the cache key."""
        if endpoint is None:
            endpoint = match(method, path)
        ep_key = (endpoint.name, endpoint.params) if endpoint is not None else None
        ck = (self.bundle.digest, principal, method, path, model, ep_key, pii)
        hit = self._cache.get(ck)
        if hit is not None:
            return hit
        request: dict = {"method": method, "path": path, "model": model,
                         "endpoint": None, "kind": None, "params": {}}
        if endpoint is not None:
            request.update(endpoint.policy_input())
        if pii is not None:
            request["pii"] = [f.policy_input() for f in pii]
        facts = {"principal": principal.policy_input(), "request": request}
        try:
            result = self._policy.evaluate(facts, self.entrypoint)
        except Exception as e:
            raise PolicyError(f"policy evaluation failed: {e}") from e
        if (
            not isinstance(result, dict)
            or not isinstance(result.get("allow"), bool)
            or not isinstance(result.get("reason", ""), str)
        ):
            raise PolicyError(f"policy {self.entrypoint} returned {result!r}, not {{allow: bool, reason}}")
        decision = Decision(result["allow"], result.get("reason") or "")
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[ck] = decision
        return decision

    def close(self) -> None:
        self._policy.close()

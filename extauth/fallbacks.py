"""Server-side fallbacks: the models a Messages body's `fallbacks` names, checked as the request's own model is.

With `fallbacks` (the Anthropic API's beta `server-side-fallback-2026-06-01`) the provider answers a request
its model declines with another model, inside the same call. Unchecked, that is a way around the gateway:
a principal allowed one model names a model its policy refuses as the fallback, provokes a refusal, and is
served by the refused model, priced as the one it asked for. So each fallback model must be:
- one the gateway serves under its own id (the body reaches the provider as written: no alias step);
- served at every provider the request may reach (its failover targets, its split);
- allowed by the policy (and every enforced policy set) for this principal and request, exactly as if the
  request had named it;
- priced no higher than the requested model (usage is priced at the requested model's rates: a dearer
  fallback would be under-billed). `"default"`, where the provider picks the model, cannot be checked and is
refused. Anything else in the field is refused too: the provider accepts only `{"model": ...}` entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ccr import routing
from ccr.config import GatewayConfig
from ccr.pricing import PriceTable
from extauth.deny import Deny
from extauth.policy import DENY_STATUS, Decision

FIELD = "fallbacks"
MAX_FALLBACKS = 3  # the provider's own limit


def named(value: object, where: str) -> list[str]:
    """The model ids a `fallbacks` value lists (none for null); a value the gateway cannot check is refused."""
    if value is None:
        return []
    if isinstance(value, str):
        raise Deny(400, "invalid_request_error",
                   f'{where}: "{value}" lets the provider choose the fallback model, which the gateway cannot '
                   "check against your policy, route or price; list the fallback models instead, e.g. "
                   '[{"model": "claude-opus-4-8"}]')
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_FALLBACKS:
        raise Deny(400, "invalid_request_error",
                   f'{where}: a list of 1 to {MAX_FALLBACKS} {{"model": ...}} objects')
    out: list[str] = []
    for i, entry in enumerate(value):
        model = entry.get("model") if isinstance(entry, dict) and len(entry) == 1 else None
        if not isinstance(model, str) or not model:
            raise Deny(400, "invalid_request_error",
                       f'{where}.{i}: an object with one field, a non-empty "model" string')
        out.append(model)
    return out


class FallbackCheck:
    """One config's view: which models the gateway serves where, and at what price."""

    def __init__(self, config: GatewayConfig, resolve: Callable[[str], routing.Resolved | None]) -> None:
        self.config = config
        self.resolve = resolve
        self.prices = PriceTable(config)

    def _providers(self, model: str) -> frozenset[str]:
        """Every provider a request for `model` may reach: its entry's provider, failover targets and split."""
        r = self.resolve(model)
        if r is None:
            return frozenset()
        m = self.config.models[r.model_index]
        return frozenset({m.provider, *m.targets, *m.split})

    def check(self, params: dict[str, Any], where: str, model: str, decide: Callable[[str], Decision]) -> None:
        """Refuses (Deny) unless every model `params` names as a fallback could serve this request in its place.
        `model`: the request's concrete model; `decide(m)`: the policy's decision on this request with model m."""
        if FIELD not in params:
            return
        reach = self._providers(model)
        for i, fallback in enumerate(named(params[FIELD], where)):
            at = f"{where}.{i}.model"
            resolved = self.resolve(fallback)
            if resolved is None:
                raise Deny(400, "invalid_request_error",
                           f"{at}: {fallback} is not a model this gateway serves; GET /v1/models lists yours")
            if resolved.is_alias:
                raise Deny(400, "invalid_request_error",
                           f"{at}: {fallback} is an alias of {resolved.served}; name fallback models by their id "
                           "(the provider receives them as written)")
            missing = reach - self._providers(fallback)
            if missing:
                raise Deny(400, "invalid_request_error",
                           f"{at}: this request may be sent to {', '.join(sorted(missing))}, where the gateway does "
                           f"not serve {fallback}; a fallback is answered by whichever provider takes the request")
            d = decide(fallback)
            if not d.allow:
                why = d.reason or "denied by policy"
                raise Deny(d.status, DENY_STATUS[d.status],
                           f"{at}: {fallback} would serve this request and is refused: {why}")
            mine, theirs = self.prices.rates(model), self.prices.rates(fallback)
            if mine is not None and theirs is not None and not theirs.no_dearer_than(mine):
                raise Deny(400, "invalid_request_error",
                           f"{at}: {fallback} is priced above {model}; the gateway prices a request at the rates "
                           "of the model it names, so a fallback must cost no more per token")

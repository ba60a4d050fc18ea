"""Which cluster serves a model's request: failover chains and data residency.

Decided the same way by extauth (which names the cluster per request, x-ccr-cluster) and by the
router (which builds the clusters and their routes), from the same config: a cluster extauth names
always exists in the Envoy config of that version.

A model with several `targets` gets chain clusters: one Envoy cluster whose priority levels are the
targets in order, so the route's retry policy (previous_priorities) moves each retry to the next
target. A request the policy binds to a region uses a chain of that region's targets only: a
target outside the region is not in the cluster at all, so no retry can reach it.

A chain may cross provider kinds in any order (Anthropic API targets and Bedrock, Vertex or
OpenAI-compatible targets translated by the adapter on their own attempts): `failover_capable` says
which client schemas a chain serves (docs/routing.md).

Model aliases are resolved here too (`resolve`): every caller asks this module what a model id means.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ccr.config import Failover, GatewayConfig, Model, Provider, ProviderKind

CHAIN_PREFIX = "chain_"


@dataclass(frozen=True)
class Chain:
    """One failover cluster: a model entry's targets (in order) for a client schema and region."""

    name: str
    model_index: int
    providers: tuple[Provider, ...]
    failover: Failover


def _in_region(p: Provider, region: str | None) -> bool:
    # A provider with no region is in no region: a bound request never goes to it.
    return region is None or p.region == region


def eligible(config: GatewayConfig, m: Model, region: str | None) -> list[Provider]:
    """The model's targets, in failover order, that a request bound to `region` may reach."""
    return [p for p in (config.provider(n) for n in m.chain) if _in_region(p, region)]


def failover_capable(schema: str, providers: list[Provider] | tuple[Provider, ...]) -> bool:
    """Whether a chain of `providers` can fail over for an Anthropic client: any order of Anthropic API
    (passthrough) and translated targets. Envoy's attempts share one request header map that a
    translating attempt rewrites; the chain's first upstream step puts the client's headers back on
    every attempt (router/chain_restore.lua). OpenAI and Bedrock clients always need the adapter's
    schema translation, which passthrough targets lack: no chain for them."""
    return schema == "anthropic" and len(providers) >= 2


def chain_name(model_index: int, region: str | None) -> str:
    return f"{CHAIN_PREFIX}{model_index}_{region or 'any'}"


def _sticky(ps: list[Provider], weights: dict[str, int], principal_id: str, salt: str) -> Provider:
    """One of `ps` by weight, the same for a principal every time (a hash of its id, not a random draw)."""
    total = sum(weights[p.name] for p in ps)
    point = int.from_bytes(hashlib.sha256(f"{salt}\0{principal_id}".encode()).digest()[:8], "big") % total
    for p in ps:
        point -= weights[p.name]
        if point < 0:
            return p
    return ps[-1]


def route(config: GatewayConfig, model_index: int, schema: str, region: str | None,
          principal_id: str = "", translatable: bool = True) -> tuple[str, str] | None:
    """(first provider, cluster) for a Messages-like request in client `schema`, or None when no
    target of the model is in `region` (the request must be refused, never sent elsewhere).
    `translatable` False (count_tokens: the adapter translates Messages calls only): a chain holding
    a translated target is not used; the first target's own cluster is."""
    m = config.models[model_index]
    ps = eligible(config, m, region)
    if not ps:
        return None
    if m.split:  # A/B: a variant per principal, among those in the region
        p = _sticky(ps, m.split, principal_id, m.match)
        return p.name, p.cluster_for(schema)
    if not failover_capable(schema, ps) or (not translatable and any(p.kind != ProviderKind.anthropic for p in ps)):
        # One target, a non-Anthropic client, or a call the adapter cannot translate (docs/routing.md).
        return ps[0].name, ps[0].cluster_for(schema)
    return ps[0].name, chain_name(model_index, region)


def regions(config: GatewayConfig) -> list[str]:
    return sorted({p.region for p in config.providers if p.region})


def chains(config: GatewayConfig) -> list[Chain]:
    """Every chain cluster `route` can name."""
    out = []
    for i, m in enumerate(config.models):
        if len(m.chain) < 2 or m.split:
            continue
        for region in [None, *regions(config)]:
            ps = eligible(config, m, region)
            if failover_capable("anthropic", ps):
                out.append(Chain(chain_name(i, region), i, tuple(ps), m.failover))
    return out


@dataclass(frozen=True)
class Resolved:
    """What a requested model id means on this gateway."""

    requested: str  # as the client named it
    served: str  # the concrete id routed, decided, priced and sent to the provider (= requested unless an alias)
    model_index: int  # its models[] entry

    @property
    def is_alias(self) -> bool:
        return self.requested != self.served


def resolve(config: GatewayConfig, requested: str) -> Resolved | None:
    """The one place a requested model id is resolved: an alias (config `aliases`) to its target, then
    the first models[] entry matching it; None: no model of this gateway (refused with 404)."""
    served = config.aliases.get(requested, requested)
    idx = model_index(config, served)
    return None if idx is None else Resolved(requested, served, idx)


def model_index(config: GatewayConfig, model: str) -> int | None:
    """The index of the first model entry matching `model` (config.route_model's entry)."""
    m = config.route_model(model)
    if m is None:
        return None
    return next(i for i, x in enumerate(config.models) if x is m)

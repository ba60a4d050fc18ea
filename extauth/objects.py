"""Checks for Message Batches and Files: the endpoints that hold per-principal data
behind the organisation's one provider credential.

* A batch create is decided request by request, like single Messages calls: every
  `params` names a routable model the principal may use, all of them go to one
  provider, and every file it references is the caller's. One denied request refuses
  the whole batch (the message names its custom_id and model).
* An object id in the path (batch get/results/cancel/delete, file get/content/delete)
  must belong to the caller; anyone else gets the same 404 as for an id that does not
  exist, so ids of other principals cannot even be probed.
* The Files API is refused unless `files.enabled`; when enabled, a `file_id` anywhere in
  a Messages body must be the caller's.
Owners come from `provider_objects` (recorded by the adapter) behind a small cache:
ownership never changes, so positive answers are cached; misses are not (an object
created a moment ago must be found).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ccr import routing
from ccr.config import GatewayConfig
from ccr.provider_objects import ObjectKind, ObjectStore, Owned
from extauth.deny import Deny
from extauth.endpoints import BY_NAME, EndpointMatch, Kind
from extauth.fallbacks import FIELD, FallbackCheck
from extauth.lean_json import Ambiguous, Buffer, JSONDecodeError
from extauth.lean_json import loads_lazy as json_loads_lazy
from extauth.pii import Finding
from extauth.policy import DENY_STATUS, Decision
from extauth.principal import Principal

# Each request in a batch is decided as the single Messages call it stands for.
MESSAGES_CREATE = EndpointMatch(BY_NAME["messages.create"])
# (provider name, cluster) for a model id, or None when no model entry matches.
RouteFn = Callable[[str], "tuple[str, str] | None"]
# PolicyEngine.decide for batch requests: (principal, method, path, model, endpoint, pii, params, text_of),
# where params is the request's body (its max_tokens, tools, text... are policy input; extauth/server.py).
DecideFn = Callable[..., Decision]
# The PII scan of one request's params (extauth/pii.py), with the body's text_of; None when off.
ScanFn = Callable[[Any, Callable[[str], str]], "tuple[Finding, ...]"]

_ID_PARAM = {"batches": ("batch_id", ObjectKind.BATCH), "files": ("file_id", ObjectKind.FILE)}


@dataclass(frozen=True, slots=True)
class ObjectFacts:
    """Where an object request goes, and how many rate-limit hits it costs."""

    provider: str
    cluster: str
    hits: int = 1
    # A batch create: (model, max_tokens) of each request, for its worst-case budget reservation.
    batch: tuple[tuple[str, int], ...] = ()
    # A batch id in the path: the request that created it (its budget hold; extauth/spend.py).
    create_request_id: str | None = None


_FILE_ID = re.compile(rb"file_id")
_U_ESCAPE = re.compile(rb"\\u")


def mentions_file(body: Buffer) -> bool:
    """Cheap pre-check before walking a Messages body for file references. A JSON escape
    (`"file\\u005fid"`) could hide the key from a byte search, so any \\u escape means 'walk'.

    For the 84 KB agent request: sre's search for the key, 30 us, is the cheaper scan (bytes' `in`
    takes 38: the key's letters are common in text, so its skips are short). The escape is searched
    for only when a backslash is there at all, which a memchr over the whole buffer tells in about
    1 us (sre's own scan for it: 23 us); for a view, over the object it views (the check request it
    came in: a superset, so "none there" holds for the body too)."""
    if _FILE_ID.search(body) is not None:
        return True
    whole = body.obj if isinstance(body, memoryview) else body
    if isinstance(whole, bytes | bytearray) and b"\\" not in whole:
        return False
    return _U_ESCAPE.search(body) is not None


def file_ids(doc: Any) -> Iterator[Any]:
    """Every value under a "file_id" key anywhere in a JSON document: the provider accepts
    file references in several block types, so all of them are checked, not just the known ones."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, sub in v.items():
                if k == "file_id":
                    yield sub
                else:
                    stack.append(sub)
        elif isinstance(v, list):
            stack.extend(v)


class ObjectGuard:
    def __init__(self, config: GatewayConfig, store: ObjectStore, route: RouteFn, cache_size: int = 10_000,
                 fallbacks: FallbackCheck | None = None) -> None:
        self.config = config
        self.store = store
        self._route = route
        # A batch request's `fallbacks` models, checked as a single call's are (extauth/fallbacks.py).
        self.fallbacks = fallbacks or FallbackCheck(config, lambda m: routing.resolve(config, m))
        self._owners: OrderedDict[tuple[ObjectKind, str], Owned] = OrderedDict()
        self._cache_size = cache_size
        default = config.provider(config.models[0].provider)
        self._default = (default.name, default.cluster)

    async def owner(self, kind: ObjectKind, object_id: str) -> Owned | None:
        key = (kind, object_id)
        hit = self._owners.get(key)
        if hit is not None:
            self._owners.move_to_end(key)
            return hit
        owned = await self.store.owner(kind, object_id)
        if owned is not None:
            self._owners[key] = owned
            if len(self._owners) > self._cache_size:
                self._owners.popitem(last=False)
        return owned

    def _files_enabled(self) -> None:
        if not self.config.files.enabled:
            raise Deny(403, "permission_error",
                       "the Files API is disabled on this gateway; an administrator can enable it "
                       "with `files: {enabled: true}` in the gateway config")

    async def _own(self, principal: Principal, kind: ObjectKind, object_id: str, what: str) -> Owned:
        owned = await self.owner(kind, object_id)
        if owned is None or owned.owner_principal_id != principal.id:
            # Same answer whether it exists or not: another principal's ids reveal nothing.
            raise Deny(404, "not_found_error", f"{what}: {object_id} not found")
        return owned

    def _cluster(self, provider: str) -> tuple[str, str]:
        return provider, self.config.provider(provider).cluster

    async def check(self, principal: Principal, m: EndpointMatch, body: Buffer, decide: DecideFn,
                    pii: ScanFn | None = None) -> ObjectFacts:
        """Decide a Batches or Files request; raises Deny, or says where it goes."""
        kind = m.endpoint.kind
        if kind == Kind.FILES:
            self._files_enabled()
        name = m.name.split(".", 1)[1]
        if name == "create":
            return await self._batch_create(principal, body, decide, pii)
        if name in ("list", "upload"):
            return ObjectFacts(*self._default)
        pname, okind = _ID_PARAM[str(kind)]
        oid = m.param(pname) or ""
        owned = await self._own(principal, okind, oid, "message_batch" if okind == ObjectKind.BATCH else "file")
        return ObjectFacts(*self._cluster(owned.provider), create_request_id=owned.create_request_id)

    async def check_file_refs(self, principal: Principal, provider: str, doc: Any, where: str) -> None:
        """Every file a Messages body (or a batch request's params) references is the caller's,
        at the provider the request goes to."""
        for fid in file_ids(doc):
            self._files_enabled()
            if not isinstance(fid, str) or not fid:
                raise Deny(400, "invalid_request_error", f"{where}file_id: Input should be a non-empty string")
            owned = await self._own(principal, ObjectKind.FILE, fid, f"{where}file")
            if owned.provider != provider:
                raise Deny(400, "invalid_request_error",
                           f"{where}file {fid} is stored at provider {owned.provider}, but this request goes "
                           f"to {provider}; upload the file where the model is served")

    async def _batch_create(self, principal: Principal, body: Buffer, decide: DecideFn,
                            pii: ScanFn | None = None) -> ObjectFacts:
        try:
            doc, text_of = json_loads_lazy(body)  # long strings stay in the body; custom_id, model, file_id are read
        except JSONDecodeError as e:
            raise Deny(400, "invalid_request_error", f"request body is not valid JSON ({e})") from None
        except Ambiguous as e:
            raise Deny(400, "invalid_request_error",
                       f"request body refused: {e}; the whole batch was refused") from None
        reqs = doc.get("requests") if isinstance(doc, dict) else None
        if not isinstance(reqs, list) or not reqs:
            raise Deny(400, "invalid_request_error",
                       "requests: a batch needs a non-empty list of {custom_id, params} objects")
        routes: dict[str, str] = {}  # provider -> the first custom_id sent there
        chosen: tuple[str, str] | None = None
        priced: list[tuple[str, int]] = []
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            label = f"batch request '{cid}'" if isinstance(cid, str) else f"batch request #{i}"
            params = r.get("params") if isinstance(r, dict) else None
            if not isinstance(params, dict):
                raise Deny(400, "invalid_request_error", f"requests.{i}.params: {label} needs a params object")
            model = params.get("model")
            if not isinstance(model, str) or not model:
                raise Deny(400, "invalid_request_error", f"requests.{i}.params.model: {label} names no model")
            if model in self.config.aliases:  # a batch's bodies go to the provider as they are: no alias step
                raise Deny(400, "invalid_request_error",
                           f"{label}: model: {model} is an alias of {self.config.aliases[model]}; a batch must name "
                           "concrete model ids; the whole batch was refused")
            route = self._route(model)
            if route is None:
                raise Deny(404, "not_found_error",
                           f"{label}: model: {model} is not served by this gateway; the whole batch was refused")
            found = pii(params, text_of) if pii is not None else None
            d = decide(principal, MESSAGES_CREATE.endpoint.method, MESSAGES_CREATE.endpoint.template, model,
                       MESSAGES_CREATE, found, params, text_of)
            if not d.allow and found:  # the policy saw personal data: its reason says whether that is why
                raise Deny(403, "permission_error",
                           f"{label} was refused: {d.reason} (locations in requests.{i}.params); "
                           "the whole batch was refused")
            if not d.allow:  # the reason names the model, the ceiling or the region that refused it
                raise Deny(d.status, DENY_STATUS[d.status], f"{label} was refused: {d.reason}; "
                           "the whole batch was refused")
            self.fallbacks.check(params, f"requests.{i}.params.{FIELD}", model, lambda m, found=found, params=params:
                                 decide(principal, MESSAGES_CREATE.endpoint.method, MESSAGES_CREATE.endpoint.template,
                                        m, MESSAGES_CREATE, found, params, text_of))
            routes.setdefault(route[0], label)
            if len(routes) > 1:
                (p1, l1), (p2, l2) = list(routes.items())[:2]
                raise Deny(400, "invalid_request_error",
                           f"this batch mixes providers ({l1} goes to {p1}, {l2} goes to {p2}); a batch is "
                           "sent to one provider, so split it into one batch per provider")
            chosen = route
            await self.check_file_refs(principal, route[0], params, f"{label}: ")
            mt = params.get("max_tokens")
            priced.append((model, mt if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0 else 0))
        assert chosen is not None
        return ObjectFacts(chosen[0], chosen[1], hits=len(reqs), batch=tuple(priced))

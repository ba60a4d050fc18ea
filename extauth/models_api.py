"""GET /v1/models and GET /v1/models/{model_id}, answered by the gateway itself.

What a caller sees is what its policy lets it use, whichever provider serves it: each model of the
catalogue (ccr/model_catalog.py) is decided by the same policy engine as a Messages call naming it
(`messages.create`, with this request's principal, source, headers and region hint and no body facts;
the global policy and every enforced policy set that applies, as for a batch's requests),
and a model the request's region binding leaves without a target is not listed either. The answer is
the Anthropic Models API's shape and pagination. It goes back as ext_authz's reply (status 200), so
nothing is forwarded to a provider.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from ccr import routing
from ccr.config import GatewayConfig
from ccr.model_catalog import Listed, catalog, page
from extauth.deny import Deny
from extauth.endpoints import BY_NAME, EndpointMatch
from extauth.policy import Decision
from extauth.policy_input import RequestFacts
from extauth.principal import Principal

_MESSAGES = EndpointMatch(BY_NAME["messages.create"])
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
DEFAULT_LIMIT, MAX_LIMIT = 20, 1000
Decide = Callable[..., Decision]


class Answer(Exception):
    """A reply the gateway gives itself (not a refusal): recorded as allowed, nothing forwarded."""

    def __init__(self, body: dict[str, object]) -> None:
        super().__init__("answered by the gateway")
        self.body = body

    def response(self) -> pb.CheckResponse:
        return pb.CheckResponse(
            # Not OK: Envoy replies with this response instead of forwarding.
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="answered by the gateway"),
            denied_response=pb.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=200),
                headers=[base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                    append_action=_OVERWRITE)],
                body=orjson.dumps(self.body).decode()))


def allowed(config: GatewayConfig, decide: Decide, principal: Principal, facts: RequestFacts) -> list[Listed]:
    """The catalogue as this caller may use it: each entry decided as a Messages call naming it
    (`decide`: PolicyEngine.decide of the global set, with every enforced policy set that applies)."""
    base = dataclasses.replace(facts, query=(), size=0, body=None, text=None, text_truncated=False)
    out = []
    for e in catalog(config):
        f = dataclasses.replace(base, model_requested=e.id if e.id != e.served else None)
        d = decide(principal, "POST", "/v1/messages", e.served, _MESSAGES, None, f)
        if not d.allow:
            continue
        # Bound to a region with no target of this model there: a call would be refused, so it is not listed.
        if routing.route(config, e.model_index, "anthropic", d.region, principal.id) is None:
            continue
        out.append(e)
    return out


def _limit(query: dict[str, tuple[str, ...]]) -> int:
    raw = query.get("limit", (str(DEFAULT_LIMIT),))[-1]
    # ASCII digits only: int() would also take "+5", " 5", "1_0" and non-ASCII digits ("５").
    n = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 4 else 0
    if not 1 <= n <= MAX_LIMIT:
        raise Deny(400, "invalid_request_error", f"limit: Input should be an integer between 1 and {MAX_LIMIT}")
    return n


def answer(config: GatewayConfig, decide: Decide, principal: Principal, endpoint: EndpointMatch,
           facts: RequestFacts) -> Answer:
    """The reply to models.list / models.get for this caller (Deny: 400 bad query, 404 not listed)."""
    models = allowed(config, decide, principal, facts)
    if endpoint.name == "models.get":
        mid = endpoint.param("model_id") or ""
        for e in models:
            if e.id == mid:
                return Answer(e.api_object())
        # A model the caller may not use is as absent as one that does not exist.
        raise Deny(404, "not_found_error", f"model: {mid}")
    query = dict(facts.query)
    limit = _limit(query)
    after = query.get("after_id", (None,))[-1]
    before = query.get("before_id", (None,))[-1]
    return Answer(page(models, limit, after, before).api_object())

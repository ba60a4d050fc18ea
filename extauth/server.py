"""The ext_authz Check handler: API key -> model -> Rego decision -> headers + metadata.

Order: the path must name a known endpoint, spelled canonically (404/400, before
anything else, like Envoy's route table), then as the real API: authenticate (401),
validate the body (400), resolve the model (404), then authorize (403). Any unexpected error
denies with 503 (fail closed); nothing here can turn an exception into an allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from ccr import routing, tracing
from ccr.config import GatewayConfig
from ccr.config_sync import on_config
from ccr.contract import (
    AUTHZ_BATCH_REQUESTS,
    AUTHZ_BUNDLE_REVISION,
    AUTHZ_DECISION_ID,
    AUTHZ_ERROR_TYPE,
    AUTHZ_GROUP_LIST,
    AUTHZ_LABELS,
    AUTHZ_MODEL_REQUESTED,
    AUTHZ_PHASE_IDENTITY,
    AUTHZ_PHASE_MD,
    AUTHZ_RATELIMIT,
    AUTHZ_REGION,
    AUTHZ_SPEND,
    AUTHZ_SPEND_WORST,
    AUTHZ_USER_ID,
    CCR_HEADER_PREFIX,
    H_BATCH_REQUESTS,
    H_CLUSTER,
    H_KEY_ID,
    H_MODEL,
    H_PRINCIPAL,
    H_PRINCIPAL_ID,
    H_PROVIDER,
    H_REGION,
    H_REGION_HINT,
    H_REQUEST_ID,
    POLICY_GLOBAL_SET,
    RL_GROUP_SEPARATOR,
    SET_HEADERS,
)
from ccr.logs import REQUEST_ID
from ccr.provider_models import from_bedrock
from ccr.provider_objects import ObjectStore
from ccr.runtime import Runtime
from extauth import fallbacks, models_api
from extauth.admission import InCheckAdmission, maybe_admission
from extauth.aliases import alias_rewrite
from extauth.bundle import BundleError
from extauth.bundle_source import BundleLoader
from extauth.capture import BodyCapture
from extauth.decision_upload import DecisionUploader
from extauth.decisions import PHASE_FULL, PHASE_IDENTITY, DecisionLog
from extauth.deny import Deny, denied
from extauth.endpoints import EndpointMatch, Kind, match, non_canonical, path_known, split_target
from extauth.identity import Identity
from extauth.keys import KeyStore
from extauth.lean_json import Ambiguous, Buffer, JSONDecodeError
from extauth.lean_json import loads_lazy as json_loads_lazy
from extauth.objects import ObjectFacts, ObjectGuard, file_ids, mentions_file
from extauth.oidc import OidcVerifier
from extauth.opa_envoy import OpaEnvoyError, apply_allowed
from extauth.pii import Finding, TextOf, scan
from extauth.policy import DENY_STATUS, Decision, PolicyEngine
from extauth.policy_admin import activation_recorder
from extauth.policy_input import InputError, RequestFacts, body_facts, request_text, source_address
from extauth.policy_input import request_facts as request_facts_of
from extauth.policy_sets import PolicySets
from extauth.principal import Principal, PrincipalKind
from extauth.sessions import session_verifier
from extauth.spend import BudgetSubjects, WorstCase
from extauth.wire import split_check
from ratelimit.service import deciders

log = logging.getLogger(__name__)

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# How long one Check may wait on a Redis call of the in-Check admission (a local Redis answers in well under
# a millisecond; Envoy's rate limit filter gave the service 2 s).
ADMISSION_REDIS_TIMEOUT_S = 0.25


def _headers(http) -> dict[str, str]:
    """Request headers, lower-cased; Envoy fills `header_map` instead when
    `encode_raw_headers` is on."""
    if http.headers:
        return http.headers  # protobuf map: dict-like, keys already lower-case
    out: dict[str, str] = {}
    for hv in http.header_map.headers:
        out[hv.key.lower()] = hv.value or hv.raw_value.decode("utf-8", "replace")
    return out


def json_object(body: Buffer) -> tuple[dict[str, Any], TextOf]:
    """A request body that must be a JSON object (it names the model). Long string values other
    than the model and file ids are left as placeholders (extauth/lean_json.py); the function
    returned with the document gives their text on demand."""
    try:
        doc, text_of = json_loads_lazy(body)
    except JSONDecodeError as e:
        raise Deny(400, "invalid_request_error",
                   f"request body is not valid JSON ({e}); send a JSON object with a 'model' field") from None
    except Ambiguous as e:
        raise Deny(400, "invalid_request_error", f"request body refused: {e}") from None
    if not isinstance(doc, dict):
        raise Deny(400, "invalid_request_error", "request body must be a JSON object with a 'model' field")
    return doc, text_of


def _as_anthropic(doc: dict[str, Any]) -> dict[str, Any]:
    """A Chat Completions body as the Messages request it becomes; a body that cannot become one
    is refused here, before policy, with the translator's reason."""
    from router.adapter.translators.base import TranslationError
    from router.adapter.translators.openai_client import to_anthropic

    try:
        return to_anthropic(doc)[0]
    except TranslationError as e:
        raise Deny(400, "invalid_request_error", str(e)) from None


def model_in(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if model is None:
        raise Deny(400, "invalid_request_error",
                   "model: Field required; name the model in the body, e.g. \"model\": \"claude-sonnet-4-5\"")
    if not isinstance(model, str) or not model:
        raise Deny(400, "invalid_request_error", "model: Input should be a non-empty string")
    return model


def endpoint_or_deny(method: str, target: str) -> EndpointMatch:
    """The endpoint a request names; anything else is refused, never guessed at.

    Envoy has already normalised the path and routed only known endpoints here; a
    non-canonical spelling reaching this point means a config or normalisation gap.
    """
    path, _ = split_target(target)
    why = non_canonical(path)
    if why is not None:
        raise Deny(400, "invalid_request_error",
                   f"path is not in canonical form ({why}); send the endpoint's exact path, e.g. /v1/messages")
    found = match(method, path)
    if found is None:
        if path_known(path):
            raise Deny(404, "not_found_error", f"{method} is not supported on {path}")
        raise Deny(404, "not_found_error", f"Not found: {method} {path} is not an endpoint this gateway serves")
    return found


# The x-ccr-* headers a successful check sets, by (credential is an API key, body names a model);
# built once, not per request.
_SET_HEADERS_FOR: dict[tuple[bool, bool], frozenset[str]] = {
    (has_key, has_model): frozenset(h for h in SET_HEADERS
                                    if (has_key or h != H_KEY_ID) and (has_model or h != H_MODEL))
    for has_key in (False, True) for has_model in (False, True)
}


_INTERNAL_ERROR = ("the gateway could not authorize this request due to an internal error; "
                   "retry shortly, and contact your gateway administrator if it persists")


def _internal_error(decision_id: str | None = None) -> pb.CheckResponse:
    return denied(503, "api_error", _with_decision(_INTERNAL_ERROR, decision_id))


def _with_decision(message: str, decision_id: str | None) -> str:
    """A denial's message naming its decision, so a client can quote it (`ccr policy why`)."""
    return f"{message} (decision {decision_id})" if decision_id else message


def with_additions(resp: pb.CheckResponse, additions: list | None) -> pb.CheckResponse:
    """A copy of an OK response with what allowing OPA-Envoy policy sets add (headers, metadata);
    a result the gateway refuses to apply (an x-ccr-* header, its own metadata keys) denies."""
    if not additions:
        return resp
    own = pb.CheckResponse()
    own.CopyFrom(resp)
    try:
        for r in additions:
            apply_allowed(own, r)
    except OpaEnvoyError as e:
        log.error("a policy set's result was refused: %s", e)
        d = Deny(503, "api_error", "the gateway could not authorize this request: a policy's result asks for "
                                   "something the gateway does not allow; contact your gateway administrator")
        d.log_reason = f"a policy set's result was refused: {e}"  # the detail is logged, not told to the client
        raise d from None
    return own


class _Seen:
    """What one Check learned before it decided or was refused: the decision log's facts."""

    __slots__ = ("alias", "bundle", "cached", "decision", "endpoint", "eval_ns", "facts", "model", "path", "pii",
                 "principal", "set_eval", "spend")

    def __init__(self) -> None:
        self.principal: Principal | None = None
        self.endpoint: EndpointMatch | None = None
        self.path: str | None = None
        self.model: str | None = None
        self.bundle = None
        self.eval_ns = -1  # policy evaluation time; -1 until the policy ran
        self.decision: Decision | None = None  # the policy's answer, once it ran
        self.cached = False  # the response is the shared cached one: copy before adding the decision id
        self.pii: tuple[Finding, ...] | None = None  # what the PII scan found (None: not scanned)
        self.facts: RequestFacts | None = None  # the rest of the policy input (extauth/policy_input.py)
        self.set_eval = None  # the policy set (extauth/policy_sets.py) that refused the request, if not the global one
        # (worst-case micro-USD, AUTHZ_SPEND or None): what to reserve (extauth/spend.py)
        self.spend: tuple[int | None, str | None] | None = None
        # An alias resolved: the per-request rewrite the upstream applies (extauth/aliases.py), else None.
        self.alias: dict[str, str] | None = None


def _batch_scan(policy: PolicyEngine):
    """The PII scan for each request of a batch create, as the policy's data asks (None: off)."""
    settings = policy.pii
    if settings is None:
        return None
    return lambda params, text_of: tuple(scan(params, settings.patterns, settings.kinds, text_of))


def _batch_decide(policy: PolicyEngine, base: RequestFacts):
    """PolicyEngine.decide for each request of a batch create: the batch's own facts (headers,
    source, region hint) with that request's params as the body (max_tokens, tools, ...; its text
    when the policy reads text). The size is the batch's."""
    def decide(principal, method, path, model, endpoint, pii, params=None, text_of: TextOf = str):
        facts = base
        if isinstance(params, dict):
            try:
                body = body_facts(params)
            except InputError as e:
                raise Deny(400, "invalid_request_error", f"batch request params: {e}") from None
            text, truncated = (request_text(params, text_of, policy.text_chars) if policy.text_chars is not None
                               else (None, False))
            facts = dataclasses.replace(base, body=body, text=text, text_truncated=truncated)
        return policy.decide(principal, method, path, model, endpoint, pii, facts)
    return decide


def _input_or_deny(fn, *args):
    try:
        return fn(*args)
    except InputError as e:
        raise Deny(400, "invalid_request_error", str(e)) from None


def _peer_certificate(req: pb.CheckRequest) -> str | None:
    """The verified client certificate (PEM) Envoy sends URL-encoded with include_peer_certificate."""
    cert = req.attributes.source.certificate
    return urllib.parse.unquote(cert) if cert else None


def _revision(seen: _Seen) -> str | None:
    """The revision of the policy bundle that decided (None before the policy ran or without one)."""
    rev = getattr(seen.bundle, "revision", None) if seen.bundle is not None else None
    return str(rev) if rev else None


def _refusal_facts(resp: pb.CheckResponse, seen: _Seen, decision_id: str | None,
                   error_type: str) -> pb.CheckResponse:
    """A refusal's dynamic metadata (Envoy emits it on denials too): what the audit row records about a
    request that never reached a provider. The principal facts only once authentication established them."""
    facts: dict[str, Any] = {AUTHZ_ERROR_TYPE: error_type}
    if decision_id is not None:
        facts[AUTHZ_DECISION_ID] = decision_id
    if (revision := _revision(seen)) is not None:
        facts[AUTHZ_BUNDLE_REVISION] = revision
    p = seen.principal
    if p is not None:
        facts.update({"principal": p.name, "principal_id": p.id, "principal_kind": str(p.kind),
                      "groups": list(p.groups)})
        for name, value in (("key_id", p.key_id), ("tenant", p.tenant), ("spiffe_id", p.spiffe_id)):
            if value is not None:
                facts[name] = value
    if seen.model is not None:
        facts["model"] = seen.model
    if seen.endpoint is not None:
        facts["endpoint"] = seen.endpoint.name
    resp.dynamic_metadata.update(facts)
    return resp


class Authorizer:
    def __init__(self, config: GatewayConfig, identity: Identity | KeyStore, policy: PolicyEngine,
                 objects: ObjectStore | None = None, decisions: DecisionLog | None = None,
                 sets: PolicySets | None = None) -> None:
        self.sets = sets if sets is not None and sets.sets else None  # policy.sets beyond the global one
        self.decisions = decisions  # None: decisions are not recorded (decision-only Authorizers in tests)
        self.identity = identity if isinstance(identity, Identity) else Identity(identity)
        self.policy = policy
        self._object_store = objects
        self.worst_case: WorstCase | None = None
        # The request-time limits and budgets when extauth decides them (limits.admission: extauth; set by setup).
        self.admission: InCheckAdmission | None = None
        # Why an answer (an allow, or a refusal before its decision id is added) could not reach Envoy as it is
        # on this transport (extauth/http_front.py: names the router does not carry, a stand-in status), or
        # None; asked before the decision is recorded, which then records the 503 the client gets instead.
        self.answer_check: Callable[[pb.CheckResponse], str | None] | None = None
        self.use_config(config)

    def use_config(self, config: GatewayConfig) -> None:
        """Serve `config` from the next check on (a new config version, ccr/config_sync.py): everything
        derived from it is rebuilt first, then one assignment makes it all current. Called on the event
        loop, between two steps of the checks; a check waiting on the policy or the database at that moment
        reads the new version after its wait (docs/config-reload.md)."""
        # Batches and Files: ownership and per-request checks. None only for decision-only
        # Authorizers in tests; the service's setup() always passes the store.
        objects = self._object_store
        fallback_check = fallbacks.FallbackCheck(config, lambda m: routing.resolve(config, m))
        guard = ObjectGuard(config, objects, self._route, fallbacks=fallback_check) if objects is not None else None
        # Budget reservations (issue 8): None when spend is off (spend is set at start).
        worst_case = WorstCase(config, self.worst_case.subjects if self.worst_case else None) \
            if config.spend.enabled else None
        resolved: dict[str, routing.Resolved | None] = {}
        # audit.bodies: None (the default) when no principal's bodies are kept.
        capture = BodyCapture.from_config(config)
        if self.admission is not None:
            self.admission.use_config(config)
        (self.config, self.objects, self._default_provider, self.worst_case, self._routes, self._clusters,
         self._model_idx, self._resolved, self._ok_cache, self.capture, self.fallbacks) = (
            config, guard, config.provider(config.models[0].provider), worst_case, {}, {}, {}, resolved, {},
            capture, fallback_check)

    def _resolve(self, model: str) -> routing.Resolved | None:
        """ccr/routing.py `resolve`, cached (fnmatch is not free); bounded: model ids come from clients."""
        try:
            return self._resolved[model]
        except KeyError:
            pass
        if len(self._resolved) >= 10_000:
            self._resolved.clear()
        got = self._resolved[model] = routing.resolve(self.config, model)
        return got

    def _route(self, model: str) -> tuple[str, str] | None:
        """(provider name, cluster) for a model id; cached because fnmatch is not free."""
        try:
            return self._routes[model]
        except KeyError:
            pass
        m = self.config.route_model(model)
        route = None
        if m is not None:
            p = self.config.provider(m.provider)
            route = (p.name, p.cluster)
        if len(self._routes) >= 10_000:
            self._routes.clear()  # model ids come from clients: keep the map bounded
        self._routes[model] = route
        return route

    def _model_cluster(self, model: str, schema: str, region: str | None, principal_id: str,
                       translatable: bool = True) -> tuple[str, str]:
        """(first provider, cluster) of the model's targets that `region` allows (ccr/routing.py); for an
        A/B split, the principal's own variant."""
        try:
            idx = self._model_idx[model]
        except KeyError:
            if len(self._model_idx) >= 10_000:
                self._model_idx.clear()  # model ids come from clients: keep the map bounded
            idx = self._model_idx[model] = routing.model_index(self.config, model)
        key = (model, schema, region, principal_id if idx is not None and self.config.models[idx].split else "",
               translatable)
        try:
            got = self._clusters[key]
        except KeyError:
            got = routing.route(self.config, idx, schema, region, principal_id, translatable) \
                if idx is not None else None
            if len(self._clusters) >= 10_000:
                self._clusters.clear()  # model ids come from clients: keep the map bounded
            self._clusters[key] = got
        if got is None:
            # Never a fallback outside the region: the request is refused before it goes anywhere.
            raise Deny(403, "permission_error",
                       f"this request is bound to region {region!r} and model {model!r} has no provider in "
                       "that region on this gateway; ask an administrator to add one")
        return got

    def _in_region(self, provider: str, region: str | None) -> None:
        """Batches and Files go to the provider that holds the object: refused when it is outside `region`."""
        if region is not None and self.config.provider(provider).region != region:
            raise Deny(403, "permission_error",
                       f"this request is bound to region {region!r} and its provider {provider!r} is not "
                       "in that region")

    async def check(self, req: pb.CheckRequest, body: Buffer | None = None) -> pb.CheckResponse:
        """Decide `req`; `body`, when given, is its raw_body (a view into the received message)."""
        REQUEST_ID.set(req.attributes.request.http.id or None)  # this call's log lines carry it (own task)
        seen = _Seen()
        try:
            resp = await self._check(req, body, seen)
        except Deny as d:
            reason = d.log_reason or d.message
            if self.answer_check is not None and (why := self.answer_check(
                    denied(d.status, d.err_type, d.message, d.headers))) is not None:
                # The client gets the 503 below, not this refusal: the log records what it gets.
                log.error("refusing with 503 a refusal this transport cannot carry: %s", why)
                did = self._record(req, seen, False, 503, f"{why} (the refusal: {reason})")
                return _refusal_facts(_internal_error(did), seen, did, "api_error")
            did = self._record(req, seen, False, d.status, reason)
            return _refusal_facts(denied(d.status, d.err_type, _with_decision(d.message, did), d.headers),
                                  seen, did, d.err_type)
        except models_api.Answer as a:
            self._record(req, seen, True, 200, seen.decision.reason if seen.decision is not None else "")
            return a.response()
        except Exception:
            log.exception("authorization failed internally; denying")
            did = self._record(req, seen, False, 503, "internal error")
            return _refusal_facts(_internal_error(did), seen, did, "api_error")
        if self.answer_check is not None and (why := self.answer_check(resp)) is not None:
            log.error("refusing an allow this transport cannot carry: %s", why)
            did = self._record(req, seen, False, 503, why)
            return _refusal_facts(_internal_error(did), seen, did, "api_error")
        did = self._record(req, seen, True, 200, seen.decision.reason if seen.decision is not None else "")
        revision = _revision(seen)
        keep_days = self.capture.retention_days(seen.principal) if self.capture is not None else None
        admission = self.admission
        if (did is not None or seen.spend is not None or revision is not None or seen.alias is not None
                or keep_days is not None or admission is not None):
            if seen.cached:  # shared by every request with these facts: the id is this request's own
                own = pb.CheckResponse()
                own.CopyFrom(resp)
                resp = own
            if did is not None:
                resp.dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value = did
            if revision is not None:
                resp.dynamic_metadata.fields[AUTHZ_BUNDLE_REVISION].string_value = revision
            if seen.alias is not None:  # per request: where this body names the model (router/alias.lua)
                for k, v in seen.alias.items():
                    resp.dynamic_metadata.fields[k].string_value = v
            if seen.spend is not None:  # per request: the worst case depends on the body
                worst, spend = seen.spend
                if worst is not None:
                    resp.dynamic_metadata.fields[AUTHZ_SPEND_WORST].number_value = worst
                if spend is not None:
                    resp.dynamic_metadata.fields[AUTHZ_SPEND].string_value = spend
            if keep_days is not None and self.capture is not None:  # audit.bodies names this principal
                self.capture.apply(resp, body if body is not None else req.attributes.request.http.raw_body,
                                   keep_days)
            if admission is not None and seen.endpoint is not None:
                # The request-time limits and budgets (limits.admission: extauth): what Envoy's rate limit
                # filters decided after an allow, decided here (extauth/admission.py).
                try:
                    resp = await admission.admit(resp, seen.endpoint.name, _headers(req.attributes.request.http))
                except Exception:
                    log.exception("rate limits could not be decided internally; denying")
                    return _refusal_facts(_internal_error(did), seen, did, "api_error")
        return resp

    def _record(self, req: pb.CheckRequest, seen: _Seen, allow: bool, status: int, reason: str,
                phase: str = PHASE_FULL) -> str | None:
        """Queue this request's decision (extauth/decisions.py); its id, or None when not recorded."""
        dl = self.decisions
        if dl is None:
            return None
        try:
            did = dl.new_id()
            http = req.attributes.request.http
            dl.record(did, _headers(http).get(H_REQUEST_ID, ""), phase, seen.principal, http.method,
                      seen.path if seen.path is not None else split_target(http.path)[0], seen.model,
                      seen.endpoint, seen.bundle, allow, status, reason, seen.eval_ns, seen.decision, seen.pii,
                      seen.facts, set_eval=seen.set_eval)
        except Exception:  # the log must never change a decision
            log.exception("could not record a decision")
            return None
        return did

    async def check_serialized(self, data: bytes) -> pb.CheckResponse:
        """Decide a CheckRequest as gRPC received it, its body never copied out of `data`."""
        try:
            req, body = split_check(data)
        except Exception:
            log.exception("unreadable CheckRequest from Envoy; denying")
            return _internal_error()
        return await self.check(req, body)

    async def _check(self, req: pb.CheckRequest, raw: Buffer | None, seen: _Seen) -> pb.CheckResponse:
        http = req.attributes.request.http
        method = http.method
        endpoint = endpoint_or_deny(method, http.path)
        seen.endpoint = endpoint
        headers = _headers(http)
        peer = req.attributes.source.principal or None  # URI SAN of a verified client certificate
        principal = await self.identity.authenticate(headers, peer, _peer_certificate(req))
        seen.principal = principal
        self._check_enabled(endpoint)

        path = seen.path = split_target(http.path)[0]
        model: str | None = None
        requested: str | None = None  # the model as the client named it (an alias, or the model itself)
        doc: dict[str, Any] | None = None  # the parsed body, when the model is named in it
        text_of: TextOf = str  # a long string of `doc` by its placeholder (extauth/lean_json.py)
        # The body as received: a view when the caller split it off the message (no copy), else
        # the message's field (one copy, as protobuf hands out bytes).
        body: Buffer = raw if raw else (http.raw_body or http.body.encode())
        if endpoint.endpoint.model_in_body or endpoint.endpoint.model_in_path:
            if endpoint.endpoint.model_in_path:  # Bedrock clients: decided on the Anthropic API's id
                model = seen.model = from_bedrock(endpoint.param("bedrock_model") or "")
                doc, text_of = json_object(body)  # an Anthropic-shaped body: scanned like one
            else:
                doc, text_of = json_object(body)
                model = seen.model = model_in(doc)
                if endpoint.endpoint.schema == "openai":
                    # Policy, PII scanning and ceilings see one shape: the Anthropic request the
                    # adapter will send (tool calls become tool_use blocks, tool messages tool_result).
                    doc = _as_anthropic(doc)
            resolved = self._resolve(model)
            if resolved is None:
                raise Deny(404, "not_found_error", f"model: {model} is not a model this gateway serves; "
                           "GET /v1/models lists the models you may use")
            requested = model
            # From here on the model is the concrete one: routed, decided, priced, limited and sent.
            model = seen.model = resolved.served
            if resolved.is_alias:
                seen.alias = alias_rewrite(endpoint, body, path, model)
            provider = self.config.provider(self.config.models[resolved.model_index].provider).name
            cluster = self.config.provider(provider).cluster_for(endpoint.endpoint.schema)
        else:
            provider, cluster = self._default_provider.name, self._default_provider.cluster

        policy = self.policy
        seen.bundle = policy.bundle
        t0 = time.perf_counter_ns()
        pii = None
        messages = doc is not None and endpoint.endpoint.kind is Kind.MESSAGES
        if policy.pii is not None and messages:
            # Scanned once, host-side; the policy decides what a finding means (policies/authz.rego, "prompt PII").
            pii = seen.pii = tuple(scan(doc, policy.pii.patterns, policy.pii.kinds, text_of))
        request_facts = seen.facts = _input_or_deny(
            request_facts_of, http.path, headers, http.host, source_address(req.attributes), peer, len(body),
            doc if messages else None, text_of, policy.text_chars)
        if requested is not None and requested != model:
            request_facts = seen.facts = dataclasses.replace(request_facts, model_requested=requested)
        decision = policy.decide(principal, method, path, model, endpoint, pii, request_facts)
        seen.eval_ns = time.perf_counter_ns() - t0
        seen.decision = decision
        if pii:  # kinds and locations only, never the values
            log.info("pii %s (%s): %s; policy %s", principal.name, seen.path,
                     ", ".join(f"{f.kind} at {f.location}" for f in pii), "allowed" if decision.allow else "denied")
        additions = None
        if self.sets is not None:  # shadow sets see every request the policy sees; enforced ones must allow too
            additions = self.sets.check(req, raw, seen, method, headers.get(H_REQUEST_ID, ""), doc, text_of,
                                        decision.allow, self.decisions)
            decision = seen.decision  # with what allowing ccr-mode sets add (headers, labels, region)
        if not decision.allow:
            raise Deny(decision.status, DENY_STATUS[decision.status], decision.reason or "denied by policy")
        if endpoint.endpoint.kind is Kind.MODELS:  # the gateway's own catalogue, as this caller's policy allows
            decide = policy.decide if self.sets is None else self.sets.batch_decide(principal, policy.decide)
            raise models_api.answer(self.config, decide, principal, endpoint, request_facts)
        if doc is not None and messages and fallbacks.FIELD in doc:
            # Models the provider may answer with instead (extauth/fallbacks.py): each decided as if named here.
            # (A body giving `fallbacks`, or an entry's `model`, twice never parsed: extauth/lean_json.py.)
            decide = self._decide_each(policy, principal, request_facts)
            self.fallbacks.check(doc, fallbacks.FIELD, model,  # type: ignore[arg-type]  # (named in the body)
                                 lambda m: decide(principal, method, path, m, endpoint, pii))
        facts = await self._objects(principal, endpoint, doc, body, provider, request_facts)
        if self.worst_case is not None:
            seen.spend = self.worst_case.facts(principal, endpoint.name, model, doc, len(body), facts)
        del doc, body  # nothing below reads the body: let a large one go before the response is built
        if model is not None and facts is None:
            # The failover chain (and, for a request bound to a region, only that region's targets).
            # count_tokens has no translation: never a chain whose last target needs one (ccr/routing.py route).
            provider, cluster = self._model_cluster(model, endpoint.endpoint.schema, decision.region, principal.id,
                                                    endpoint.name != "messages.count_tokens")
        if facts is not None:
            provider, cluster = facts.provider, facts.cluster
            self._in_region(provider, decision.region)
        if endpoint.endpoint.kind in (Kind.BATCHES, Kind.FILES):
            cluster = self.config.provider(provider).objects_cluster

        # Client-sent x-ccr-* we do not overwrite below must go (setting overwrites the rest), and
        # the region hint is the gateway's, not the provider's.
        keep = _SET_HEADERS_FOR[principal.key_id is not None, model is not None]
        if decision.region is not None:
            keep = keep | {H_REGION}
        spoofed = tuple(h for h in headers if (h.startswith(CCR_HEADER_PREFIX) and h not in keep) or h == H_REGION_HINT)
        # GenAI attributes on this Check's span (ccr/rpc_observe.py), for a cached answer too; an
        # unsampled call (most of them) has no recording span and builds nothing.
        if tracing.TRACER is not None and (span := tracing.recording_span()) is not None:
            attrs = {tracing.GEN_AI_REQUEST_MODEL: model, "ccr.endpoint": endpoint.name,
                     tracing.GEN_AI_SYSTEM: tracing.gen_ai_system(self.config, provider)}
            span.set_attributes({k: v for k, v in attrs.items() if v is not None})
        if facts is not None:  # per-object answers are not cached
            return with_additions(self._ok(principal, model, provider, cluster, spoofed, endpoint.name, facts,
                                           decision, requested), additions)
        ck = (principal, model, requested, provider, spoofed, endpoint.name, policy.bundle.digest, decision)
        resp = self._ok_cache.get(ck)
        seen.cached = True
        if resp is None:
            resp = self._ok(principal, model, provider, cluster, spoofed, endpoint.name, None, decision, requested)
            if len(self._ok_cache) >= 50_000:
                self._ok_cache.clear()
            self._ok_cache[ck] = resp
        if additions:
            seen.cached = False
            resp = with_additions(resp, additions)
        return resp

    async def _objects(self, principal: Principal, m: EndpointMatch, doc: dict[str, Any] | None, body: Buffer,
                       provider: str, request_facts: RequestFacts) -> ObjectFacts | None:
        """Batches and Files checks (extauth/objects.py); file references in a Messages body
        (`doc`, already parsed by the caller from `body`)."""
        if doc is not None:
            if not mentions_file(body):
                return None
            if self.objects is not None:
                await self.objects.check_file_refs(principal, provider, doc, "")
            elif any(True for _ in file_ids(doc)):
                raise Deny(403, "permission_error", "file references need the gateway's object store")
            return None
        if m.endpoint.kind not in (Kind.BATCHES, Kind.FILES):
            return None
        if self.objects is None:
            return None  # decision-only Authorizer (tests): setup() always passes the store
        policy = self.policy
        return await self.objects.check(principal, m, body, self._decide_each(policy, principal, request_facts),
                                        _batch_scan(policy))

    def _decide_each(self, policy: PolicyEngine, principal: Principal, request_facts: RequestFacts
                     ) -> Callable[..., Decision]:
        """A decide function for a request this check stands for (a batch's requests, a fallback model): the
        global policy, then every enforced ccr-mode set that applies to the principal, with this check's facts."""
        decide = _batch_decide(policy, request_facts)
        if self.sets is not None:
            decide = self.sets.batch_decide(principal, decide, lambda engine: _batch_decide(engine, request_facts))
        return decide

    def _check_enabled(self, endpoint: EndpointMatch) -> None:
        """Endpoint families the config keeps off are refused for everyone."""
        if endpoint.endpoint.kind is Kind.FILES and not self.config.files.enabled:
            raise Deny(403, "permission_error",
                       "the Files API is disabled on this gateway; an administrator can enable it "
                       "with `files: {enabled: true}` in the gateway config")

    def _ok(
        self, p: Principal, model: str | None, provider: str, cluster: str, remove: tuple[str, ...],
        endpoint: str | None = None, obj: ObjectFacts | None = None, decision: Decision | None = None,
        requested: str | None = None,
    ) -> pb.CheckResponse:
        # The policy's headers first: the gateway's own below can never be replaced by them
        # (parse_result refuses x-ccr-* anyway).
        values = list(decision.headers) if decision is not None else []
        values += [(H_PRINCIPAL_ID, p.id), (H_PRINCIPAL, p.name)]
        if p.key_id is not None:
            values.append((H_KEY_ID, p.key_id))
        if model is not None:
            values.append((H_MODEL, model))
        values += [(H_PROVIDER, provider), (H_CLUSTER, cluster)]
        if obj is not None and obj.hits != 1:
            values.append((H_BATCH_REQUESTS, str(obj.hits)))
        if decision is not None and decision.region is not None:
            values.append((H_REGION, decision.region))
        facts: dict = {"principal": p.name, "principal_id": p.id, "principal_kind": str(p.kind),
                       "groups": list(p.groups)}
        if p.key_id is not None:
            facts["key_id"] = p.key_id
        if p.kind is PrincipalKind.USER:
            facts[AUTHZ_USER_ID] = p.id
        if p.groups:
            facts[AUTHZ_GROUP_LIST] = RL_GROUP_SEPARATOR.join(p.groups)
        if p.tenant is not None:
            facts["tenant"] = p.tenant
        if p.owner is not None:
            facts["owner"] = p.owner
        if p.spiffe_id is not None:
            facts["spiffe_id"] = p.spiffe_id
        if model is not None:  # absent (not "") on model-less paths such as GET /v1/models
            facts["model"] = model  # the concrete model served (an alias resolved)
            facts[AUTHZ_MODEL_REQUESTED] = requested or model  # as the client named it
        if endpoint is not None:
            facts["endpoint"] = endpoint
        facts.update({
            "provider": provider,
            "cluster": cluster,
            "rpm": {
                "requests_per_unit": p.rpm or self.config.limits.requests_per_minute,
                "unit": "MINUTE",
            },
        })
        if obj is not None:
            # A batch costs one rate-limit hit per request (the batch-create route's hits_addend).
            facts[AUTHZ_BATCH_REQUESTS] = obj.hits
        if decision is not None:  # what the policy's result asks later filters to know
            if decision.region is not None:
                facts[AUTHZ_REGION] = decision.region
            if decision.labels:
                facts[AUTHZ_LABELS] = dict(decision.labels)
            if decision.ratelimit:
                facts[AUTHZ_RATELIMIT] = dict(decision.ratelimit)
        meta = struct_pb2.Struct()
        meta.update(facts)
        return pb.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=pb.OkHttpResponse(
                headers=[
                    base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v),
                                               append_action=_OVERWRITE)
                    for k, v in values
                ],
                headers_to_remove=list(remove),
            ),
            dynamic_metadata=meta,
        )


_IDENTITY_OK = pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


async def check_identity(authorizer: Authorizer, req: pb.CheckRequest) -> pb.CheckResponse:
    """The headers-only check Envoy makes before buffering a large body: is the caller known?

    Sets nothing: the full check that follows, with the body, decides and sets every fact.
    Recorded in the decision log only when it refuses (phase `identity`): a pass is not the
    request's decision, the full check's is, so each request still has exactly one row.
    """
    seen = _Seen()
    try:
        http = req.attributes.request.http
        await authorizer.identity.authenticate(_headers(http), req.attributes.source.principal or None)
        return _IDENTITY_OK
    except Deny as d:
        did = authorizer._record(req, seen, False, d.status, d.message, PHASE_IDENTITY)
        return _refusal_facts(denied(d.status, d.err_type, _with_decision(d.message, did)), seen, did, d.err_type)
    except Exception:
        log.exception("identity check failed internally; denying")
        did = authorizer._record(req, seen, False, 503, "internal error", PHASE_IDENTITY)
        return _refusal_facts(denied(503, "api_error", _with_decision(
            "the gateway could not authenticate this request due to an internal error; retry shortly, and "
            "contact your gateway administrator if it persists", did)), seen, did, "api_error")


def _is_identity_phase(context: grpc.aio.ServicerContext) -> bool:
    return any(k == AUTHZ_PHASE_MD and v == AUTHZ_PHASE_IDENTITY for k, v in context.invocation_metadata() or ())


class AuthorizationServicer:
    """envoy.service.auth.v3.Authorization/Check on the message as received (bytes): the body of a
    large request is read in place, never parsed into the protobuf message (extauth/wire.py)."""

    SERVICE = "envoy.service.auth.v3.Authorization"

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def Check(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.CheckResponse:  # noqa: N802
        if _is_identity_phase(context):
            return await check_identity(self.authorizer, pb.CheckRequest.FromString(request))
        return await self.authorizer.check_serialized(request)

    def add_to(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.Check, request_deserializer=None,  # bytes: see split_check
            response_serializer=pb.CheckResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.SERVICE, {"Check": handler}),))


# -- start-up -----------------------------------------------------------------


def decision_log(config: GatewayConfig, runtime: Runtime) -> DecisionLog:
    """The decision log `policy.decision_log` asks for; a relative file is relative to the config file."""
    s = config.policy.decision_log
    file = None
    if s.file:
        file = Path(s.file)
        if not file.is_absolute():
            file = Path(runtime.config_path).resolve().parent / file
    http = None
    if s.http is not None:
        h = s.http
        base = Path(runtime.config_path).resolve().parent
        token = None
        if h.token_file:
            try:
                token = (base / h.token_file).read_text().strip()
            except OSError as e:
                raise SystemExit(f"extauth: cannot read policy.decision_log.http.token_file {h.token_file}: "
                                 f"{e.strerror}") from None
        http = DecisionUploader(h.url.rstrip("/") + h.resource, token=token,
                                ca_file=base / h.ca_file if h.ca_file else None, timeout_s=h.timeout_s,
                                interval_s=h.upload_interval_s, batch_bytes=h.batch_bytes,
                                buffer_bytes=h.buffer_bytes, retry_min_s=h.retry_min_s, retry_max_s=h.retry_max_s)
    return DecisionLog(runtime.postgres_dsn if s.postgres else None, file=file, include_input=s.include_input,
                       include_text=s.include_text, text_queue_chars=s.text_queue_chars,
                       entrypoint=config.policy.entrypoint, queue_size=s.queue_size, batch_rows=s.batch_rows,
                       flush_ms=s.flush_ms, http=http)


async def setup(server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime):
    try:
        loader, poll_interval = BundleLoader.from_config(config, runtime)
        # One status file and one set of metrics for the global set and those of policy.sets.
        sets = PolicySets.from_config(config, runtime, loader)
        # Every bundle revision that goes live is recorded in the admin chain first (extauth/policy_admin.py).
        for name, each in ((POLICY_GLOBAL_SET, loader), *((s.name, s.loader) for s in sets.sets)):
            each.before_live = activation_recorder(runtime.postgres_dsn, name)
        policy = await loader.load_initial()
        await sets.load_initial()
    except BundleError as e:
        raise SystemExit(f"extauth: {e}") from None
    if policy.host_builtins:
        log.warning("policy needs host builtins %s (slower); prefer WASM-native ones",
                    sorted(policy.host_builtins))
    keys = KeyStore(runtime.postgres_dsn)
    await keys.start()
    objects = ObjectStore(runtime.postgres_dsn)
    # Session tokens first: they are recognised by their `typ` alone, before any IdP verifier.
    sessions = await session_verifier(config, runtime)
    verifiers: list = [sessions] if sessions is not None else []
    oidc = OidcVerifier(config.identity.oidc) if config.identity.oidc else None
    if oidc is not None:
        await oidc.start()  # first JWKS fetch; an unreachable IdP is retried on demand, not fatal
        verifiers.append(oidc)
    decisions = decision_log(config, runtime)
    await decisions.start()
    authorizer = Authorizer(config, Identity(keys, verifiers, spiffe=config.identity.spiffe), policy, objects,
                            decisions, sets)
    budget_subjects = None
    if authorizer.worst_case is not None:  # spend (issue 8): reserve only where a budget may apply
        budget_subjects = BudgetSubjects(runtime.postgres_dsn, config.spend.refresh_s)
        await budget_subjects.start()
        authorizer.worst_case.subjects = budget_subjects
    # limits.admission: extauth: the rate limit service's deciders, in this process (extauth/admission.py).
    # The limits' Redis calls are awaited on the loop (on_loop); a hung Redis fails the calls waiting on it after
    # ADMISSION_REDIS_TIMEOUT_S, then calls fail at once for STALL_HOLD_S (ratelimit/redis_pipe.py) and the
    # limits' on_redis_down applies, as for a store that refuses connections.
    authorizer.admission = maybe_admission(config, lambda: deciders(
        config, runtime, connections=2, gauges=False, redis_timeout_s=ADMISSION_REDIS_TIMEOUT_S, on_loop=True))
    AuthorizationServicer(authorizer).add_to(server)
    on_config(authorizer.use_config)  # new config versions (ccr/config_sync.py)
    if config.services.authz_transport == "http":  # Envoy's checks come over HTTP/1.1 (docs/hot-path.md)
        from ccr.service import add_listener
        from extauth.http_front import AuthzHttpFront

        front = AuthzHttpFront(authorizer, config)
        on_config(front.use_config)
        add_listener(front)
    loader.holder = authorizer  # new good bundles rebind authorizer.policy (see extauth/bundle_source.py)
    watcher = asyncio.create_task(loader.run(poll_interval), name="bundle-watch")
    sets.start()
    log.info("policy from %s (revision %r, sha256 %s), entrypoint %s", loader.source.describe,
             policy.bundle.revision, policy.bundle.digest[:12], config.policy.entrypoint)

    async def cleanup() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await loader.close()
        await sets.close()
        await keys.close()
        if sessions is not None:
            await sessions.status.close()
        if oidc is not None:
            await oidc.close()
        await objects.close()
        if budget_subjects is not None:
            await budget_subjects.close()
        await decisions.close()  # flushes the queued decisions
        if authorizer.admission is not None:
            authorizer.admission.parts.close()
        authorizer.policy.close()

    return cleanup

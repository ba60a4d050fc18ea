"""The ext_authz Check handler: API key -> model -> Rego decision -> headers + metadata.

Order matches the real API: authenticate first (401), then validate the body
(400), then resolve the model (404), then authorize (403). Any unexpected error
denies with 503 (fail closed); nothing here can turn an exception into an allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from ccr.config import GatewayConfig
from ccr.errors import error_body
from ccr.runtime import Runtime
from extauth.bundle import BundleError, build_bundle, read_bundle
from extauth.keys import KeyRecord, KeyStore
from extauth.policy import PolicyEngine

log = logging.getLogger(__name__)

MODEL_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
CCR_PREFIX = "x-ccr-"
SET_HEADERS = ("x-ccr-key-id", "x-ccr-principal", "x-ccr-model", "x-ccr-provider", "x-ccr-cluster")
_SET_WITHOUT_MODEL = tuple(h for h in SET_HEADERS if h != "x-ccr-model")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_GRPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    503: code_pb2.UNAVAILABLE,
}

MISSING_KEY = (
    "missing API key: send your gateway key in the x-api-key header "
    "or as 'Authorization: Bearer <key>'"
)
INVALID_KEY = (
    "invalid API key: the key is unknown or has been revoked; "
    "check it or ask your gateway administrator for a new one (`ccr keys create`)"
)


class Deny(Exception):
    def __init__(self, status: int, err_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message


def denied(status: int, err_type: str, message: str) -> pb.CheckResponse:
    return pb.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(status, code_pb2.PERMISSION_DENIED), message=message),
        denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                    append_action=_OVERWRITE,
                )
            ],
            body=error_body(err_type, message).decode(),
        ),
    )


def _headers(http) -> dict[str, str]:
    """Request headers, lower-cased; Envoy fills `header_map` instead when
    `encode_raw_headers` is on."""
    if http.headers:
        return http.headers  # protobuf map: dict-like, keys already lower-case
    out: dict[str, str] = {}
    for hv in http.header_map.headers:
        out[hv.key.lower()] = hv.value or hv.raw_value.decode("utf-8", "replace")
    return out


def api_key_from(headers) -> str | None:
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    auth = headers.get("authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def model_from_body(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Deny(400, "invalid_request_error",
                   f"request body is not valid JSON ({e}); send a JSON object with a 'model' field") from None
    if not isinstance(doc, dict):
        raise Deny(400, "invalid_request_error", "request body must be a JSON object with a 'model' field")
    model = doc.get("model")
    if model is None:
        raise Deny(400, "invalid_request_error",
                   "model: Field required; name the model in the body, e.g. \"model\": \"claude-sonnet-4-5\"")
    if not isinstance(model, str) or not model:
        raise Deny(400, "invalid_request_error", "model: Input should be a non-empty string")
    return model


class Authorizer:
    def __init__(self, config: GatewayConfig, keys: KeyStore, policy: PolicyEngine) -> None:
        self.config = config
        self.keys = keys
        self.policy = policy
        self._default_provider = config.provider(config.models[0].provider)
        self._routes: dict[str, tuple[str, str] | None] = {}
        self._ok_cache: dict[tuple, pb.CheckResponse] = {}

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

    async def check(self, req: pb.CheckRequest) -> pb.CheckResponse:
        try:
            return await self._check(req)
        except Deny as d:
            return denied(d.status, d.err_type, d.message)
        except Exception:
            log.exception("authorization failed internally; denying")
            return denied(503, "api_error",
                          "the gateway could not authorize this request due to an internal error; "
                          "retry shortly, and contact your gateway administrator if it persists")

    async def _check(self, req: pb.CheckRequest) -> pb.CheckResponse:
        http = req.attributes.request.http
        headers = _headers(http)
        key = api_key_from(headers)
        if key is None:
            raise Deny(401, "authentication_error", MISSING_KEY)
        rec = await self.keys.lookup(key)
        if rec is None:
            raise Deny(401, "authentication_error", INVALID_KEY)

        method = http.method
        path = http.path.partition("?")[0]
        model: str | None = None
        if method == "POST" and path in MODEL_PATHS:
            body = http.raw_body or http.body.encode()
            model = model_from_body(body)
            route = self._route(model)
            if route is None:
                raise Deny(404, "not_found_error", f"model: {model}")
            provider, cluster = route
        else:
            provider, cluster = self._default_provider.name, self._default_provider.cluster

        decision = self.policy.decide(rec.id, rec.name, rec.groups, method, path, model)
        if not decision.allow:
            raise Deny(403, "permission_error", decision.reason or "denied by policy")

        # Client-sent x-ccr-* we do not overwrite below must go (setting overwrites the rest).
        keep = SET_HEADERS if model is not None else _SET_WITHOUT_MODEL
        spoofed = tuple(h for h in headers if h.startswith(CCR_PREFIX) and h not in keep)
        ck = (rec, model, provider, spoofed, self.policy.bundle.digest)
        resp = self._ok_cache.get(ck)
        if resp is None:
            resp = self._ok(rec, model, provider, cluster, spoofed)
            if len(self._ok_cache) >= 50_000:
                self._ok_cache.clear()
            self._ok_cache[ck] = resp
        return resp

    def _ok(
        self, rec: KeyRecord, model: str | None, provider: str, cluster: str, remove: tuple[str, ...]
    ) -> pb.CheckResponse:
        values = [("x-ccr-key-id", rec.id), ("x-ccr-principal", rec.name)]
        if model is not None:
            values.append(("x-ccr-model", model))
        values += [("x-ccr-provider", provider), ("x-ccr-cluster", cluster)]
        facts: dict = {"key_id": rec.id, "principal": rec.name}
        if model is not None:  # absent (not "") on model-less paths such as GET /v1/models
            facts["model"] = model
        facts.update({
            "provider": provider,
            "cluster": cluster,
            "rpm": {
                "requests_per_unit": rec.rpm or self.config.limits.requests_per_minute,
                "unit": "MINUTE",
            },
        })
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


class AuthorizationServicer(pb_grpc.AuthorizationServicer):
    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:  # noqa: N802
        return await self.authorizer.check(request)


# -- start-up -----------------------------------------------------------------


def resolve_bundle(config: GatewayConfig, runtime: Runtime) -> Path:
    """The runtime's bundle, or one built now from `policy.dir` (relative to the
    config file) into the run directory."""
    if runtime.policy_bundle:
        return Path(runtime.policy_bundle)
    pdir = Path(config.policy.dir)
    if not pdir.is_absolute():
        pdir = Path(runtime.config_path).resolve().parent / pdir
    return build_bundle(pdir, Path(runtime.run_dir) / "policy.tar.gz", config.policy.entrypoint)


async def watch_bundle(authorizer: Authorizer, path: Path, interval_s: float = 2.0) -> None:
    """Swap in a rebuilt bundle without a restart; a bad bundle keeps the old policy."""
    def stamp() -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    last = stamp()
    while True:
        await asyncio.sleep(interval_s)
        now = stamp()
        if now is None or now == last:
            continue
        last = now
        try:
            bundle = read_bundle(path)
            if bundle.digest == authorizer.policy.bundle.digest:
                continue
            engine = PolicyEngine(bundle, authorizer.config.policy.entrypoint)
        except Exception as e:
            log.error("new policy bundle %s rejected, keeping the current one: %s", path, e)
            continue
        old, authorizer.policy = authorizer.policy, engine
        old.close()
        log.info("policy bundle reloaded: %s (sha256 %s)", path, bundle.digest[:12])


async def setup(server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime):
    bundle_path = resolve_bundle(config, runtime)
    try:
        policy = PolicyEngine.load(bundle_path, config.policy.entrypoint)
    except BundleError as e:
        raise SystemExit(f"extauth: {e}") from None
    if policy.host_builtins:
        log.warning("policy needs host builtins %s (slower); prefer WASM-native ones",
                    sorted(policy.host_builtins))
    keys = KeyStore(runtime.postgres_dsn)
    await keys.start()
    authorizer = Authorizer(config, keys, policy)
    pb_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(authorizer), server)
    watcher = asyncio.create_task(watch_bundle(authorizer, bundle_path), name="bundle-watch")
    log.info("policy %s (sha256 %s), entrypoint %s", bundle_path, policy.bundle.digest[:12],
             config.policy.entrypoint)

    async def cleanup() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await keys.close()
        authorizer.policy.close()

    return cleanup

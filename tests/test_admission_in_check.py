"""extauth's in-Check admission (extauth/admission.py) on real Redis: the ext_authz reply it makes of the
rate limit service's own decision, and the store down failing closed or open per limit."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from ccr.config import GatewayConfig, parse_config
from ccr.contract import AUTHZ_ERROR_TYPE, AUTHZ_RATELIMIT_OUTCOME, H_PRINCIPAL_ID
from ccr.procs import free_port
from ccr.runtime import Runtime
from extauth.admission import UNAVAILABLE, InCheckAdmission
from ratelimit.service import Deciders, deciders

REPO = Path(__file__).resolve().parent.parent


def _config(allow: bool = False, **limits: Any) -> GatewayConfig:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    doc["limits"] = limits
    doc["spend"] = {"enabled": False}
    if allow:
        doc.setdefault("services", {}).update(failure_mode_allow=True,
                                              i_understand_unauthenticated_traffic_reaches_providers=True)
    return parse_config(doc)


class LoopAdmission:
    """The admission and the one event loop its Redis connection lives on; `admit` runs a call to its end."""

    def __init__(self, parts: Deciders, cfg: GatewayConfig) -> None:
        self.runner = asyncio.Runner()
        self.inner = InCheckAdmission(parts, cfg)

    def admit(self, resp: pb.CheckResponse, endpoint: str, headers: dict[str, str]) -> pb.CheckResponse:
        return self.runner.run(self.inner.admit(resp, endpoint, headers))


@pytest.fixture
def admission(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Iterator[LoopAdmission]:
    cfg, url = request.param if hasattr(request, "param") else (_config(), redis_url)
    if url is None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: the store is down
    rt = Runtime(config_path=str(tmp_path / "ccr.yaml"), run_dir=str(tmp_path), postgres_dsn="postgresql://unused",
                 redis_url=url)
    parts = deciders(cfg, rt, connections=1, gauges=False, on_loop=True)
    adm = LoopAdmission(parts, cfg)
    try:
        yield adm
    finally:
        adm.runner.run(_close(parts))
        adm.runner.close()


async def _close(parts: Deciders) -> None:
    parts.close()


def _allowed(principal: str, rpm: int) -> pb.CheckResponse:
    meta = struct_pb2.Struct()
    meta.update({"principal": "p", "principal_id": principal, "key_id": principal, "model": "claude-x",
                 "rpm": {"requests_per_unit": rpm, "unit": "MINUTE"}})
    return pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), dynamic_metadata=meta,
                            ok_response=pb.OkHttpResponse(headers=[base_pb2.HeaderValueOption(
                                header=base_pb2.HeaderValue(key=H_PRINCIPAL_ID, value=principal))]))


def _headers(resp: pb.CheckResponse) -> dict[str, str]:
    opts = resp.ok_response.response_headers_to_add if resp.HasField("ok_response") else resp.denied_response.headers
    return {h.header.key: h.header.value for h in opts}


def test_allowed_then_refused_as_envoys_rate_limit_filter_would(admission: LoopAdmission) -> None:
    who = f"key_{uuid.uuid4().hex[:8]}"
    for left in (1, 0):
        resp = admission.admit(_allowed(who, 2), "messages.create", {"x-request-id": "r"})
        assert resp.HasField("ok_response")
        h = _headers(resp)
        assert (h["x-ratelimit-limit"], h["x-ratelimit-remaining"]) == ("2, 2;w=60", str(left))
        assert h["anthropic-ratelimit-requests-limit"] == "2" and 1 <= int(h["x-ratelimit-reset"]) <= 60
    refused = admission.admit(_allowed(who, 2), "messages.create", {"x-request-id": "r"})
    assert refused.denied_response.status.code == 429
    body = json.loads(refused.denied_response.body)
    assert body["error"]["type"] == "rate_limit_error" and f"principal {who}" in body["error"]["message"]
    h = _headers(refused)
    assert h["x-envoy-ratelimited"] == "true" and h["content-type"] == "application/json"
    assert h["x-ratelimit-remaining"] == "0" and int(h["retry-after"]) >= 1
    md = refused.dynamic_metadata.fields
    assert md[AUTHZ_RATELIMIT_OUTCOME].string_value == "over_limit"
    assert md[AUTHZ_ERROR_TYPE].string_value == "rate_limit_error" and md["principal_id"].string_value == who


@pytest.mark.parametrize("admission", [(_config(), None)], indirect=True)
def test_store_down_fails_closed_by_default(admission: LoopAdmission) -> None:
    resp = admission.admit(_allowed("key_a", 5), "messages.create", {})
    assert resp.denied_response.status.code == 503
    assert json.loads(resp.denied_response.body)["error"] == {"type": "api_error", "message": UNAVAILABLE}
    assert resp.dynamic_metadata.fields[AUTHZ_RATELIMIT_OUTCOME].string_value == "error"


@pytest.mark.parametrize("admission", [(_config(on_redis_down="open"), None)], indirect=True)
def test_store_down_admits_uncounted_when_every_limit_fails_open(admission: LoopAdmission) -> None:
    resp = admission.admit(_allowed("key_a", 5), "messages.create", {})
    assert resp.HasField("ok_response") and not resp.HasField("denied_response")
    assert AUTHZ_RATELIMIT_OUTCOME not in resp.dynamic_metadata.fields


@pytest.mark.parametrize("admission", [(_config(on_redis_down="open", rules=[
    {"name": "strict", "per": "key", "amount": 5, "on_redis_down": "closed"}]), None)], indirect=True)
def test_store_down_a_fail_closed_rule_still_refuses(admission: LoopAdmission) -> None:
    assert admission.admit(_allowed("key_a", 5), "messages.create", {}).denied_response.status.code == 503


@pytest.mark.parametrize("admission", [(_config(allow=True), None)], indirect=True)
def test_store_down_with_failure_mode_allow_admits_as_envoys_filter_then_does(admission: LoopAdmission) -> None:
    resp = admission.admit(_allowed("key_a", 5), "messages.create", {})
    assert resp.HasField("ok_response") and not resp.HasField("denied_response")


def test_a_hung_store_holds_only_the_checks_waiting_on_it_not_the_loop(tmp_path: Path) -> None:
    """The admission awaits Redis: while a store that accepts but never answers holds one Check, the event
    loop keeps serving everything else (identity checks, other Checks' work); then that Check fails closed."""
    import socket

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # the kernel completes connections; nothing ever reads or replies
    cfg = _config()
    rt = Runtime(config_path=str(tmp_path / "ccr.yaml"), run_dir=str(tmp_path), postgres_dsn="postgresql://unused",
                 redis_url=f"redis://127.0.0.1:{hung.getsockname()[1]}/0")
    parts = deciders(cfg, rt, connections=1, gauges=False, redis_timeout_s=0.2, on_loop=True)
    adm = InCheckAdmission(parts, cfg)

    async def go() -> None:
        waiting = asyncio.ensure_future(adm.admit(_allowed("key_a", 5), "messages.create", {}))
        other_work = 0
        while not waiting.done():  # the loop turns while the Check waits: other work runs meanwhile
            other_work += 1
            await asyncio.sleep(0)
        assert other_work > 100
        resp = waiting.result()
        assert resp.denied_response.status.code == 503  # fail closed, as for a store that refuses connections
        parts.close()

    try:
        asyncio.run(go())
    finally:
        hung.close()


def test_a_store_answering_nonsense_never_admits(tmp_path: Path) -> None:
    """Something on the Redis port that answers every command with a string: the decision raises (the Check then
    refuses with 503: Authorizer.check) instead of reading the nonsense as an allow."""

    async def go() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(65536):
                writer.write(b"$2\r\nhi\r\n" * 8)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        cfg = _config()
        rt = Runtime(config_path=str(tmp_path / "ccr.yaml"), run_dir=str(tmp_path), postgres_dsn="postgresql://unused",
                     redis_url=f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0")
        parts = deciders(cfg, rt, connections=1, gauges=False, redis_timeout_s=2, on_loop=True)
        try:
            with pytest.raises(Exception) as e:
                await InCheckAdmission(parts, cfg).admit(_allowed("key_a", 5), "messages.create", {})
            assert isinstance(e.value, (IndexError, ValueError, TypeError)), repr(e.value)  # the reply, unreadable
        finally:
            parts.close()
            server.close()

    asyncio.run(go())

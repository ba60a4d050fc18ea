"""A token limit can be charged at stream end from natively metered usage.

Envoy's rate limit filter, with `apply_on_stream_done` and `hits_addend` read from
USAGE_NS, charges the output tokens that router/meter.lua (an upstream Lua filter)
read from the reply. Real Envoy, the real Anthropic emulator and the real meter; the
rate limit service is a recording stub, since what is checked is what Envoy sends it.
"""

from __future__ import annotations

import json
import queue
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ccr.contract import USAGE_NS
from ccr.procs import Child, free_port, spawn, wait_ready_file, wait_until
from ccr.supervisor import envoy_binary
from router.resources import METER_LUA, T

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-ant-stream-done-test"


class RecordingRls(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self) -> None:
        self.calls: queue.Queue[rls_pb2.RateLimitRequest] = queue.Queue()

    def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest, context: grpc.ServicerContext  # noqa: N802
                        ) -> rls_pb2.RateLimitResponse:
        self.calls.put(request)
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


def _cluster(name: str, port: int, h2: bool, filters: list[dict[str, object]] | None = None) -> dict[str, object]:
    protocol = "http2_protocol_options" if h2 else "http_protocol_options"
    opts: dict[str, object] = {"@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                               "explicit_http_config": {protocol: {}}}
    if filters:
        opts["http_filters"] = filters
    return {"name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": opts}}


def _bootstrap(listen: int, emulator: int, rls: int) -> dict[str, object]:
    meter = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": METER_LUA.read_text()}}}
    # The meter removes client credentials; the provider's key goes on after it.
    credential = {"name": "envoy.filters.http.header_mutation", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"append": {"header": {"key": "x-api-key", "value": KEY},
                                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]}}}
    codec = {"name": "envoy.filters.http.upstream_codec", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}
    # Envoy applies hits_addend only to the filter's own rate limits (RateLimitPerRoute), not to
    # the route's list (router/object_routes.py says the same for batches).
    route = {"match": {"prefix": "/"}, "route": {"cluster": "provider"}, "typed_per_filter_config": {
        "envoy.filters.http.ratelimit": {
            "@type": T + "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute",
            "rate_limits": [{
                "actions": [{"generic_key": {"descriptor_value": "output_tokens"}}],
                "apply_on_stream_done": True,
                "hits_addend": {"format": f"%DYNAMIC_METADATA({USAGE_NS}:output_tokens)%"},
            }]}}}
    hcm = {"@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "t", "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"],
                                                                   "routes": [route]}]},
           "http_filters": [
               {"name": "envoy.filters.http.ratelimit", "typed_config": {
                   "@type": T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                   "domain": "ccr", "failure_mode_deny": True,
                   "rate_limit_service": {"transport_api_version": "V3",
                                          "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}}}}},
               {"name": "envoy.filters.http.router", "typed_config": {
                   "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}]}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [_cluster("provider", emulator, False, [meter, credential, codec]), _cluster("rls", rls, True)],
        },
    }


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, RecordingRls]]:
    d = tmp_path_factory.mktemp("stream_done")
    rls = RecordingRls()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(rls, server)
    rls_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    children: list[Child] = []
    try:
        emu = spawn("emulator", [sys.executable, "-m", "emulators.anthropic", "--port", "0", "--api-key", KEY,
                                 "--ready-file", str(d / "emulator.ready")], d, cwd=REPO)
        children.append(emu)
        emu_port = int(str(wait_ready_file(emu, d / "emulator.ready")["address"]).rsplit(":", 1)[1])
        listen = free_port()
        cfg = d / "envoy.json"
        cfg.write_text(json.dumps(_bootstrap(listen, emu_port, rls_port)))
        admin = d / "admin"
        envoy = spawn("envoy", [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
                                "--admin-address-path", str(admin), "-l", "warning"], d)
        children.append(envoy)
        url = f"http://127.0.0.1:{listen}"

        def up() -> bool:  # asks Envoy's admin, so no request is charged before the test's own
            try:
                text = admin.read_text().strip() if admin.exists() else ""
                return bool(text) and httpx.get(f"http://{text}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(envoy, up, 30, "ready")
        yield url, rls
    finally:
        for c in reversed(children):
            c.stop()
        server.stop(0)


def _charge(rls: RecordingRls) -> rls_pb2.RateLimitRequest:
    req = rls.calls.get(timeout=15)
    assert [(e.key, e.value) for e in req.descriptors[0].entries] == [("generic_key", "output_tokens")]
    return req


@pytest.mark.parametrize("stream", [True, False])
def test_output_tokens_are_charged_at_stream_end(rig: tuple[str, RecordingRls], stream: bool) -> None:
    url, rls = rig
    body = {"model": "claude-haiku-4-5", "max_tokens": 200, "stream": stream,
            "messages": [{"role": "user", "content": "Write four sentences about rate limits."}]}
    r = httpx.post(url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}, timeout=30)
    assert r.status_code == 200, r.text
    if stream:
        deltas = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and '"message_delta"' in line]
        output = deltas[-1]["usage"]["output_tokens"]
    else:
        output = r.json()["usage"]["output_tokens"]
    assert output > 1
    charge = _charge(rls)
    # Envoy puts a rate limit's hits_addend on its descriptor (the request-level field stays 0).
    assert charge.descriptors[0].HasField("hits_addend")
    assert charge.descriptors[0].hits_addend.value == output
    assert rls.calls.empty()  # one charge per request, none at its start

"""What real Envoy does to a retried request's headers, and router/chain_restore.lua undoing it.

A two-level cluster as router/failover.py builds chains (priority per target, endpoint metadata
`ccr.provider`, previous_priorities retries on 5xx), with upstream filters: the attempt's provider set
from the host Envoy picked, then a Lua step guarded to the first target's attempts only that does what
a translating attempt does (rewrites :path and content-type, drops anthropic-version, adds x-amz-date).
The first target answers 500, the second records what it got.

Proves: without the restore step the second attempt carries the first attempt's changes (Envoy's
attempts share one request header map); with it, the second attempt gets the client's request again,
and the saved copy (dynamic metadata, in the access log) holds no client credential.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from ccr.contract import CHAIN_REQUEST_NS, H_ATTEMPT_PROVIDER
from ccr.procs import Child, wait_until
from router import failover
from tests.test_lua_meter_envoy import hcm, listener, start_envoy

T = "type.googleapis.com/"

# A translating attempt's header changes, on the first target's attempt only (guarded below).
TRANSLATE_LUA = """
function envoy_on_request(h)
  local hs = h:headers()
  hs:replace(":path", "/model/translated/invoke")
  hs:replace("content-type", "application/x-translated")
  hs:remove("anthropic-version")
  hs:replace("x-amz-date", "20261126T000000Z")
end
"""


@dataclass
class Upstream:
    status: int
    got: list[dict[str, Any]] = field(default_factory=list)


def serve(up: Upstream) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            up.got.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                           "body": body})
            self.send_response(up.status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def cluster(name: str, ports: list[int], restore: bool) -> dict[str, Any]:
    first = SimpleNamespace(name="first")
    filters = [
        {"name": "attempt", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [failover._SET_ATTEMPT]}}},
        failover._guarded(first, {"name": "envoy.filters.http.lua", "typed_config": {  # type: ignore[arg-type]
            "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": TRANSLATE_LUA}}}, "translate"),
        failover._strip(),
        failover._codec(),
    ]
    if restore:
        filters.insert(0, failover._restore())
    return {
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"priority": i, "lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
                "metadata": {"filter_metadata": {failover.MD_NS: {"provider": target}}}}]}
            for i, (target, port) in enumerate(zip(("first", "second"), ports, strict=True))]},
        "typed_extension_protocol_options": {failover.HTTP_OPTS_KEY: {
            "@type": failover.HTTP_OPTS, "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": filters}},
    }


@dataclass
class World:
    url: str
    first: Upstream
    second: Upstream
    log: Path
    envoy: Child


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("restore")
    first, second = Upstream(500), Upstream(200)
    servers = [serve(first), serve(second)]
    ports = [s.server_address[1] for s in servers]
    retry = {"retry_on": "retriable-status-codes", "retriable_status_codes": [500], "num_retries": 1,
             "retry_priority": {"name": failover.PREVIOUS_PRIORITIES, "typed_config": {
                 "@type": T + "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                 "update_frequency": 1}},
             "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"}}
    routes = [{"match": {"prefix": "/", "headers": [{"name": "x-test-chain", "string_match": {"exact": c}}]},
               "route": {"cluster": c, "timeout": "10s", "retry_policy": retry}} for c in ("plain", "restored")]
    log = tmp / "access.log"
    lst = hcm("front", routes, None, [])
    lst["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": str(log),
        "log_format": {"json_format": {"id": "%REQ(x-test-id)%", "saved": f"%DYNAMIC_METADATA({CHAIN_REQUEST_NS})%"}}}}]
    config = {"node": {"id": "restore-test", "cluster": "restore-test"},
              "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
              "static_resources": {"listeners": [listener("front", lst)],
                                   "clusters": [cluster("plain", ports, False), cluster("restored", ports, True)]}}
    child, lports = start_envoy(config, tmp, "envoy")
    try:
        yield World(f"http://127.0.0.1:{lports['front']}", first, second, log, child)
    finally:
        child.stop()
        for s in servers:
            s.shutdown()


def _send(w: World, chain: str, test_id: str) -> httpx.Response:
    return httpx.post(f"{w.url}/v1/messages?beta=true", content=b'{"model":"m"}', headers={
        "x-test-chain": chain, "x-test-id": test_id, "content-type": "application/json",
        "anthropic-version": "2023-06-01", "x-api-key": "sk-client-gateway-key"}, timeout=10)


def test_without_the_restore_step_the_next_attempt_gets_the_previous_attempts_headers(world: World) -> None:
    n1, n2 = len(world.first.got), len(world.second.got)
    assert _send(world, "plain", "plain-1").status_code == 200
    first, second = world.first.got[n1:], world.second.got[n2:]
    assert [r["path"] for r in first] == ["/model/translated/invoke"]
    # The second target's attempt never ran the translate step, yet it carries its changes: one shared map.
    assert len(second) == 1 and second[0]["path"] == "/model/translated/invoke"
    assert second[0]["headers"]["content-type"] == "application/x-translated"
    assert "anthropic-version" not in second[0]["headers"] and "x-amz-date" in second[0]["headers"]
    assert H_ATTEMPT_PROVIDER not in second[0]["headers"]


def test_the_restore_step_gives_every_attempt_the_clients_request(world: World) -> None:
    n1, n2 = len(world.first.got), len(world.second.got)
    assert _send(world, "restored", "restored-1").status_code == 200
    first, second = world.first.got[n1:], world.second.got[n2:]
    assert [r["path"] for r in first] == ["/model/translated/invoke"]
    assert len(second) == 1
    got = second[0]
    assert got["path"] == "/v1/messages?beta=true" and got["body"] == b'{"model":"m"}'
    assert got["headers"]["content-type"] == "application/json" and got["headers"]["anthropic-version"] == "2023-06-01"
    assert "x-amz-date" not in got["headers"]
    # The saved copy is request metadata (upstream filters share the downstream stream info), without the
    # client's credential.
    entry: dict[str, Any] = {}

    def logged() -> bool:
        for line in (world.log.read_text().splitlines() if world.log.exists() else []):
            if json.loads(line)["id"] == "restored-1":
                entry.update(json.loads(line))
                return True
        return False

    wait_until(world.envoy, logged, 15, "the access log line")
    saved = entry["saved"]["headers"]
    assert saved[":path"] == "/v1/messages?beta=true" and saved["anthropic-version"] == "2023-06-01"
    assert "x-api-key" not in saved and "authorization" not in saved

"""router/meter.lua in the real Envoy: an upstream HTTP filter of the provider cluster
(typed_extension_protocol_options HttpProtocolOptions.http_filters = [lua, credential_injector,
upstream_codec]) in front of the Anthropic emulator, with a downstream file access log printing
`%DYNAMIC_METADATA(ccr.usage)%`.

Proves: metadata set by an upstream Lua filter reaches the downstream access log (streamed,
unstreamed, client abort mid-stream); nil is stored as a null value that replaces an earlier
number; bodyChunks() passes a stream through undelayed; the request reaches the provider without
the client's credentials or x-ccr-* headers and with accept-encoding identity; and for fixed
bodies (direct responses of a second listener) the logged usage equals the Python meter's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ccr.procs import Child, spawn, wait_ready_file, wait_until
from ccr.supervisor import envoy_binary
from router.usage import assess, make_meter
from tests.harness import emulator_mark
from tests.lua_meter import METER_LUA, struct_fields
from tests.test_usage import STREAM, message_start, sse, text_deltas

REPO = Path(__file__).resolve().parent.parent
T = "type.googleapis.com/"
PROVIDER_KEY = "sk-emulator-lua-test"
MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "hello"}]

# Fixed replies served by Envoy's second listener (direct_response), metered on the way through.
FIXED: dict[str, tuple[str, bytes]] = {
    "stream": ("text/event-stream", STREAM),
    "cut": ("text/event-stream", sse(message_start(40, 2, 3, 1), *text_deltas("héllo wörld", "✓✓✓", "abc"))),
    "crlf": ("text/event-stream", STREAM.replace(b"\n", b"\r\n")),
    "garbage": ("application/json", b'{"type":"message","usage":'),
    "count": ("application/json; charset=utf-8", b'{"input_tokens": 4242}'),
    "message": ("application/json", b'{"type":"message","usage":{"input_tokens":11,"output_tokens":22,'
                                    b'"cache_creation_input_tokens":null,"cache_read_input_tokens":3}}'),
    "plain": ("text/plain", b"hello"),
}
# Replies without a body: end of stream at the response headers (bodyChunks() yields nothing).
BODILESS: dict[str, tuple[int, str]] = {"nocontent": (204, "application/json"), "empty": (200, "application/json"),
                                        "emptysse": (200, "text/event-stream")}

# A downstream Lua filter that sets a number and then nil under one key: what Envoy stores.
NIL_PROBE = """
function envoy_on_request(h)
  local md = h:streamInfo():dynamicMetadata()
  md:set("probe", "a", 5)
  md:set("probe", "a", nil)
  md:set("probe", "b", 7)
  md:set("probe", "c", "kept")
end
"""

LOG_FORMAT = {
    "id": "%REQ(x-test-id)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "usage": "%DYNAMIC_METADATA(ccr.usage)%",
    "output_tokens": "%DYNAMIC_METADATA(ccr.usage:output_tokens)%",
    "probe": "%DYNAMIC_METADATA(probe)%",
}


# The same values as plain text, as a substitution (e.g. a rate limit hits_addend) sees them.
TEXT_FORMAT = "%REQ(x-test-id)% out=%DYNAMIC_METADATA(ccr.usage:output_tokens)% probe_a=%DYNAMIC_METADATA(probe:a)%\n"


def hcm(name: str, routes: list[dict[str, Any]], log_path: Path | None, extra_filters: list[dict[str, Any]],
        ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [*extra_filters, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if log_path is not None:
        out["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": str(log_path),
            "log_format": {"json_format": LOG_FORMAT}}}, {"name": "envoy.access_loggers.file", "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": f"{log_path}.txt",
            "log_format": {"text_format_source": {"inline_string": TEXT_FORMAT}}}}]
    return out


def listener(name: str, typed_config: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": typed_config}]}]}


# The meter with its header hygiene broken: the attempt must be refused, never forwarded.
BROKEN_LUA = METER_LUA.read_text().replace(
    "\nreturn M\n", "\nM.clean_request_headers = function() error('broken on purpose') end\nreturn M\n")


def metered_cluster(name: str, host: str, port: int, source: str | None = None) -> dict[str, Any]:
    """A provider cluster as the gateway wires it: the meter, then the provider's credential."""
    return {
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": [
                {"name": "envoy.filters.http.lua", "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": source or METER_LUA.read_text()}}},
                {"name": "envoy.filters.http.credential_injector", "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                    "overwrite": True,
                    "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": {
                        "@type": T + "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                        "credential": {"name": "provider-key"}, "header": "x-api-key"}}}},
                {"name": "envoy.filters.http.upstream_codec", "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
            ]}},
    }


def envoy_config(emulator: tuple[str, int], fixed_port: int | None, log_path: Path) -> dict[str, Any]:
    host, port = emulator
    routes: list[dict[str, Any]] = [
        {"match": {"prefix": "/fixed/"}, "route": {"cluster": "fixed", "timeout": "30s"}},
        {"match": {"prefix": "/probe"}, "direct_response": {"status": 204}},
        {"match": {"prefix": "/broken/"}, "route": {"cluster": "broken", "prefix_rewrite": "/", "timeout": "30s"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "provider", "timeout": "60s"}},
    ]
    nil_probe = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.lua.v3.Lua", "default_source_code": {"inline_string": NIL_PROBE}}}
    fixed_routes = [{"match": {"path": f"/fixed/{k}"}, "direct_response": {"status": 200, "body": {
        "inline_string": body.decode()}}, "response_headers_to_add": [{"header": {"key": "content-type", "value": ct},
                                                                       "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}
                    for k, (ct, body) in FIXED.items()]
    fixed_routes += [{"match": {"path": f"/fixed/{k}"}, "direct_response": {"status": status},
                      "response_headers_to_add": [{"header": {"key": "content-type", "value": ct},
                                                   "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}
                     for k, (status, ct) in BODILESS.items()]
    listeners = [listener("front", hcm("front", routes, log_path, [nil_probe]))]
    if fixed_port is None:  # a first start only learns the fixed listener's port
        listeners.append(listener("fixed", hcm("fixedlst", fixed_routes, None, [])))
    clusters = [metered_cluster("provider", host, port), metered_cluster("fixed", "127.0.0.1", fixed_port or 1),
                metered_cluster("broken", host, port, BROKEN_LUA)]
    return {
        "node": {"id": "lua-meter-test", "cluster": "lua-meter-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": clusters, "secrets": [
            {"name": "provider-key", "generic_secret": {"secret": {"inline_string": PROVIDER_KEY}}}]},
    }


@dataclass
class Envoy:
    url: str
    fixed_url: str
    log_path: Path
    emulator_url: str
    child: Child

    def log_entry(self, test_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The access log line of one request (Envoy flushes the file log on its own schedule)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.log_path.exists():
                for line in self.log_path.read_text().splitlines():
                    entry = json.loads(line)
                    if entry.get("id") == test_id:
                        return entry  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise AssertionError(f"no access log line for {test_id}")
            time.sleep(0.05)

    def text_entry(self, test_id: str, timeout: float = 15.0) -> str:
        path = Path(f"{self.log_path}.txt")
        deadline = time.monotonic() + timeout
        while True:
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.startswith(test_id + " "):
                        return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no text access log line for {test_id}")
            time.sleep(0.05)


def _listener_ports(admin_url: str) -> dict[str, int]:
    try:
        r = httpx.get(admin_url + "/listeners?format=json", timeout=1)
        statuses = r.json().get("listener_statuses", [])
    except (httpx.HTTPError, ValueError):
        return {}
    return {s["name"]: int(s["local_address"]["socket_address"]["port_value"]) for s in statuses
            if s.get("local_address", {}).get("socket_address", {}).get("port_value")}


def start_envoy(config: dict[str, Any], tmp: Path, name: str) -> tuple[Child, dict[str, int]]:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config))
    admin = tmp / f"{name}-admin"
    child = spawn(name, [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                         "--admin-address-path", str(admin), "-l", "warning", "--file-flush-interval-msec", "20",
                         "--drain-time-s", "1", "--parent-shutdown-time-s", "2"], tmp / "logs")
    try:
        wait_until(child, lambda: admin.exists() and admin.read_text().strip() != "", 30, "serving admin")
        admin_url = "http://" + admin.read_text().strip()
        want = {lst["name"] for lst in config["static_resources"]["listeners"]}
        wait_until(child, lambda: want <= _listener_ports(admin_url).keys(), 30, "listening")
        return child, _listener_ports(admin_url)
    except BaseException:
        child.stop()
        raise


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    tmp = tmp_path_factory.mktemp("luaenvoy")
    ready = tmp / "emulator.ready"
    emu = spawn("emulator", [sys.executable, "-m", "emulators.anthropic", "--host", "127.0.0.1", "--port", "0",
                             "--api-key", PROVIDER_KEY, "--ready-file", str(ready)], tmp / "logs", cwd=REPO)
    children = [emu]
    try:
        info = wait_ready_file(emu, ready)
        host, _, port = str(info["address"]).rpartition(":")
        # Envoy's direct responses stand in for a provider with fixed bodies: a helper Envoy
        # serves them, the Envoy under test meters them.
        helper, ports = start_envoy(envoy_config((host, int(port)), None, tmp / "unused.log"), tmp, "envoy-fixed")
        children.append(helper)
        log_path = tmp / "access.log"
        cfg = envoy_config((host, int(port)), ports["fixed"], log_path)
        child, ports2 = start_envoy(cfg, tmp, "envoy")
        children.append(child)
        yield Envoy(f"http://127.0.0.1:{ports2['front']}", f"http://127.0.0.1:{ports['fixed']}", log_path,
                    f"http://{info['address']}", child)
    finally:
        for c in reversed(children):
            c.stop()


def test_envoy_validates_the_config(tmp_path: Path) -> None:
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(envoy_config(("127.0.0.1", 9), 9, tmp_path / "a.log")))
    res = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def client_headers(test_id: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": "ccr_client_key", "authorization": "Bearer client", "anthropic-version": "2023-06-01",
            "x-ccr-principal-id": "spoofed", "x-ccr-model": "m", "accept-encoding": "br, gzip",
            "x-test-id": test_id, **extra}


def last_upstream(e: Envoy) -> dict[str, Any]:
    recs = httpx.get(f"{e.emulator_url}/_emulator/requests").json()
    return recs[-1]  # type: ignore[no-any-return]


def test_unstreamed_reply_is_logged_with_the_providers_usage(envoy: Envoy) -> None:
    tid = uuid.uuid4().hex
    r = httpx.post(f"{envoy.url}/v1/messages", json={"model": MODEL, "max_tokens": 64, "messages": HELLO},
                   headers=client_headers(tid), timeout=30)
    assert r.status_code == 200, r.text
    assert "content-encoding" not in r.headers  # asked for identity upstream
    usage = r.json()["usage"]
    seen = last_upstream(envoy)["headers"]
    assert seen["x-api-key"] == PROVIDER_KEY and "authorization" not in seen
    assert not [h for h in seen if h.lower().startswith("x-ccr-")]
    assert seen["accept-encoding"] == "identity"
    entry = envoy.log_entry(tid)
    split = usage.get("cache_creation") or {}
    assert entry["usage"] == {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                              "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                              "cache_read_input_tokens": usage["cache_read_input_tokens"],
                              "cache_creation_5m_input_tokens": split.get("ephemeral_5m_input_tokens", 0),
                              "cache_creation_1h_input_tokens": split.get("ephemeral_1h_input_tokens", 0),
                              "usage_status": "complete", "usage_note": ""}
    assert entry["output_tokens"] == usage["output_tokens"] > 0
    # As text (what a substitution formatter gives): an integer, no ".0".
    assert envoy.text_entry(tid) == f"{tid} out={usage['output_tokens']} probe_a=-"


def test_streamed_reply_is_logged_with_the_final_usage(envoy: Envoy) -> None:
    tid = uuid.uuid4().hex
    body = {"model": MODEL, "max_tokens": 64, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{envoy.url}/v1/messages", json=body, headers=client_headers(tid), timeout=30) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    start = events[0]["message"]["usage"]
    final = next(e for e in events if e["type"] == "message_delta")["usage"]
    entry = envoy.log_entry(tid)
    assert entry["usage"]["usage_status"] == "complete"
    assert entry["usage"]["input_tokens"] == start["input_tokens"] > 0
    assert entry["usage"]["output_tokens"] == final["output_tokens"] > 0


def test_a_stream_flows_undelayed_and_an_abort_is_logged_with_the_output_so_far(envoy: Envoy) -> None:
    tid = uuid.uuid4().hex
    hold = f"hold-{tid}"
    body = {"model": MODEL, "max_tokens": 500, "messages": HELLO, "stream": True}
    h = client_headers(tid, **{"x-emulator-fault": "midstream-error", "x-emulator-output-tokens": "200",
                               "x-emulator-hold": hold})
    deltas = 0
    start: dict[str, int] = {}
    # The provider holds mid-block until released: bodyChunks() must already have passed the deltas on
    # (a filter that buffered would leave this read waiting for the hold to time out).
    with httpx.stream("POST", f"{envoy.url}/v1/messages", json=body, headers=h,
                      timeout=httpx.Timeout(30, read=10)) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                d = json.loads(line[6:])
                if d["type"] == "message_start":
                    start = d["message"]["usage"]
                deltas += d["type"] == "content_block_delta"
                if deltas == 2:
                    break  # the client leaves while the provider still holds the stream
    entry = envoy.log_entry(tid)
    httpx.post(f"{envoy.emulator_url}/_emulator/release/{hold}")
    u = entry["usage"]
    assert u["usage_status"] == "estimated", entry
    assert u["input_tokens"] == start["input_tokens"] > 0
    assert u["output_tokens"] >= 2 and "cut off" in u["usage_note"] and "did not finish" in u["usage_note"]
    assert "DC" in entry["flags"]  # the downstream went away


def test_error_replies_are_not_billable(envoy: Envoy) -> None:
    tid = uuid.uuid4().hex
    r = httpx.post(f"{envoy.url}/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": HELLO},
                   headers=client_headers(tid, **{"x-emulator-fault": "529"}), timeout=30)
    assert r.status_code == 529
    assert envoy.log_entry(tid)["usage"] == {
        "input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
        "cache_creation_5m_input_tokens": 0, "cache_creation_1h_input_tokens": 0,
        "usage_status": "not_billable", "usage_note": "provider replied 529; error replies bill no tokens"}


def test_an_upstream_reset_mid_stream_is_logged_with_the_output_so_far(envoy: Envoy) -> None:
    tid = uuid.uuid4().hex
    hold = f"reset-{tid}"
    body = {"model": MODEL, "max_tokens": 500, "messages": HELLO, "stream": True}
    h = client_headers(tid, **{"x-emulator-fault": "midstream-reset", "x-emulator-output-tokens": "200",
                               "x-emulator-hold": hold})
    deltas = 0
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(  # noqa: PT012
            "POST", f"{envoy.url}/v1/messages", json=body, headers=h, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "content_block_delta":
                deltas += 1
                if deltas == 1:  # output reached the client: now the provider resets the connection
                    httpx.post(f"{envoy.emulator_url}/_emulator/release/{hold}")
    u = envoy.log_entry(tid)["usage"]
    assert u["usage_status"] == "estimated" and u["output_tokens"] >= deltas >= 1, u
    assert u["input_tokens"] > 0 and "cut off" in u["usage_note"]


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_replies_are_logged_as_the_python_meter_assesses_them(envoy: Envoy, name: str) -> None:
    ctype, body = FIXED[name]
    tid = uuid.uuid4().hex
    r = httpx.get(f"{envoy.url}/fixed/{name}", headers={"x-test-id": tid}, timeout=30)
    assert r.status_code == 200 and r.content == body  # not a byte changed
    meter = make_meter(ctype)
    if meter is None:
        want = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                "cache_creation_5m_input_tokens": 0, "cache_creation_1h_input_tokens": 0,
                "usage_status": "not_billable", "usage_note": "reply of type text/plain carries no usage"}
    else:
        meter.feed(body)
        want = struct_fields(assess(meter.finish(), ctype.startswith("text/event-stream"), ended=True))
        want = {k: int(v) if isinstance(v, float) else v for k, v in want.items()}
    assert envoy.log_entry(tid)["usage"] == want


@pytest.mark.parametrize("name", sorted(BODILESS))
def test_bodiless_replies_are_not_billable(envoy: Envoy, name: str) -> None:
    status, _ = BODILESS[name]
    tid = uuid.uuid4().hex
    r = httpx.get(f"{envoy.url}/fixed/{name}", headers={"x-test-id": tid}, timeout=30)
    assert r.status_code == status and r.content == b""
    assert envoy.log_entry(tid)["usage"] == {
        "input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
        "cache_creation_5m_input_tokens": 0, "cache_creation_1h_input_tokens": 0,
        "usage_status": "not_billable", "usage_note": f"provider replied {status} with no body"}


def test_a_failed_header_hygiene_refuses_the_attempt(envoy: Envoy) -> None:
    assert "broken on purpose" in BROKEN_LUA
    tid = uuid.uuid4().hex
    mark = emulator_mark(envoy.emulator_url)
    r = httpx.post(f"{envoy.url}/broken/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": HELLO},
                   headers=client_headers(tid), timeout=30)
    assert r.status_code == 500
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    assert mark.arrived() == []  # nothing reached it
    assert "broken on purpose" in envoy.child.log_path.read_text()


def test_nil_is_a_null_value_that_replaces_a_number(envoy: Envoy) -> None:
    tid = uuid.uuid4().hex
    assert httpx.get(f"{envoy.url}/probe", headers={"x-test-id": tid}).status_code == 204
    assert envoy.log_entry(tid)["probe"] == {"a": None, "b": 7, "c": "kept"}
    # A null value prints as "-" in text, like an absent one.
    assert envoy.text_entry(tid) == f"{tid} out=- probe_a=-"

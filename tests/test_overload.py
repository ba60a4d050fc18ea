"""No body buffering for strangers: overload manager, connection limits, identity before body.

The flood test runs the real gateway (Envoy, extauth, the emulator) and floods it, on
loopback, with concurrent unauthenticated large uploads while an authenticated client
keeps working.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anthropic
import grpc
import httpx
import pytest
import yaml
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2

from ccr.config import MIB, ConfigError, OverloadSettings, parse_config
from ccr.contract import AUTHZ_PHASE_IDENTITY, AUTHZ_PHASE_MD
from ccr.credentials import write_secret
from ccr.runtime import Runtime
from ccr.supervisor import Gateway, envoy_binary, render_bootstrap
from extauth.bundle import build_bundle
from extauth.endpoints import ENDPOINTS
from extauth.keys import create_key
from router import resources
from router.downstream import IDENTITY_FIRST, below_regex
from tests.harness import running_gateway, running_service

REPO = Path(__file__).resolve().parent.parent

MODEL = "claude-sonnet-4-6"
HEAP_LIMIT = 384 * MIB
HEADERS_TIMEOUT_S = 1.0
STRANGERS = 24
STRANGER_BODY = 48 * MIB  # 24 x 48 MiB = 1.1 GiB: far over the heap limit if it were buffered
CHUNK = b"x" * (64 * 1024)


# -- unit checks ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 99, 100, 101, 1000, 65536, 999_999, MIB, 10 * MIB + 7])
def test_below_regex_matches_exactly_the_smaller_lengths(n: int) -> None:
    rx = re.compile(below_regex(n))
    probes = set(range(0, min(n + 50, 3000))) | {n - 1, n, n + 1, n * 10, n // 10, 10 ** len(str(n)),
                                                  10 ** (len(str(n)) - 1)} | set(range(max(0, n - 2000), n + 2000))
    for v in sorted(p for p in probes if p >= 0):
        assert bool(rx.fullmatch(str(v))) == (v < n), (n, v)
    # Odd spellings count as large: the identity check runs for them.
    for odd in ("00", "01", "+1", "-1", " 1", "1 ", "1,1", "0x10", ""):
        assert not rx.fullmatch(odd), (n, odd)


def test_rendered_bootstrap_with_overload_manager_passes_envoy_validate(tmp_path: Path) -> None:
    settings = OverloadSettings(max_heap_bytes=300 * MIB, max_downstream_connections=77,
                                reset_streams_above_bytes=4 * MIB)
    text = render_bootstrap("ccr-test", "127.0.0.1", 0, "127.0.0.1:7005", settings)
    om = yaml.safe_load(text)["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in om["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 300 * MIB
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"][
        "max_active_downstream_connections"] == 77
    assert {a["name"].rpartition(".")[2] for a in om["actions"]} >= {
        "shrink_heap", "reset_high_memory_stream", "stop_accepting_requests", "stop_accepting_connections"}
    assert om["buffer_factory_config"]["minimum_account_to_track_power_of_two"] == 22
    f = tmp_path / "bootstrap.yaml"
    f.write_text(text)
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-4000:]
    # The same check refuses an overload manager Envoy does not understand.
    f.write_text(text.replace("overload_actions.shrink_heap", "overload_actions.shrink_heap_x"))
    bad = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "shrink_heap_x" in bad.stderr


def test_downstream_settings_reach_the_listener_and_pass_envoy_validate(tmp_path: Path) -> None:
    base = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    base["gateway"]["downstream"] = {"request_headers_timeout_s": 3, "idle_timeout_s": 42,
                                     "max_requests_per_connection": 5, "max_headers_count": 33,
                                     "max_concurrent_streams": 7, "per_connection_buffer_bytes": 256 * 1024,
                                     "identity_first_body_bytes": 100_000}
    cfg = parse_config(base)
    rt = Runtime(config_path=str(REPO / "ccr.example.yaml"), run_dir=str(tmp_path), postgres_dsn="postgresql://x",
                 redis_url="redis://x", extauth="127.0.0.1:7001", ratelimit="127.0.0.1:7002",
                 adapter="127.0.0.1:7003", accesslog="127.0.0.1:7004", listen_port=18080,
                 provider_credentials={"anthropic": str(write_secret(tmp_path / "k.json", "anthropic", "sk-x"))})
    doc = resources.static_bootstrap(cfg, rt, 18080)
    lis = doc["static_resources"]["listeners"][0]
    hcm = lis["filter_chains"][0]["filters"][0]["typed_config"]
    assert lis["per_connection_buffer_limit_bytes"] == 256 * 1024
    assert hcm["request_headers_timeout"] == "3.000s"
    assert hcm["common_http_protocol_options"] == {"idle_timeout": "42.000s", "max_requests_per_connection": 5,
                                                   "max_headers_count": 33}
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 7
    assert hcm["http2_protocol_options"]["initial_connection_window_size"] == 256 * 1024
    names = [f["name"] for f in hcm["http_filters"]]
    # Identity first, then the body-buffering check, then everything else.
    assert names[:2] == ["ccr.identity_first", "envoy.filters.http.ext_authz"]
    matcher = hcm["http_filters"][0]["typed_config"]["xds_matcher"]["matcher_list"]["matchers"][0]
    assert matcher["predicate"]["single_predicate"]["value_match"]["safe_regex"]["regex"] == below_regex(100_000)
    f = tmp_path / "envoy.json"
    f.write_text(json.dumps(doc))
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-4000:]


def test_only_the_endpoints_decided_on_their_body_have_it_buffered(tmp_path: Path) -> None:
    """Body-less endpoints (GET, DELETE, a batch cancel) get one check at their headers: no body
    buffering, no identity-first check before it. Messages, a batch create (decided on the body)
    and a file upload (bounded by max_request_bytes through that buffering) keep theirs."""
    cfg = parse_config(yaml.safe_load((REPO / "ccr.example.yaml").read_text()))
    rt = Runtime(config_path=str(REPO / "ccr.example.yaml"), run_dir=str(tmp_path), postgres_dsn="postgresql://x",
                 redis_url="redis://x", extauth="127.0.0.1:7001", ratelimit="127.0.0.1:7002",
                 adapter="127.0.0.1:7003", accesslog="127.0.0.1:7004", listen_port=18080,
                 provider_credentials={"anthropic": str(write_secret(tmp_path / "k.json", "anthropic", "sk-x"))})
    hcm = resources.static_bootstrap(cfg, rt, 18080)["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    routes = {r.get("name"): r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    buffered = {"messages.create", "messages.count_tokens", "batches.create", "files.upload",
                # The same Messages call in the OpenAI and Bedrock clients' schemas.
                "messages.openai_chat", "messages.bedrock_invoke", "messages.bedrock_invoke_stream"}
    for e in ENDPOINTS:
        tpfc = routes[e.name].get("typed_per_filter_config", {})
        if e.name in buffered:
            assert resources.EXT_AUTHZ_FILTER not in tpfc and IDENTITY_FIRST not in tpfc, e.name
        else:
            assert e.method in ("GET", "DELETE") or e.name == "batches.cancel", e.name
            assert tpfc[resources.EXT_AUTHZ_FILTER]["check_settings"] == {"disable_request_body_buffering": True}
            assert tpfc[IDENTITY_FIRST]["disabled"] is True


def test_identity_first_threshold_cannot_exceed_the_connection_buffer() -> None:
    base = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    base["gateway"]["downstream"] = {"per_connection_buffer_bytes": MIB, "identity_first_body_bytes": 2 * MIB}
    with pytest.raises(ConfigError, match="identity_first_body_bytes"):
        parse_config(base)


# -- extauth's headers-only check ------------------------------------------------------


@pytest.fixture(scope="module")
def extauth_stub(postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.AuthorizationStub]:
    run = tmp_path_factory.mktemp("extauth-identity")
    bundle = build_bundle(REPO / "policies", run / "policy.tar.gz", "ccr/authz/decision")
    config = (REPO / "ccr.example.yaml").read_text()
    with running_service("extauth", run, config, postgres_dsn=postgres_dsn, policy_bundle=str(bundle)) as child, \
            grpc.insecure_channel(str(child.info["address"])) as ch:
        yield pb_grpc.AuthorizationStub(ch)


def _check(headers: dict[str, str], body: bytes = b"") -> pb.CheckRequest:
    http = ac.AttributeContext.HttpRequest(method="POST", path="/v1/messages", headers=headers, raw_body=body)
    return pb.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http)))


def test_identity_phase_checks_the_key_only(extauth_stub: pb_grpc.AuthorizationStub, postgres_dsn: str) -> None:
    _, key = create_key(postgres_dsn, "identity-phase")
    phase = ((AUTHZ_PHASE_MD, AUTHZ_PHASE_IDENTITY),)
    # Headers only, no body yet: a known key passes and nothing is decided or set...
    ok = extauth_stub.Check(_check({"x-api-key": key}), metadata=phase)
    assert ok.status.code == code_pb2.OK
    assert not ok.ok_response.headers and not ok.dynamic_metadata.fields
    # ...a stranger is refused in the Anthropic shape...
    for headers in ({}, {"x-api-key": "ccr_" + "B" * 43}, {"authorization": "Bearer nope"}):
        no = extauth_stub.Check(_check(headers), metadata=phase)
        assert no.status.code == code_pb2.UNAUTHENTICATED and no.denied_response.status.code == 401
        assert json.loads(no.denied_response.body)["error"]["type"] == "authentication_error"
    # ...and without the phase the same body-less request gets the full check, which needs the body.
    full = extauth_stub.Check(_check({"x-api-key": key}))
    assert full.denied_response.status.code == 400
    # The full check still decides with the body.
    body = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert extauth_stub.Check(_check({"x-api-key": key}, body)).status.code == code_pb2.OK


# -- the real gateway ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("overload"), lambda cfg: cfg["gateway"].update(
            overload={"max_heap_bytes": HEAP_LIMIT},
            downstream={"request_headers_timeout_s": HEADERS_TIMEOUT_S})) as g:
        yield g


def stats(gw: Gateway) -> dict[str, int]:
    text = httpx.get(f"{gw.admin_url}/stats", params={"filter": r"^(server\.memory|http\.ccr\.)"}).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def memory_allocated(gw: Gateway) -> int:
    """Bytes Envoy has allocated now (tcmalloc, read live; the server.memory_* stats lag)."""
    return int(httpx.get(f"{gw.admin_url}/memory").json()["allocated"])


def _host_port(gw: Gateway) -> tuple[str, int]:
    host, _, port = gw.url.removeprefix("http://").rpartition(":")
    return host, int(port)


@dataclass
class Outcome:
    status: int | None  # None: the connection was reset or closed before a response
    body: bytes
    sent: int  # body bytes the stranger got into the socket before it was refused


def _read_response(s: socket.socket) -> Outcome:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"content-length:\s*(\d+)", head, re.I)
            if sep and m and len(body) >= int(m.group(1)):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    return Outcome(status, body, 0)


def stranger_upload(host: str, port: int, i: int, target: str = "POST /v1/messages") -> Outcome:
    """A client without a valid key uploading STRANGER_BODY bytes as fast as Envoy reads them.

    It sends while the socket is writable and reads as soon as it is readable, the way an
    attacker who does not care about the answer still sees one.
    """
    chunked = i % 4 == 3  # no Content-Length at all: chunked transfer
    lines = [f"{target} HTTP/1.1", f"host: {host}", "content-type: application/json",
             "anthropic-version: 2023-06-01"]
    lines.append("transfer-encoding: chunked" if chunked else f"content-length: {STRANGER_BODY}")
    if i % 2:
        lines.append(f"x-api-key: ccr_not-a-key-{i}")
    frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
    sent = 0
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        deadline = time.monotonic() + 30
        while sent < STRANGER_BODY and time.monotonic() < deadline:
            readable, writable, _ = select.select([s], [s], [], 5)
            if readable:
                break
            if writable:
                try:
                    s.sendall(frame)
                except (BrokenPipeError, ConnectionResetError):
                    return Outcome(None, b"", sent)
                sent += len(CHUNK)
        out = _read_response(s)
    out.sent = sent
    return out


def test_flood_of_unauthenticated_large_bodies_leaves_authenticated_users_served(gw: Gateway) -> None:
    host, port = _host_port(gw)
    before = stats(gw)
    authed_done = threading.Event()
    flood_done = threading.Event()
    peak = [0]

    def watch_memory() -> None:
        while not flood_done.is_set():
            peak[0] = max(peak[0], memory_allocated(gw))
            flood_done.wait(0.02)  # sampling pace, not synchronisation

    def stranger(i: int) -> list[Outcome]:
        # Bounded: at most 6 uploads each, and none once the authenticated client is done.
        outcomes = []
        for _ in range(6):
            outcomes.append(stranger_upload(host, port, i))
            if authed_done.is_set():
                break
        return outcomes

    def authenticated() -> list[int]:
        c = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0, timeout=30)
        codes = []
        try:
            for n in range(25):
                r = c.messages.with_raw_response.create(
                    model=MODEL, max_tokens=16, messages=[{"role": "user", "content": f"hello {n}"}])
                codes.append(r.status_code)
                assert r.parse().usage.output_tokens > 0
        finally:
            authed_done.set()
        return codes

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    try:
        with ThreadPoolExecutor(STRANGERS + 1) as pool:
            floods = [pool.submit(stranger, i) for i in range(STRANGERS)]
            authed = pool.submit(authenticated)
            codes = authed.result(timeout=120)
            outcomes = [o for f in floods for o in f.result(timeout=120)]
    finally:
        flood_done.set()
        watcher.join()
    after = stats(gw)

    # Every authenticated request succeeded, while the flood ran.
    assert codes == [200] * 25
    # The flood got Anthropic-shaped 401s (or resets), each refused long before its body was in.
    assert len(outcomes) >= STRANGERS
    refused = [o for o in outcomes if o.status is not None]
    assert len(refused) >= len(outcomes) // 2, [o.status for o in outcomes]
    for o in refused:
        assert o.status == 401, (o.status, o.body[:300])
        err = json.loads(o.body)
        assert err["type"] == "error" and err["error"]["type"] == "authentication_error"
    assert max(o.sent for o in outcomes) < STRANGER_BODY // 4, sorted(o.sent for o in outcomes)[-5:]
    # Each stranger was refused by the headers-only check; none reached the body-buffering one,
    # and the small authenticated requests did not pay for a second check.
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["http.ccr.ext_authz.identity.denied"] == len(outcomes)
    assert delta.get("http.ccr.ext_authz.identity.ok", 0) == 0
    assert delta.get("http.ccr.ext_authz.denied", 0) == 0
    assert delta["http.ccr.ext_authz.ok"] == 25
    # Envoy's memory stayed well under its configured ceiling: the bodies were never buffered.
    assert 0 < peak[0] < HEAP_LIMIT // 2, peak[0]


def test_large_authenticated_body_is_checked_twice_and_served(gw: Gateway) -> None:
    """Above identity_first_body_bytes an authenticated request pays one extra (headers-only) check."""
    before = stats(gw)
    text = "y" * (3 * MIB)
    r = httpx.post(f"{gw.url}/v1/messages", timeout=60,
                   json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": text}]},
                   headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text[:300]
    after = stats(gw)
    assert after["http.ccr.ext_authz.identity.ok"] - before.get("http.ccr.ext_authz.identity.ok", 0) == 1
    assert after["http.ccr.ext_authz.ok"] - before["http.ccr.ext_authz.ok"] == 1


def test_a_get_pays_one_check(gw: Gateway) -> None:
    """No Content-Length on a GET: it used to pay the identity-first check and then the full one."""
    before = stats(gw)
    # (GET /v1/models is the gateway's own answer, an ext_authz reply: a forwarded GET here.)
    r = httpx.get(f"{gw.url}/v1/messages/batches", headers={"x-api-key": gw.api_key,
                                                             "anthropic-version": "2023-06-01"}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert "data" in r.json()
    after = stats(gw)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["http.ccr.ext_authz.ok"] == 1
    assert delta.get("http.ccr.ext_authz.identity.ok", 0) == 0


def test_a_strangers_body_on_a_get_is_refused_at_its_headers(gw: Gateway) -> None:
    """A chunked body on a body-less endpoint is never buffered for the check: the one check
    runs at the headers and refuses the stranger long before the body is in."""
    host, port = _host_port(gw)
    before = stats(gw)
    out = stranger_upload(host, port, 3, target="GET /v1/models")  # 3: chunked, with a wrong key
    after = stats(gw)
    assert out.status == 401, out
    assert json.loads(out.body)["error"]["type"] == "authentication_error"
    assert out.sent < STRANGER_BODY // 4, out.sent
    assert after["http.ccr.ext_authz.denied"] - before.get("http.ccr.ext_authz.denied", 0) == 1
    assert after.get("http.ccr.ext_authz.identity.denied", 0) == before.get("http.ccr.ext_authz.identity.denied", 0)


def test_slow_loris_is_cut_off_by_the_request_headers_timeout(gw: Gateway) -> None:
    host, port = _host_port(gw)
    before = stats(gw).get("http.ccr.downstream_rq_header_timeout", 0)
    with socket.create_connection((host, port), timeout=HEADERS_TIMEOUT_S + 20) as s:
        # Headers that are never finished.
        s.sendall(f"POST /v1/messages HTTP/1.1\r\nhost: {host}\r\nx-api-key: ccr_slow".encode())
        started = time.monotonic()
        out = _read_response(s)  # returns once Envoy answers and closes the connection
        waited = time.monotonic() - started
        # The connection is closed: a further read sees end of stream (or a reset).
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1) == b""
    assert waited < HEADERS_TIMEOUT_S + 15
    assert out.status == 408, out
    err = json.loads(out.body)
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert "request_headers_timeout_s" in err["error"]["message"]
    assert stats(gw)["http.ccr.downstream_rq_header_timeout"] == before + 1


# -- a gateway whose heap ceiling authenticated uploads exceed ----------------------------

SMALL_HEAP = 128 * MIB
MAX_CONNECTIONS = 16


@pytest.fixture(scope="module")
def small_heap_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("small-heap"), lambda cfg: cfg["gateway"].update(
            overload={"max_heap_bytes": SMALL_HEAP, "max_downstream_connections": MAX_CONNECTIONS})) as g:
        yield g


def overload_stats(gw: Gateway) -> dict[str, int]:
    text = httpx.get(f"{gw.admin_url}/stats", params={"filter": r"^overload\."}).text
    return {n: int(v) for n, _, v in (line.partition(": ") for line in text.splitlines()) if v.strip().isdigit()}


def test_authenticated_uploads_past_the_heap_ceiling_are_shed_and_the_gateway_recovers(
        small_heap_gw: Gateway) -> None:
    """Keys do not buy unlimited memory: uploads that push Envoy past its heap ceiling are cut
    with an Anthropic-shaped error, Envoy stays up, and serves again once memory is back."""
    gw = small_heap_gw
    # 30 MiB: under the shipped standard tier's 32 MiB request ceiling (policies/data.json), so
    # what cuts these uploads is the heap, not the policy.
    body = json.dumps({"model": MODEL, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "z" * (30 * MIB)}]}).encode()
    headers = {"x-api-key": gw.api_key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    done = threading.Event()
    peak = [0]

    def watch_memory() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], memory_allocated(gw))
            done.wait(0.02)  # sampling pace, not synchronisation

    def upload(_: int) -> tuple[int | None, bytes]:
        try:
            r = httpx.post(f"{gw.url}/v1/messages", content=body, headers=headers, timeout=60)
            return r.status_code, r.content
        except httpx.TransportError:
            return None, b""  # cut before a response could be written

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(upload, range(8)))
    finally:
        done.set()
        watcher.join()

    shed = [r for r in results if r[0] != 200]
    assert shed, "8 concurrent 30 MiB uploads against a 128 MiB heap were all buffered"
    assert overload_stats(gw)["overload.envoy.load_shed_points.http1_server_abort_dispatch.shed_load_count"] > 0
    for status, content in shed:
        if status is not None:
            assert status == 500, (status, content[:300])
            assert json.loads(content)["error"]["type"] == "api_error"
    # Without the overload manager these uploads take Envoy past 1 GiB (three copies of each
    # body while it is checked); with it, Envoy stops reading within a sampling interval.
    assert peak[0] < 3 * SMALL_HEAP, peak[0] // MIB
    assert all(c.alive() for c in gw.children)

    # Recovery: once the heap pressure is back below the thresholds, requests are served.
    deadline = time.monotonic() + 30
    while overload_stats(gw)["overload.envoy.resource_monitors.fixed_heap.pressure"] >= 85:
        assert time.monotonic() < deadline, "heap pressure never came down"
    with anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0) as c:
        assert c.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]).content


def _global_overflow(gw: Gateway) -> int:
    text = httpx.get(f"{gw.admin_url}/stats", params={"filter": r"downstream_global_cx_overflow"}).text
    return sum(int(v) for _, _, v in (line.partition(": ") for line in text.splitlines()) if v.strip().isdigit())


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_beyond_the_global_limit_are_refused(small_heap_gw: Gateway) -> None:
    gw = small_heap_gw
    host, port = _host_port(gw)
    before = _global_overflow(gw)
    deadline = time.monotonic() + 30
    while stats(gw).get("http.ccr.downstream_cx_active", 0):  # earlier clients have hung up
        assert time.monotonic() < deadline, "client connections from earlier tests are still open"
    held = [socket.create_connection((host, port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        # Envoy counts a connection once it has accepted it: a request answered on each proves it.
        for s in held:
            s.sendall(f"GET /not-api HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
            assert s.recv(65536).startswith(b"HTTP/1.1 ")
        with socket.create_connection((host, port), timeout=10) as extra:
            assert _closed_by_peer(extra)
        assert _global_overflow(gw) == before + 1
        # The admin port is not counted: the operator can still look in.
        assert httpx.get(f"{gw.admin_url}/ready").status_code == 200
    finally:
        for s in held:
            s.close()
    # Once clients let go, new ones are served again (wait on the condition, bounded).
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{gw.url}/not-api", timeout=5)
            break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "connections were never released"

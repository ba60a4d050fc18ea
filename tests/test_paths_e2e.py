"""No spelling of an endpoint escapes its decision, and fail-open is no bypass: through the
real gateway (Envoy + extauth + the emulator), with raw HTTP so every byte of the request
target is exactly what an attacker would send.

The emulator records every request that reaches it (`/_emulator/requests`): that record is
the proof of what was forwarded.
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import pytest

from ccr.supervisor import Gateway
from extauth.endpoints import ENDPOINTS, Endpoint, Kind
from extauth.keys import create_key
from tests.harness import emulator_mark, running_gateway

SONNET, HAIKU = "claude-sonnet-4-5", "claude-haiku-4-5"
IDS = {"model_id": SONNET,
       "bedrock_model": "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
       "batch_id": "msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}


# A request header of this test only: which spelling a request the emulator recorded was sent as.
PROBE = "x-paths-test-probe"


def concrete(e: Endpoint) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: IDS[m.group(1)], e.template)


def variants(path: str) -> list[str]:
    """Other spellings of `path`: slashes, dot segments, percent-encoding, case, junk."""
    head, _, last = path.rpartition("/")
    v1 = "/" + path.split("/")[1] + "/"  # "/v1/" (or "/model/" for the Bedrock-client paths)
    first = path.split("/")[2]  # the segment after it
    rest = path[len(v1):]
    enc = "%" + format(ord(last[0]), "02X") + last[1:]
    enc_lower = "%" + format(ord(last[0]), "02x") + last[1:]
    return [
        path + "/", "/" + path, path.replace(v1, v1 + "/", 1), path + "//",
        v1 + "./" + rest, v1 + "x/../" + rest, v1 + "%2e/" + rest, v1 + "%2E%2E" + v1 + rest, "/../" + path[1:],
        path + "/.", path + "/x/..", path + "/..", head + "/" + enc, head + "/" + enc_lower,
        path + "%2F", path + "%2f", head + "%2F" + last, path.replace("/", "%2F"), path + "%5C",
        path.replace("/", "\\"), v1.upper() + rest, v1 + first.capitalize() + path[len(v1 + first):],
        path.upper(), path + ";x", path + "%00", path + "%20", path + "%09", path + "#frag", path + "\t",
        path[1:], path + "/" + "a" * 2000, path.replace(v1, v1[:-1] + "2/", 1), path + ".json",
        "http://gateway" + path + "/", "http://gateway/" + path + "/", "http://gateway" + path.upper(),
    ]


def raw_request(gw: Gateway, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request with the target sent byte for byte; (status, body).

    Reads exactly the response (content-length or chunked) instead of waiting for the close,
    which Envoy delays after an early reply."""
    url = urlsplit(gw.url)
    head = [f"{method} {target} HTTP/1.1", "Host: gateway", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += _recv(s)
        top, _, rest = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if method == "HEAD":
            return int(lines[0].split(" ")[1]), b""
        if "content-length" in fields:
            while len(rest) < int(fields["content-length"]):
                rest += _recv(s)
            return int(lines[0].split(" ")[1]), rest
        while not rest.endswith(b"0\r\n\r\n"):  # chunked: read to the last chunk
            rest += _recv(s)
        return int(lines[0].split(" ")[1]), _unchunk(rest)


def _recv(s: socket.socket) -> bytes:
    chunk = s.recv(65536)
    if not chunk:
        raise ConnectionError("connection closed before the response was complete")
    return chunk


def _unchunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2:]


def h2_request(gw: Gateway, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """The same over HTTP/2 (h2c, prior knowledge), `:path` byte for byte; status 0 = stream reset."""
    url = urlsplit(gw.url)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False))
    conn.initiate_connection()
    hdrs = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", b"gateway"),
            (b":path", target.encode("utf-8")), *((k.lower().encode(), v.encode()) for k, v in headers.items())]
    conn.send_headers(1, hdrs, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    status, out = 0, b""
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(conn.data_to_send())
        while True:
            data = s.recv(65536)
            if not data:
                return status, out
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    out += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, out
                elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    return 0, out
            s.sendall(conn.data_to_send())


def body_for(e: Endpoint, model: str) -> bytes:
    if e.method != "POST":
        return b""
    msg = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    if e.kind is Kind.BATCHES:
        return json.dumps({"requests": [{"custom_id": "a", "params": msg}]}).encode()
    return json.dumps(msg).encode()


@pytest.fixture(scope="module")
def haiku_key(gw: Gateway) -> str:
    assert gw.runtime is not None
    # Its ~1,400 requests go out within about 30 s: no spelling's answer may depend on the default 600 a minute.
    return create_key(gw.runtime.postgres_dsn, "haiku-paths", ["haiku-only"], rpm=1_000_000)[1]


def _headers(key: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}


def test_the_canonical_spellings_work(gw: Gateway, haiku_key: str) -> None:
    """The control: the battery's client and records see what they should."""
    mark = emulator_mark(gw)
    e = ENDPOINTS[0]
    status, body = raw_request(gw, "POST", "/v1/messages?beta=true", _headers(haiku_key), body_for(e, HAIKU))
    assert status == 200, body
    status, body = raw_request(gw, "POST", "/v1/messages", _headers(haiku_key), body_for(e, SONNET))
    assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"
    new = mark.arrived()
    assert [(r["method"], r["path"], r["query_string"]) for r in new] == [("POST", "/v1/messages", "beta=true")]


@pytest.mark.parametrize("send", [raw_request, h2_request], ids=["http1", "h2"])
@pytest.mark.parametrize("e", ENDPOINTS, ids=lambda e: e.name)
def test_every_variant_of_every_endpoint_is_refused_or_decided(gw: Gateway, haiku_key: str, e: Endpoint,
                                                               send: Any) -> None:
    """A Haiku-only key asks for Sonnet through every other spelling of the endpoint.

    Each is refused by the gateway (400/403/404, nothing forwarded; over HTTP/2 also a stream
    reset) or was turned into the endpoint's canonical spelling and decided like it: a
    model-bearing or Files endpoint is then still refused, and anything forwarded is exactly
    the canonical request.
    """
    canonical = concrete(e)
    body = body_for(e, SONNET)
    refused = {0, 400, 403, 404} if send is h2_request else {400, 403, 404}
    targets = variants(canonical)
    # The spellings go out at once (Envoy holds a connection it drops for a malformed HTTP/2 request
    # open for its 1s delayed close): each carries its own tag, so what reached the provider is
    # told apart per spelling, and every record made meanwhile must carry one of them.
    probe = uuid.uuid4().hex
    mark = emulator_mark(gw)
    with ThreadPoolExecutor(8) as pool:
        sent = list(pool.map(lambda it: send(gw, e.method, it[1], {**_headers(haiku_key), PROBE: f"{probe}-{it[0]}"},
                                             body), enumerate(targets)))
    arrived = mark.arrived()
    assert all(r["headers"].get(PROBE, "").startswith(probe + "-") for r in arrived), arrived
    outcomes, replies = {}, {}
    for i, (target, (status, reply)) in enumerate(zip(targets, sent, strict=True)):
        new = [r for r in arrived if r["headers"][PROBE] == f"{probe}-{i}"]
        outcomes[target] = status
        replies[target] = reply
        if not new and e.name == "models.list" and status == 200:
            # The gateway's own answer (extauth/models_api.py): the Haiku-only key's models, nothing forwarded.
            assert [m["id"] for m in json.loads(reply)["data"]] == ["claude-haiku-4-5-20251001"], (target, reply)
            continue
        if not new:
            assert status in refused, (target, status, reply)
            if status:
                err = json.loads(reply)  # the Anthropic error shape, also for Envoy's own refusals
                assert err["type"] == "error" and err["error"]["message"], (target, reply)
            continue
        # Forwarded: only a canonical request the policy allows for this key (the batch with a
        # Sonnet request inside and other principals' batch ids are refused by the object checks).
        assert e.name == "batches.list", (target, new)  # GET /v1/models is answered by the gateway
        assert [(r["method"], r["path"]) for r in new] == [(e.method, canonical)], (target, new)
    # Everything else never reaches the provider in any spelling.
    if not (e.kind is Kind.MODELS or e.name == "batches.list"):
        assert set(outcomes.values()) <= refused, outcomes
        # The spellings Envoy normalises to the canonical path got the endpoint's decision (403
        # for Sonnet on a Haiku-only key, in a batch too, 403 for Files while disabled, 404 for
        # a batch id the key does not own), not the route table's 404.
        decided = 404 if "batch_id" in e.params else 403
        v1 = "/" + canonical.split("/")[1] + "/"
        for target in ("/" + canonical, canonical.replace(v1, v1 + "/", 1), v1 + "./" + canonical[len(v1):],
                       v1 + "x/../" + canonical[len(v1):]):
            assert outcomes[target] == decided, (target, outcomes[target])
            assert b"this gateway serves only" not in replies[target], (target, replies[target])


def test_a_normalised_spelling_is_forwarded_canonically(gw: Gateway, haiku_key: str) -> None:
    """`//v1/./messages` with an allowed model: decided as /v1/messages and sent upstream as that."""
    mark = emulator_mark(gw)
    status, reply = raw_request(gw, "POST", "//v1/x/../%6Dessages?beta=true", _headers(haiku_key),
                                body_for(ENDPOINTS[0], HAIKU))
    assert status == 200, reply
    assert [(r["path"], r["query_string"]) for r in mark.arrived()] == [("/v1/messages", "beta=true")]


def test_a_detour_through_another_endpoint_is_decided_as_the_destination(gw: Gateway, haiku_key: str) -> None:
    mark = emulator_mark(gw)
    for target in ("/v1/messages/batches/%2e%2e/%2e%2e/messages", "/v1/messages/batches/x/../../../messages",
                   "/v1/models/../messages", "/v1/files/%2E%2E/messages"):
        status, reply = raw_request(gw, "POST", target, _headers(haiku_key), body_for(ENDPOINTS[0], SONNET))
        assert status == 403 and json.loads(reply)["error"]["type"] == "permission_error", (target, reply)
    # A trailing '..' leaves a trailing slash ("/v1/messages/"): no endpoint.
    status, _ = raw_request(gw, "POST", "/v1/messages/batches/%2e%2e", _headers(haiku_key),
                            body_for(ENDPOINTS[0], SONNET))
    assert status == 404
    assert mark.arrived() == []


def test_unknown_paths_are_404_without_authentication(gw: Gateway) -> None:
    mark = emulator_mark(gw)
    for method, target in (("GET", "/v1/organizations/me"), ("POST", "/v1/complete"), ("GET", "/v1/messages"),
                           ("PUT", "/v1/messages"), ("GET", "/admin"), ("POST", "/v1/messages/"),
                           ("GET", "/v1/messages/batches/a%2Fb"), ("post", "/v1/messages"), ("Post", "/v1/messages"),
                           ("HEAD", "/v1/models"), ("OPTIONS", "/v1/messages")):
        status, reply = raw_request(gw, method, target, {})
        assert status in (400, 404), (method, target, status)
        if status == 404 and method != "HEAD":
            assert json.loads(reply)["error"]["type"] == "not_found_error"
    assert mark.arrived() == []


# -- fail-open is no bypass --------------------------------------------------------


@pytest.fixture
def fail_open_gw(tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(tmp_path, lambda cfg: cfg.update(services={
            "failure_mode_allow": True, "i_understand_unauthenticated_traffic_reaches_providers": True})) as g:
        yield g


SPOOF = {"x-ccr-cluster": "provider_anthropic", "X-CCR-Provider": "anthropic", "x-ccr-principal-id": "key_admin",
         "x-ccr-principal": "admin", "x-ccr-model": HAIKU, "x-ccr-key-id": "key_admin"}


def test_fail_open_with_extauth_down_forwards_nothing(fail_open_gw: Gateway) -> None:
    gw = fail_open_gw
    body = body_for(ENDPOINTS[0], HAIKU)
    # Control: with extauth up the same request goes through, spoofed headers and all.
    mark = emulator_mark(gw)
    status, reply = raw_request(gw, "POST", "/v1/messages", {**_headers(gw.api_key), **SPOOF}, body)
    assert status == 200, reply
    [rec] = mark.arrived()
    up = rec["headers"]
    assert not [h for h in up if h.lower().startswith("x-ccr-")]

    next(c for c in gw.children if c.name == "extauth").stop()
    mark = emulator_mark(gw)
    for method, target, b in (("POST", "/v1/messages", body), ("POST", "/v1/messages/count_tokens", body),
                              ("GET", "/v1/models", b""), ("POST", "/v1/messages/batches", body)):
        for headers in ({**_headers("ccr_nobody"), **SPOOF}, {"content-type": "application/json", **SPOOF}):
            for send in (raw_request, h2_request):
                status, reply = send(gw, method, target, headers, b)
                assert status == 503, (send.__name__, target, status, reply)
                err = json.loads(reply)["error"]
                assert err["type"] == "api_error" and "no authorization decision" in err["message"]
    assert mark.arrived() == [], "a request reached the provider without a decision"

"""The provider adapter over real gRPC, driven message by message the way Envoy's ext_proc filter does."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format

from ccr.contract import ID_ENVOY, USAGE_CACHE_SPLIT
from ccr.runtime import Runtime, UpstreamOverride
from ccr.service import client_credentials
from tests.harness import running_service
from tests.test_usage import EXPECTED, STREAM

REPO = Path(__file__).resolve().parent.parent
TOKENS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
CFG_KEY = "sk-ant-provider-from-config-0001"
OVERRIDE_KEY = "sk-ant-provider-from-override-0002"
CLIENT_KEY = "ccr_live_client_key_must_not_leak"

CONFIG = """
version: 1
providers:
  - name: anthropic
    api_key_env: CCR_TEST_ANTHROPIC_KEY
  - name: emulated
    api_key_env: CCR_TEST_UNUSED_BECAUSE_OVERRIDDEN
  - name: nokey
    api_key_env: CCR_TEST_KEY_THAT_IS_NOT_SET
models:
  - match: "claude-*"
    provider: anthropic
"""


# address -> what Envoy presents to that adapter.
ENVOY_CREDENTIALS: dict[str, grpc.ChannelCredentials] = {}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("adapter")
    env = {"CCR_TEST_ANTHROPIC_KEY": CFG_KEY, "CCR_TEST_OVERRIDE_KEY": OVERRIDE_KEY,
           "CCR_TEST_UNUSED_BECAUSE_OVERRIDDEN": "sk-wrong-key"}
    overrides = {"emulated": UpstreamOverride(endpoint="http://127.0.0.1:9", api_key_env="CCR_TEST_OVERRIDE_KEY")}
    with running_service("router.adapter", d, CONFIG, env=env, upstream_overrides=overrides) as child:
        assert child.info["pid"] == child.pid
        yield as_envoy(d, str(child.info["address"]))
    # Secrets never reach the log.
    text = child.log_path.read_text()
    assert CFG_KEY not in text and OVERRIDE_KEY not in text and CLIENT_KEY not in text


def as_envoy(run_dir: Path, address: str) -> str:
    """Streams to `address` present Envoy's run identity: the adapter answers only mutual TLS
    from it (tests/test_seal.py)."""
    pki = Runtime.load(run_dir / "runtime.json").mtls
    assert pki is not None
    ENVOY_CREDENTIALS[address] = client_credentials(pki, ID_ENVOY)
    return address


class Stream:
    """One ext_proc stream: send a message, wait for its reply, like Envoy does."""

    def __init__(self, address: str, provider: str | None) -> None:
        self._channel = grpc.secure_channel(address, ENVOY_CREDENTIALS[address])
        self._q: queue.Queue[pb.ProcessingRequest | None] = queue.Queue()
        md = [("x-ccr-provider", provider)] if provider is not None else []
        stub = pb_grpc.ExternalProcessorStub(self._channel)
        self._replies = stub.Process(iter(self._q.get, None), metadata=md, timeout=20)

    def send(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        self._q.put(req)
        return next(self._replies)

    def close(self) -> None:
        self._q.put(None)
        for _ in self._replies:  # the server has nothing more to say
            raise AssertionError("unexpected extra reply")
        self._channel.close()


def headers(pairs: list[tuple[str, str]], raw: bool = True) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) if raw else base_pb2.HeaderValue(key=k, value=v)
        for k, v in pairs
    ])


CLIENT_REQUEST = [
    (":method", "POST"), (":path", "/v1/messages?beta=true"), (":authority", "gateway.local"),
    (":scheme", "https"), ("content-type", "application/json"), ("x-api-key", CLIENT_KEY),
    ("authorization", f"Bearer {CLIENT_KEY}"), ("anthropic-version", "2023-06-01"),
    ("anthropic-beta", "interleaved-thinking-2025-05-14,some-future-beta-2031-01-01"),
    ("x-ccr-principal", "alice@example.com"), ("x-ccr-key-id", "k_123"),
    ("x-ccr-cluster", "provider_anthropic"),
    ("x-stainless-lang", "python"), ("user-agent", "claude-cli/2.0"),
    ("accept-encoding", "br, zstd, gzip"),
]


def request_headers(pairs: list[tuple[str, str]] = CLIENT_REQUEST, raw: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers(pairs, raw)))


def response_headers(status: int, content_type: str | None, **extra: str) -> pb.ProcessingRequest:
    pairs = [(":status", str(status))] + ([("content-type", content_type)] if content_type else [])
    pairs += [(k.replace("_", "-"), v) for k, v in extra.items()]
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers(pairs)))


def body(chunk: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=end))


def published(resp: pb.ProcessingResponse) -> dict[str, object] | None:
    """The whole ccr.usage publication: every field, every time (Envoy merges them)."""
    if not resp.HasField("dynamic_metadata"):
        return None
    md = json_format.MessageToDict(resp.dynamic_metadata)
    assert set(md) == {"ccr.usage"}
    assert set(md["ccr.usage"]) == {*TOKENS, *USAGE_CACHE_SPLIT, "usage_status", "usage_note"}
    return md["ccr.usage"]  # type: ignore[no-any-return]


def usage_of(resp: pb.ProcessingResponse) -> dict[str, int | None] | None:
    md = published(resp)
    if md is None:
        return None
    return {k: None if md[k] is None else int(md[k]) for k in TOKENS}  # type: ignore[call-overload]


def status_of(resp: pb.ProcessingResponse) -> str | None:
    md = published(resp)
    return None if md is None else str(md["usage_status"])


def assert_passthrough(resp: pb.ProcessingResponse, kind: str) -> None:
    assert resp.WhichOneof("response") == kind
    common = getattr(resp, kind).response
    assert not common.HasField("body_mutation") and not common.HasField("header_mutation")
    assert common.status == pb.CommonResponse.CONTINUE


def check_credential_swap(resp: pb.ProcessingResponse) -> None:
    assert resp.WhichOneof("response") == "request_headers"
    mut = resp.request_headers.response.header_mutation
    # Every client credential goes; the provider's is Envoy's to add (credential_injector).
    assert set(mut.remove_headers) == {"authorization", "x-api-key", "x-ccr-principal", "x-ccr-key-id",
                                       "x-ccr-cluster"}
    # An unencoded reply whatever the client accepts (the meter must read it), and no credential:
    # the adapter holds none, even with provider keys in its environment.
    assert {(o.header.key, o.header.raw_value) for o in mut.set_headers} == {("accept-encoding", b"identity")}
    for opt in mut.set_headers:
        assert not opt.header.value
        assert opt.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    # Everything else (anthropic-*, content-type, user agent, path) is untouched.
    touched = set(mut.remove_headers) | {o.header.key for o in mut.set_headers}
    for k, _ in CLIENT_REQUEST:
        if k.startswith("anthropic-") or k in ("content-type", "user-agent", "x-stainless-lang", ":path"):
            assert k not in touched
    assert not resp.request_headers.response.HasField("body_mutation")
    assert not resp.HasField("mode_override")


def test_streaming_reply_is_metered_and_passed_through(adapter: str) -> None:
    s = Stream(adapter, "anthropic")
    check_credential_swap(s.send(request_headers()))

    r = s.send(response_headers(200, "text/event-stream; charset=utf-8", request_id="req_1"))
    assert_passthrough(r, "response_headers")
    assert not r.HasField("mode_override")  # keep streaming the body through us

    # Chunk boundaries that cut events, lines and a multi-byte character.
    cuts = [0, 17, 18, 300, 301, 302, len(STREAM) // 2 + 3, len(STREAM) - 40, len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    seen: list[dict[str, int | None]] = []
    for c in chunks:
        r = s.send(body(c))
        assert_passthrough(r, "response_body")
        if (u := usage_of(r)) is not None:
            seen.append(u)
    r = s.send(body(b"", end=True))
    assert_passthrough(r, "response_body")
    assert usage_of(r) == EXPECTED and status_of(r) == "complete"
    # Usage is also published as it becomes known, so an aborted stream is still charged.
    assert seen and seen[0]["input_tokens"] == EXPECTED["input_tokens"]
    assert seen[-1] == EXPECTED
    s.close()


def test_json_reply_with_value_encoded_headers(adapter: str) -> None:
    s = Stream(adapter, "emulated")
    # Older Envoys send `value` instead of `raw_value`; both are read.
    check_credential_swap(s.send(request_headers(raw=False)))
    reply = json.dumps({
        "id": "msg_2", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "ok"}],
        "usage": {"input_tokens": 1200, "output_tokens": 45, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 1024},
    }).encode()
    assert not s.send(response_headers(200, "application/json")).HasField("mode_override")
    r1 = s.send(body(reply[:50]))
    assert_passthrough(r1, "response_body")
    assert usage_of(r1) is None
    r2 = s.send(body(reply[50:], end=True))
    assert_passthrough(r2, "response_body")
    assert usage_of(r2) == {"input_tokens": 1200, "output_tokens": 45, "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 1024}
    s.close()


def test_count_tokens_reply_records_zero_usage(adapter: str) -> None:
    s = Stream(adapter, "anthropic")
    s.send(request_headers())
    s.send(response_headers(200, "application/json"))
    r = s.send(body(b'{"input_tokens": 31337}', end=True))
    assert usage_of(r) == dict.fromkeys(EXPECTED, 0) and status_of(r) == "not_billable"
    s.close()


@pytest.mark.parametrize(("status", "ctype"), [(429, "application/json"), (529, "application/json"),
                                                (200, "application/octet-stream")])
def test_unmeterable_reply_stops_body_streaming(adapter: str, status: int, ctype: str) -> None:
    s = Stream(adapter, "anthropic")
    s.send(request_headers())
    r = s.send(response_headers(status, ctype))
    assert_passthrough(r, "response_headers")  # error bodies come back unmodified
    mo = r.mode_override
    assert r.HasField("mode_override")
    assert mo.response_body_mode == processing_mode_pb2.ProcessingMode.NONE
    assert mo.response_header_mode == processing_mode_pb2.ProcessingMode.SEND
    assert mo.response_trailer_mode == processing_mode_pb2.ProcessingMode.SKIP
    assert usage_of(r) == dict.fromkeys(EXPECTED, 0) and status_of(r) == "not_billable"
    assert published(r)["usage_note"]  # type: ignore[index]
    s.close()


def test_unreadable_encoding_is_not_claimed_as_zero(adapter: str) -> None:
    s = Stream(adapter, "anthropic")
    s.send(request_headers())
    r = s.send(response_headers(200, "text/event-stream", content_encoding="br"))
    assert r.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.NONE
    assert usage_of(r) == dict.fromkeys(EXPECTED, None) and status_of(r) == "unknown"
    assert "content-encoding 'br'" in str(published(r)["usage_note"])  # type: ignore[index]
    s.close()


def test_malformed_body_never_breaks_the_stream(adapter: str) -> None:
    s = Stream(adapter, "anthropic")
    s.send(request_headers())
    s.send(response_headers(200, "text/event-stream"))
    for junk in (b"\xff\xfe\x00garbage\r", b"\ndata: {\"type\":\"message_start\",\"message\":", b"\n\n\n",
                 b"event: message_delta\ndata: [1,2]\n\n"):
        assert_passthrough(s.send(body(junk)), "response_body")
    r = s.send(body(b"", end=True))
    assert_passthrough(r, "response_body")
    # Nothing readable: unknown (NULL counts with a reason), not a made-up zero.
    assert usage_of(r) == dict.fromkeys(EXPECTED, None) and status_of(r) == "unknown"
    s.close()


def test_aborted_stream_leaves_an_estimate_published(adapter: str) -> None:
    """A client abort ends the attempt without an end-of-stream: the last publication must stand."""
    s = Stream(adapter, "anthropic")
    s.send(request_headers())
    r = s.send(response_headers(200, "text/event-stream"))
    assert status_of(r) == "unknown"  # if the stream died right here
    cut = STREAM.index(b"event: content_block_stop")
    last = None
    for i in range(0, cut, 64):
        r = s.send(body(STREAM[i:min(i + 64, cut)]))
        last = published(r) or last
    assert last is not None and last["usage_status"] == "estimated"
    assert int(last["output_tokens"]) > 1  # type: ignore[call-overload]
    assert int(last["input_tokens"]) == EXPECTED["input_tokens"]  # type: ignore[call-overload]
    s.close()


def _assert_immediate_500(resp: pb.ProcessingResponse, *needles: str) -> None:
    assert resp.WhichOneof("response") == "immediate_response"
    ir = resp.immediate_response
    assert ir.status.code == 500
    assert {(h.header.key, h.header.raw_value) for h in ir.headers.set_headers} == {
        ("content-type", b"application/json")}
    err = json.loads(ir.body)
    assert err["type"] == "error" and err["error"]["type"] == "api_error"
    for n in needles:
        assert n in err["error"]["message"]
    assert CLIENT_KEY not in ir.body.decode()


def test_adapter_needs_no_credential(adapter: str) -> None:
    # A provider whose credential variable is unset is still served: Envoy injects credentials,
    # and `ccr up` refuses to start without one (tests/test_cli_up.py).
    s = Stream(adapter, "nokey")
    check_credential_swap(s.send(request_headers()))
    s.close()


@pytest.mark.parametrize("provider", ["does-not-exist", None])
def test_unknown_or_missing_provider_is_an_immediate_500(adapter: str, provider: str | None) -> None:
    s = Stream(adapter, provider)
    _assert_immediate_500(s.send(request_headers()), "x-ccr-provider" if provider is None else provider)
    s.close()


def test_concurrent_streams_are_independent(adapter: str) -> None:
    a, b = Stream(adapter, "anthropic"), Stream(adapter, "emulated")
    a.send(request_headers())
    b.send(request_headers())
    a.send(response_headers(200, "text/event-stream"))
    b.send(response_headers(500, "application/json"))
    a.send(body(STREAM[:100]))
    assert usage_of(a.send(body(STREAM[100:], end=True))) == EXPECTED
    a.close()
    b.close()

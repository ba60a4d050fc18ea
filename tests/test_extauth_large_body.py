"""extauth with large bodies: what one 20 MB Check costs in memory, and that reading a body in place
(extauth/wire.py) and as a JSON skeleton (extauth/lean_json.py) decides exactly as parsing it whole."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from ccr.config import parse_config
from ccr.provider_objects import ObjectKind, ObjectStore
from extauth import lean_json, wire
from extauth.bundle import build_bundle
from extauth.keys import KeyStore, create_key
from extauth.policy import PolicyEngine
from extauth.server import Authorizer
from tests.test_extauth import GATEWAY_YAML, REPO, http_check, ok_headers

MIB = 1024 * 1024
BIG = 20 * MIB
# What a Check may allocate beyond one copy of the body: the UTF-8 check of a long string decodes
# 256 KiB at a time (a str of at most 1 MiB, and the previous one until it is replaced); the
# skeleton and orjson's buffer for it are a few KB for these bodies; the key, decision and
# response are small. 4 MiB leaves room for allocator rounding without hiding a second copy.
SLACK = 4 * MIB


def text_body(size: int = BIG, **extra: Any) -> bytes:
    text = ("Lorem \"ipsum\" dolor\tsit amet, é😀 consectetur\n" * (size // 48 + 1))[:size]
    return orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16, "stream": True, **extra,
                         "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]})


def image_body(size: int = BIG) -> bytes:
    data = base64.b64encode(random.Random(6).randbytes(size * 3 // 4)).decode()
    return orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16, "stream": True, "messages": [{
        "role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": data}},
                                    {"type": "text", "text": "What is this?"}]}]})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(REPO / "policies", tmp_path_factory.mktemp("b") / "b.tar.gz", "ccr/authz/decision")


def checks(postgres_dsn: str, bundle: Path, raws: list[bytes], *, serialized: bool = True,
           setup: tuple[tuple[ObjectKind, str, str, str], ...] = (), traced: bool = False,
           ) -> list[tuple[pb.CheckResponse, int]]:
    """Each serialized CheckRequest decided by an Authorizer on a real key and object store:
    (response, bytes tracemalloc saw allocated at the peak of that Check beyond what was live before)."""
    config = parse_config({**yaml.safe_load(GATEWAY_YAML), "files": {"enabled": True}})

    async def scenario() -> list[tuple[pb.CheckResponse, int]]:
        keys, store = KeyStore(postgres_dsn), ObjectStore(postgres_dsn)
        await keys.start()
        for kind, oid, provider, owner in setup:
            await store.record(kind, oid, provider, owner)
        auth = Authorizer(config, keys, PolicyEngine.load(bundle, "ccr/authz/decision"), store)
        out = []
        try:
            for raw in raws:
                req = None if serialized else pb.CheckRequest.FromString(raw)
                if traced:
                    tracemalloc.start()
                    tracemalloc.reset_peak()
                    before = tracemalloc.get_traced_memory()[0]
                resp = await (auth.check_serialized(raw) if req is None else auth.check(req))
                peak = tracemalloc.get_traced_memory()[1] - before if traced else 0
                tracemalloc.stop()
                out.append((resp, peak))
        finally:
            await keys.close()
            await store.close()
            auth.policy.close()
        return out

    return asyncio.run(scenario())


def check_bytes(key: str, body: bytes, path: str = "/v1/messages") -> bytes:
    return http_check({"x-api-key": key}, path=path, body=body).SerializeToString()


# -- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [text_body, image_body], ids=["text", "image"])
def test_a_20mb_check_allocates_at_most_one_more_copy_of_the_body(postgres_dsn: str, bundle: Path, make) -> None:
    """Issue 6: at most two copies of a body in extauth. The received message is one; a Check may add
    at most one more, however it gets the request: from gRPC as bytes (the service's path: the body
    is read in place, so nothing body-sized is added) or as a parsed message (whose own copy lives in
    protobuf's arena, which tracemalloc does not see; reading raw_body copies it once more). Parsing
    the body whole with orjson cost 13 copies: 280 MB traced for 20 MB."""
    _, key = create_key(postgres_dsn, "big")
    body = make()
    raw = check_bytes(key, body)
    warm = check_bytes(key, orjson.dumps({"model": "claude-sonnet-4-5", "messages": []}))
    for serialized in (True, False):
        (_, _), (resp, peak) = checks(postgres_dsn, bundle, [warm, raw], serialized=serialized, traced=True)
        assert resp.status.code == code_pb2.OK, resp
        assert ok_headers(resp)["x-ccr-model"] == "claude-sonnet-4-5"
        assert peak <= len(body) + SLACK, (serialized, peak / MIB)
        if serialized:  # nothing body-sized at all
            assert peak <= SLACK, peak / MIB


# -- the same decisions --------------------------------------------------------------------------


def _big_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (body, path): large bodies a check reads differently from small ones."""
    long_text = "é" * (2 * MIB)
    own = {"type": "document", "source": {"type": "file", "file_id": "file_01big"}}
    long_id = {"type": "document", "source": {"type": "file", "file_id": "file_" + "x" * 3000}}

    def refs(*blocks: dict) -> bytes:
        return orjson.dumps({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": [
            {"type": "text", "text": long_text}, *blocks]}]})

    batch = {"requests": [{"custom_id": "c" + "z" * 2000, "params": {
        "model": m, "max_tokens": 8, "messages": [{"role": "user", "content": long_text}]}}
        for m in ("claude-haiku-4-5", "claude-opus-4-1")]}
    return {name: (body, "/v1/messages") for name, body in {
        "text": text_body(2 * MIB),
        "image": image_body(2 * MIB),
        "long model": text_body(2 * MIB, model="claude-" + "y" * 4000),  # read, not a placeholder
        "model not a string": text_body(2 * MIB, model=7),
        "invalid at the end": text_body(2 * MIB)[:-1] + b",}",
        "control character": text_body(2 * MIB).replace(b"dolor", b"dol\x01r", 1),
        "lone surrogate": text_body(2 * MIB).replace(b"dolor", b"dol\\ud800r", 1),
        "invalid UTF-8": text_body(2 * MIB).replace("é".encode(), b"\xc3(", 1),
        "bad escape": text_body(2 * MIB).replace(b"dolor", b"dol\\qr", 1),
        "not an object": orjson.dumps([{"model": "claude-sonnet-4-5", "text": long_text}]),
        "no model": orjson.dumps({"max_tokens": 1, "messages": [{"role": "user", "content": long_text}]}),
        "own file": refs(own),
        "long file id": refs(long_id),
        # file\u005fid: the key spelled with an escape is still a file reference
        "escaped file_id": refs(own).replace(b'"file_id"', b'"file\\u005fid"'),
    }.items()} | {"batch": (orjson.dumps(batch), "/v1/messages/batches")}


def test_large_bodies_are_decided_as_when_parsed_whole(postgres_dsn: str, bundle: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rec, owner = create_key(postgres_dsn, "owner")
    _, other = create_key(postgres_dsn, "other")
    _, hal = create_key(postgres_dsn, "hal", groups=["haiku-only"])
    cases = _big_cases()
    names = [(name, who) for name in cases for who in ("owner", "other", "hal")]
    keys = {"owner": owner, "other": other, "hal": hal}
    raws = [check_bytes(keys[who], *cases[name]) for name, who in names]
    setup = ((ObjectKind.FILE, "file_01big", "anthropic", rec.id),)
    lean = [r.SerializeToString() for r, _ in checks(postgres_dsn, bundle, raws, setup=setup)]
    setup = ()  # recorded once; ownership is never re-assigned
    with monkeypatch.context() as m:  # as before: the whole message parsed, the whole body given to orjson
        m.setattr(wire, "SPLIT_FROM_BYTES", 1 << 40)
        m.setattr(lean_json, "SKELETON_FROM_BYTES", 1 << 40)
        whole = [r.SerializeToString() for r, _ in checks(postgres_dsn, bundle, raws, setup=setup)]
    for name, a, b in zip(names, lean, whole, strict=True):
        assert a == b, name
    verdict = {n: pb.CheckResponse.FromString(r) for n, r in zip(names, lean, strict=True)}
    ok = {n for n, v in verdict.items() if v.status.code == code_pb2.OK}
    # The cases do reach each outcome: allowed, refused for the body, for the model, for the file.
    assert {("text", "owner"), ("image", "owner"), ("own file", "owner"), ("escaped file_id", "owner")} <= ok
    for name in ("invalid at the end", "control character", "lone surrogate", "invalid UTF-8", "bad escape",
                 "not an object", "no model", "model not a string"):
        assert "invalid_request_error" in verdict[(name, "owner")].denied_response.body, name
    assert "y" * 4000 in verdict[("long model", "hal")].denied_response.body
    for name in ("own file", "escaped file_id"):
        assert "not_found_error" in verdict[(name, "other")].denied_response.body
    assert "x" * 3000 in verdict[("long file id", "owner")].denied_response.body
    assert "z" * 2000 in verdict[("batch", "owner")].denied_response.body


# JSON documents with long and short strings, escapes and non-ASCII text, then sometimes broken.
_text = st.text(alphabet=st.sampled_from(list('ab"\\/\n\t\x00\x1fé😀\ud7ff\ue000 ')), max_size=40)
_keys = st.sampled_from(["model", "file_id", "custom_id", "text", "data", "model "]) | _text
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12)
_noise = st.sampled_from([b'"', b"\\", b"\\u", b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\x00", b"\xff", b"\xc3",
                          b":", b",", b"}", b"]", b" ", b"u", b"0", b"\\u00e9"])


def _same(whole: Any, lean: Any, key: str | None = None) -> bool:
    """`lean` is `whole` but for opaque placeholders in place of string values not read by checks."""
    if isinstance(whole, dict):
        return (isinstance(lean, dict) and list(whole) == list(lean)
                and all(_same(whole[k], lean[k], k) for k in whole))
    if isinstance(whole, list):
        return isinstance(lean, list) and len(whole) == len(lean) and all(map(_same, whole, lean))
    if (isinstance(whole, str) and isinstance(lean, str) and lean != whole and lean.startswith("\x00ccr-")
            and key not in lean_json.RESTORED_KEYS):
        return True
    if isinstance(whole, float) and type(lean) is int and not -2**63 <= lean < 2**64:
        return float(lean) == whole  # beyond 64 bits: orjson reads a double, the body's parser an integer
    return type(whole) is type(lean) and whole == lean


@settings(max_examples=400, deadline=None)
@given(doc=_json, edits=st.lists(st.tuples(st.floats(0, 1), _noise, st.booleans()), max_size=2))
def test_skeleton_reads_json_as_orjson_does(doc: Any, edits: list[tuple[float, bytes, bool]]) -> None:
    data = bytearray(orjson.dumps(doc))
    for where, noise, replace in edits:
        i = int(where * len(data))
        data[i:i + (1 if replace else 0)] = noise
    body = bytes(data)
    with pytest.MonkeyPatch.context() as m:  # every body large, every string of 4+ bytes long
        m.setattr(lean_json, "SKELETON_FROM_BYTES", 0)
        m.setattr(lean_json, "LONG_STRING_BYTES", 4)
        m.setattr(lean_json, "_SKIP", re.compile(rb'[^"]*+'))  # no short string skipped in C
        try:
            whole = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            if "number is infinity" in str(e):  # read as infinity (extauth/lean_json.py), or refused if invalid
                with contextlib.suppress(orjson.JSONDecodeError, lean_json.Ambiguous):
                    lean_json.loads(memoryview(body))
                return
            with pytest.raises(orjson.JSONDecodeError) as got:
                lean_json.loads(memoryview(body))
            assert str(got.value) == str(e)
            return
        if _repeats_a_key(body):  # refused, never read one way (tests/test_one_reading.py)
            with pytest.raises(lean_json.Ambiguous):
                lean_json.loads(memoryview(body))
            return
        assert _same(whole, lean_json.loads(memoryview(body)))


def _repeats_a_key(body: bytes) -> bool:
    """Whether a valid JSON body gives a key twice in one object (the standard library's reading)."""
    repeated = False

    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        repeated |= len({k for k, _ in kv}) != len(kv)
        return dict(kv)

    json.loads(body, object_pairs_hook=pairs)
    return repeated


# -- the message split ---------------------------------------------------------------------------


def _rich_request(body: bytes) -> pb.CheckRequest:
    req = http_check({"x-api-key": "k", "anthropic-beta": "b" * 300, "x-long": "v" * 70_000},
                     path="/v1/messages?beta=true", body=body)
    req.attributes.source.principal = "spiffe://example.org/w"
    req.attributes.source.certificate = "-----BEGIN%20CERTIFICATE-----" * 40
    req.attributes.source.address.socket_address.address = "10.0.0.1"
    req.attributes.destination.principal = "gw"
    req.attributes.context_extensions["k"] = "v"
    req.attributes.metadata_context.filter_metadata["f"].CopyFrom(struct_pb2.Struct(fields={
        "a": struct_pb2.Value(string_value="b")}))
    req.attributes.request.time.seconds = 1_700_000_000
    req.attributes.request.http.size = len(body)
    req.attributes.request.http.header_map.headers.append(base_pb2.HeaderValue(key="x", value="y"))
    req.attributes.tls_session.sni = "gw.example"
    return req


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 300_000, 2_097_151, 2_097_152])
def test_split_gives_the_message_and_its_body(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SPLIT_FROM_BYTES", 0)
    body = random.Random(size).randbytes(size)
    for req in (_rich_request(body), http_check({}, body=body)):
        data = req.SerializeToString()
        got, view = wire.split_check(data)
        if view is not None:  # split: the message without the body, the body in place
            assert view.obj is data and got.attributes.request.http.raw_body == b""
            got.attributes.request.http.raw_body = bytes(view)
        assert got == pb.CheckRequest.FromString(data) == req


def test_unusual_messages_are_parsed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SPLIT_FROM_BYTES", 0)
    a = http_check({"x-api-key": "k"}, body=b"first").SerializeToString()
    b = http_check({"x-api-key": "other"}, body=b"second").SerializeToString()
    merged = a + b  # protobuf merges a repeated message field and keeps the last bytes field
    got, view = wire.split_check(merged)
    assert view is None and got == pb.CheckRequest.FromString(merged)
    assert got.attributes.request.http.raw_body == b"second"
    for broken in (a[:-3], a + b"\xff", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        with pytest.raises(DecodeError):
            pb.CheckRequest.FromString(broken)
        with pytest.raises(DecodeError):
            wire.split_check(broken)

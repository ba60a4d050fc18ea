"""extauth's Batches and Files checks (extauth/objects.py) with a real PostgreSQL store, plus the
pure helpers: file reference discovery and the adapter's results meter."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import json_format
from google.rpc import code_pb2
from hypothesis import given
from hypothesis import strategies as st

from ccr.config import parse_config
from ccr.provider_objects import ObjectKind, ObjectStore
from extauth.bundle import build_bundle
from extauth.keys import KeyStore, create_key
from extauth.objects import file_ids, mentions_file
from extauth.policy import PolicyEngine
from extauth.server import Authorizer
from router.adapter.objects import _ResultsMeter
from tests.test_extauth import GATEWAY_YAML, REPO, denied_error, http_check, ok_headers


def _req(cid: str, model: str, **extra: object) -> dict:
    return {"custom_id": cid, "params": {"model": model, "max_tokens": 8,
                                         "messages": [{"role": "user", "content": "hi"}], **extra}}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(REPO / "policies", tmp_path_factory.mktemp("b") / "b.tar.gz", "ccr/authz/decision")


def run(postgres_dsn: str, bundle: Path, calls: list[tuple[str, str, str, bytes]],
        setup: list[tuple[ObjectKind, str, str, str]] = (), **config_extra: object  # type: ignore[assignment]
        ) -> list[pb.CheckResponse]:
    """Each call is (key, method, path, body); `setup` pre-records (kind, id, provider, owner)."""
    config = parse_config({**yaml.safe_load(GATEWAY_YAML), "files": {"enabled": True}, **config_extra})

    async def scenario() -> list[pb.CheckResponse]:
        keys, store = KeyStore(postgres_dsn), ObjectStore(postgres_dsn)
        await keys.start()
        for kind, oid, provider, owner in setup:
            await store.record(kind, oid, provider, owner)
        auth = Authorizer(config, keys, PolicyEngine.load(bundle, "ccr/authz/decision"), store)
        try:
            return [await auth.check(http_check({"x-api-key": k}, method=m, path=p, body=b)) for k, m, p, b in calls]
        finally:
            await keys.close()
            await store.close()
            auth.policy.close()

    return asyncio.run(scenario())


def test_batch_create_decided_per_request(postgres_dsn: str, bundle: Path) -> None:
    _, hal = create_key(postgres_dsn, "hal-x", groups=["haiku-only"])
    body = lambda *r: orjson.dumps({"requests": list(r)})  # noqa: E731
    ok, denied, unknown, mixed, bad = run(postgres_dsn, bundle, [
        (hal, "POST", "/v1/messages/batches", body(_req("a", "claude-haiku-4-5"), _req("b", "claude-haiku-4-5"))),
        (hal, "POST", "/v1/messages/batches", body(_req("a", "claude-haiku-4-5"), _req("evil", "claude-sonnet-4-5"))),
        (hal, "POST", "/v1/messages/batches", body(_req("odd", "gpt-4o"))),
        (hal, "POST", "/v1/messages/batches", body(_req("x", "claude-opus-4-1"), _req("y", "claude-haiku-4-5"))),
        (hal, "POST", "/v1/messages/batches", b'{"requests": []}'),
    ])
    assert ok.status.code == code_pb2.OK
    assert ok_headers(ok)["x-ccr-batch-requests"] == "2"
    assert json_format.MessageToDict(ok.dynamic_metadata)["batch_requests"] == 2
    status, err = denied_error(denied)
    assert status == 403 and "'evil'" in err["message"] and "claude-sonnet-4-5" in err["message"]
    status, err = denied_error(unknown)
    assert status == 404 and "'odd'" in err["message"] and "gpt-4o" in err["message"]
    # claude-opus-4-1 is served by provider "backup", haiku by "anthropic": one batch can't do both.
    status, err = denied_error(mixed)
    assert status == 403 and "'x'" in err["message"]  # haiku-only may not use opus at all
    _, dflt = create_key(postgres_dsn, "mixer", groups=["default"])
    (mixed2,) = run(postgres_dsn, bundle, [(dflt, "POST", "/v1/messages/batches",
                                           body(_req("x", "claude-opus-4-1"), _req("y", "claude-haiku-4-5")))])
    status, err = denied_error(mixed2)
    assert status == 400 and "mixes providers" in err["message"] and "'x'" in err["message"]
    assert denied_error(bad)[0] == 400


def test_a_batch_naming_an_alias_is_refused_with_its_target(postgres_dsn: str, bundle: Path) -> None:
    """Batch bodies reach the provider as they are (no alias step): an alias in one is refused, named."""
    _, k = create_key(postgres_dsn, "batch-alias", groups=["default"])
    body = orjson.dumps({"requests": [_req("a", "claude-haiku-4-5"), _req("b", "fast")]})
    (resp,) = run(postgres_dsn, bundle, [(k, "POST", "/v1/messages/batches", body)],
                  aliases={"fast": "claude-haiku-4-5"})
    status, err = denied_error(resp)
    assert status == 400 and "'b'" in err["message"] and "alias of claude-haiku-4-5" in err["message"]


def test_object_ids_are_scoped_to_their_owner(postgres_dsn: str, bundle: Path) -> None:
    a_rec, a = create_key(postgres_dsn, "owner-a")
    _, b = create_key(postgres_dsn, "other-b")
    paths = [("GET", "/v1/messages/batches/msgbatch_01own"), ("GET", "/v1/messages/batches/msgbatch_01own/results"),
             ("POST", "/v1/messages/batches/msgbatch_01own/cancel"), ("DELETE", "/v1/messages/batches/msgbatch_01own"),
             ("GET", "/v1/files/file_01own"), ("GET", "/v1/files/file_01own/content"),
             ("DELETE", "/v1/files/file_01own")]
    setup = [(ObjectKind.BATCH, "msgbatch_01own", "backup", a_rec.id),
             (ObjectKind.FILE, "file_01own", "backup", a_rec.id)]
    ref = orjson.dumps({"model": "claude-opus-4-1", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "file_01own"}}]}]})
    calls = [(k, m, p, b"") for k in (a, b) for m, p in paths] + [(a, "POST", "/v1/messages", ref),
                                                                 (b, "POST", "/v1/messages", ref)]
    out = run(postgres_dsn, bundle, calls, setup)
    mine, theirs = out[:len(paths)], out[len(paths):2 * len(paths)]
    for r in mine:
        assert r.status.code == code_pb2.OK
        # Routed to the provider that holds the object, not the default one.
        assert ok_headers(r)["x-ccr-cluster"] == "provider_backup_objects"  # the objects cluster: through the adapter
    for r in theirs:
        status, err = denied_error(r)
        assert status == 404 and err["type"] == "not_found_error" and "own" in err["message"]
    assert out[-2].status.code == code_pb2.OK
    assert denied_error(out[-1])[0] == 404


def test_file_ids_found_anywhere() -> None:
    doc = {"messages": [{"content": [{"type": "tool_result", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_a"}}]}]}],
        "system": [{"type": "document", "source": {"file_id": "file_b"}}], "x": {"file_id": 7}}
    assert sorted(map(str, file_ids(doc))) == ["7", "file_a", "file_b"]
    assert mentions_file(b'{"file\\u005fid": "x"}') and mentions_file(b'{"file_id": 1}')
    assert not mentions_file(b'{"model": "m", "messages": []}')


_KEYS = st.sampled_from(["file_id", "source", "type", "content"]) | st.text(max_size=8)


@given(st.recursive(st.none() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(_KEYS, c, max_size=3)))
def test_every_file_reference_needs_the_precheck(doc: object) -> None:
    """Whatever the JSON, if it holds a file_id the byte pre-check says 'parse' (escapes included)."""
    for raw in (orjson.dumps(doc), orjson.dumps(doc).replace(b"file_id", b"file\\u005fid")):
        if list(file_ids(orjson.loads(raw))):
            assert mentions_file(raw)
            # As the fronts hand it: a view of the received buffer, or into the larger check request.
            assert mentions_file(memoryview(bytearray(raw)))
            for around in (b"headers ", b"headers \\ "):
                msg = around + raw + b" trailer"
                assert mentions_file(memoryview(msg)[len(around):len(around) + len(raw)])


def test_the_precheck_on_views_finds_escapes_and_skips_clean_bodies() -> None:
    clean = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    assert not mentions_file(memoryview(bytearray(clean)))
    # A backslash elsewhere in the viewed message (not in the body) only costs the exact search.
    msg = b"\\u005f" + clean
    assert not mentions_file(memoryview(msg)[6:])
    hidden = b'{"x": {"file\\u005fid": "f"}}'
    assert mentions_file(memoryview(b"head" + hidden)[4:]) and mentions_file(memoryview(bytearray(hidden)))


def test_results_meter_sums_succeeded_in_any_chunking() -> None:
    lines = [
        {"custom_id": "a", "result": {"type": "succeeded", "message": {"usage": {
            "input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 2}}}},
        {"custom_id": "b", "result": {"type": "errored", "error": {"type": "error"}}},
        {"custom_id": "c", "result": {"type": "succeeded", "message": {"usage": {
            "input_tokens": 5, "output_tokens": 4}}}},
    ]
    body = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    for size in (1, 7, len(body)):
        m = _ResultsMeter()
        for i in range(0, len(body), size):
            m.feed(body[i:i + size])
        u = m.finish()
        assert (u.input_tokens, u.output_tokens, u.cache_read_input_tokens) == (15, 7, 2) and m.complete


def test_batch_create_requests_meet_the_tier_ceilings(postgres_dsn: str, bundle: Path) -> None:
    """Each request of a batch is decided with its own body facts (max_tokens, tools, ...):
    a ceiling can't be dodged by putting the request in a batch."""
    _, key = create_key(postgres_dsn, "ceiling-batcher", groups=["default"])
    body = lambda *r: orjson.dumps({"requests": list(r)})  # noqa: E731
    ok, tokens, tools, malformed = run(postgres_dsn, bundle, [
        (key, "POST", "/v1/messages/batches", body(_req("a", "claude-haiku-4-5", max_tokens=128000))),
        (key, "POST", "/v1/messages/batches", body(_req("a", "claude-haiku-4-5"),
                                                   _req("huge", "claude-haiku-4-5", max_tokens=200000))),
        (key, "POST", "/v1/messages/batches", body(_req("kit", "claude-haiku-4-5",
                                                        tools=[{"name": f"t{i}"} for i in range(129)]))),
        (key, "POST", "/v1/messages/batches", body(_req("odd", "claude-haiku-4-5", max_tokens="8"))),
    ])
    assert ok.status.code == code_pb2.OK
    status, err = denied_error(tokens)
    assert status == 403 and err["message"].startswith(
        "batch request 'huge' was refused: max_tokens 200000 is above the ceiling of 128000 for tier 'standard'")
    status, err = denied_error(tools)
    assert status == 403 and "'kit'" in err["message"]
    assert "declares 129 tools, above the ceiling of 128" in err["message"]
    status, err = denied_error(malformed)
    assert status == 400 and "max_tokens" in err["message"]


def test_batch_create_request_text_reaches_a_policy_that_reads_text(postgres_dsn: str, tmp_path: Path) -> None:
    import json

    src = tmp_path / "policies"
    src.mkdir()
    (src / "authz.rego").write_text("""package ccr.authz

decision := {"allow": false, "reason": concat("", ["text at ", t.loc, " is not allowed"])} if {
	some t in input.request.text
	contains(t.text, "forbidden")
} else := {"allow": true, "reason": "ok"}
""")
    (src / "data.json").write_text(json.dumps({"policy_input": {"text": True}}))
    reads_text = build_bundle(src, tmp_path / "b.tar.gz", "ccr/authz/decision")
    _, key = create_key(postgres_dsn, "text-batcher", groups=["default"])
    body = lambda *r: orjson.dumps({"requests": list(r)})  # noqa: E731
    bad = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "forbidden"}]}]
    ok, refused = run(postgres_dsn, reads_text, [
        (key, "POST", "/v1/messages/batches", body(_req("a", "claude-haiku-4-5"))),
        (key, "POST", "/v1/messages/batches", body(_req("a", "claude-haiku-4-5"),
                                                   _req("b", "claude-haiku-4-5", messages=bad))),
    ])
    assert ok.status.code == code_pb2.OK
    status, err = denied_error(refused)
    assert status == 403 and err["message"].startswith(
        "batch request 'b' was refused: text at messages[0].content[1] is not allowed")


def test_batch_create_requests_are_scanned_for_pii(postgres_dsn: str, tmp_path: Path) -> None:
    import json
    import shutil

    src = tmp_path / "policies"
    shutil.copytree(REPO / "policies", src)
    data = json.loads((src / "data.json").read_text())
    data["pii"]["mode"] = "block"
    (src / "data.json").write_text(json.dumps(data))
    blocking = build_bundle(src, tmp_path / "b.tar.gz", "ccr/authz/decision")
    _, key = create_key(postgres_dsn, "batcher", groups=["default"])
    body = lambda *r: orjson.dumps({"requests": list(r)})  # noqa: E731
    card = [{"role": "user", "content": [{"type": "text", "text": "charge 4111 1111 "},
                                         {"type": "text", "text": "1111 1111"}]}]
    # A body over 1 MiB is read as a skeleton (extauth/lean_json.py): its long strings are scanned too.
    long_text = "lorem ipsum " * 120_000 + " SSN 123-45-6789"
    large = orjson.dumps({"model": "claude-haiku-4-5", "max_tokens": 8,
                          "messages": [{"role": "user", "content": [{"type": "text", "text": long_text}]}]})
    assert len(large) > 1024 * 1024
    ok, refused, single, big = run(postgres_dsn, blocking, [
        (key, "POST", "/v1/messages/batches", body(_req("a", "claude-haiku-4-5"))),
        (key, "POST", "/v1/messages/batches", body(_req("a", "claude-haiku-4-5"),
                                                   _req("pay", "claude-haiku-4-5", messages=card))),
        (key, "POST", "/v1/messages", orjson.dumps({"model": "claude-haiku-4-5", "max_tokens": 8, "messages": card})),
        (key, "POST", "/v1/messages", large),
    ])
    status, err = denied_error(big)
    assert status == 403 and err["message"].startswith("prompt contains a US SSN (messages[0].content[0])")
    assert ok.status.code == code_pb2.OK
    status, err = denied_error(refused)
    assert status == 403 and err["type"] == "permission_error"
    assert err["message"].startswith("batch request 'pay' was refused: prompt contains a payment card number "
                                     "(messages[0].content[0])")
    assert "requests.1.params" in err["message"] and "4111" not in err["message"]
    status, err = denied_error(single)
    assert status == 403 and err["message"].startswith("prompt contains a payment card number (messages[0].content[0])")


def test_pii_log_mode_allows_and_logs_kind_and_location_only(postgres_dsn: str, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging
    import shutil

    src = tmp_path / "policies"
    shutil.copytree(REPO / "policies", src)
    data = json.loads((src / "data.json").read_text())
    data["pii"]["mode"] = "log"
    (src / "data.json").write_text(json.dumps(data))
    logging_bundle = build_bundle(src, tmp_path / "b.tar.gz", "ccr/authz/decision")
    _, key = create_key(postgres_dsn, "logger", groups=["default"])
    msg = orjson.dumps({"model": "claude-haiku-4-5", "max_tokens": 8, "system": "IBAN GB82 WEST 1234 5698 7654 32",
                        "messages": [{"role": "user", "content": "hi"}]})
    with caplog.at_level(logging.INFO, logger="extauth.server"):
        (resp,) = run(postgres_dsn, logging_bundle, [(key, "POST", "/v1/messages", msg)])
    assert resp.status.code == code_pb2.OK
    lines = [r.getMessage() for r in caplog.records if r.name == "extauth.server" and "pii" in r.getMessage()]
    assert lines == ["pii logger (/v1/messages): iban at system; policy allowed"]
    assert "GB82" not in caplog.text

"""The adapter's Batches/Files handling over real gRPC (router/adapter/objects.py), with a real
PostgreSQL store: ownership recorded from the create reply, results metered once, fail closed."""

from __future__ import annotations

import json
from collections.abc import Iterator

import orjson
import psycopg
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

from tests.harness import running_service
from tests.test_adapter import CFG_KEY, CONFIG, Stream, as_envoy, body, request_headers, response_headers, usage_of

ENV = {"CCR_TEST_ANTHROPIC_KEY": CFG_KEY}


@pytest.fixture(scope="module")
def adapter_db(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str) -> Iterator[str]:
    d = tmp_path_factory.mktemp("adapter-db")
    with running_service("router.adapter", d, CONFIG, env=ENV, postgres_dsn=postgres_dsn) as child:
        yield as_envoy(d, str(child.info["address"]))


@pytest.fixture(scope="module")
def adapter_nodb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The harness default DSN points at a closed port: every store call fails.
    d = tmp_path_factory.mktemp("adapter-nodb")
    with running_service("router.adapter", d, CONFIG, env=ENV) as child:
        yield as_envoy(d, str(child.info["address"]))


def _req(method: str, path: str, principal: str | None) -> list[tuple[str, str]]:
    pairs = [(":method", method), (":path", path), (":authority", "gw"), ("x-api-key", "ccr_client")]
    return pairs + ([("x-ccr-principal-id", principal)] if principal else [])


def _batch(bid: str) -> dict:
    return {"id": bid, "type": "message_batch", "processing_status": "ended",
            "request_counts": {"processing": 0, "succeeded": 2, "errored": 0, "canceled": 0, "expired": 0},
            "results_url": f"https://api.anthropic.com/v1/messages/batches/{bid}/results"}


def test_create_records_owner_and_results_are_metered_once(adapter_db: str, postgres_dsn: str) -> None:
    s = Stream(adapter_db, "anthropic")
    r = s.send(request_headers(_req("POST", "/v1/messages/batches", "key_owner1")))
    mut = r.request_headers.response.header_mutation
    assert "x-ccr-principal-id" in mut.remove_headers  # never reaches the provider
    assert {o.header.key: o.header.raw_value for o in mut.set_headers}["accept-encoding"] == b"identity"
    r = s.send(response_headers(200, "application/json", content_length="300"))
    assert r.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    assert "content-length" in r.response_headers.response.header_mutation.remove_headers
    r = s.send(body(orjson.dumps(_batch("msgbatch_01adapter")), end=True))
    out = json.loads(r.response_body.response.body_mutation.body)
    assert out["results_url"] == "/v1/messages/batches/msgbatch_01adapter/results"
    assert usage_of(r) == {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                           "cache_read_input_tokens": 0}
    s.close()
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute("SELECT owner_principal_id, provider, request_count FROM provider_objects"
                           " WHERE object_id = 'msgbatch_01adapter'").fetchone()
    assert row == ("key_owner1", "anthropic", 2)

    lines = b"".join(orjson.dumps({"custom_id": c, "result": {"type": "succeeded", "message": {
        "usage": {"input_tokens": 7, "output_tokens": 5}}}}) + b"\n" for c in ("a", "b"))
    metered = []
    for _ in range(2):
        s = Stream(adapter_db, "anthropic")
        s.send(request_headers(_req("GET", "/v1/messages/batches/msgbatch_01adapter/results", "key_owner1")))
        r = s.send(response_headers(200, "application/binary"))
        assert not r.HasField("mode_override")  # the JSON Lines stream through the adapter
        s.send(body(lines[:13]))
        r = s.send(body(lines[13:], end=True))
        metered.append(usage_of(r))
        s.close()
    assert metered[0] is not None and metered[0]["input_tokens"] == 14 and metered[0]["output_tokens"] == 10
    assert metered[1] is not None and metered[1]["input_tokens"] == 0 and metered[1]["output_tokens"] == 0


def test_no_principal_is_refused_before_the_provider(adapter_db: str) -> None:
    s = Stream(adapter_db, "anthropic")
    r = s.send(request_headers(_req("GET", "/v1/messages/batches", None)))
    assert r.immediate_response.status.code == 500
    assert "no principal" in json.loads(r.immediate_response.body)["error"]["message"]
    s.close()


def test_unrecordable_create_fails_closed(adapter_nodb: str) -> None:
    s = Stream(adapter_nodb, "anthropic")
    s.send(request_headers(_req("POST", "/v1/files", "key_owner1")))
    s.send(response_headers(200, "application/json"))
    r = s.send(body(orjson.dumps({"id": "file_01x", "type": "file"}), end=True))
    assert r.immediate_response.status.code == 500
    err = json.loads(r.immediate_response.body)["error"]
    assert err["type"] == "api_error" and "files.upload" in err["message"]
    s.close()


def test_messages_never_touch_the_store(adapter_nodb: str) -> None:
    """Ordinary traffic works with the database unreachable: the object path is not on it."""
    s = Stream(adapter_nodb, "anthropic")
    r = s.send(request_headers(_req("POST", "/v1/messages", "key_owner1")))
    assert r.WhichOneof("response") == "request_headers"
    r = s.send(response_headers(200, "application/json"))
    r = s.send(body(orjson.dumps({"type": "message", "usage": {"input_tokens": 3, "output_tokens": 2}}), end=True))
    assert usage_of(r) is not None and usage_of(r)["input_tokens"] == 3  # type: ignore[index]
    assert not r.response_body.response.HasField("body_mutation")
    s.close()

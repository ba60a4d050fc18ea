"""Message Batches and Files through the whole gateway (real Envoy, extauth, ratelimit, adapter,
audit, PostgreSQL, Redis, the emulator) with two principals: what A creates, B can neither see
nor use; a batch is checked request by request; batch results are metered once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import psycopg
import pytest

from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import emulator_mark, emulator_records, gateway_config, log_row

BETA = ["files-api-2025-04-14"]
HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-6"


def _start(tmp: Path, files_enabled: bool) -> Gateway:
    g = Gateway(gateway_config(tmp, lambda cfg: cfg.update(files={"enabled": files_enabled}))).start()
    g.issue_local_key()
    return g


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = _start(tmp_path_factory.mktemp("gw-objects"), files_enabled=True)
    try:
        yield g
    finally:
        g.stop()
    assert all(not c.alive() for c in g.children)


@pytest.fixture(scope="module")
def keys(dsn: str) -> dict[str, str]:
    return {name: create_key(dsn, name, groups)[1]
            for name, groups in (("alice", ["default"]), ("bob", ["default"]), ("hal", ["haiku-only"]))}


def client(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)


def req(cid: str, model: str = HAIKU, **params: Any) -> dict[str, Any]:
    return {"custom_id": cid, "params": {"model": model, "max_tokens": 32,
                                         "messages": [{"role": "user", "content": f"hello {cid}"}], **params}}


def test_batch_is_owned_and_invisible_to_others(gw: Gateway, keys: dict[str, str]) -> None:
    a, b = client(gw, keys["alice"]), client(gw, keys["bob"])
    batch = a.messages.batches.create(requests=[req("one"), req("two")])  # type: ignore[list-item]
    assert batch.id.startswith("msgbatch_") and batch.processing_status == "ended"
    # results_url points at the gateway (path only), never straight at the provider.
    assert batch.results_url == f"/v1/messages/batches/{batch.id}/results"
    assert a.messages.batches.retrieve(batch.id).id == batch.id
    assert [r.custom_id for r in a.messages.batches.results(batch.id)] == ["one", "two"]
    assert batch.id in [x.id for x in a.messages.batches.list()]

    mark = emulator_mark(gw)
    for call in (lambda: b.messages.batches.retrieve(batch.id),
                 lambda: list(b.messages.batches.results(batch.id)),
                 lambda: b.messages.batches.cancel(batch.id),
                 lambda: b.messages.batches.delete(batch.id)):
        with pytest.raises(anthropic.NotFoundError) as e:
            call()
        # The same answer as for an id that does not exist (plus this refusal's own decision id).
        assert re.fullmatch(rf"message_batch: {batch.id} not found \(decision dec_[0-9a-f]+\)",
                            e.value.body["error"]["message"])  # type: ignore[index]
    assert mark.arrived() == [], "a refused request reached the provider"
    with pytest.raises(anthropic.NotFoundError) as e:
        b.messages.batches.retrieve("msgbatch_01doesnotexist000000000")
    assert "not found" in e.value.body["error"]["message"]  # type: ignore[index]
    # B's listing comes from the provider's (which holds A's batch) but shows only B's own.
    assert batch.id not in [x.id for x in b.messages.batches.list()]
    mine = b.messages.batches.create(requests=[req("b1")])  # type: ignore[list-item]
    page = b.messages.batches.list()
    assert [x.id for x in page.data] == [mine.id] and page.first_id == page.last_id == mine.id
    # The owner can delete it.
    assert a.messages.batches.delete(batch.id).id == batch.id


def test_batch_with_a_denied_model_is_refused_whole(gw: Gateway, keys: dict[str, str]) -> None:
    hal = client(gw, keys["hal"])
    mark = emulator_mark(gw)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        hal.messages.batches.create(requests=[req("ok", HAIKU), req("sneaky", SONNET)])  # type: ignore[list-item]
    msg = e.value.body["error"]["message"]  # type: ignore[index]
    assert "'sneaky'" in msg and SONNET in msg and "whole batch" in msg
    with pytest.raises(anthropic.NotFoundError) as nf:
        hal.messages.batches.create(requests=[req("odd", "gpt-4o")])  # type: ignore[list-item]
    assert "'odd'" in nf.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        hal.messages.batches.create(requests=[{"custom_id": "x", "params": {"max_tokens": 5}}])  # type: ignore[list-item]
    assert mark.arrived() == [], "a refused batch reached the provider"
    ok = hal.messages.batches.create(requests=[req("fine", HAIKU)])  # type: ignore[list-item]
    assert ok.request_counts.succeeded == 1


def test_batch_counts_each_request_against_the_rate_limit(gw: Gateway, dsn: str) -> None:
    _, key = create_key(dsn, "rpm-three", ["default"], rpm=3)
    c = client(gw, key)
    c.messages.batches.create(requests=[req("r1"), req("r2"), req("r3")])  # type: ignore[list-item]
    with pytest.raises(anthropic.RateLimitError):
        c.messages.create(model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "hi"}])


def test_batch_results_are_metered_once(gw: Gateway, keys: dict[str, str], dsn: str) -> None:
    a = client(gw, keys["alice"])
    batch = a.messages.batches.create(requests=[req("m1"), req("m2"), req("bad", max_tokens=0)])  # type: ignore[list-item]
    url = f"{gw.url}/v1/messages/batches/{batch.id}/results"
    headers = {"x-api-key": keys["alice"], "anthropic-version": "2023-06-01"}
    first = httpx.get(url, headers=headers)
    assert first.status_code == 200
    lines = [anthropic.types.messages.MessageBatchIndividualResponse.model_validate_json(x)
             for x in first.text.splitlines() if x]
    ok = [x.result.message.usage for x in lines if x.result.type == "succeeded"]  # type: ignore[union-attr]
    assert len(ok) == 2
    row = log_row(dsn, first.headers["x-request-id"])
    assert row["input_tokens"] == sum(u.input_tokens for u in ok) > 0
    assert row["output_tokens"] == sum(u.output_tokens for u in ok) > 0
    second = httpx.get(url, headers=headers)
    assert second.status_code == 200 and second.text == first.text
    again = log_row(dsn, second.headers["x-request-id"])
    assert again["input_tokens"] == 0 and again["output_tokens"] == 0
    with psycopg.connect(dsn) as conn:
        row2 = conn.execute("SELECT owner_principal_id, metered_at, request_count FROM provider_objects"
                            " WHERE kind = 'batch' AND object_id = %s", (batch.id,)).fetchone()
    assert row2 is not None and row2[1] is not None and row2[2] == 3


def test_files_are_owned_and_invisible_to_others(gw: Gateway, keys: dict[str, str]) -> None:
    a, b = client(gw, keys["alice"]), client(gw, keys["bob"])
    f = a.beta.files.upload(file=("secret.txt", b"alice's notes", "text/plain"), betas=BETA)
    assert f.id.startswith("file_")
    assert a.beta.files.retrieve_metadata(f.id, betas=BETA).filename == "secret.txt"
    assert a.beta.files.download(f.id, betas=BETA).read() == b"alice's notes"
    assert f.id in [x.id for x in a.beta.files.list(betas=BETA)]
    doc = {"type": "document", "source": {"type": "file", "file_id": f.id}}
    msg = [{"role": "user", "content": [doc, {"type": "text", "text": "summarise"}]}]
    assert a.beta.messages.create(model=HAIKU, max_tokens=16, betas=BETA, messages=msg).usage.input_tokens > 0

    mark = emulator_mark(gw)
    for call in (lambda: b.beta.files.retrieve_metadata(f.id, betas=BETA),
                 lambda: b.beta.files.download(f.id, betas=BETA),
                 lambda: b.beta.files.delete(f.id, betas=BETA),
                 lambda: b.beta.messages.create(model=HAIKU, max_tokens=16, betas=BETA, messages=msg),
                 lambda: b.messages.batches.create(requests=[  # type: ignore[list-item]
                     {"custom_id": "steal", "params": {"model": HAIKU, "max_tokens": 16, "messages": msg}}])):
        with pytest.raises(anthropic.NotFoundError) as e:
            call()
        assert f.id in e.value.body["error"]["message"]  # type: ignore[index]
    # A JSON escape does not hide the reference.
    doc_json = json.dumps({"model": HAIKU, "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": f.id}}]}]})
    escaped = doc_json.replace('"file_id"', '"file\\u005fid"')
    assert "file_id" not in escaped
    r = httpx.post(f"{gw.url}/v1/messages", content=escaped,
                   headers={"x-api-key": keys["bob"], "anthropic-version": "2023-06-01",
                            "anthropic-beta": BETA[0], "content-type": "application/json"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert mark.arrived() == [], "a refused request reached the provider"
    assert f.id not in [x.id for x in b.beta.files.list(betas=BETA)]
    assert a.beta.files.delete(f.id, betas=BETA).id == f.id


def test_files_api_off_unless_enabled(tmp_path: Path) -> None:
    g = _start(tmp_path, files_enabled=False)
    try:
        c = client(g, g.api_key)
        with pytest.raises(anthropic.PermissionDeniedError, match="Files API is disabled"):
            c.beta.files.upload(file=("x.txt", b"x", "text/plain"), betas=BETA)
        with pytest.raises(anthropic.PermissionDeniedError, match="Files API is disabled"):
            c.beta.files.list(betas=BETA)
        doc = {"type": "document", "source": {"type": "file", "file_id": "file_011Cabc"}}
        with pytest.raises(anthropic.PermissionDeniedError):
            c.beta.messages.create(model=HAIKU, max_tokens=8, betas=BETA,
                                   messages=[{"role": "user", "content": [doc]}])
        assert [r["path"] for r in emulator_records(g)] == []
    finally:
        g.stop()


def test_listing_pages_through_own_objects_only(gw: Gateway, dsn: str) -> None:
    _, ka = create_key(dsn, "lister-a", ["default"])
    _, kb = create_key(dsn, "lister-b", ["default"])
    a, b = client(gw, ka), client(gw, kb)
    b_ids = []
    for i in range(2):  # B's batches interleaved with A's, so each provider page mixes owners
        a.messages.batches.create(requests=[req(f"a{i}")])  # type: ignore[list-item]
        b_ids.append(b.messages.batches.create(requests=[req(f"b{i}")]).id)  # type: ignore[list-item]
        a.messages.batches.create(requests=[req(f"c{i}")])  # type: ignore[list-item]
    first = b.messages.batches.list(limit=1)
    assert [x.id for x in first.data] == [b_ids[1]] and first.has_more and first.last_id == b_ids[1]
    # The provider was asked for its largest page; the caller's limit applies to what is kept.
    assert "limit=1000" in emulator_records(gw)[-1]["query_string"]
    assert [x.id for x in b.messages.batches.list(limit=1)] == b_ids[::-1]  # auto-pagination, own only
    f = b.beta.files.upload(file=("b.txt", b"b", "text/plain"), betas=BETA)
    a.beta.files.upload(file=("a.txt", b"a", "text/plain"), betas=BETA)
    assert [x.id for x in b.beta.files.list(limit=1, betas=BETA)] == [f.id]

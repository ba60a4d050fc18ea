"""The emulator's Message Batches and Files APIs, driven by the real `anthropic` SDK over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.test_emulator import KEY, _launch, _stop

BETA = ["files-api-2025-04-14"]


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("emu-objects")
    immediate, url1 = _launch(tmp, "--api-key", KEY)
    manual, url2 = _launch(tmp, "--api-key", KEY, "--batch-mode", "manual")
    try:
        yield {"immediate": url1, "manual": url2}
    finally:
        assert _stop(immediate) == 0 and _stop(manual) == 0


def _client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def _req(cid: str, text: str = "hi", **params: Any) -> dict[str, Any]:
    p = {"model": "claude-haiku-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": text}], **params}
    return {"custom_id": cid, "params": p}


def test_batch_lifecycle_immediate(urls: dict[str, str]) -> None:
    c = _client(urls["immediate"])
    b = c.messages.batches.create(requests=[_req("a", "first"), _req("b", max_tokens=0)])  # type: ignore[list-item]
    assert b.id.startswith("msgbatch_") and b.type == "message_batch"
    assert b.processing_status == "ended" and b.ended_at is not None
    assert b.request_counts.succeeded == 1 and b.request_counts.errored == 1 and b.request_counts.processing == 0
    assert b.results_url == f"{urls['immediate']}/v1/messages/batches/{b.id}/results"
    assert c.messages.batches.retrieve(b.id).id == b.id
    results = {r.custom_id: r.result for r in c.messages.batches.results(b.id)}
    assert results["a"].type == "succeeded"
    msg = results["a"].message  # type: ignore[union-attr]
    assert "first" in msg.content[0].text and msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    assert results["b"].type == "errored"
    assert "max_tokens" in results["b"].error.error.message  # type: ignore[union-attr]
    # Cancelling an ended batch is refused; deleting it works, then it is gone.
    with pytest.raises(anthropic.BadRequestError):
        c.messages.batches.cancel(b.id)
    deleted = c.messages.batches.delete(b.id)
    assert deleted.id == b.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        c.messages.batches.retrieve(b.id)


def test_batch_manual_end_and_cancel(urls: dict[str, str]) -> None:
    base = urls["manual"]
    c = _client(base)
    b = c.messages.batches.create(requests=[_req("x"), _req("y")])  # type: ignore[list-item]
    assert b.processing_status == "in_progress" and b.results_url is None
    assert b.request_counts.processing == 2
    with pytest.raises(anthropic.BadRequestError):
        c.messages.batches.delete(b.id)  # in-progress batches must be canceled first
    early = httpx.get(f"{base}/v1/messages/batches/{b.id}/results",
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert early.status_code == 400 and "has not ended" in early.json()["error"]["message"]
    assert httpx.post(f"{base}/_emulator/batches/{b.id}/end").status_code == 200
    ended = c.messages.batches.retrieve(b.id)
    assert ended.processing_status == "ended" and ended.request_counts.succeeded == 2

    b2 = c.messages.batches.create(requests=[_req("z")])  # type: ignore[list-item]
    canceling = c.messages.batches.cancel(b2.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
    httpx.post(f"{base}/_emulator/batches/end").raise_for_status()
    done = c.messages.batches.retrieve(b2.id)
    assert done.processing_status == "ended" and done.request_counts.canceled == 1
    assert [r.result.type for r in c.messages.batches.results(b2.id)] == ["canceled"]


def test_batch_list_pagination(urls: dict[str, str]) -> None:
    c = _client(urls["immediate"])
    made = [c.messages.batches.create(requests=[_req(f"p{i}")]).id for i in range(3)]  # type: ignore[list-item]
    page = c.messages.batches.list(limit=2)
    assert len(page.data) == 2 and page.has_more and page.first_id == page.data[0].id
    assert page.last_id == page.data[-1].id
    listed = [b.id for b in c.messages.batches.list(limit=2)]  # auto-pagination follows last_id
    assert listed[:3] == made[::-1]  # newest first
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("body,field", [
    ({}, "requests"),
    ({"requests": []}, "requests"),
    ({"requests": [{"custom_id": "bad id!", "params": {}}]}, "custom_id"),
    ({"requests": [_req("dup"), _req("dup")]}, "not unique"),
    ({"requests": [{"custom_id": "a"}]}, "params"),
])
def test_batch_create_validation(urls: dict[str, str], body: dict[str, Any], field: str) -> None:
    r = httpx.post(f"{urls['immediate']}/v1/messages/batches", json=body,
                   headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert r.status_code == 400
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert field in err["error"]["message"]


def test_files_lifecycle(urls: dict[str, str], tmp_path: Path) -> None:
    c = _client(urls["immediate"])
    f = c.beta.files.upload(file=("notes.txt", b"hi\x00\xff\r\nfile", "text/plain"), betas=BETA)
    assert f.id.startswith("file_") and f.type == "file" and f.filename == "notes.txt"
    assert f.mime_type == "text/plain" and f.size_bytes == 10
    meta = c.beta.files.retrieve_metadata(f.id, betas=BETA)
    assert meta.id == f.id and meta.size_bytes == 10
    assert c.beta.files.download(f.id, betas=BETA).read() == b"hi\x00\xff\r\nfile"
    assert f.id in [x.id for x in c.beta.files.list(betas=BETA)]
    # A Messages request can reference it; an unknown file_id is not found.
    doc = {"type": "document", "source": {"type": "file", "file_id": f.id}}
    msg = c.beta.messages.create(model="claude-haiku-4-5", max_tokens=16, betas=BETA,
                                 messages=[{"role": "user", "content": [doc, {"type": "text", "text": "sum"}]}])
    assert msg.usage.input_tokens > 0
    gone = {"type": "document", "source": {"type": "file", "file_id": "file_011Cnope"}}
    with pytest.raises(anthropic.NotFoundError):
        c.beta.messages.create(model="claude-haiku-4-5", max_tokens=16, betas=BETA,
                               messages=[{"role": "user", "content": [gone]}])
    deleted = c.beta.files.delete(f.id, betas=BETA)
    assert deleted.id == f.id
    with pytest.raises(anthropic.NotFoundError):
        c.beta.files.retrieve_metadata(f.id, betas=BETA)


def test_files_need_the_beta_header(urls: dict[str, str]) -> None:
    c = _client(urls["immediate"])
    with pytest.raises(anthropic.BadRequestError, match="files-api-2025-04-14"):
        c.beta.files.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=urls["immediate"], api_key="wrong", max_retries=0).beta.files.list(betas=BETA)


def test_files_list_pagination(urls: dict[str, str]) -> None:
    c = _client(urls["manual"])
    made = [c.beta.files.upload(file=(f"f{i}.txt", b"x", "text/plain"), betas=BETA).id for i in range(3)]
    page = c.beta.files.list(limit=2, betas=BETA)
    assert [x.id for x in page.data] == made[::-1][:2] and page.next_page == made[1]
    assert [x.id for x in c.beta.files.list(limit=2, betas=BETA)][:3] == made[::-1]

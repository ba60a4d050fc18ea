"""Fail closed: when a decision service is down, the client gets a clear Anthropic-shaped
error and the request never reaches the provider (no silent allow).

A gateway of its own, since these tests stop its parts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from ccr.supervisor import Gateway
from tests.harness import emulator_mark, running_gateway

BODY = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gw(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """limits.admission as the test asks (indirect parameter), else the default."""
    admission = getattr(request, "param", "extauth")
    with running_gateway(tmp_path, lambda cfg: cfg["limits"].update(admission=admission)) as g:
        yield g


def _post(gw: Gateway) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/messages", json=BODY, timeout=30,
                      headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"})


def _list_batches(gw: Gateway) -> httpx.Response:
    return httpx.get(f"{gw.url}/v1/messages/batches", timeout=30,
                     headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"})


def _stop(gw: Gateway, name: str) -> None:
    """Every worker of the service (services.workers may start several: name, name.1, ...)."""
    workers = [c for c in gw.children if c.name.split(".")[0] == name]
    assert workers
    for child in workers:
        child.stop()


@pytest.mark.parametrize("gw,service,status,kind", [
    ("extauth", "extauth", 503, "api_error"),
    # Envoy asks the rate limit service at the request only when admission is there (limits.admission).
    ("ratelimit", "ratelimit", 503, "api_error"),
    ("extauth", "adapter", 502, "api_error"),
], indirect=["gw"])
def test_service_down_fails_closed(gw: Gateway, service: str, status: int, kind: str) -> None:
    # The adapter serves only Batches and Files (their owner records); Messages never call it.
    call = _list_batches if service == "adapter" else _post
    assert call(gw).status_code == 200
    mark = emulator_mark(gw)
    _stop(gw, service)
    if service == "adapter":
        assert _post(gw).status_code == 200
        assert [x["path"] for x in mark.arrived()] == ["/v1/messages"]
        mark = emulator_mark(gw)
    r = call(gw)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert body["error"]["message"]
    assert mark.arrived() == [], "a request reached the provider without a decision"
    # Its audit row says so: not forwarded, no usage (NULL, not 0).
    row = _row(gw, r.headers["x-request-id"])
    assert (row["usage_status"], row["input_tokens"], row["output_tokens"]) == ("not_forwarded", None, None)


def _row(gw: Gateway, request_id: str, timeout: float = 15.0) -> dict[str, object]:
    assert gw.runtime is not None
    deadline = time.monotonic() + timeout
    with psycopg.connect(gw.runtime.postgres_dsn, autocommit=True) as conn, \
            conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        while (row := cur.execute("SELECT * FROM request_log WHERE request_id = %s", (request_id,)).fetchone()) \
                is None:
            assert time.monotonic() < deadline, f"no request_log row for {request_id}"
            time.sleep(0.05)
    return row


def test_with_admission_in_extauth_the_rate_limit_service_is_off_the_request_path(gw: Gateway) -> None:
    """extauth decides the request-time limits on Redis itself: a stopped rate limit service (which then
    only takes stream-end token charges) refuses nothing, and the limits are still decided."""
    assert _post(gw).status_code == 200
    _stop(gw, "ratelimit")
    r = _post(gw)
    assert r.status_code == 200, r.text
    h = r.headers
    assert int(h["anthropic-ratelimit-requests-remaining"]) < int(h["anthropic-ratelimit-requests-limit"])
    assert _row(gw, r.headers["x-request-id"])["ratelimit"] == "ok"

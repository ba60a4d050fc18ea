"""Captured bodies (audit.bodies), end to end: the anthropic SDK through the real Envoy, extauth deciding
from the key's tenant, the capture filter on the provider clusters, and the access-log receiver
encrypting into PostgreSQL. The enabled tenant's bodies are stored encrypted (the prompt is not in the
ciphertext), decrypt to the exact bytes sent and received (a stream as its SSE bytes, a Bedrock
translation as the client got it); another tenant's are not stored, nor a client's own x-ccr-capture;
a changed or moved ciphertext is refused; retention deletes them."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anthropic
import httpx2
import psycopg
import pytest
from psycopg.rows import dict_row

from audit.bodies import KEY_FILE
from ccr.cli import main
from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import log_row, running_gateway
from tests.provider_emulators import Emulators, running_emulators

SONNET = "claude-sonnet-4-5"
MAX = 64 * 1024
DAYS = 7


@pytest.fixture(scope="module")
def emus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulators]:
    with running_emulators(tmp_path_factory.mktemp("emus")) as e:
        yield e


# Both ext_authz transports: over HTTP the captured request body travels in its own answer header
# (H_AUTHZ_BODY_CAPTURE), as it does not fit the request headers ext_authz may add.
@pytest.fixture(scope="module", params=["grpc", "http"])
def gw(tmp_path_factory: pytest.TempPathFactory, emus: Emulators, request: pytest.FixtureRequest
       ) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["services"]["authz_transport"] = request.param
        cfg["providers"] += emus.providers()
        cfg["models"] = emus.models() + cfg["models"]
        cfg.setdefault("audit", {})["bodies"] = [{"tenant": "capture-co", "retention_days": DAYS}]
        cfg["audit"]["body_max_bytes"] = MAX

    saved = {k: os.environ.get(k) for k in emus.env()}
    os.environ.update(emus.env())
    try:
        with running_gateway(tmp_path_factory.mktemp("gw"), edit) as g:
            yield g
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Sent:
    """The exact request bodies an SDK client put on the wire (an httpx2 event hook, the SDK's HTTP client)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def hook(self, request: httpx2.Request) -> None:
        self.bodies.append(request.read())


def _client(gw: Gateway, key: str, sent: Sent, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, default_headers=headers,
                               http_client=httpx2.Client(event_hooks={"request": [sent.hook]}))


def _stored(dsn: str, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        while True:
            row = conn.execute("SELECT * FROM request_body WHERE request_id = %s", (request_id,)).fetchone()
            if row is not None:
                return row
            assert time.monotonic() < deadline, f"no request_body row for {request_id}"
            time.sleep(0.05)


def _count(dsn: str, request_id: str) -> int:
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute("SELECT count(*) FROM request_body WHERE request_id = %s", (request_id,)).fetchone()
    return n


def _decrypt(gw: Gateway, request_id: str, part: str, capsysbinary: pytest.CaptureFixture[bytes]) -> bytes:
    capsysbinary.readouterr()
    code = main(["audit", "body", request_id, "--part", part, "-c", str(gw.config_path)])
    out = capsysbinary.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def keys(gw: Gateway) -> dict[str, str]:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    _, on = create_key(dsn, "bodies-on", ["default"], tenant="capture-co")
    _, off = create_key(dsn, "bodies-off", ["default"], tenant="acme")
    return {"on": on, "off": off}


def test_enabled_tenant_bodies_stored_encrypted_and_exact(gw: Gateway, keys: dict[str, str],
                                                          capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    secret = f"prompt-secret-{uuid.uuid4().hex}"
    sent = Sent()
    c = _client(gw, keys["on"], sent)
    raw = c.messages.with_raw_response.create(model=SONNET, max_tokens=32,
                                              messages=[{"role": "user", "content": secret}])
    raw.parse()
    rid = raw.headers["x-request-id"]
    reply = raw.http_response.content
    row = _stored(dsn, rid)
    # Encrypted: neither body is in the clear, and each has its own nonce.
    assert secret.encode() not in bytes(row["request_ct"]) and secret.encode() not in bytes(row["response_ct"])
    assert reply not in bytes(row["response_ct"]) and row["request_nonce"] != row["response_nonce"]
    assert row["request_bytes"] == len(sent.bodies[-1]) and row["request_truncated"] is False
    assert row["response_bytes"] == len(reply) and row["response_truncated"] is False
    assert row["expires_at"] - row["ts"] == timedelta(days=DAYS)
    key_file = gw.data_dir() / "audit" / KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(row["key_id"]) == 16
    # Decrypts to the exact bytes the SDK sent and got; joinable to its audit row.
    assert _decrypt(gw, rid, "request", capsysbinary) == sent.bodies[-1]
    assert _decrypt(gw, rid, "response", capsysbinary) == reply
    assert log_row(dsn, rid)["tenant"] == "capture-co"
    # ccr audit query --show-body: the row with its bodies.
    capsysbinary.readouterr()
    assert main(["audit", "query", "--tenant", "capture-co", "--show-body", "--limit", "50",
                 "-c", str(gw.config_path)]) == 0
    lines = [json.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    mine = next(d for d in lines if d["request_id"] == rid)
    assert mine["body"]["request"] == sent.bodies[-1].decode() and mine["body"]["response"] == reply.decode()

    # A stream: the reply is kept as the SSE bytes the client read.
    with c.messages.with_streaming_response.create(model=SONNET, max_tokens=48, stream=True,
                                                   messages=[{"role": "user", "content": secret + " stream"}]) as s:
        srid = s.headers["x-request-id"]
        sse = b"".join(s.iter_bytes())
    assert b"event: message_stop" in sse
    _stored(dsn, srid)
    assert _decrypt(gw, srid, "response", capsysbinary) == sse
    assert _decrypt(gw, srid, "request", capsysbinary) == sent.bodies[-1]


def test_translated_reply_is_kept_as_the_client_got_it(gw: Gateway, keys: dict[str, str],
                                                        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """Through the adapter (Bedrock translation): the Anthropic-shaped reply the client read."""
    assert gw.runtime is not None
    sent = Sent()
    raw = _client(gw, keys["on"], sent).messages.with_raw_response.create(
        model="claude-bedrock-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "via bedrock"}])
    raw.parse()
    rid = raw.headers["x-request-id"]
    _stored(gw.runtime.postgres_dsn, rid)
    got = _decrypt(gw, rid, "response", capsysbinary)
    assert got == raw.http_response.content and json.loads(got)["type"] == "message"
    assert _decrypt(gw, rid, "request", capsysbinary) == sent.bodies[-1]
    # Streamed: Bedrock's event stream translated into the SSE the client read, byte for byte.
    with _client(gw, keys["on"], sent).messages.with_streaming_response.create(
            model="claude-bedrock-sonnet-4-5", max_tokens=16, stream=True,
            messages=[{"role": "user", "content": "via bedrock, streamed"}]) as st:
        srid = st.headers["x-request-id"]
        sse = b"".join(st.iter_bytes())
    assert b"event: message_stop" in sse
    _stored(gw.runtime.postgres_dsn, srid)
    assert _decrypt(gw, srid, "response", capsysbinary) == sse


def test_larger_body_is_cut_with_a_flag_and_the_request_still_served(
        gw: Gateway, keys: dict[str, str], capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert gw.runtime is not None
    sent = Sent()
    big = "x" * (2 * MAX)
    raw = _client(gw, keys["on"], sent).messages.with_raw_response.create(
        model=SONNET, max_tokens=8, messages=[{"role": "user", "content": big}])
    assert raw.parse().type == "message"
    rid = raw.headers["x-request-id"]
    row = _stored(gw.runtime.postgres_dsn, rid)
    assert row["request_truncated"] is True and row["request_bytes"] == len(sent.bodies[-1]) > MAX
    assert _decrypt(gw, rid, "request", capsysbinary) == sent.bodies[-1][:MAX]


def test_other_tenant_and_client_header_store_nothing(gw: Gateway, keys: dict[str, str]) -> None:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    sent = Sent()
    # Not enabled, even when the client asks for capture itself (x-ccr-* never reaches extauth).
    off = _client(gw, keys["off"], sent, **{"x-ccr-capture": "65536"})
    raw = off.messages.with_raw_response.create(model=SONNET, max_tokens=8,
                                                messages=[{"role": "user", "content": "not kept"}])
    raw.parse()
    rid = raw.headers["x-request-id"]
    # Then an enabled request on the same gateway, and wait until its body is stored: the receiver has
    # handled the earlier entry by then on the same stream (entries go in order).
    on = _client(gw, keys["on"], Sent())
    later = on.messages.with_raw_response.create(model=SONNET, max_tokens=8,
                                                 messages=[{"role": "user", "content": "kept"}])
    later.parse()
    _stored(dsn, later.headers["x-request-id"])
    assert log_row(dsn, rid)["tenant"] == "acme"
    assert _count(dsn, rid) == 0


def test_tampered_or_moved_ciphertext_is_refused(gw: Gateway, keys: dict[str, str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    c = _client(gw, keys["on"], Sent())
    rids = []
    for text in ("first", "second"):
        raw = c.messages.with_raw_response.create(model=SONNET, max_tokens=8,
                                                  messages=[{"role": "user", "content": text}])
        raw.parse()
        rids.append(raw.headers["x-request-id"])
    a = _stored(dsn, rids[0])
    _stored(dsn, rids[1])
    with psycopg.connect(dsn, autocommit=True) as conn:  # the owner, as an administrator could
        ct = bytearray(a["request_ct"])
        ct[5] ^= 0x01
        conn.execute("UPDATE request_body SET request_ct = %s WHERE request_id = %s", (bytes(ct), rids[0]))
        # a's response moved onto b's row: bound to a's request id, so refused for b.
        conn.execute("UPDATE request_body SET response_nonce = %s, response_ct = %s WHERE request_id = %s",
                     (a["response_nonce"], a["response_ct"], rids[1]))
    for rid, part in ((rids[0], "request"), (rids[1], "response")):
        capsys.readouterr()
        code = main(["audit", "body", rid, "--part", part, "-c", str(gw.config_path)])
        err = capsys.readouterr().err
        assert code == 1 and "REFUSED" in err and f"{part} body of {rid} does not decrypt" in err, err
    capsys.readouterr()
    assert main(["audit", "query", "--tenant", "capture-co", "--show-body", "-c", str(gw.config_path)]) == 1
    out = capsys.readouterr().out
    shown = {d["request_id"]: d["body"] for d in map(json.loads, out.splitlines())}
    assert "does not decrypt" in shown[rids[0]]["error"] and "does not decrypt" in shown[rids[1]]["error"]


def test_retention_deletes_expired_bodies(gw: Gateway, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    raw = _client(gw, keys["on"], Sent()).messages.with_raw_response.create(
        model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "retained"}])
    raw.parse()
    rid = raw.headers["x-request-id"]
    row = _stored(dsn, rid)
    cfg = str(gw.config_path)
    assert main(["audit", "retain", "-c", cfg, "--now", (row["ts"] + timedelta(days=DAYS - 1)).isoformat()]) == 0
    assert _count(dsn, rid) == 1
    assert main(["audit", "retain", "-c", cfg, "--now", (row["ts"] + timedelta(days=DAYS, seconds=1)).isoformat()]
                ) == 0
    assert _count(dsn, rid) == 0
    assert "captured body row(s) past their retention" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["audit", "body", rid, "-c", cfg]) == 1
    assert "no stored bodies" in capsys.readouterr().err


def test_the_receivers_role_can_insert_bodies_but_not_read_them(gw: Gateway) -> None:
    assert gw.runtime is not None and gw.runtime.audit_dsn
    with psycopg.connect(gw.runtime.audit_dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT request_ct FROM request_body LIMIT 1")
    with psycopg.connect(gw.runtime.audit_dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM request_body")

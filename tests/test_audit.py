"""The access log receiver as Envoy streams to it: a real process, real PostgreSQL, gRPC ALS."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from ccr.procs import Child
from tests.harness import create_database, running_service

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)

CONFIG = """
version: 1
providers: [{name: anthropic}]
models: [{match: "claude-*", provider: anthropic}]
"""


@dataclass
class Audit:
    stub: als_pb2_grpc.AccessLogServiceStub
    child: Child
    dsn: str


@pytest.fixture
def audit(tmp_path: Path, postgres_dsn: str) -> Iterator[Audit]:
    with running_service("audit", tmp_path, CONFIG, postgres_dsn=postgres_dsn) as child, \
            grpc.insecure_channel(str(child.info["address"])) as channel:
        yield Audit(als_pb2_grpc.AccessLogServiceStub(channel), child, postgres_dsn)


def entry(
    rid: str, *, key_id: str | None = "key_01", principal: str = "alice@example.com",
    model: str = "claude-sonnet-4-5", usage: dict[str, object] | None = None, status: int | None = 200,
    method: int = base_pb2.POST, path: str = "/v1/messages?beta=true", flags: dict[str, bool] | None = None,
    start: datetime = T0, latency: timedelta | None = timedelta(seconds=1, microseconds=234567),
    cluster: str = "provider_anthropic", body_in: int = 84213, body_out: int = 1532,
    log_type: int = accesslog_pb2.DownstreamEnd, upstream: bool = True, client_rid: str | None = None,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry shaped like Envoy's HTTP gRPC access logger sends for a Messages API call."""
    e = accesslog_pb2.HTTPAccessLogEntry(protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP11)
    c = e.common_properties
    c.access_log_type = log_type
    c.start_time.FromDatetime(start)
    c.time_to_last_rx_byte.FromTimedelta(timedelta(milliseconds=3))
    if latency is not None:
        c.time_to_last_downstream_tx_byte.FromTimedelta(latency)
    c.downstream_remote_address.socket_address.address = "10.1.2.3"
    c.downstream_remote_address.socket_address.port_value = 53122
    # Envoy names the host it picked even when nothing was sent to it (adapter or connection failure).
    c.upstream_remote_address.socket_address.address = "160.79.104.10"
    c.upstream_remote_address.socket_address.port_value = 443
    if upstream:  # the request went to a provider
        c.time_to_first_upstream_tx_byte.FromTimedelta(timedelta(milliseconds=4))
    c.upstream_cluster = cluster
    c.route_name = "messages"
    for name, on in (flags or {}).items():
        setattr(c.response_flags, name, on)
    authz: dict[str, object] = {"principal": principal, "model": model, "provider": "anthropic",
                                "cluster": cluster, "rpm": {"requests_per_unit": 600, "unit": "MINUTE"}}
    if key_id is not None:
        authz["key_id"] = key_id
    c.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(authz)
    if usage is not None:
        c.metadata.filter_metadata["ccr.usage"].update(usage)
    r = e.request
    r.request_method = method
    r.scheme = "https"
    r.authority = "gateway.internal"
    r.path = path
    r.user_agent = "Anthropic/Python 0.70.0"
    r.request_id = rid
    r.request_headers_bytes = 812
    r.request_body_bytes = body_in
    r.request_headers["anthropic-version"] = "2023-06-01"
    if client_rid is not None:
        r.request_headers["x-client-request-id"] = client_rid
    if status is not None:
        e.response.response_code.value = status
    e.response.response_headers_bytes = 410
    e.response.response_body_bytes = body_out
    return e


def messages(
    entries: list[accesslog_pb2.HTTPAccessLogEntry], per_msg: int
) -> Iterator[als_pb2.StreamAccessLogsMessage]:
    for i in range(0, len(entries), per_msg):
        m = als_pb2.StreamAccessLogsMessage()
        if i == 0:  # Envoy identifies itself on a stream's first message only
            m.identifier.node.id = "ccr-envoy-0"
            m.identifier.node.cluster = "ccr"
            m.identifier.log_name = "ccr"
        m.http_logs.log_entry.extend(entries[i:i + per_msg])
        yield m


def send(a: Audit, entries: list[accesslog_pb2.HTTPAccessLogEntry], per_msg: int = 3) -> None:
    # The service answers when the stream's rows are committed.
    resp = a.stub.StreamAccessLogs(messages(entries, per_msg), timeout=60)
    assert isinstance(resp, als_pb2.StreamAccessLogsResponse)


def rows(dsn: str, prefix: str) -> dict[str, dict[str, object]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM request_log WHERE request_id LIKE %s", (prefix + "%",))
        return {r["request_id"]: r for r in cur.fetchall()}


def _prefix() -> str:
    return f"req-{uuid.uuid4().hex[:8]}-"


def test_rows_carry_the_mapped_fields(audit: Audit) -> None:
    p = _prefix()
    usage = {"input_tokens": 21034, "output_tokens": 812, "cache_creation_input_tokens": 1200,
             "cache_read_input_tokens": 19000}
    send(audit, [
        entry(p + "full", usage={**usage, "usage_status": "complete", "usage_note": ""}, client_rid="my-id-1"),
        entry(p + "nousage", key_id=None, usage=None, method=base_pb2.GET, path="/v1/models",
              latency=None, body_in=0, body_out=220),
        entry(p + "failed", status=503, usage=None, cluster="provider_bedrock", upstream=False,
              flags={"no_healthy_upstream": True, "upstream_connection_failure": True}),
        entry(p + "reset", status=None, flags={"downstream_remote_reset": True}, usage=None),
    ])
    got = rows(audit.dsn, p)
    assert set(got) == {p + "full", p + "nousage", p + "failed", p + "reset"}

    full = got[p + "full"]
    assert full["ts"] == T0
    assert (full["key_id"], full["principal"], full["model"]) == ("key_01", "alice@example.com",
                                                                  "claude-sonnet-4-5")
    assert (full["method"], full["path"], full["status"]) == ("POST", "/v1/messages?beta=true", 200)
    assert [full[k] for k in usage] == list(usage.values())
    assert (full["usage_status"], full["usage_note"]) == ("complete", None)
    assert full["client_request_id"] == "my-id-1"
    assert full["latency_ms"] == pytest.approx(1234.567)
    assert full["upstream_cluster"] == "provider_anthropic"
    assert full["response_flags"] is None
    assert (full["bytes_received"], full["bytes_sent"]) == (84213, 1532)

    # A provider was called but nothing said what it used: unknown, never 0.
    nousage = got[p + "nousage"]
    assert nousage["key_id"] is None and nousage["principal"] == "alice@example.com"
    assert (nousage["method"], nousage["path"]) == ("GET", "/v1/models")
    assert [nousage[k] for k in usage] == [None] * 4
    assert nousage["usage_status"] == "unknown" and "no usage was reported" in nousage["usage_note"]
    assert nousage["client_request_id"] is None
    assert nousage["latency_ms"] is None
    assert (nousage["bytes_received"], nousage["bytes_sent"]) == (0, 220)

    failed = got[p + "failed"]
    assert failed["status"] == 503 and failed["response_flags"] == "UH,UF"
    assert failed["upstream_cluster"] == "provider_bedrock"
    assert failed["usage_status"] == "not_forwarded" and failed["usage_note"] == "no healthy upstream"
    assert [failed[k] for k in usage] == [None] * 4
    reset = got[p + "reset"]
    assert reset["status"] == 0 and reset["response_flags"] == "DR"
    assert reset["usage_status"] == "unknown" and "flags DR" in reset["usage_note"]


def test_usage_status_and_refusals(audit: Audit) -> None:
    p = _prefix()
    est = {"input_tokens": 300, "output_tokens": 41, "cache_creation_input_tokens": 0,
           "cache_read_input_tokens": 0, "usage_status": "estimated", "usage_note": "cut off; output estimated"}
    authz = entry(p + "authz", status=401, key_id=None, usage=None, upstream=False, cluster="")
    authz.common_properties.response_flags.unauthorized_details.reason = (
        accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE)
    nulls = dict.fromkeys(("input_tokens", "output_tokens", "cache_creation_input_tokens",
                           "cache_read_input_tokens"))
    send(audit, [
        entry(p + "est", usage=est, status=200, flags={"downstream_remote_reset": True}),
        entry(p + "unk", usage={**nulls, "usage_status": "unknown", "usage_note": "content-encoding 'br'"}),
        # A status the receiver does not know never passes its numbers off as known.
        entry(p + "odd", usage={"input_tokens": 5, "usage_status": "made-up"}),
        authz,
        entry(p + "rl", status=429, usage=None, upstream=False, flags={"rate_limited": True}),
        entry(p + "404", status=404, usage=None, upstream=False, cluster=""),
    ])
    got = rows(audit.dsn, p)
    assert (got[p + "est"]["usage_status"], got[p + "est"]["output_tokens"]) == ("estimated", 41)
    assert got[p + "est"]["usage_note"] == "cut off; output estimated"
    assert got[p + "unk"]["usage_status"] == "unknown" and got[p + "unk"]["input_tokens"] is None
    assert got[p + "unk"]["usage_note"] == "content-encoding 'br'"
    assert got[p + "odd"]["usage_status"] == "unknown" and got[p + "odd"]["input_tokens"] is None
    assert "made-up" in got[p + "odd"]["usage_note"]
    for name, note in (("authz", "refused by the gateway's authorization"), ("rl", "rate limited by the gateway"),
                       ("404", "the gateway replied 404 before contacting a provider")):
        row = got[p + name]
        assert (row["usage_status"], row["usage_note"], row["input_tokens"], row["output_tokens"]) == (
            "not_forwarded", note, None, None), name


def test_client_request_id_is_kept_but_bounded(audit: Audit) -> None:
    p = _prefix()
    send(audit, [entry(p + "a", client_rid="same"), entry(p + "b", client_rid="same"),
                 entry(p + "long", client_rid="x" * 5000)])
    got = rows(audit.dsn, p)
    # The same client id on two requests: two rows, told apart by the gateway's id.
    assert got[p + "a"]["client_request_id"] == got[p + "b"]["client_request_id"] == "same"
    assert got[p + "long"]["client_request_id"] == "x" * 256


def test_duplicate_request_id_is_one_row(audit: Audit) -> None:
    p = _prefix()
    first = entry(p + "dup", usage={"output_tokens": 5})
    send(audit, [first, entry(p + "dup", usage={"output_tokens": 999}), entry(p + "other")])
    send(audit, [entry(p + "dup", status=500)])  # a later stream, e.g. after an Envoy reconnect
    got = rows(audit.dsn, p)
    assert set(got) == {p + "dup", p + "other"}
    assert got[p + "dup"]["output_tokens"] == 5 and got[p + "dup"]["status"] == 200
    with psycopg.connect(audit.dsn) as conn:
        (n,) = conn.execute("SELECT count(*) FROM request_log WHERE request_id = %s", (p + "dup",)).fetchone()
    assert n == 1


def test_intermediate_entries_do_not_take_the_row(audit: Audit) -> None:
    p = _prefix()
    send(audit, [
        entry(p + "long", status=200, usage=None, log_type=accesslog_pb2.DownstreamPeriodic),
        entry(p + "long", usage={"output_tokens": 4000}),
    ])
    got = rows(audit.dsn, p)
    assert got[p + "long"]["output_tokens"] == 4000


def test_malformed_entries_are_skipped_and_the_rest_written(audit: Audit) -> None:
    p = _prefix()
    no_start = entry(p + "nostart")
    no_start.common_properties.ClearField("start_time")
    send(audit, [
        entry(p + "good1", usage={"input_tokens": 10}),
        entry(""),  # no request id
        entry(p + "badusage", usage={"input_tokens": "lots"}),
        entry(p + "negusage", usage={"output_tokens": -3}),
        no_start,
        entry(p + "nul\x00path", path="/v1/messages\x00x"),
        entry(p + "good2", usage={"output_tokens": 7}),
    ], per_msg=2)
    # A value PostgreSQL rejects (status beyond integer) costs only its own row.
    send(audit, [entry(p + "good3"), entry(p + "hugestatus", status=3_000_000_000), entry(p + "good4")],
         per_msg=3)
    got = rows(audit.dsn, p)
    assert set(got) == {p + "good1", p + "good2", p + "good3", p + "good4", p + "nul\ufffdpath"}
    assert got[p + "good1"]["input_tokens"] == 10 and got[p + "good2"]["output_tokens"] == 7
    assert got[p + "nul\ufffdpath"]["path"] == "/v1/messages\ufffdx"
    log = audit.child.log_path.read_text()
    assert log.count("skipping access log entry") == 4
    assert f"skipping request_log row request_id='{p}hugestatus'" in log
    assert audit.child.alive()


def test_large_stream_is_batched_completely(audit: Audit) -> None:
    p = _prefix()
    send(audit, [entry(f"{p}{i:05d}", usage={"input_tokens": i}) for i in range(3000)], per_msg=100)
    got = rows(audit.dsn, p)
    assert len(got) == 3000
    assert sum(r["input_tokens"] for r in got.values()) == sum(range(3000))


def _wait_for_log(child: Child, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in child.log_path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged; log:\n{child.log_tail()}")


def _wait_for_rows(dsn: str, prefix: str, want: set[str], timeout: float = 30.0) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + timeout
    while (got := rows(dsn, prefix)).keys() != want:
        assert time.monotonic() < deadline, f"rows {sorted(got)} != {sorted(want)}"
        time.sleep(0.05)
    return got


def test_database_outage_spools_then_writes_in_order(audit: Audit) -> None:
    p = _prefix()
    send(audit, [entry(p + "before")])  # the writer holds a live connection now
    during = {f"{p}during{i}" for i in range(20)}
    with psycopg.connect(audit.dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE request_log RENAME TO request_log_away")
        try:
            # The stream is answered once its rows are durable: in the spool, not in the table.
            assert _send_catching(audit, p) is None
            _wait_for_log(audit.child, "spooling rows to")
            (n,) = admin.execute("SELECT count(*) FROM request_log_away WHERE request_id LIKE %s",
                                 (p + "during%",)).fetchone() or (None,)
            assert n == 0
        finally:
            admin.execute("ALTER TABLE request_log_away RENAME TO request_log")
        got = _wait_for_rows(audit.dsn, p, {p + "before", *during})
        _wait_for_log(audit.child, "access log spool drained")
        # Written in the order they arrived: one chain, consecutive links.
        order = sorted(during, key=lambda r: int(r.removeprefix(p + "during")))
        seqs = [got[r]["chain_seq"] for r in [p + "before", *order]]
        assert seqs == list(range(seqs[0], seqs[0] + 21))  # type: ignore[arg-type]

        # A dropped connection: the writer reconnects and the next stream lands.
        n = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                          " WHERE application_name = 'ccr-audit' AND datname = current_database()").fetchone()
        assert n is not None and n[0] >= 1
    send(audit, [entry(p + "after")])
    assert p + "after" in _wait_for_rows(audit.dsn, p, {p + "before", *during, p + "after"})


def _send_catching(a: Audit, p: str) -> BaseException | None:
    try:
        send(a, [entry(f"{p}during{i}") for i in range(20)], per_msg=7)
    except BaseException as e:  # noqa: BLE001 - reported back to the test thread
        return e
    return None


def test_migration_2_upgrades_a_version_1_log(postgres_server: dict[str, object]) -> None:
    """Old rows keep their counts (status NULL: written before statuses existed); unknown can now be NULL."""
    from ccr import db

    dsn = create_database(str(postgres_server["admin_dsn"]), prefix="m")
    v1 = next(m for m in db.MIGRATIONS if m[0] == 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(v1[2])
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, %s)", (v1[1],))
        conn.execute("INSERT INTO request_log (ts, request_id, method, path, status, output_tokens)"
                     " VALUES (now(), 'old', 'POST', '/v1/messages', 200, 12)")
    assert db.migrate(dsn) >= 2
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        old = cur.execute("SELECT * FROM request_log WHERE request_id = 'old'").fetchone()
        assert old is not None and (old["output_tokens"], old["input_tokens"]) == (12, 0)
        assert old["usage_status"] is None and old["client_request_id"] is None
        cur.execute("INSERT INTO request_log (ts, request_id, method, path, status, usage_status)"
                    " VALUES (now(), 'new', 'POST', '/v1/messages', 200, 'unknown') RETURNING input_tokens")
        assert cur.fetchone() == {"input_tokens": None}  # no default 0 any more
        with pytest.raises(psycopg.errors.CheckViolation):
            cur.execute("INSERT INTO request_log (ts, request_id, method, path, status, usage_status)"
                        " VALUES (now(), 'bad', 'POST', '/', 200, 'free text')")


def test_a_draining_receiver_ends_each_stream_right_after_its_next_message(tmp_path: Path, postgres_dsn: str) -> None:
    """SIGTERM: the receiver ends a stream Envoy holds open right after that stream's next message
    (Envoy then sends on a new stream, to another replica), keeping every row it read; it does not
    hold the stream to the drain deadline, where gRPC would cut it with messages unread."""
    import queue
    import signal

    from tests.harness import log_row

    config = CONFIG + "services: {drain_timeout_s: 300}\n"
    outbox: queue.Queue[als_pb2.StreamAccessLogsMessage | None] = queue.Queue()

    def stream() -> Iterator[als_pb2.StreamAccessLogsMessage]:
        while (m := outbox.get()) is not None:
            yield m

    p = _prefix()
    first, second = messages([entry(p + "1")], 1), messages([entry(p + "2")], 1)
    with running_service("audit", tmp_path, config, postgres_dsn=postgres_dsn) as child, \
            grpc.insecure_channel(str(child.info["address"])) as channel:
        call = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs.future(stream(), timeout=600)
        try:
            outbox.put(next(first))
            assert log_row(postgres_dsn, p + "1")["status"] == 200
            child.proc.send_signal(signal.SIGTERM)
            log = tmp_path / "logs" / "audit.log"
            deadline = time.monotonic() + 30
            while "out of rotation: refusing new calls" not in log.read_text():
                assert time.monotonic() < deadline and child.alive(), child.log_tail()
                time.sleep(0.05)
            assert not call.done()  # a quiet stream is not cut: nothing of it could be in flight
            outbox.put(next(second))
            # Answered right after that message, the client side still open: Envoy would move on.
            assert isinstance(call.result(timeout=60), als_pb2.StreamAccessLogsResponse)
        finally:
            outbox.put(None)
        assert child.proc.wait(timeout=60) == 0  # long before the 300 s drain deadline
        assert "ended after its last message" in log.read_text()
    assert log_row(postgres_dsn, p + "2")["status"] == 200  # its rows were written before the exit

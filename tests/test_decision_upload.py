"""The decision log to an HTTP service in OPA's decision_logs shape (extauth/decision_upload.py),
against a real HTTP server the tests start: batches POSTed gzip-compressed, OPA's event fields,
the input only when configured and never a credential, at-least-once delivery across a service
that is down, errors or hangs, a bounded buffer whose drops are counted, and no request waiting."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from pathlib import Path

import grpc
import psycopg
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2

from ccr.config import ConfigError, parse_config
from ccr.contract import AUTHZ_DECISION_ID
from ccr.metrics import REGISTRY
from ccr.service import GRPC_OPTIONS
from extauth.decision_upload import DecisionUploader
from extauth.decisions import DecisionLog
from extauth.keys import create_key
from extauth.server import Authorizer
from tests.decision_log_server import DecisionLogServer
from tests.harness import running_service
from tests.test_decisions import bundle, with_authorizer  # noqa: F401 (fixture)
from tests.test_extauth import GATEWAY_YAML, http_check, msg_body

TOKEN = "log-service-token-0123456789"
SECRET_TEXT = "the-merger-closes-on-friday"
SECRET_BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16, "system": SECRET_TEXT,
                          "messages": [{"role": "user", "content": SECRET_TEXT}]}).encode()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def fast_uploader(url: str, **kw) -> DecisionUploader:
    """Short retries, so a test waits on the events' arrival rather than on a backoff."""
    kw = {"interval_s": 0.01, "retry_min_s": 0.01, "retry_max_s": 0.05, "timeout_s": 5.0, **kw}
    return DecisionUploader(url, **kw)


async def until(predicate, timeout: float = 20.0) -> None:
    """Wait on a condition of the event loop's own state (the uploader runs on this loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_opa_shaped_batches_gzip_with_input_only_when_enabled(postgres_dsn: str, bundle: Path) -> None:  # noqa: F811
    _, key = create_key(postgres_dsn, "upload-shape")
    _, haiku = create_key(postgres_dsn, "upload-shape-haiku", groups=["haiku-only"])
    for include in (False, True):
        with DecisionLogServer() as svc:
            up = fast_uploader(svc.url + "/logs", token=TOKEN)
            log = DecisionLog(None, include_input=include, flush_ms=60_000, http=up)

            async def scenario(auth: Authorizer) -> list[pb.CheckResponse]:
                return [await auth.check(http_check({"x-api-key": k, "x-request-id": rid}, body=SECRET_BODY))
                        for rid, k in (("up-ok", key), ("up-401", "nope"), ("up-403", haiku))]

            got = asyncio.run(with_authorizer(postgres_dsn, bundle, log, scenario))  # close() uploads
            events = svc.events()
            path, headers, status = svc.posts[0]
        assert (path, status) == ("/logs", 200)
        assert headers["content-type"] == "application/json" and headers["content-encoding"] == "gzip"
        assert headers["authorization"] == f"Bearer {TOKEN}"
        assert [e["request_id"] for e in events] == ["up-ok", "up-403"]  # the 401 never reached the policy
        ok, denied = events
        assert ok["decision_id"] == got[0].dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value
        assert ok["path"] == "ccr/authz/decision" and ok["result"]["allow"] is True
        assert denied["result"]["allow"] is False and "claude-haiku-*" in denied["result"]["reason"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", ok["timestamp"])
        assert ok["bundles"]["ccr"]["revision"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
        assert ok["metrics"]["timer_rego_query_eval_ns"] >= 0
        assert ("input" in ok) is include and ("input" in denied) is include
        if include:
            assert ok["input"]["principal"]["name"] == "upload-shape" and ok["input"]["request"]["model"]
            assert "text" not in ok["input"]["request"]  # the request text is never logged
        dump = json.dumps(events)
        assert key not in dump and haiku not in dump and SECRET_TEXT not in dump


def test_service_down_errors_then_back_delivers_each_once_without_blocking(postgres_dsn: str,
                                                                           bundle: Path) -> None:  # noqa: F811
    _, key = create_key(postgres_dsn, "upload-down")
    svc = DecisionLogServer().start()
    svc.stop()  # down: connections to its port are refused
    up = fast_uploader(svc.url + "/logs")
    log = DecisionLog(None, flush_ms=5, http=up)
    errors_before = metric("ccr_policy_decision_log_uploads_total", result="error")

    async def scenario(auth: Authorizer) -> list[str]:
        await log.start()
        ids = []
        for i in range(20):  # each check completes while the service is down (none waits on the upload)
            r = await asyncio.wait_for(auth.check(http_check({"x-api-key": key, "x-request-id": f"down-{i}"},
                                                             body=msg_body())), 5)
            assert r.status.code == code_pb2.OK
            ids.append(r.dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value)
        await until(lambda: up.undelivered == 20 and up.failures >= 2)  # refused connections, retried
        svc.status = 503  # back, but failing: still retried, nothing accepted
        await asyncio.to_thread(svc.start)
        await until(lambda: sum(1 for p in svc.posts if p[2] == 503) >= 2)
        assert svc.events() == [] and up.undelivered == 20  # a retry may be in flight: none lost, none accepted
        svc.status = 200
        await until(lambda: len(svc.events()) >= 20)
        return ids

    try:
        ids = asyncio.run(with_authorizer(postgres_dsn, bundle, log, scenario))
        got = [e["decision_id"] for e in svc.events()]
    finally:
        svc.stop()
    assert got == ids  # every decision, in order, once: no accepted batch was sent twice
    assert up.dropped == 0 and up.sent == 20
    assert metric("ccr_policy_decision_log_uploads_total", result="error") >= errors_before + 4


def test_hung_service_times_out_and_redelivers_at_least_once(postgres_dsn: str, bundle: Path) -> None:  # noqa: F811
    _, key = create_key(postgres_dsn, "upload-hung")
    with DecisionLogServer() as svc:
        svc.hold.clear()  # the service takes the upload and never answers
        up = fast_uploader(svc.url + "/logs", timeout_s=0.3)
        log = DecisionLog(None, flush_ms=5, http=up)

        async def scenario(auth: Authorizer) -> list[str]:
            await log.start()
            ids = []
            for i in range(5):
                r = await asyncio.wait_for(auth.check(http_check({"x-api-key": key, "x-request-id": f"hung-{i}"},
                                                                 body=msg_body())), 5)
                ids.append(r.dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value)
            await until(lambda: up.failures >= 1)  # the upload timed out and was kept
            svc.hold.set()  # answers now: held uploads complete too late for their client
            await until(lambda: set(ids) <= {e["decision_id"] for e in svc.events()})
            return ids

        ids = asyncio.run(with_authorizer(postgres_dsn, bundle, log, scenario))
        got = [e["decision_id"] for e in svc.events()]
    assert set(got) == set(ids) and len(got) >= len(ids)  # at least once; a timed-out batch may repeat


def test_full_buffer_drops_oldest_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    svc = DecisionLogServer().start()
    svc.stop()
    up = fast_uploader(svc.url + "/logs", buffer_bytes=1000)
    events = [json.dumps({"decision_id": f"dec_{i:04d}", "pad": "x" * 270}).encode() for i in range(10)]
    dropped_before = metric("ccr_policy_decision_log_dropped_total", sink="http")

    async def scenario() -> None:
        up.offer(events)  # 10 x ~300 bytes into 1000: the 7 oldest go at once
        assert up.waiting == 3 and up.dropped == 7
        assert await up.drain() is False  # down: kept
        await asyncio.to_thread(svc.start)
        await up.close()

    try:
        with caplog.at_level(logging.WARNING, logger="extauth.decisions"):
            asyncio.run(scenario())
        got = [e["decision_id"] for e in svc.events()]
    finally:
        svc.stop()
    assert got == ["dec_0007", "dec_0008", "dec_0009"]
    assert metric("ccr_policy_decision_log_dropped_total", sink="http") == dropped_before + 7
    assert any("7 event(s) dropped" in m for m in caplog.messages)


def test_refused_batch_is_dropped_not_retried_forever() -> None:
    with DecisionLogServer() as svc:
        svc.status = 400
        up = fast_uploader(svc.url + "/logs", batch_bytes=64)
        dropped_before = metric("ccr_policy_decision_log_dropped_total", sink="http")

        async def scenario() -> bool:
            up.offer([b'{"decision_id":"dec_a","pad":"' + b"y" * 60 + b'"}', b'{"decision_id":"dec_b"}'])
            ok = await up.drain()
            await up.close()
            return ok

        assert asyncio.run(scenario()) is True
        assert [s for _, _, s in svc.posts] == [400, 400]  # one POST per batch (64 bytes each), no retry
    assert up.dropped == 2 and up.waiting == 0
    assert metric("ccr_policy_decision_log_dropped_total", sink="http") == dropped_before + 2


def test_batches_stay_under_batch_bytes() -> None:
    with DecisionLogServer() as svc:
        up = fast_uploader(svc.url + "/logs", batch_bytes=1024)
        events = [json.dumps({"decision_id": f"dec_{i:03d}", "pad": "z" * 90}).encode() for i in range(50)]

        async def scenario() -> None:
            up.offer(events)
            assert await up.drain() is True
            await up.close()

        asyncio.run(scenario())
        sizes = [len(json.dumps(b, separators=(",", ":"))) for b in svc.accepted]
        assert len(svc.accepted) > 1 and max(sizes) <= 1024
        assert [e["decision_id"] for e in svc.events()] == [f"dec_{i:03d}" for i in range(50)]


def test_extauth_service_uploads_from_config(postgres_dsn: str, bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    _, key = create_key(postgres_dsn, "upload-service")
    (tmp_path / "log.token").write_text(TOKEN + "\n")
    with DecisionLogServer() as svc:
        yaml_text = GATEWAY_YAML + (
            "policy:\n  decision_log:\n    include_input: true\n"
            f"    http: {{url: '{svc.url}/', resource: /v1/decisions, token_file: log.token,"
            " upload_interval_s: 60}\n")
        with running_service("extauth", tmp_path, yaml_text, postgres_dsn=postgres_dsn,
                             policy_bundle=str(bundle)) as child:
            with grpc.insecure_channel(str(child.info["address"]), options=GRPC_OPTIONS) as ch:
                resp = pb_grpc.AuthorizationStub(ch).Check(
                    http_check({"x-api-key": key, "x-request-id": "svc-upload-1"}, body=msg_body()))
            assert resp.status.code == code_pb2.OK
        # Neither the interval (a minute) nor batch_bytes can have sent it: the shutdown flush did.
        [event] = svc.events()
        path, headers, _ = svc.posts[0]
    assert path == "/v1/decisions" and headers["authorization"] == f"Bearer {TOKEN}"
    assert event["decision_id"] == resp.dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value
    assert event["request_id"] == "svc-upload-1" and event["input"]["principal"]["name"] == "upload-service"
    assert key not in json.dumps(event)


def test_http_settings_checked() -> None:
    import yaml

    base = yaml.safe_load(GATEWAY_YAML)

    def settings(http: dict):
        return parse_config({**base, "policy": {"decision_log": {"http": http}}}).policy.decision_log.http

    h = settings({"url": "https://logs.example.com"})
    assert (h.resource, h.batch_bytes, h.retry_min_s, h.token_file) == ("/logs", 1 << 20, 0.5, None)
    assert parse_config(base).policy.decision_log.http is None  # off unless configured
    for bad, msg in (({"url": "ftp://x"}, "http:// or https://"),
                     ({"url": "https://x", "resource": "logs"}, "resource"),
                     ({"url": "https://x", "retry_min_s": 5, "retry_max_s": 1}, "retry_max_s"),
                     ({"url": "https://x", "buffer": 1}, "buffer")):
        with pytest.raises(ConfigError, match=msg):
            settings(bad)


def test_close_is_bounded_when_the_service_hangs() -> None:
    """Shutdown gives a log service that never answers at most the grace period, and counts what it
    could not deliver as dropped (the upload in flight is cancelled, its batch not lost before that)."""
    with DecisionLogServer() as svc:
        svc.hold.clear()
        up = fast_uploader(svc.url + "/logs", timeout_s=60)
        dropped_before = metric("ccr_policy_decision_log_dropped_total", sink="http")

        async def scenario() -> None:
            up.start()
            up.offer([b'{"decision_id":"dec_hang"}'])
            await until(lambda: up.waiting == 0)  # taken out of the buffer: the POST is in flight, held
            # Bounded by the grace period (0.5 s), not by the upload's timeout (60 s).
            await asyncio.wait_for(up.close(grace_s=0.5), 30)

        asyncio.run(scenario())
        svc.hold.set()
    assert up.dropped == 1 and metric("ccr_policy_decision_log_dropped_total", sink="http") == dropped_before + 1


def test_request_text_only_with_include_text_and_within_its_budget(postgres_dsn: str, tmp_path: Path) -> None:
    """A bundle that reads the request text: its events carry the text the policy saw only with
    include_text (never without it, never in PostgreSQL), and past the queue's text budget a decision
    is still logged, its text left out and marked."""
    from tests.test_policy_input import bundle_of, shipped_data

    text_bundle = bundle_of(tmp_path, shipped_data(policy_input={"text": True}))
    _, key = create_key(postgres_dsn, "upload-text")
    runs = {}
    for name, include_text, budget in (("off", False, 1 << 20), ("on", True, 1 << 20), ("budget", True, 60)):
        with DecisionLogServer() as svc:
            log = DecisionLog(postgres_dsn, include_input=True, include_text=include_text, text_queue_chars=budget,
                              flush_ms=60_000, http=fast_uploader(svc.url + "/logs"))

            async def scenario(auth: Authorizer, name: str = name) -> None:
                for i in range(2):
                    await auth.check(http_check({"x-api-key": key, "x-request-id": f"text-{name}-{i}"},
                                                body=SECRET_BODY))

            asyncio.run(with_authorizer(postgres_dsn, text_bundle, log, scenario))
            runs[name] = svc.events()
    texts = {name: [e["input"]["request"].get("text") for e in events] for name, events in runs.items()}
    assert texts["off"] == [None, None] and SECRET_TEXT not in json.dumps(runs["off"])
    for t in texts["on"]:
        assert [(x["loc"], x["kind"], x["text"]) for x in t] == [
            ("system", "system", SECRET_TEXT), ("messages[0].content", "message", SECRET_TEXT)]
    # 54 characters a request: the first fits the 60-character budget, the second is logged without it.
    assert texts["budget"][0] == texts["on"][0] and texts["budget"][1] is None
    assert runs["budget"][1]["input"]["request"]["text_dropped"] is True
    with psycopg.connect(postgres_dsn) as conn:  # PostgreSQL keeps the digest, never the text
        dump = json.dumps(conn.execute("SELECT * FROM policy_decisions WHERE request_id LIKE 'text-%'").fetchall(),
                          default=str)
    assert "text-on-0" in dump and SECRET_TEXT not in dump
    with pytest.raises(ConfigError, match="include_text needs include_input"):
        parse_config({**__import__("yaml").safe_load(GATEWAY_YAML),
                      "policy": {"decision_log": {"include_text": True}}})

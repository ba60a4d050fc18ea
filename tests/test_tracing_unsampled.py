"""Tracing on, most requests unsampled (telemetry.sample_ratio): an unsampled call must pay next to
nothing in the services, and a sampled one must still get its full span, cached answer or not."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from audit.observe import RequestObserver
from ccr import tracing
from ccr.config import parse_config
from ccr.contract import H_TRACEPARENT, H_TRACESTATE
from ccr.service import GRPC_OPTIONS
from extauth.bundle import build_bundle
from extauth.keys import create_key
from tests.harness import running_service
from tests.otlp_receiver import Span, otlp_receiver
from tests.test_audit import entry
from tests.test_extauth import GATEWAY_YAML, REPO, http_check, msg_body


def _traceparent(sampled: bool) -> tuple[str, str, str]:
    """(traceparent, its trace id, its parent span id), fresh ids as Envoy makes them."""
    tid, sid = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{tid}-{sid}-{'01' if sampled else '00'}", tid, sid


class _Untouchable:
    """Stands in for what an unsampled call must never reach."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"an unsampled call reached {name}")


def test_unsampled_metadata_never_reaches_the_propagator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_propagator", _Untouchable())
    tp, _, _ = _traceparent(sampled=False)
    assert tracing.parent_from_metadata(((H_TRACEPARENT, tp), (H_TRACESTATE, ""), ("x-other", "1"))) is None
    assert tracing.parent_from_metadata((("x-other", "1"),)) is None
    assert tracing.parent_from_metadata(None) is None


def test_sampled_metadata_gives_the_callers_span_as_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_propagator", TraceContextTextMapPropagator())
    tp, tid, sid = _traceparent(sampled=True)
    for state in ("", "vendor=abc"):  # Envoy sends an empty tracestate; a real one is kept
        ctx = tracing.parent_from_metadata(((H_TRACEPARENT, tp), (H_TRACESTATE, state)))
        sc = trace.get_current_span(ctx).get_span_context()
        assert (f"{sc.trace_id:032x}", f"{sc.span_id:016x}", sc.trace_flags.sampled) == (tid, sid, True)
        assert sc.trace_state.to_header() == state


def test_the_access_log_builds_no_span_attributes_for_an_unsampled_request(monkeypatch: pytest.MonkeyPatch) -> None:
    observer = RequestObserver(parse_config({"version": 1, "providers": [{"name": "anthropic"}],
                                             "models": [{"match": "claude-*", "provider": "anthropic"}]}))
    monkeypatch.setattr(tracing, "_propagator", TraceContextTextMapPropagator())
    monkeypatch.setattr(tracing, "TRACER", _Untouchable())
    monkeypatch.setattr(tracing, "gen_ai_system", lambda *_: _Untouchable().gen_ai_system)
    e = entry("req_1")
    e.request.request_headers[H_TRACEPARENT] = _traceparent(sampled=False)[0]
    e.request.request_headers[H_TRACESTATE] = ""
    observer._span(e, 0, "claude-sonnet-4-5", "anthropic", {"input_tokens": 3})  # reaches neither
    # The check can fail: a sampled one does reach the tracer.
    e.request.request_headers[H_TRACEPARENT] = _traceparent(sampled=True)[0]
    with pytest.raises(AssertionError, match="reached"):
        observer._span(e, 0, "claude-sonnet-4-5", "anthropic", {"input_tokens": 3})


def test_extauth_spans_only_sampled_checks_and_a_cached_answer_keeps_its_attributes(
        postgres_dsn: str, tmp_path: Path) -> None:
    """Three identical Checks as Envoy makes them, each with its own traceparent: sampled (the answer
    is computed and cached), unsampled, sampled again (the cached answer). Both sampled Checks have a
    span, child of the caller's, with the GenAI attributes; the unsampled one has none."""
    _, key = create_key(postgres_dsn, "traced")
    bundle = build_bundle(REPO / "policies", tmp_path / "policy.tar.gz", "ccr/authz/decision")
    req = http_check({"x-api-key": key, "content-type": "application/json"}, body=msg_body("claude-sonnet-4-5"))
    calls = [_traceparent(sampled=True), _traceparent(sampled=False), _traceparent(sampled=True)]
    with otlp_receiver() as (endpoint, receiver):
        config = GATEWAY_YAML + f"telemetry: {{otlp_endpoint: '{endpoint}', sample_ratio: 0.05}}\n"
        with running_service("extauth", tmp_path, config, postgres_dsn=postgres_dsn, policy_bundle=str(bundle)) as svc:
            with grpc.insecure_channel(str(svc.info["address"]), options=GRPC_OPTIONS) as ch:
                stub = pb_grpc.AuthorizationStub(ch)
                for tp, _, _ in calls:
                    resp = stub.Check(req, metadata=((H_TRACEPARENT, tp), (H_TRACESTATE, "")))
                    assert resp.status.code == code_pb2.OK, resp

            def of(spans: list[Span], tid: str) -> list[Span]:
                return [s for s in spans if s.service == "ccr-extauth" and s.trace_id == tid]

            # Spans leave in the order their calls ended: once the last one is here, all are.
            spans = receiver.wait_for(lambda spans: bool(of(spans, calls[2][1])))
    assert of(spans, calls[1][1]) == []  # unsampled: no span at all
    for _, tid, parent in (calls[0], calls[2]):
        (span,) = of(spans, tid)
        assert span.parent_span_id == parent and span.name == "extauth Authorization/Check"
        assert span.attributes["gen_ai.request.model"] == "claude-sonnet-4-5"
        assert span.attributes["gen_ai.system"] == "anthropic"
        assert span.attributes["ccr.endpoint"] == "messages.create"

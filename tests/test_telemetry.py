"""Telemetry units: bounded labels, error kinds, the unary-call timer, tracing config in Envoy's
resources (checked by the real Envoy), the PromQL name extraction the dashboard test relies on."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from pydantic import ValidationError

from audit.observe import error_kind
from ccr import metrics, tracing
from ccr.config import TelemetrySettings, load_config
from ccr.contract import H_TRACEPARENT, OTLP_CLUSTER
from ccr.rpc_observe import AioRpcObserver
from router import resources
from tests.promql_names import metric_names
from tests.test_router import REPO, _runtime, _validate


def test_label_sets_are_bounded_by_the_config() -> None:
    ls = metrics.LabelSets(["anthropic"], ["claude-haiku-4-5", "claude-sonnet-*"], ["engineering", "research"])
    assert ls.provider("anthropic") == "anthropic"
    assert ls.provider("evil-provider") == "other"
    assert ls.provider(None) == "none"
    assert ls.model("claude-haiku-4-5") == "claude-haiku-4-5"
    # An id only a glob matches is labelled with the glob: a client cannot mint new label values.
    assert ls.model("claude-sonnet-4-6-whatever-i-like") == "claude-sonnet-*"
    assert ls.model("gpt-9") == "other"
    assert ls.model(None) == "none"
    assert ls.group(["research", "engineering"]) == "engineering"  # allow-list order, one group per request
    assert ls.group(["contractors"]) == "other"
    assert ls.group([]) == "other"
    assert ls.group(None) == "none"


def test_error_kinds_from_what_envoy_logged() -> None:
    common = accesslog_pb2.AccessLogCommon()
    assert error_kind(common, 200, None) is None
    assert error_kind(common, 0, None) == "incomplete"
    assert error_kind(common, 403, "UAEX") == "denied"
    assert error_kind(common, 429, "RL") == "rate_limited"
    assert error_kind(common, 402, None) == "budget"
    assert error_kind(common, 402, "RL") == "budget"  # the budget filter is a rate limit filter: it sets RL too
    assert error_kind(common, 503, "UF") == "gateway"
    assert error_kind(common, 400, None) == "client"
    common.time_to_first_upstream_rx_byte.FromMilliseconds(5)  # the provider answered
    assert error_kind(common, 529, None) == "upstream"
    assert error_kind(common, 429, None) == "client"  # the provider's own 429 is the provider's answer


def test_telemetry_config_is_off_and_closed_by_default() -> None:
    t = TelemetrySettings()
    assert t.otlp_endpoint is None and t.metric_groups == []
    with pytest.raises(ValidationError):
        TelemetrySettings(otlp_endpoint="http://collector:4317/v1/traces")
    with pytest.raises(ValidationError):
        TelemetrySettings(sample_ratio=1.5)


def test_tracing_off_builds_nothing(tmp_path: Path) -> None:
    cfg = load_config(REPO / "ccr.example.yaml")
    tracing.setup(cfg, "test")
    assert tracing.TRACER is None
    res = resources.build(cfg, _runtime(), 18080)
    hcm = res.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "tracing" not in hcm
    assert OTLP_CLUSTER not in {c["name"] for c in res.clusters}


def test_tracing_on_is_accepted_by_envoy(tmp_path: Path) -> None:
    cfg = load_config(REPO / "ccr.example.yaml")
    cfg = cfg.model_copy(update={"telemetry": TelemetrySettings(otlp_endpoint="127.0.0.1:4317", sample_ratio=0.25)})
    res = resources.build(cfg, _runtime(), 18080)
    hcm = res.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["random_sampling"] == {"value": 25.0}
    assert hcm["tracing"]["provider"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == OTLP_CLUSTER
    als = hcm["access_log"][0]["typed_config"]
    assert H_TRACEPARENT in als["additional_request_headers_to_log"]
    assert OTLP_CLUSTER in {c["name"] for c in res.clusters}
    r = _validate(tmp_path, resources.static_bootstrap(cfg, _runtime(), 18080))
    assert r.returncode == 0, r.stderr[-4000:]


async def _unary_calls() -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        return request

    server = grpc.aio.server(interceptors=[AioRpcObserver("unit")])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.v1.Echo", {"Say": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            say = ch.unary_unary("/test.v1.Echo/Say")
            assert await say(b"hi") == b"hi"
            assert await say(b"hi") == b"hi"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await say(b"fail")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_unary_calls_are_timed_and_failures_counted() -> None:
    labels = {"service": "unit", "method": "Echo/Say"}
    asyncio.run(_unary_calls())
    assert metrics.REGISTRY.get_sample_value("ccr_rpc_duration_seconds_count", labels) == 3
    assert metrics.REGISTRY.get_sample_value("ccr_rpc_errors_total", labels) == 1


def test_metric_names_of_promql() -> None:
    assert metric_names('sum by (le, model) (rate(ccr_request_duration_seconds_bucket{model=~"a|b"}[5m]))') == {
        "ccr_request_duration_seconds_bucket"}
    assert metric_names('sum(rate(a_total{kind="x"}[$__rate_interval])) / sum(rate(b_total[5m])) > 0.05 '
                        'or min(up{ccr_service="extauth"}) == 0') == {"a_total", "b_total", "up"}
    assert metric_names("ccr_audit_spool_bytes > 0 and deriv(ccr_audit_spool_bytes[10m]) > 1e6") == {
        "ccr_audit_spool_bytes"}


def _promtool() -> str:
    found = REPO / ".venv" / "bin" / "promtool"
    if found.exists():
        return str(found)
    on_path = shutil.which("promtool")
    if on_path is None:
        pytest.fail("promtool is missing: run ./install.sh (it installs promtool into .venv/bin)")
    return on_path


def test_alert_rules_pass_promtool() -> None:
    r = subprocess.run([_promtool(), "check", "rules", str(REPO / "deploy/prometheus/alerts.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 11 rules found" in r.stdout, r.stdout


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: [{name: x, rules: [{alert: A, expr: 'sum(rate(x[5m]'}]}]\n")
    r = subprocess.run([_promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def test_only_sampled_trace_contexts_are_continued() -> None:
    assert tracing.sampled("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert not tracing.sampled("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
    assert not tracing.sampled("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331")  # truncated
    assert not tracing.sampled("garbage")
    assert not tracing.sampled("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-zz")

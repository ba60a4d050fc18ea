"""Traces and metrics of the whole gateway (docs/observability.md): a real OTLP receiver gets one
request's spans from Envoy and the services, correctly parented; every metric the shipped dashboard
and alert rules query is exposed by a running gateway."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml

from ccr.supervisor import Gateway
from tests.harness import REPO, log_row, running_gateway
from tests.otlp_receiver import Span, otlp_receiver
from tests.promql_names import alert_expressions, dashboard_expressions, metric_names

MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "hello"}]


def _trace_of(spans: list[Span], service: str) -> list[Span]:
    return [s for s in spans if s.service == service]


# Envoy's span of the check call: its gRPC client's, or (ext_authz over HTTP) its async HTTP client's.
CHECK_EGRESS = {"grpc": "Authorization.Check egress", "http": "async ccr_extauth_http egress"}


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_one_request_is_one_trace_across_envoy_and_the_services(tmp_path: Path, transport: str) -> None:
    with otlp_receiver() as (endpoint, receiver):
        def edit(cfg: dict[str, Any]) -> None:
            cfg["services"]["authz_transport"] = transport
            cfg["telemetry"] = {"otlp_endpoint": endpoint, "sample_ratio": 1.0, "metric_groups": ["engineering"]}
            # Envoy asks the rate limit service at the request (by default extauth decides the limits in its
            # Check, and the service is not called at the request): its span must join the request's trace.
            cfg["limits"]["admission"] = "ratelimit"

        with running_gateway(tmp_path, edit) as gw:
            c = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
            raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=HELLO)
            request_id = raw.headers["x-request-id"]
            log_row(gw.runtime.postgres_dsn, request_id)  # the access log has it

            def complete(spans: list[Span]) -> bool:
                rec = [s for s in spans if s.service == "ccr-accesslog"
                       and s.attributes.get("ccr.request_id") == request_id]
                if not rec:
                    return False
                tid = rec[0].trace_id
                names = {s.service for s in spans if s.trace_id == tid}
                return {"ccr-envoy", "ccr-extauth", "ccr-ratelimit"} <= names

            spans = receiver.wait_for(complete)
    record = next(s for s in spans if s.service == "ccr-accesslog" and s.attributes.get("ccr.request_id") == request_id)
    trace = [s for s in spans if s.trace_id == record.trace_id]
    by_id = {s.span_id: s for s in trace}
    envoy = _trace_of(trace, "ccr-envoy")
    roots = [s for s in trace if not s.parent_span_id]
    assert len(roots) == 1 and roots[0].service == "ccr-envoy", [(s.service, s.name, s.parent_span_id) for s in trace]
    # Each service's span is the child of an Envoy span of this trace (the gRPC call's egress span).
    for service in ("ccr-extauth", "ccr-ratelimit", "ccr-accesslog"):
        mine = _trace_of(trace, service)
        assert mine, f"no {service} span in the trace"
        for s in mine:
            assert s.parent_span_id in by_id, f"{service} span {s.name} has a parent outside the trace"
            assert by_id[s.parent_span_id].service == "ccr-envoy", (service, by_id[s.parent_span_id])
    # Envoy's gRPC client spans are what the services continue; the access log continues the request's.
    assert by_id[_trace_of(trace, "ccr-extauth")[0].parent_span_id].name.endswith(CHECK_EGRESS[transport])
    assert by_id[_trace_of(trace, "ccr-ratelimit")[0].parent_span_id].name.endswith("ShouldRateLimit egress")
    assert _trace_of(trace, "ccr-accesslog")[0].parent_span_id == roots[0].span_id
    check = next(s for s in _trace_of(trace, "ccr-extauth") if s.attributes.get("gen_ai.request.model"))
    assert check.attributes["gen_ai.request.model"] == MODEL
    assert check.attributes["gen_ai.system"] == "anthropic"
    assert record.attributes["gen_ai.request.model"] == MODEL
    assert record.attributes["gen_ai.usage.input_tokens"] > 0
    assert record.attributes["gen_ai.usage.output_tokens"] > 0
    assert len(envoy) >= 2  # the downstream request and at least one egress gRPC call


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def test_a_translated_request_has_the_adapters_span_under_envoys(tmp_path: Path) -> None:
    """Through the adapter (a Bedrock translation): its span continues the trace from the ext_proc
    stream's traceparent, child of Envoy's span, with the GenAI attributes of the attempt."""
    import os

    from tests.provider_emulators import running_emulators

    with otlp_receiver() as (endpoint, receiver), running_emulators(_mkdir(tmp_path / "emus")) as emus:
        def edit(cfg: dict[str, Any]) -> None:
            cfg["telemetry"] = {"otlp_endpoint": endpoint, "sample_ratio": 1.0}
            cfg["providers"] += emus.providers()
            cfg["models"] = emus.models() + cfg["models"]

        saved = {k: os.environ.get(k) for k in emus.env()}
        os.environ.update(emus.env())
        try:
            with running_gateway(_mkdir(tmp_path / "gw"), edit) as gw:
                c = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
                raw = c.messages.with_raw_response.create(model="claude-bedrock-sonnet-4-5", max_tokens=16,
                                                          messages=HELLO)
                msg = raw.parse()
                request_id = raw.headers["x-request-id"]
                log_row(gw.runtime.postgres_dsn, request_id)

                def complete(spans: list[Span]) -> bool:
                    rec = [s for s in spans if s.service == "ccr-accesslog"
                           and s.attributes.get("ccr.request_id") == request_id]
                    if not rec:
                        return False
                    trace = [s for s in spans if s.trace_id == rec[0].trace_id]
                    ids = {s.span_id for s in trace}
                    # Envoy exports its spans in batches: wait for the adapter's parent and the root.
                    return (any(s.service == "ccr-adapter" and s.parent_span_id in ids for s in trace)
                            and any(not s.parent_span_id for s in trace))

                spans = receiver.wait_for(complete)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    record = next(s for s in spans if s.service == "ccr-accesslog" and s.attributes.get("ccr.request_id") == request_id)
    trace = [s for s in spans if s.trace_id == record.trace_id]
    by_id = {s.span_id: s for s in trace}
    roots = [s for s in trace if not s.parent_span_id]
    assert len(roots) == 1 and roots[0].service == "ccr-envoy", [(s.service, s.name, s.parent_span_id) for s in trace]
    adapter = _trace_of(trace, "ccr-adapter")
    assert len(adapter) == 1, [(s.service, s.name) for s in trace]
    span = adapter[0]
    parent = by_id.get(span.parent_span_id)
    assert parent is not None and parent.service == "ccr-envoy", (span, parent)
    assert "ExternalProcessor" in parent.name, parent.name  # Envoy's ext_proc gRPC call
    assert span.name == "adapter ExternalProcessor/Process"
    assert span.attributes["gen_ai.system"] == "aws.bedrock"
    assert span.attributes["gen_ai.request.model"] == "claude-bedrock-sonnet-4-5"
    assert span.attributes["ccr.translated"] is True and span.attributes["http.response.status_code"] == 200
    assert span.attributes["gen_ai.usage.input_tokens"] == msg.usage.input_tokens > 0
    assert span.attributes["gen_ai.usage.output_tokens"] == msg.usage.output_tokens > 0


def _scrape(url: str) -> str:
    r = httpx.get(url, timeout=10)
    r.raise_for_status()
    return r.text


def _families(text: str) -> set[str]:
    """Every metric family a /metrics page names (with or without samples yet), sample names too."""
    out = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            out.add(name)
            if kind == "counter":
                out.add(name + "_total")
            if kind == "histogram":
                out |= {name + "_bucket", name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            out.add(line.split("{", 1)[0].split(" ", 1)[0])
    return out


# Series Prometheus itself makes (not exported by anything).
PROMETHEUS_OWN = {"up"}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Gateway, set[str], dict[str, str]]:
    tmp = tmp_path_factory.mktemp("metrics")

    def edit(cfg: dict[str, Any]) -> None:
        cfg["telemetry"] = {"metric_groups": ["engineering"]}

    with running_gateway(tmp, edit) as gw:
        c = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
        raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=HELLO)
        row = log_row(gw.runtime.postgres_dsn, raw.headers["x-request-id"])
        who = {v for v in (row["principal"], row["key_id"]) if v}
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=gw.url, api_key="ccr_wrong", max_retries=0).messages.create(
                model=MODEL, max_tokens=16, messages=HELLO)
        # The refused request's access-log entry arrives with Envoy's next flush: wait for it to be
        # counted (the condition itself, bounded), then scrape every page.
        receivers = [addr for name, addr in gw.runtime.metrics.items() if name.split(".")[0] == "accesslog"]
        deadline = time.monotonic() + 30
        while not any('ccr_request_errors_total{' in line and 'code' not in line and 'kind="' in line
                       for addr in receivers for line in _scrape(f"http://{addr}/metrics").splitlines()):
            assert time.monotonic() < deadline, "the refused request was never counted"
            time.sleep(0.05)
        pages = {name: _scrape(f"http://{addr}/metrics") for name, addr in gw.runtime.metrics.items()}
        pages["envoy"] = _scrape(gw.admin_url + "/stats/prometheus")
        names: set[str] = set()
        for text in pages.values():
            names |= _families(text)
        assert who, row
        for name, text in pages.items():  # no principal or key id ever becomes a label value
            assert not [w for w in who if w in text], (name, who)
        yield gw, names, pages


def test_every_service_serves_metrics(scraped: tuple[Gateway, set[str], dict[str, str]]) -> None:
    gw, _, pages = scraped
    for service in ("extauth", "ratelimit", "adapter", "accesslog", "router"):
        assert service in pages, f"no /metrics recorded for {service}: {sorted(gw.runtime.metrics)}"
    # The check's timer: the gRPC Check's, or (pytest --authz-transport http) the HTTP front's.
    over_http = gw.runtime.config().services.authz_transport == "http"
    check = "Authorization/CheckHTTP" if over_http else "Authorization/Check"
    assert f"ccr_rpc_duration_seconds_count{{method=\"{check}\",service=\"extauth\"}}" in pages["extauth"]
    assert 'ccr_xds_version_info{type="Listener"' in pages["router"]
    assert 'ccr_rpc_streams_total{method="AccessLogService/StreamAccessLogs",service="accesslog"}' in pages["accesslog"]


def test_request_metrics_count_the_request_with_bounded_labels(
        scraped: tuple[Gateway, set[str], dict[str, str]]) -> None:
    _, _, pages = scraped
    text = pages["accesslog"] if "accesslog.1" not in pages else pages["accesslog"] + pages["accesslog.1"]
    ok = [line for line in text.splitlines() if line.startswith("ccr_requests_total{") and 'code="2xx"' in line]
    assert ok, text
    # The model label is the config's model entry the id matched (bounded by the config).
    assert 'model="claude-sonnet-*"' in ok[0], ok
    assert 'provider="anthropic"' in ok[0] and 'route="messages' in ok[0], ok
    # The local key's principal is in no allow-listed group: counted as "other", never by id.
    assert 'group="other"' in ok[0], ok
    assert "ccr-up-local" not in text
    assert any(line.startswith("ccr_tokens_total{") and 'type="output"' in line for line in text.splitlines())
    assert any(line.startswith("ccr_cost_usd_total{") for line in text.splitlines())
    denied = [line for line in text.splitlines() if line.startswith("ccr_request_errors_total{")]
    assert any('kind="denied"' in line or 'kind="client"' in line for line in denied), denied


def test_everything_the_dashboard_and_alerts_query_exists(scraped: tuple[Gateway, set[str], dict[str, str]]) -> None:
    _, names, _ = scraped
    queried = set()
    for expr in alert_expressions(yaml.safe_load((REPO / "deploy/prometheus/alerts.yaml").read_text())):
        queried |= metric_names(expr)
    for expr in dashboard_expressions(json.loads((REPO / "deploy/grafana/ccr.json").read_text())):
        queried |= metric_names(expr)
    assert len(queried) > 10, queried
    missing = sorted(queried - names - PROMETHEUS_OWN)
    assert not missing, f"queried but exposed by no ccr process nor Envoy: {missing}"

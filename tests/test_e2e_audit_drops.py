"""Envoy's access-log drops are a Prometheus metric where Prometheus scrapes Envoy, under the name the
alert queries: the receiver is frozen (SIGSTOP, by its pid) while requests keep coming, Envoy's small
backlog (audit.envoy_backlog_bytes) overflows, and the drop counter rises at the scrape target `ccr up`
wrote for Prometheus."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ccr.supervisor import Gateway
from tests.harness import REPO, running_gateway
from tests.promql_names import alert_expressions, metric_names

DROPPED = "envoy_access_logs_grpc_access_log_logs_dropped"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["audit"].update(envoy_backlog_bytes=64 * 1024, envoy_batch_bytes=1024, envoy_flush_interval_ms=10)
        cfg["limits"]["requests_per_minute"] = 100_000
        cfg["spend"]["enabled"] = False

    with running_gateway(tmp_path_factory.mktemp("drops"), edit) as g:
        yield g


def _envoy_scrape_url(gw: Gateway) -> str:
    assert gw.runtime is not None
    groups = json.loads((Path(gw.runtime.run_dir) / "prometheus-targets.json").read_text())
    envoy = next(g for g in groups if g["labels"]["ccr_service"] == "envoy")
    return f"http://{envoy['targets'][0]}{envoy['labels']['__metrics_path__']}"


def _dropped(url: str) -> float:
    text = httpx.get(url, timeout=10).text
    values = [float(m[1]) for m in re.finditer(rf"^{DROPPED}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{DROPPED} is not exposed at {url}"
    return sum(values)


def test_drops_are_counted_where_prometheus_scrapes_and_the_alert_queries_them(gw: Gateway) -> None:
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yaml").read_text())
    alerted = [e for e in alert_expressions(rules) if DROPPED in metric_names(e)]
    assert alerted, "no alert rule reads Envoy's access-log drop counter"

    url = _envoy_scrape_url(gw)
    assert _dropped(url) == 0
    receivers = [c for c in gw.children if c.name.split(".")[0] == "accesslog"]
    assert receivers
    body = {"model": "claude-haiku-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    headers = {"x-api-key": gw.api_key, "anthropic-version": "2023-06-01",
               # A long (logged) client request id makes each entry larger: fewer requests fill the backlog.
               "x-client-request-id": "c" * 250}
    for c in receivers:
        os.kill(c.pid, signal.SIGSTOP)
    try:
        with httpx.Client(timeout=30) as client:
            sent = 0
            deadline = time.monotonic() + 240
            while _dropped(url) == 0:
                assert time.monotonic() < deadline, f"no drop counted after {sent} requests"
                for _ in range(50):
                    assert client.post(f"{gw.url}/v1/messages", json=body, headers=headers).status_code == 200
                sent += 50
    finally:
        for c in receivers:
            os.kill(c.pid, signal.SIGCONT)
    assert _dropped(url) > 0

"""Policy sets through the whole gateway: real Envoy, extauth, bundles from the real `opa build`,
the SDK. A shadow set that denies everything lets traffic through and records the would-be
denials; an OPA-Envoy policy, unchanged, decides a tenant's requests and adds its headers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row

from ccr import cli
from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests import opa_envoy_policies as oe
from tests.harness import emulator_mark, running_gateway

MODEL = "claude-sonnet-4-5"


# Both ext_authz transports; over HTTP the names the OPA-Envoy policy adds are declared (policy.result_names).
@pytest.fixture(scope="module", params=["grpc", "http"])
def gw(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gw-sets")
    trial = oe.build(tmp, "trial", oe.DENY_ALL)
    teams = oe.build(tmp, "teams", oe.OBJECT, "envoy/authz/result")

    def edit(cfg: dict[str, Any]) -> None:
        cfg["services"]["authz_transport"] = request.param
        cfg["policy"]["result_names"] = {"headers": ["x-ext-auth-allow"], "response_headers": ["x-policy-said"],
                                         "metadata": ["team"]}
        cfg["policy"]["sets"] = [
            {"name": "trial", "mode": "opa-envoy", "shadow": True, "bundle": {"path": str(trial)}},
            {"name": "teams", "mode": "opa-envoy", "entrypoint": "envoy/authz/result", "tenants": ["acme"],
             "bundle": {"path": str(teams)}},
        ]

    with running_gateway(tmp, edit) as g:
        yield g


def decisions(dsn: str, rid: str, n: int, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
    """The decision rows of a request by policy set, once `n` are written (within flush_ms)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        while True:
            cur.execute("SELECT * FROM policy_decisions WHERE request_id = %s", (rid,))
            got = cur.fetchall()
            if len(got) >= n:
                return {r["policy_set"]: r for r in got}
            assert time.monotonic() < deadline, f"{len(got)} decision rows for {rid} after {timeout}s"
            time.sleep(0.05)


def test_shadow_set_denying_everything_lets_traffic_through(gw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    c = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
    mark = emulator_mark(gw)
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().content and len(mark.arrived()) == 1
    rid = raw.headers["x-request-id"]
    rows = decisions(gw.runtime.postgres_dsn, rid, 2)
    assert set(rows) == {"global", "trial"}  # the tenant set applies to acme only
    assert rows["global"]["allow"] is True and rows["global"]["shadow"] is False
    trial = rows["trial"]
    assert (trial["shadow"], trial["allow"], trial["status"], trial["bundle_revision"]) == (
        True, False, 403, "trial-r1")
    assert cli.main(["-c", str(gw.config_path), "policy", "why", rid]) == 0
    out = capsys.readouterr().out
    assert "set trial (shadow: logged, not enforced)  bundle trial-r1" in out and "set global  bundle" in out


def test_opa_envoy_policy_decides_a_tenants_requests(gw: Gateway) -> None:
    dsn = gw.runtime.postgres_dsn
    _, key = create_key(dsn, "acme-dev", tenant="acme")
    c = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]

    with pytest.raises(anthropic.RateLimitError) as e:  # the policy's http_status and body
        c.messages.create(model=MODEL, max_tokens=8, messages=msgs, extra_headers={"x-team": "blue"})
    assert e.value.status_code == 429
    assert e.value.body["error"]["message"].startswith(  # type: ignore[index]
        "only the red team may call this gateway (decision dec_")
    assert e.value.response.headers["x-ext-auth-allow"] == "no"
    rows = decisions(dsn, e.value.response.headers["x-request-id"], 3)  # global allow, teams deny, trial shadow
    assert (rows["teams"]["allow"], rows["teams"]["status"], rows["teams"]["bundle_revision"]) == (
        False, 429, "teams-r1")

    mark = emulator_mark(gw)
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=msgs,
                                              extra_headers={"x-team": "red", "x-debug": "1"})
    assert raw.parse().content
    assert raw.headers["x-policy-said"] == "welcome"  # response_headers_to_add
    [upstream] = mark.arrived()
    assert upstream["headers"]["x-ext-auth-allow"] == "yes"  # headers, to the upstream request
    assert "x-debug" not in upstream["headers"]  # request_headers_to_remove
    rows = decisions(dsn, raw.headers["x-request-id"], 3)
    assert rows["teams"]["allow"] is True and rows["trial"]["shadow"] is True


def test_metrics_and_status_show_every_sets_revision(gw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    runtime = orjson.loads((Path(gw.runtime.run_dir) / "runtime.json").read_bytes())
    assert runtime["metrics"]["extauth"]
    for name, address in runtime["metrics"].items():
        if not name.startswith("extauth"):
            continue
        text = httpx.get(f"http://{address}/metrics", timeout=10).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        info = {s.labels["set"]: s for s in samples if s.name == "ccr_policy_bundle_info"}
        assert set(info) == {"global", "trial", "teams"}
        assert info["trial"].labels["revision"] == "trial-r1" and info["teams"].labels["revision"] == "teams-r1"
        assert all(s.value == 1 and len(s.labels["digest"]) == 64 for s in info.values())
        loaded = {s.labels["set"]: s.value for s in samples
                  if s.name == "ccr_policy_bundle_last_load_success_timestamp_seconds"}
        failures = {s.labels["set"]: s.value for s in samples if s.name == "ccr_policy_bundle_load_failures_total"}
        assert set(loaded) == set(failures) == set(info) and all(t > 1.7e9 for t in loaded.values())
        assert set(failures.values()) == {0}

    assert cli.main(["-c", str(gw.config_path), "policy", "status"]) == 0
    out = capsys.readouterr().out
    assert "set trial (opa-envoy, shadow, every principal)" in out and "revision   : trial-r1" in out
    assert "set teams (opa-envoy, tenants acme)" in out and "revision   : teams-r1" in out

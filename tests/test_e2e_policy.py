"""The shipped policies (tiers, data residency) through the whole gateway: real Envoy, extauth,
the compiled Rego, the emulated provider and the anthropic SDK."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from ccr.contract import H_REGION, H_REGION_HINT
from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import REPO, emulator_mark, running_gateway

HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-5"
DECISION = re.compile(r"\(decision (dec_[0-9a-f]+)\)$")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The shipped policies; the data a team edits: contractors may call Claude (their tier keeps
    them on Haiku), tenant acme-eu is bound to the EU, and the binding travels upstream as a header."""
    tmp = tmp_path_factory.mktemp("gw-policy")
    pol = tmp / "policies"
    shutil.copytree(REPO / "policies", pol)
    data = json.loads((pol / "data.json").read_text())
    data["model_access"]["contractors"] = ["claude-*"]
    data["residency"]["tenants"] = {"acme-eu": "eu"}
    data["residency"]["header"] = "x-data-region"
    (pol / "data.json").write_text(json.dumps(data))

    def edit(cfg: dict[str, Any]) -> None:
        cfg["policy"]["dir"] = str(pol)
        # The provider is in the EU: a request bound there may use it (and only providers there).
        cfg["providers"][0]["region"] = "eu"

    with running_gateway(tmp, edit) as g:
        yield g


def client(gw: Gateway, key: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, default_headers=headers or None)


def test_contractor_tier_denial_has_the_anthropic_shape_and_decision_id(gw: Gateway) -> None:
    _, key = create_key(gw.runtime.postgres_dsn, "contractor-e2e", ["contractors"])
    c = client(gw, key)
    mark = emulator_mark(gw)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        c.messages.create(model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    err = e.value.body["error"]  # type: ignore[index]
    assert e.value.status_code == 403 and err["type"] == "permission_error"
    assert err["message"].startswith("tier 'contractor' may use only models claude-haiku-*")
    assert DECISION.search(err["message"]) is not None
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        c.messages.create(model=HAIKU, max_tokens=9000, messages=[{"role": "user", "content": "hi"}])
    assert "max_tokens 9000 is above the ceiling of 8192 for tier 'contractor'" in e.value.body["error"]["message"]  # type: ignore[index]
    assert mark.arrived() == []  # nothing reached the provider

    # A size ceiling is a 413 from the policy: it keeps the policy's reason and the decision id
    # (Envoy's own 413 reply text is only for bodies past gateway.max_request_bytes).
    with pytest.raises(anthropic.APIStatusError) as e:
        c.messages.create(model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "z" * (3 * 1024 * 1024)}])
    assert e.value.status_code == 413
    msg = e.value.body["error"]["message"]  # type: ignore[index]
    assert "above the ceiling of 2097152" in msg and "max_request_bytes" not in msg, msg
    assert DECISION.search(msg) is not None
    assert mark.arrived() == []  # nothing reached the provider

    ok = c.messages.create(model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert ok.content and len(mark.arrived()) == 1


def test_residency_binding_reaches_upstream_and_a_foreign_region_is_refused(gw: Gateway) -> None:
    _, key = create_key(gw.runtime.postgres_dsn, "eu-e2e", ["default"], tenant="acme-eu")
    mark = emulator_mark(gw)
    ok = client(gw, key, **{H_REGION_HINT: "eu"}).messages.create(
        model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert ok.content
    [rec] = mark.arrived()
    headers = {k.lower(): v for k, v in rec["headers"].items()}
    assert headers["x-data-region"] == "eu"  # the policy's header, from the region binding
    assert H_REGION_HINT not in headers and H_REGION not in headers  # gateway-only headers stay inside

    with pytest.raises(anthropic.PermissionDeniedError) as e:
        client(gw, key, **{H_REGION_HINT: "us"}).messages.create(
            model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    msg = e.value.body["error"]["message"]  # type: ignore[index]
    assert "'eu-e2e' is bound to region 'eu' and may not use region 'us'" in msg
    assert DECISION.search(msg) is not None
    with pytest.raises(anthropic.BadRequestError) as e:
        client(gw, key, **{H_REGION_HINT: "moon"}).messages.create(
            model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert mark.arrived() == [rec]  # neither refusal reached the provider


def test_policy_why_prints_the_rules_reason_and_revision(gw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """`ccr policy why REQUEST_ID` (or the decision id a denial names): the decision, the rule's reason,
    the policy set and the bundle in use, joined to the request's audit row."""
    import time

    import psycopg

    from ccr import cli

    _, key = create_key(gw.runtime.postgres_dsn, "contractor-why", ["contractors"])
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        client(gw, key).messages.create(model=HAIKU, max_tokens=9000, messages=[{"role": "user", "content": "hi"}])
    rid = e.value.response.headers["x-request-id"]
    did = DECISION.search(e.value.body["error"]["message"]).group(1)  # type: ignore[index]
    deadline = time.monotonic() + 20
    with psycopg.connect(gw.runtime.postgres_dsn, autocommit=True) as conn:
        while True:  # the decision log writes within flush_ms; the audit row once Envoy logs the request
            n = conn.execute("SELECT (SELECT count(*) FROM policy_decisions WHERE request_id = %s)"
                             " + (SELECT count(*) FROM request_log WHERE request_id = %s)", (rid, rid)).fetchone()[0]
            if n == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        digest = conn.execute("SELECT bundle_digest FROM policy_decisions WHERE decision_id = %s", (did,)).fetchone()
    assert digest is not None and n == 2
    for ref in (rid, did):
        assert cli.main(["-c", str(gw.config_path), "policy", "why", ref]) == 0
        out = capsys.readouterr().out
        assert f"decision {did}" in out and f"request {rid}" in out
        assert "result    : deny (HTTP 403, full check)" in out
        assert "reason    : max_tokens 9000 is above the ceiling of 8192 for tier 'contractor'" in out
        assert "principal : contractor-why (key " in out
        assert f"policy    : set global  bundle {digest[0][:12]}" in out
        assert "request_log: status 403" in out
        assert key not in out

"""Several policy sets in one extauth: per-tenant sets that must allow too, shadow sets that are
logged and never enforced, OPA-Envoy sets with their own input and result, each with its own bundle,
status entry and metrics. Real bundles (`opa build -t wasm`), real PostgreSQL for the decision log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.rpc import code_pb2

from ccr import metrics
from ccr.config import ConfigError, parse_config
from ccr.contract import AUTHZ_DECISION_ID, POLICY_STATUS_FILE
from ccr.runtime import Runtime
from extauth.bundle import build_bundle
from extauth.bundle_source import BundleLoader, FileSource
from extauth.decisions import DecisionLog
from extauth.endpoints import match
from extauth.keys import KeyStore, create_key
from extauth.policy_sets import PolicySets
from extauth.principal import Principal, PrincipalKind
from extauth.server import Authorizer
from tests import opa_envoy_policies as oe
from tests.test_bundles import ENTRYPOINT, policy_src
from tests.test_decisions import DECISION_IN_MESSAGE, rows
from tests.test_extauth import GATEWAY_YAML, REGIONAL_GATEWAY_YAML, REPO, denied_error, http_check, msg_body, ok_headers

HAIKU, SONNET = "claude-haiku-4-5", "claude-sonnet-4-5"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    haiku_src = policy_src(root / "haiku", ["claude-haiku-*"])
    return {
        "global": build_bundle(REPO / "policies", root / "global.tar.gz", ENTRYPOINT, revision="global-r1"),
        "acme-haiku": build_bundle(haiku_src, root / "acme-haiku.tar.gz", ENTRYPOINT, revision="acme-r1"),
        "bool": oe.build(root, "bool", oe.BOOLEAN),
        "object": oe.build(root, "object", oe.OBJECT, "envoy/authz/result"),
        "deny-all": oe.build(root, "deny-all", oe.DENY_ALL),
        "impersonate": oe.build(root, "impersonate", oe.IMPERSONATE, "envoy/authz/result"),
        "broken": oe.build(root, "broken", oe.BROKEN),
        "clash": oe.build(root, "clash", oe.METADATA_CLASH, "envoy/authz/result"),
    }


Scenario = Callable[[Authorizer, PolicySets], Awaitable[Any]]


def run_with_sets(dsn: str, tmp: Path, bundles: dict[str, Path], sets: list[dict], scenario: Scenario,
                  log: DecisionLog | None = None, gateway_yaml: str = GATEWAY_YAML) -> Any:
    doc = yaml.safe_load(gateway_yaml)
    doc["policy"] = {"sets": sets}
    config = parse_config(doc)
    run = tmp / "run"
    run.mkdir(exist_ok=True)
    runtime = Runtime(config_path=str(tmp / "gateway.yaml"), run_dir=str(run), postgres_dsn=dsn,
                      redis_url="redis://127.0.0.1:1/0")

    decisions = log or DecisionLog(dsn)

    async def main() -> Any:
        loader = BundleLoader(None, FileSource(bundles["global"]), ENTRYPOINT)
        ps = PolicySets.from_config(config, runtime, loader)
        policy = await loader.load_initial()
        await ps.load_initial()
        keys = KeyStore(dsn)
        await keys.start()
        auth = Authorizer(config, keys, policy, decisions=decisions, sets=ps)
        loader.holder = auth
        try:
            return await scenario(auth, ps)
        finally:
            await decisions.close()  # flushes every queued decision
            await keys.close()
            await ps.close()
            policy.close()

    return asyncio.run(main())


def by_set(dsn: str, rid: str) -> dict[str, dict]:
    got = rows(dsn, "request_id = %s", (rid,))
    out = {r["policy_set"]: r for r in got}
    assert len(out) == len(got), f"two rows for one set: {got}"
    return out


def test_tenant_set_applies_only_to_its_tenant(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, acme = create_key(postgres_dsn, "sets-acme", tenant="acme")
    _, globex = create_key(postgres_dsn, "sets-globex", tenant="globex")
    _, none = create_key(postgres_dsn, "sets-none")
    sets = [{"name": "acme-haiku", "tenants": ["acme"], "bundle": {"path": str(bundles["acme-haiku"])}}]

    async def scenario(auth: Authorizer, ps: PolicySets) -> dict[str, pb.CheckResponse]:
        out = {}
        for rid, key, model, extra in (
                ("t-acme-sonnet", acme, SONNET, {}),
                # A header naming another tenant changes nothing: the tenant is the key's.
                ("t-acme-spoof", acme, SONNET, {"x-tenant": "globex", "x-ccr-tenant": "globex"}),
                ("t-acme-haiku", acme, HAIKU, {}),
                ("t-globex-sonnet", globex, SONNET, {}),
                ("t-none-sonnet", none, SONNET, {"x-tenant": "acme"})):
            out[rid] = await auth.check(http_check({"x-api-key": key, "x-request-id": rid, **extra},
                                                   body=msg_body(model)))
        return out

    got = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)
    for rid in ("t-acme-sonnet", "t-acme-spoof"):
        status, err = denied_error(got[rid])
        assert status == 403 and "claude-haiku-*" in err["message"]
        # The request's row (the one its message names) is the refusing set's, with its revision;
        # the global set's allow is recorded beside it.
        rs = by_set(postgres_dsn, rid)
        row = rs["acme-haiku"]
        assert (row["bundle_revision"], row["allow"], row["shadow"], row["status"]) == ("acme-r1", False, False, 403)
        assert DECISION_IN_MESSAGE.search(err["message"]).group(1) == row["decision_id"]
        assert (rs["global"]["allow"], rs["global"]["bundle_revision"]) == (True, "global-r1")
        assert rs["global"]["input_sha256"] == row["input_sha256"]  # the same input (ccr mode)
    assert got["t-acme-haiku"].status.code == code_pb2.OK
    rs = by_set(postgres_dsn, "t-acme-haiku")
    assert rs["global"]["allow"] and rs["global"]["bundle_revision"] == "global-r1"
    assert rs["acme-haiku"]["allow"] and rs["acme-haiku"]["bundle_revision"] == "acme-r1"
    assert got["t-acme-haiku"].dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value == rs["global"]["decision_id"]
    for rid in ("t-globex-sonnet", "t-none-sonnet"):
        assert got[rid].status.code == code_pb2.OK
        assert set(by_set(postgres_dsn, rid)) == {"global"}  # the acme set never ran for them


def test_shadow_set_logs_would_be_denials_and_never_enforces(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, key = create_key(postgres_dsn, "sets-shadow")
    sets = [{"name": "trial", "mode": "opa-envoy", "shadow": True, "bundle": {"path": str(bundles["deny-all"])}},
            {"name": "trial-ccr", "shadow": True, "bundle": {"path": str(bundles["acme-haiku"])}},
            # OPA-Envoy's own word for it.
            {"name": "broken", "mode": "opa-envoy", "dry_run": True, "bundle": {"path": str(bundles["broken"])}},
            {"name": "bad-headers", "mode": "opa-envoy", "entrypoint": "envoy/authz/result", "shadow": True,
             "bundle": {"path": str(bundles["impersonate"])}}]

    async def scenario(auth: Authorizer, ps: PolicySets) -> list[pb.CheckResponse]:
        return [await auth.check(http_check({"x-api-key": key, "x-request-id": f"sh-{i}",
                                             "content-type": "application/json"}, body=msg_body(SONNET)))
                for i in range(2)]

    got = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)
    for i, resp in enumerate(got):
        assert resp.status.code == code_pb2.OK  # every set denies or fails; none is enforced
        headers = ok_headers(resp)  # the shadow policy that asked for other identity headers got nothing
        assert headers["x-ccr-principal-id"] != "key_admin" and headers["x-ccr-cluster"] != "elsewhere"
        rs = by_set(postgres_dsn, f"sh-{i}")
        assert rs["global"]["allow"] is True and rs["global"]["shadow"] is False
        assert resp.dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value == rs["global"]["decision_id"]
        trial = rs["trial"]
        assert (trial["shadow"], trial["allow"], trial["status"], trial["bundle_revision"]) == (
            True, False, 403, "deny-all-r1")
        assert trial["input_sha256"] and trial["input_sha256"] != rs["global"]["input_sha256"]
        assert (rs["trial-ccr"]["shadow"], rs["trial-ccr"]["allow"]) == (True, False)
        assert "claude-haiku-*" in rs["trial-ccr"]["reason"]
        # A shadow set that errors is logged as a would-be (fail-closed) denial; the request is unaffected.
        for name, why in (("broken", "boolean or an object"), ("bad-headers", "reserved for the gateway")):
            assert (rs[name]["shadow"], rs[name]["allow"], rs[name]["status"]) == (True, False, 503)
            assert why in rs[name]["reason"]


def test_shadow_sets_after_a_refusing_set_still_run(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, key = create_key(postgres_dsn, "sets-order", tenant="acme")
    sets = [{"name": "acme-haiku", "tenants": ["acme"], "bundle": {"path": str(bundles["acme-haiku"])}},
            {"name": "envoy", "mode": "opa-envoy", "bundle": {"path": str(bundles["bool"])}},
            {"name": "trial", "mode": "opa-envoy", "shadow": True, "bundle": {"path": str(bundles["deny-all"])}}]

    async def scenario(auth: Authorizer, ps: PolicySets) -> pb.CheckResponse:
        return await auth.check(http_check({"x-api-key": key, "x-request-id": "order-1",
                                            "content-type": "application/json"}, body=msg_body(SONNET)))

    status, err = denied_error(run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario))
    rs = by_set(postgres_dsn, "order-1")
    # The first refusal decides; enforced sets after it are not asked; shadow sets see the request anyway.
    assert status == 403 and "claude-haiku-*" in err["message"]
    assert set(rs) == {"global", "acme-haiku", "trial"}
    assert DECISION_IN_MESSAGE.search(err["message"]).group(1) == rs["acme-haiku"]["decision_id"]
    assert (rs["trial"]["shadow"], rs["trial"]["allow"]) == (True, False)


def test_opa_envoy_boolean_policy_enforced(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, key = create_key(postgres_dsn, "sets-bool")
    sets = [{"name": "envoy", "mode": "opa-envoy", "bundle": {"path": str(bundles["bool"])}}]

    async def scenario(auth: Authorizer, ps: PolicySets) -> dict[str, pb.CheckResponse]:
        h = {"x-api-key": key, "content-type": "application/json"}
        return {
            "models": await auth.check(http_check({**h, "x-request-id": "b-models"}, "GET", "/v1/models")),
            "haiku": await auth.check(http_check({**h, "x-request-id": "b-haiku"}, body=msg_body(HAIKU))),
            "sonnet": await auth.check(http_check({**h, "x-request-id": "b-sonnet"}, body=msg_body(SONNET))),
        }

    got = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)
    # GET /v1/models is answered by the gateway (a 200 of its own, extauth/models_api.py) when allowed.
    assert got["models"].denied_response.status.code == 200 and got["haiku"].status.code == code_pb2.OK
    status, err = denied_error(got["sonnet"])
    assert status == 403 and err["type"] == "permission_error"
    assert err["message"].startswith("denied by policy set 'envoy'")
    row = by_set(postgres_dsn, "b-sonnet")["envoy"]
    assert (row["allow"], row["status"], row["bundle_revision"]) == (False, 403, "bool-r1")
    assert DECISION_IN_MESSAGE.search(err["message"]).group(1) == row["decision_id"]
    assert by_set(postgres_dsn, "b-haiku")["envoy"]["allow"] is True


def test_opa_envoy_object_result(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, key = create_key(postgres_dsn, "sets-object")
    sets = [{"name": "teams", "mode": "opa-envoy", "entrypoint": "envoy/authz/result",
             "bundle": {"path": str(bundles["object"])}}]

    async def scenario(auth: Authorizer, ps: PolicySets) -> dict[str, pb.CheckResponse]:
        h = {"x-api-key": key, "content-type": "application/json"}
        return {
            "red": await auth.check(http_check({**h, "x-team": "red", "x-request-id": "o-red"}, body=msg_body())),
            "red-again": await auth.check(http_check({**h, "x-team": "red"}, body=msg_body())),
            "blue": await auth.check(http_check({**h, "x-team": "blue", "x-request-id": "o-blue"}, body=msg_body())),
        }

    got = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)
    red = got["red"]
    assert red.status.code == code_pb2.OK
    headers = ok_headers(red)
    assert headers["x-ext-auth-allow"] == "yes" and headers["x-ccr-principal"] == "sets-object"
    assert [(h.header.key, h.header.value) for h in red.ok_response.response_headers_to_add] == [
        ("x-policy-said", "welcome")]
    assert "x-debug" in red.ok_response.headers_to_remove
    meta = red.dynamic_metadata.fields
    assert meta["team"].string_value == "red" and meta["principal"].string_value == "sets-object"
    assert meta[AUTHZ_DECISION_ID].string_value != got["red-again"].dynamic_metadata.fields[
        AUTHZ_DECISION_ID].string_value  # each request its own id, though the base response is cached
    assert got["red-again"].dynamic_metadata.fields["team"].string_value == "red"

    blue = got["blue"]
    status, err = denied_error(blue)
    assert status == 429 and err["type"] == "rate_limit_error"
    assert err["message"].startswith("only the red team may call this gateway (decision dec_")
    assert {h.header.key: h.header.value for h in blue.denied_response.headers}["x-ext-auth-allow"] == "no"


def test_policy_never_sets_identity_headers(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, key = create_key(postgres_dsn, "sets-impersonate")
    sets = [{"name": "evil", "mode": "opa-envoy", "entrypoint": "envoy/authz/result",
             "bundle": {"path": str(bundles["impersonate"])}}]

    async def scenario(auth: Authorizer, ps: PolicySets) -> pb.CheckResponse:
        return await auth.check(http_check({"x-api-key": key, "x-request-id": "evil-1"}, body=msg_body()))

    resp = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)
    status, err = denied_error(resp)  # refused, not applied: fail closed
    assert status == 503 and "policy set 'evil' failed" in err["message"]
    assert not resp.HasField("ok_response")
    row = by_set(postgres_dsn, "evil-1")["evil"]
    assert row["allow"] is False and row["status"] == 503 and "reserved for the gateway" in row["reason"]


def test_policy_never_replaces_the_gateways_metadata(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, key = create_key(postgres_dsn, "sets-clash")
    sets = [{"name": "clash", "mode": "opa-envoy", "entrypoint": "envoy/authz/result",
             "bundle": {"path": str(bundles["clash"])}}]

    async def scenario(auth: Authorizer, ps: PolicySets) -> pb.CheckResponse:
        return await auth.check(http_check({"x-api-key": key, "x-request-id": "clash-1"}, body=msg_body()))

    resp = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)
    status, err = denied_error(resp)
    assert status == 503 and not resp.HasField("ok_response") and "key_admin" not in err["message"]
    main = [r for r in rows(postgres_dsn, "request_id = %s", ("clash-1",)) if r["status"] == 503]
    assert len(main) == 1 and "may not replace the gateway's keys ['principal_id']" in main[0]["reason"]


def test_each_set_swaps_on_its_own_with_status_and_metrics(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, key = create_key(postgres_dsn, "sets-swap")
    live = tmp_path / "teams.tar.gz"
    shutil.copy(bundles["bool"], live)
    sets = [{"name": "teams", "mode": "opa-envoy", "bundle": {"path": str(live)}}]
    status_file = tmp_path / "run" / POLICY_STATUS_FILE
    before = metrics.REGISTRY.get_sample_value("ccr_policy_bundle_load_failures_total", {"set": "teams"}) or 0

    async def scenario(auth: Authorizer, ps: PolicySets) -> None:
        [teams] = ps.sets
        st = json.loads(status_file.read_text())
        assert st["revision"] == "global-r1" and st["set"] == "global"
        assert st["sets"]["teams"]["revision"] == "bool-r1" and st["sets"]["teams"]["mode"] == "opa-envoy"
        assert metrics.REGISTRY.get_sample_value(
            "ccr_policy_bundle_info", {"set": "teams", "revision": "bool-r1",
                                       "digest": teams.policy.bundle.digest}) == 1
        sonnet = http_check({"x-api-key": key, "content-type": "application/json"}, body=msg_body(SONNET))
        assert (await auth.check(sonnet)).status.code != code_pb2.OK

        # A broken bundle is refused; the last good one keeps serving; the failure is counted.
        live.write_bytes(b"not a bundle")
        assert await teams.loader.poll_once() == "refused"
        st = json.loads(status_file.read_text())
        assert st["sets"]["teams"]["revision"] == "bool-r1" and st["sets"]["teams"]["last_error"]
        assert st["last_error"] is None  # the global set is not affected
        failures = metrics.REGISTRY.get_sample_value("ccr_policy_bundle_load_failures_total", {"set": "teams"})
        assert failures == before + 1
        old_digest = teams.policy.bundle.digest

        # A new good revision swaps in (for this set only).
        shutil.copy(bundles["deny-all"], live)
        assert await teams.loader.poll_once() == "loaded"
        st = json.loads(status_file.read_text())
        assert st["sets"]["teams"]["revision"] == "deny-all-r1" and st["sets"]["teams"]["last_error"] is None
        assert st["revision"] == "global-r1"
        assert metrics.REGISTRY.get_sample_value(
            "ccr_policy_bundle_info", {"set": "teams", "revision": "bool-r1", "digest": old_digest}) is None
        assert metrics.REGISTRY.get_sample_value(
            "ccr_policy_bundle_info", {"set": "teams", "revision": "deny-all-r1",
                                       "digest": teams.policy.bundle.digest}) == 1
        models = http_check({"x-api-key": key}, "GET", "/v1/models")
        assert (await auth.check(models)).denied_response.status.code == 403  # deny-all now enforced

    run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)


def test_an_enforced_set_without_a_bundle_stops_start_up_a_shadow_one_does_not(
        postgres_dsn: str, tmp_path: Path, bundles) -> None:
    missing = str(tmp_path / "missing.tar.gz")

    async def scenario(auth: Authorizer, ps: PolicySets) -> pb.CheckResponse:
        _, key = create_key(postgres_dsn, "sets-missing")
        return await auth.check(http_check({"x-api-key": key}, body=msg_body()))

    resp = run_with_sets(postgres_dsn, tmp_path, bundles,
                         [{"name": "later", "shadow": True, "bundle": {"path": missing}}], scenario)
    assert resp.status.code == code_pb2.OK
    from extauth.bundle import BundleError

    with pytest.raises(BundleError, match="policy set 'now'"):
        run_with_sets(postgres_dsn, tmp_path, bundles, [{"name": "now", "bundle": {"path": missing}}], scenario)


@pytest.mark.parametrize("sets, why", [
    ([{"name": "global", "bundle": {"path": "x"}}], "is the set policy.dir"),
    ([{"name": "a", "bundle": {"path": "x"}}, {"name": "a", "bundle": {"path": "y"}}], "unique"),
    ([{"name": "a", "tenants": [], "bundle": {"path": "x"}}], "tenants is empty"),
    ([{"name": "a", "bundle": {"url": "https://b.example/x.tar.gz"}}], "without verification"),
    ([{"name": "a", "mode": "opa", "bundle": {"path": "x"}}], "mode"),
    ([{"name": "A b", "bundle": {"path": "x"}}], "name"),
])
def test_set_config_is_strict(sets: list, why: str) -> None:
    doc = yaml.safe_load(GATEWAY_YAML)
    doc["policy"] = {"sets": sets}
    with pytest.raises(ConfigError, match=why):
        parse_config(doc)


def test_decision_log_file_lines_of_sets_hold_no_credentials(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    _, key = create_key(postgres_dsn, "sets-file")
    sets = [{"name": "trial", "mode": "opa-envoy", "shadow": True, "bundle": {"path": str(bundles["deny-all"])}}]
    file = tmp_path / "decisions.jsonl"
    prompt = "my card is 4111 1111 1111 1111"
    body = orjson.dumps({"model": SONNET, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]})

    async def scenario(auth: Authorizer, ps: PolicySets) -> pb.CheckResponse:
        return await auth.check(http_check({"x-api-key": key, "authorization": "Bearer also-secret",
                                            "content-type": "application/json", "x-team": "red",
                                            "x-request-id": "file-1"}, body=body))

    resp = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario,
                         DecisionLog(postgres_dsn, file=file, include_input=True))
    assert resp.status.code == code_pb2.OK
    text = file.read_text()
    for secret in (key, "also-secret", prompt, "4111"):
        assert secret not in text
    lines = {json.loads(ln)["labels"]["policy_set"] if "labels" in json.loads(ln) else "global": json.loads(ln)
             for ln in text.splitlines()}
    trial = lines["trial"]
    assert trial["path"] == "envoy/authz/allow" and trial["result"] is False
    assert trial["labels"] == {"policy_set": "trial", "shadow": True, "mode": "opa-envoy"}
    assert trial["bundles"] == {"trial": {"revision": "deny-all-r1"}}
    headers = trial["input"]["attributes"]["request"]["http"]["headers"]
    assert headers["x-api-key"] == headers["authorization"] == "[redacted]" and headers["x-team"] == "red"
    assert trial["input"]["parsed_path"] == ["v1", "messages"] and "parsed_body" not in trial["input"]
    [row] = [r for r in rows(postgres_dsn, "request_id = %s", ("file-1",)) if r["policy_set"] == "trial"]
    assert row["decision_id"] == trial["decision_id"]


def test_batch_requests_are_decided_by_the_tenants_set_too(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    sets = [{"name": "acme-haiku", "tenants": ["acme"], "bundle": {"path": str(bundles["acme-haiku"])}},
            {"name": "trial", "shadow": True, "bundle": {"path": str(bundles["acme-haiku"])}}]
    acme = Principal(PrincipalKind.KEY, "key_acme", "acme-batch", ("default",), tenant="acme", key_id="key_acme")
    other = Principal(PrincipalKind.KEY, "key_o", "other-batch", ("default",), tenant="globex", key_id="key_o")
    create = match("POST", "/v1/messages")

    async def scenario(auth: Authorizer, ps: PolicySets) -> dict[str, Any]:
        out = {}
        for p in (acme, other):
            decide = ps.batch_decide(p, auth.policy.decide)  # what each request of a batch create is decided by
            out[p.name] = tuple(decide(p, "POST", "/v1/messages", m, create) for m in (SONNET, HAIKU))
        return out

    got = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)
    sonnet, haiku = got["acme-batch"]
    assert not sonnet.allow and "claude-haiku-*" in sonnet.reason and haiku.allow
    sonnet, haiku = got["other-batch"]
    assert sonnet.allow and haiku.allow  # neither the acme set nor the shadow one refuses another tenant


def test_set_from_a_bundle_server_signed_and_pushed_with_the_cli(postgres_dsn: str, tmp_path: Path, bundles,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from ccr.cli import main
    from tests.bundle_server import BundleServer
    from tests.test_bundles import make_keys, rewrite

    keys = make_keys(tmp_path / "keys")
    _, key = create_key(postgres_dsn, "sets-http")
    with BundleServer() as srv:
        url = srv.url + "/envoy.tar.gz"
        sets = [{"name": "envoy", "mode": "opa-envoy", "bundle": {"url": url, "poll_interval_s": 0.5},
                 "verification": {"key_file": str(keys["ES256"][1]), "alg": "ES256", "key_id": "sec-1"}}]
        config = tmp_path / "cli.yaml"
        config.write_text(yaml.safe_dump({**yaml.safe_load(GATEWAY_YAML), "policy": {"sets": sets}}))
        cli = ["-c", str(config)]
        signed = tmp_path / "envoy.tar.gz"
        # The set's alg and key id are the defaults: what `sign --set` signs is what the set verifies.
        assert main(["policy", "sign", *cli, str(bundles["bool"]), "--set", "envoy",
                     "--signing-key", str(keys["ES256"][0]), "--out", str(signed)]) == 0
        assert main(["policy", "verify", *cli, str(signed), "--set", "envoy"]) == 0
        assert main(["policy", "verify", *cli, str(bundles["bool"]), "--set", "envoy"]) == 1  # unsigned
        assert main(["policy", "push", *cli, str(signed), "--set", "envoy"]) == 0
        assert main(["policy", "verify", *cli, str(signed), "--set", "nope"]) == 2
        capsys.readouterr()

        async def scenario(auth: Authorizer, ps: PolicySets) -> None:
            [envoy] = ps.sets
            assert envoy.policy.bundle.signed and envoy.policy.bundle.revision == "bool-r1"
            models = http_check({"x-api-key": key}, "GET", "/v1/models")
            assert (await auth.check(models)).denied_response.status.code == 200  # the gateway's own answer
            # Tampered on the server (not through `push`, which verifies first): refused, last good serves.
            srv.put("/envoy.tar.gz", rewrite(signed.read_bytes(), replace={"data.json": b'{"x": 1}'}))
            assert await envoy.loader.poll_once() == "refused"
            assert "tampered" in envoy.loader.status.last_error and envoy.policy.bundle.revision == "bool-r1"
            assert (await auth.check(models)).denied_response.status.code == 200

        run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)


# -- ccr-mode sets with input v1 and its result (status, headers, labels, region) ----------------

# A team's ccr-mode policy that reads input v1 facts (a header, the body's max_tokens) and answers
# with the fields of the validated result: a denial's status, headers, labels, a region.
TEAM_POLICY = """
package ccr.authz

import rego.v1

decision := {"allow": false, "reason": "team blue is over its budget", "status": 429} if {
    input.request.headers["x-team"] == "blue"
} else := {"allow": false, "status": 400,
           "reason": sprintf("max_tokens %d is over the team ceiling of 100", [input.request.max_tokens])} if {
    input.request.max_tokens > 100
} else := {"allow": true, "reason": "team policy", "headers": {"x-team-policy": "acme"},
           "metadata": {"labels": {"team": "acme"}, "region": "eu"}} if {
    input.request.headers["x-team"] == "eu"
} else := {"allow": true, "reason": "team policy", "headers": {"x-team-policy": "acme"},
           "metadata": {"labels": {"team": "acme"}}}
"""

# A policy that reads the request's text (data.policy_input.text): only its set's input carries it.
TEXT_POLICY = """
package ccr.authz

import rego.v1

decision := {"allow": false, "reason": "the text names a secret project"} if {
    some t in input.request.text
    contains(t.text, "bluebird")
} else := {"allow": true, "reason": "nothing secret"}
"""


def ccr_bundle(root: Path, name: str, rego: str, data: dict) -> Path:
    src = root / f"{name}-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "policy.rego").write_text(rego)
    (src / "data.json").write_text(json.dumps(data))
    return build_bundle(src, root / f"{name}.tar.gz", ENTRYPOINT, revision=f"{name}-r1")


def test_ccr_sets_get_input_v1_and_their_result_is_honoured(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    from ccr.contract import AUTHZ_LABELS, AUTHZ_REGION, H_REGION
    from extauth.decisions import canonical, policy_input
    from extauth.policy_input import RequestFacts, body_facts, policy_headers, request_text
    from tests.test_decisions import _principal

    team = ccr_bundle(tmp_path, "team", TEAM_POLICY, {})
    reader = ccr_bundle(tmp_path, "reader", TEXT_POLICY, {"policy_input": {"text": True}})
    _, key = create_key(postgres_dsn, "sets-team", tenant="acme")
    sets = [{"name": "team", "tenants": ["acme"], "bundle": {"path": str(team)}},
            {"name": "reader", "shadow": True, "bundle": {"path": str(reader)}}]
    secret = orjson.dumps({"model": SONNET, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "status of bluebird?"}]})
    big = orjson.dumps({"model": SONNET, "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]})
    requests = {"blue": ({"x-team": "blue"}, msg_body(SONNET)), "big": ({}, big),
                "eu": ({"x-team": "eu"}, msg_body(SONNET)), "secret": ({}, secret)}

    async def scenario(auth: Authorizer, ps: PolicySets) -> dict[str, pb.CheckResponse]:
        return {rid: await auth.check(http_check({"x-api-key": key, "x-request-id": f"team-{rid}", **extra},
                                                 body=body))
                for rid, (extra, body) in requests.items()}

    got = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario, gateway_yaml=REGIONAL_GATEWAY_YAML)

    # A refusing ccr-mode set's status, error type and reason are the request's (they were 403 before).
    for rid, code, err_type, why in (("blue", 429, "rate_limit_error", "team blue is over its budget"),
                                      ("big", 400, "invalid_request_error", "max_tokens 500 is over the team")):
        status, err = denied_error(got[rid])
        assert (status, err["type"]) == (code, err_type) and why in err["message"]
        rs = by_set(postgres_dsn, f"team-{rid}")
        row = rs["team"]
        assert (row["allow"], row["status"], row["shadow"], row["bundle_revision"]) == (False, code, False, "team-r1")
        assert why in row["reason"] and DECISION_IN_MESSAGE.search(err["message"]).group(1) == row["decision_id"]
        # The set saw the global set's input v1 (headers, body facts): the same digest.
        assert row["input_sha256"] and row["input_sha256"] == rs["global"]["input_sha256"]
        assert rs["global"]["allow"] is True

    # An allowing enforced set's headers, labels and region join the global set's result.
    eu = got["eu"]
    assert eu.status.code == code_pb2.OK
    headers = ok_headers(eu)
    assert headers["x-team-policy"] == "acme" and headers[H_REGION] == "eu"
    md = eu.dynamic_metadata.fields
    assert md[AUTHZ_REGION].string_value == "eu"
    assert dict(md[AUTHZ_LABELS].struct_value) == {"team": "acme", "tier": "standard"}  # the global's tier too

    # A shadow set that reads the text has that text in its input: its row's digest is of that input.
    assert got["secret"].status.code == code_pb2.OK
    rs = by_set(postgres_dsn, "team-secret")
    row = rs["reader"]
    assert (row["shadow"], row["allow"], row["status"]) == (True, False, 403)
    assert "secret project" in row["reason"]
    principal = asyncio.run(_principal(postgres_dsn, key))
    text, truncated = request_text(orjson.loads(secret), str, 256 * 1024)
    facts = RequestFacts(headers=policy_headers({"x-api-key": key, "x-request-id": "team-secret"}), host="gw.local",
                         size=len(secret), body=body_facts(orjson.loads(secret)), text=text, text_truncated=truncated)
    expected = hashlib.sha256(canonical(policy_input(principal, "POST", "/v1/messages", SONNET,
                                                     match("POST", "/v1/messages"), None, facts))).hexdigest()
    assert row["input_sha256"] == expected and expected != rs["global"]["input_sha256"]
    assert rs["team"]["allow"] is True and rs["team"]["input_sha256"] == rs["global"]["input_sha256"]


def test_batch_requests_get_the_sets_status_and_input_v1(postgres_dsn: str, tmp_path: Path, bundles) -> None:
    from extauth.policy_input import RequestFacts
    from extauth.server import _batch_decide

    team = ccr_bundle(tmp_path, "team", TEAM_POLICY, {})
    sets = [{"name": "team", "tenants": ["acme"], "bundle": {"path": str(team)}}]
    acme = Principal(PrincipalKind.KEY, "key_acme", "acme-batch", ("default",), tenant="acme", key_id="key_acme")
    create = match("POST", "/v1/messages")
    base = RequestFacts(host="gw.local", size=100)

    async def scenario(auth: Authorizer, ps: PolicySets) -> tuple:
        decide = ps.batch_decide(acme, _batch_decide(auth.policy, base), lambda e: _batch_decide(e, base))
        return tuple(decide(acme, "POST", "/v1/messages", SONNET, create, None, params, str)
                     for params in ({"model": SONNET, "max_tokens": 500, "messages": []},
                                    {"model": SONNET, "max_tokens": 50, "messages": []}))

    big, small = run_with_sets(postgres_dsn, tmp_path, bundles, sets, scenario)
    assert (big.allow, big.status) == (False, 400) and "max_tokens 500 is over the team ceiling" in big.reason
    assert small.allow


def test_joined_results_refuse_two_regions() -> None:
    from extauth.policy import Decision
    from extauth.policy_sets import ResultConflict, joined

    g = Decision(True, "", labels=(("tier", "standard"),), region="us")
    d = joined(g, Decision(True, "", headers=(("x-a", "1"),), labels=(("team", "acme"),), region="us"), "team")
    assert d.region == "us" and d.headers == (("x-a", "1"),) and d.labels == (("team", "acme"), ("tier", "standard"))
    with pytest.raises(ResultConflict, match="region 'eu'"):
        joined(g, Decision(True, "", region="eu"), "team")

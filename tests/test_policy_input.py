"""Policy input v1 and the policy's result: pure mappings, result validation, the decision
cache, and the shipped policies (tiers, residency, PII) through extauth's Check."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import json_format
from google.rpc import code_pb2

from ccr.config import parse_config
from ccr.contract import AUTHZ_LABELS, AUTHZ_RATELIMIT, AUTHZ_REGION, H_REGION, H_REGION_HINT
from extauth.bundle import build_bundle
from extauth.endpoints import match
from extauth.keys import KeyStore, create_key
from extauth.policy import PolicyEngine, PolicyError, parse_result
from extauth.policy_input import (
    MAX_DEPTH,
    MAX_TEXT_PIECES,
    InputError,
    RequestFacts,
    TextPiece,
    body_facts,
    document,
    policy_headers,
    policy_query,
    region_hint,
    request_text,
)
from extauth.principal import Principal, PrincipalKind
from extauth.server import Authorizer
from tests.harness import REPO, copy_policy_modules
from tests.test_extauth import GATEWAY_YAML, REGIONAL_GATEWAY_YAML, denied_error, http_check, ok_headers

ENTRYPOINT = "ccr/authz/decision"
ALICE = Principal(PrincipalKind.KEY, "key_a", "alice", ("default",), key_id="key_a")


# -- pure mappings -------------------------------------------------------------------


def test_headers_leave_out_credentials_noise_and_ccr() -> None:
    got = dict(policy_headers({
        "authorization": "Bearer ccr_secret", "x-api-key": "ccr_secret", "cookie": "s=1",
        "proxy-authorization": "Basic x", ":path": "/v1/messages", ":authority": "gw",
        "x-request-id": "r1", "content-length": "10", "x-envoy-expected-rq-timeout-ms": "5",
        "traceparent": "00-a-b-01", "x-ccr-principal": "mallory",
        "anthropic-version": "2023-06-01", "User-Agent": "sdk/1", "ccr-region": "eu",
    }))
    assert got == {"anthropic-version": "2023-06-01", "user-agent": "sdk/1", "ccr-region": "eu"}
    assert "ccr_secret" not in json.dumps(got)


def test_query_is_parsed_with_blank_values() -> None:
    assert policy_query("/v1/messages?beta=true&x=&x=2") == (("beta", ("true",)), ("x", ("", "2")))
    assert policy_query("/v1/messages") == ()


@pytest.mark.parametrize("raw", ["", "  ", "eu west", "ｅｕ", "e\u200bu", "x" * 33, "eu;us", "eu.west"])
def test_region_hint_that_is_not_a_plain_name_is_refused(raw: str) -> None:
    with pytest.raises(InputError, match=H_REGION_HINT):
        region_hint({H_REGION_HINT: raw})


def test_region_hint_normalised() -> None:
    assert region_hint({H_REGION_HINT: " EU "}) == "eu"
    assert region_hint({}) is None


def test_body_facts() -> None:
    f = body_facts({"max_tokens": 100, "stream": True, "thinking": {"type": "enabled", "budget_tokens": 2048},
                    "tools": [{"name": "grep"}, {"type": "web_search_20250305", "name": "web_search"}]})
    assert (f.max_tokens, f.stream, f.thinking_budget, f.tools) == (100, True, 2048, ("grep", "web_search"))
    assert body_facts({"thinking": {"type": "disabled"}}).thinking_budget == 0
    # Adaptive thinking without a budget may use all of max_tokens: that is its budget for a ceiling.
    adaptive = body_facts({"max_tokens": 9000, "thinking": {"type": "adaptive"}})
    assert (adaptive.thinking, adaptive.thinking_budget) == ("adaptive", 9000)
    assert body_facts({}).tools is None


@pytest.mark.parametrize("doc, needle", [
    ({"max_tokens": "100"}, "max_tokens"),
    ({"max_tokens": 1e9}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"thinking": {"type": "enabled"}}, "budget_tokens"),
    ({"thinking": {"type": "turbo"}}, "thinking.type"),
    ({"thinking": {"type": "enabled", "budget_tokens": "9"}}, "budget_tokens"),
    ({"thinking": "on"}, "thinking"),
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"name": ""}]}, "tools.0.name"),
    ({"tools": [{"description": "no name"}]}, "tools.0.name"),
    ({"tools": [{"name": "t"}] * 1025}, "at most 1024 tools"),
])
def test_body_facts_refuse_what_a_ceiling_cannot_compare(doc: dict, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        body_facts(doc)


CONVERSATION = {
    "system": [{"type": "text", "text": "be brief"}],
    "messages": [
        {"role": "user", "content": "look up Jane"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "tool_use", "id": "t1", "name": "crm", "input": {"q": {"name": "Jane"}, "n": 3}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "Jane Doe"}]},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
    ],
}


def test_request_text_each_piece_with_location_and_kind() -> None:
    pieces, truncated = request_text(CONVERSATION)
    assert not truncated
    assert [t.policy_input() for t in pieces] == [
        {"loc": "system[0]", "kind": "system", "text": "be brief"},
        {"loc": "messages[0].content", "kind": "message", "text": "look up Jane"},
        {"loc": "messages[1].content[0]", "kind": "thinking", "text": "hmm"},
        {"loc": "messages[1].content[1].input.q.name", "kind": "tool_input", "text": "Jane"},
        {"loc": "messages[2].content[0].content[0]", "kind": "tool_result", "text": "Jane Doe"},
        {"loc": "messages[2].content[1].source.data", "kind": "document", "text": "doc"},
    ]


def test_request_text_is_bounded_for_huge_texts_many_blocks_and_deep_nesting() -> None:
    huge = {"messages": [{"role": "user", "content": "x" * 5_000_000}]}
    pieces, truncated = request_text(huge, max_chars=1000)
    assert truncated and len(pieces) == 1 and len(pieces[0].text) == 1000

    # Once the budget is spent, later strings are not even decoded (a placeholder stays a placeholder).
    decoded: list[str] = []
    two = {"messages": [{"role": "user", "content": "a" * 10}, {"role": "user", "content": "PLACEHOLDER"}]}
    pieces, truncated = request_text(two, lambda s: decoded.append(s) or s, max_chars=10)
    assert truncated and decoded == ["a" * 10] and len(pieces) == 1

    many = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 100_000}]}
    pieces, truncated = request_text(many)
    assert truncated and len(pieces) == MAX_TEXT_PIECES

    deep: Any = "secret"
    for _ in range(500):
        deep = {"k": deep}
    nested = {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "t", "input": deep}]}]}
    pieces, truncated = request_text(nested)
    assert truncated and pieces == ()  # the string lies below MAX_DEPTH
    assert MAX_DEPTH < 500


def test_document_v1_shape() -> None:
    facts = RequestFacts(query=(("beta", ("true",)),), headers=(("anthropic-version", "2023-06-01"),),
                         host="gw.local", source_address="10.1.2.3", source_spiffe_id="spiffe://ex.org/w",
                         size=123, region_hint="eu", body=body_facts({"max_tokens": 5, "tools": [{"name": "a"}]}))
    doc = document(ALICE, "POST", "/v1/messages", "claude-haiku-4-5", match("POST", "/v1/messages"), None, facts)
    assert doc["version"] == 1
    assert doc["source"] == {"address": "10.1.2.3", "spiffe_id": "spiffe://ex.org/w"}
    r = doc["request"]
    assert (r["endpoint"], r["kind"], r["model"], r["max_tokens"], r["tools"], r["tool_count"], r["size"],
            r["region_hint"], r["query"], r["headers"], r["host"]) == (
        "messages.create", "messages", "claude-haiku-4-5", 5, ["a"], 1, 123, "eu", {"beta": ["true"]},
        {"anthropic-version": "2023-06-01"}, "gw.local")
    assert "text" not in r and "pii" not in r  # only when materialised / scanned
    assert doc["principal"]["kind"] == "key" and doc["principal"]["groups"] == ["default"]


# -- the result ---------------------------------------------------------------------


def test_full_result_is_parsed() -> None:
    d = parse_result({"allow": True, "reason": "ok", "headers": {"x-team": "a"},
                      "metadata": {"region": "eu", "labels": {"tier": "t"}, "ratelimit": {"tier": "t"}}})
    assert (d.allow, d.headers, d.region, d.labels, d.ratelimit) == (
        True, (("x-team", "a"),), "eu", (("tier", "t"),), (("tier", "t"),))
    deny = parse_result({"allow": False, "reason": "too big", "status": 413})
    assert (deny.allow, deny.status) == (False, 413)
    assert parse_result({"allow": False}).status == 403


@pytest.mark.parametrize("result, needle", [
    (None, "not {allow"),
    ({"allow": "yes"}, "not {allow"),
    ({"allow": True, "reason": 3}, "reason"),
    ({"allow": True, "extra": 1}, "unknown field"),
    ({"allow": False, "status": 200}, "status"),
    ({"allow": False, "status": 418}, "status"),
    ({"allow": False, "status": True}, "status"),
    ({"allow": True, "status": 403}, "allowed with status"),
    ({"allow": True, "headers": {"x-ccr-principal": "admin"}}, "may not set header 'x-ccr-principal'"),
    ({"allow": True, "headers": {"x-ccr-region": "us"}}, "may not set header 'x-ccr-region'"),
    ({"allow": True, "headers": {"authorization": "Bearer x"}}, "may not set header 'authorization'"),
    ({"allow": True, "headers": {"x-request-id": "r"}}, "may not set header 'x-request-id'"),
    ({"allow": True, "headers": {"X-Team": "a"}}, "lower-case name"),
    ({"allow": True, "headers": {"x-team": "a\r\nx-ccr-principal: admin"}}, "CR/LF"),
    ({"allow": True, "headers": {"x-team": 1}}, "x-team"),
    ({"allow": True, "headers": ["x-team"]}, "result.headers"),
    ({"allow": True, "metadata": {"route": "x"}}, "metadata"),
    ({"allow": True, "metadata": {"region": "e u"}}, "region"),
    ({"allow": True, "metadata": {"labels": {"tier": ["a"]}}}, "labels"),
])
def test_bad_result_fails_closed(result: Any, needle: str) -> None:
    with pytest.raises(PolicyError, match=needle):
        parse_result(result, ENTRYPOINT)


# -- bundles for the tests ----------------------------------------------------------------


def shipped_data(**changes: Any) -> dict[str, Any]:
    data = json.loads((REPO / "policies" / "data.json").read_text())
    data["model_access"]["contractors"] = ["claude-*"]
    data["residency"]["tenants"] = {"acme-eu": "eu"}
    data.update(changes)
    return data


def bundle_of(tmp: Path, data: dict[str, Any], extra_rego: str | None = None) -> Path:
    src = tmp / "policies"
    src.mkdir(parents=True, exist_ok=True)
    copy_policy_modules(src)
    if extra_rego is not None:  # a test policy in its own package, as the entrypoint
        (src / "test_policy.rego").write_text(extra_rego)
    (src / "data.json").write_text(json.dumps(data))
    entry = ENTRYPOINT if extra_rego is None else "t/decision"
    return build_bundle(src, tmp / "bundle.tar.gz", entry)


def run_checks(dsn: str, bundle: Path, checks: list[pb.CheckRequest], entrypoint: str = ENTRYPOINT,
               gateway_yaml: str = GATEWAY_YAML) -> list[pb.CheckResponse]:
    config = parse_config(__import__("yaml").safe_load(gateway_yaml))

    async def scenario() -> list[pb.CheckResponse]:
        keys = KeyStore(dsn)
        await keys.start()
        auth = Authorizer(config, keys, PolicyEngine.load(bundle, entrypoint))
        try:
            return [await auth.check(c) for c in checks]
        finally:
            await keys.close()
            auth.policy.close()

    return asyncio.run(scenario())


def body(model: str = "claude-haiku-4-5", **fields: Any) -> bytes:
    return orjson.dumps({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}],
                         **fields})


def meta(resp: pb.CheckResponse) -> dict[str, Any]:
    return json_format.MessageToDict(resp.dynamic_metadata)


# -- shipped policies through Check ---------------------------------------------------------


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle_of(tmp_path_factory.mktemp("shipped"), shipped_data())


def test_contractor_tier_limits_models_and_ceilings(postgres_dsn: str, shipped: Path) -> None:
    _, k = create_key(postgres_dsn, "contractor", groups=["contractors"])
    h = {"x-api-key": k}
    ok, sonnet, tokens, thinking, tools, size = run_checks(postgres_dsn, shipped, [
        http_check(h, body=body()),
        http_check(h, body=body("claude-sonnet-4-5")),
        http_check(h, body=body(max_tokens=8193)),
        http_check(h, body=body(max_tokens=8000, thinking={"type": "enabled", "budget_tokens": 5000})),
        http_check(h, body=body(tools=[{"name": f"t{i}", "input_schema": {}} for i in range(17)])),
        http_check(h, body=body(system="x" * (2 * 1024 * 1024))),
    ])
    assert ok.status.code == code_pb2.OK
    assert meta(ok)[AUTHZ_LABELS] == {"tier": "contractor"} and meta(ok)[AUTHZ_RATELIMIT] == {"tier": "contractor"}
    for resp, status, needle in (
        (sonnet, 403, "tier 'contractor' may use only models claude-haiku-*"),
        (tokens, 403, "max_tokens 8193 is above the ceiling of 8192 for tier 'contractor'"),
        (thinking, 403, "thinking budget 5000 is above the ceiling of 4096"),
        (tools, 403, "request declares 17 tools, above the ceiling of 16"),
        (size, 413, "bytes, above the ceiling of 2097152 bytes for tier 'contractor'"),
    ):
        got_status, err = denied_error(resp)
        assert got_status == status and needle in err["message"], err
    assert denied_error(size)[1]["type"] == "request_too_large"


def test_malformed_ceiling_fact_is_400_not_a_bypass(postgres_dsn: str, shipped: Path) -> None:
    _, k = create_key(postgres_dsn, "contractor-400", groups=["contractors"])
    resp, = run_checks(postgres_dsn, shipped, [http_check({"x-api-key": k}, body=body(max_tokens="99999999"))])
    status, err = denied_error(resp)
    assert status == 400 and err["type"] == "invalid_request_error" and "max_tokens" in err["message"]


def test_residency_region_in_metadata_and_header(postgres_dsn: str, shipped: Path) -> None:
    _, eu = create_key(postgres_dsn, "eu-key", tenant="acme-eu")
    _, free = create_key(postgres_dsn, "free-key")
    bound, own, other, unbound, unknown, none = run_checks(postgres_dsn, shipped, [
        http_check({"x-api-key": eu}, body=body()),
        http_check({"x-api-key": eu, H_REGION_HINT: "eu"}, body=body()),
        http_check({"x-api-key": eu, H_REGION_HINT: "us"}, body=body()),
        http_check({"x-api-key": free, H_REGION_HINT: "US"}, body=body()),
        http_check({"x-api-key": free, H_REGION_HINT: "moon"}, body=body()),
        http_check({"x-api-key": free, H_REGION: "eu"}, body=body()),  # a client's x-ccr-region is not a binding
    ], gateway_yaml=REGIONAL_GATEWAY_YAML)
    for resp, region in ((bound, "eu"), (own, "eu"), (unbound, "us")):
        assert resp.status.code == code_pb2.OK
        assert meta(resp)[AUTHZ_REGION] == region and ok_headers(resp)[H_REGION] == region
        assert meta(resp)[AUTHZ_LABELS]["region"] == region
    assert H_REGION_HINT in own.ok_response.headers_to_remove  # the hint is the gateway's, not the provider's
    status, err = denied_error(other)
    assert status == 403 and "bound to region 'eu' and may not use region 'us'" in err["message"]
    status, err = denied_error(unknown)
    assert status == 400 and "region 'moon'" in err["message"]
    assert none.status.code == code_pb2.OK and AUTHZ_REGION not in meta(none) and H_REGION not in ok_headers(none)
    assert H_REGION in none.ok_response.headers_to_remove


def test_pii_keeps_working_with_the_new_input(postgres_dsn: str, tmp_path: Path) -> None:
    data = shipped_data()
    data["pii"]["mode"] = "block"
    bundle = bundle_of(tmp_path, data)
    _, k = create_key(postgres_dsn, "pii-key")
    split = [{"type": "text", "text": "SSN 123-45-"}, {"type": "text", "text": "\u200b6789 ok"}]
    fullwidth = "card ４１１１ １１１１ １１１１ １１１１"
    blocked_split, blocked_fw, clean = run_checks(postgres_dsn, bundle, [
        http_check({"x-api-key": k}, body=body(messages=[{"role": "user", "content": split}])),
        http_check({"x-api-key": k}, body=body(messages=[{"role": "user", "content": fullwidth}])),
        http_check({"x-api-key": k}, body=body()),
    ])
    status, err = denied_error(blocked_split)
    assert status == 403 and err["message"].startswith("prompt contains a US SSN (messages[0].content[0])")
    status, err = denied_error(blocked_fw)
    assert status == 403 and "payment card number" in err["message"]
    assert clean.status.code == code_pb2.OK


def test_hostile_tool_names_and_lookalikes_are_not_allowed_tools(postgres_dsn: str, tmp_path: Path) -> None:
    data = shipped_data()
    data["tiers"]["contractor"]["tools"] = ["read_*", "grep"]
    bundle = bundle_of(tmp_path, data)
    _, k = create_key(postgres_dsn, "tools-key", groups=["contractors"])
    ok, zw, homoglyph = run_checks(postgres_dsn, bundle, [
        http_check({"x-api-key": k}, body=body(tools=[{"name": "read_file"}, {"name": "grep"}])),
        http_check({"x-api-key": k}, body=body(tools=[{"name": "gr\u200bep"}])),
        http_check({"x-api-key": k}, body=body(tools=[{"name": "gr\u0435p"}])),  # Cyrillic e
    ])
    assert ok.status.code == code_pb2.OK
    for resp in (zw, homoglyph):
        status, err = denied_error(resp)
        assert status == 403 and "is not allowed for tier 'contractor'" in err["message"]


@pytest.mark.parametrize("text", [False, True])
def test_hostile_bodies_are_decided(postgres_dsn: str, tmp_path: Path, text: bool) -> None:
    """Huge texts, many blocks, deep nesting: decided by the shipped set (with the PII scan on and,
    in the second run, the text in the input) without blowing up."""
    data = shipped_data(policy_input={"text": text})
    data["pii"]["mode"] = "block"
    shipped = bundle_of(tmp_path, data)
    _, k = create_key(postgres_dsn, "hostile-key")

    def nested(levels: int) -> bytes:  # tool input nested `levels` objects deep (json: orjson stops at 255)
        inner = '"x"'
        for _ in range(levels):
            inner = '{"k": ' + inner + "}"
        return ('{"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "go"},'
                '{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "t", "input": '
                + inner + "}]}]}").encode()

    bodies = [
        body(messages=[{"role": "user", "content": "\u200b" * (4 * 1024 * 1024)}]),
        body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 50_000}]),
        nested(500),
        nested(5000),  # deeper than any JSON parser here accepts: a clear 400, not a crash
    ]
    got = run_checks(postgres_dsn, shipped, [http_check({"x-api-key": k}, body=b) for b in bodies])
    assert [r.status.code for r in got[:3]] == [code_pb2.OK] * 3
    status, err = denied_error(got[3])
    assert status == 400 and err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]


# -- results from a team's policy ------------------------------------------------------------

TEAM_POLICY = """package t

import data.ccr.authz

# The shipped decision, plus what a team's rules add.
decision := {"allow": false, "status": 429, "reason": "slow down"} if {
	input.request.headers["x-test"] == "429"
} else := {"allow": true, "reason": "spoof", "headers": {"x-ccr-principal": "admin"}} if {
	input.request.headers["x-test"] == "spoof"
} else := {"allow": true, "reason": "header", "headers": {"x-team": input.principal.name}} if {
	input.request.headers["x-test"] == "header"
} else := {"allow": false, "reason": concat("", ["text: ", input.request.text[1].text])} if {
	some t in input.request.text
	contains(t.text, "forbidden")
} else := authz.decision
"""


def test_team_result_status_headers_and_spoof_refusal(postgres_dsn: str, tmp_path: Path) -> None:
    bundle = bundle_of(tmp_path, shipped_data(), TEAM_POLICY)
    _, k = create_key(postgres_dsn, "team-key")
    slow, spoof, header = run_checks(postgres_dsn, bundle, [
        http_check({"x-api-key": k, "x-test": "429"}, body=body()),
        http_check({"x-api-key": k, "x-test": "spoof"}, body=body()),
        http_check({"x-api-key": k, "x-test": "header"}, body=body()),
    ], entrypoint="t/decision")
    status, err = denied_error(slow)
    assert status == 429 and err["type"] == "rate_limit_error" and err["message"] == "slow down"
    # A policy may never set the gateway's identity headers: the request fails closed.
    status, err = denied_error(spoof)
    assert status == 503 and err["type"] == "api_error"
    assert header.status.code == code_pb2.OK and ok_headers(header)["x-team"] == "team-key"
    assert ok_headers(header)["x-ccr-principal"] == "team-key"


def test_text_reaches_the_policy_only_when_the_bundle_asks(postgres_dsn: str, tmp_path: Path) -> None:
    _, k = create_key(postgres_dsn, "text-key")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "forbidden word"}]}]
    off = bundle_of(tmp_path / "off", shipped_data(), TEAM_POLICY)
    on = bundle_of(tmp_path / "on", shipped_data(policy_input={"text": True}), TEAM_POLICY)
    no_text, = run_checks(postgres_dsn, off, [http_check({"x-api-key": k}, body=body(messages=msgs))], "t/decision")
    assert no_text.status.code == code_pb2.OK  # the policy never saw the text
    # Same principal and facts but the text: the cached allow must not answer for the second request.
    allowed, denied = run_checks(postgres_dsn, on, [
        http_check({"x-api-key": k}, body=body(messages=[{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "fine word....."}]}])),
        http_check({"x-api-key": k}, body=body(messages=msgs)),
    ], "t/decision")
    assert allowed.status.code == code_pb2.OK
    status, err = denied_error(denied)
    assert status == 403 and err["message"] == "text: forbidden word"


def test_decision_cache_covers_every_input_fact(shipped: Path) -> None:
    eng = PolicyEngine.load(shipped, ENTRYPOINT)
    try:
        p = Principal(PrincipalKind.KEY, "key_c", "c", ("contractors",), key_id="key_c")
        ep = match("POST", "/v1/messages")

        def decide(**kw: Any):
            return eng.decide(p, "POST", "/v1/messages", "claude-haiku-4-5", ep, None, RequestFacts(**kw))

        small = decide(size=100, body=body_facts({"max_tokens": 100}))
        assert small.allow and decide(size=100, body=body_facts({"max_tokens": 100})) is small  # a hit
        assert not decide(size=100, body=body_facts({"max_tokens": 9000})).allow
        assert decide(size=3_000_000, body=body_facts({"max_tokens": 100})).status == 413
        assert not decide(size=100, region_hint="moon").allow
        assert decide(size=100, region_hint="eu").region == "eu"
        assert not decide(size=100, body=body_facts({"tools": [{"name": f"t{i}"} for i in range(17)]})).allow
        text = (TextPiece("messages[0].content", "message", "x" * 100_000),)
        assert decide(size=100, text=text).allow
        # Keyed by the input's sha256: an entry never holds the input itself (text, headers).
        assert all(isinstance(k, str) and len(k) == 64 for k in eng._cache)  # noqa: SLF001
        assert small.input_sha256 in eng._cache  # noqa: SLF001
    finally:
        eng.close()


def test_source_address_and_peer_reach_the_input(postgres_dsn: str, tmp_path: Path) -> None:
    policy = """package t
decision := {"allow": true, "reason": "ok", "headers": {"x-src": input.source.address}} if {
	input.version == 1
}
"""
    bundle = bundle_of(tmp_path, shipped_data(), policy)
    _, k = create_key(postgres_dsn, "src-key")
    req = http_check({"x-api-key": k}, body=body())
    req.attributes.source.CopyFrom(ac.AttributeContext.Peer(address=address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="192.0.2.7", port_value=51234))))
    resp, = run_checks(postgres_dsn, bundle, [req], "t/decision")
    assert ok_headers(resp)["x-src"] == "192.0.2.7"


def test_decision_log_input_has_no_credentials_and_no_text(shipped: Path, tmp_path: Path) -> None:
    """The logged input (include_input) is input v1 without the request's text; its digest is the
    one the engine cached the decision under (text included)."""
    from extauth.decisions import DecisionLog

    eng = PolicyEngine.load(shipped, ENTRYPOINT)
    try:
        facts = RequestFacts(headers=policy_headers({"x-api-key": "ccr_secret_value", "user-agent": "sdk"}),
                             size=10, text=(TextPiece("messages[0].content", "message", "very private words"),))
        d = eng.decide(ALICE, "POST", "/v1/messages", "claude-haiku-4-5", match("POST", "/v1/messages"), None, facts)
        out = tmp_path / "decisions.jsonl"
        dl = DecisionLog(None, file=out, include_input=True)
        dl.record("dec_1", "rid-1", "full", ALICE, "POST", "/v1/messages", "claude-haiku-4-5",
                  match("POST", "/v1/messages"), eng.bundle, True, 200, d.reason, 5000, d, None, facts)
        assert asyncio.run(dl.flush()) == 1
    finally:
        eng.close()
    text = out.read_text()
    assert "ccr_secret_value" not in text and "very private words" not in text
    line = json.loads(text)
    assert line["input"]["version"] == 1 and line["input"]["request"]["headers"] == {"user-agent": "sdk"}
    assert "text" not in line["input"]["request"]
    assert d.input_sha256 is not None and len(d.input_sha256) == 64


def test_oidc_claims_the_config_selects_bind_region_and_tier(shipped: Path) -> None:
    """`identity.oidc[].extra_claims` reach input.principal.claims: a `region` claim binds the user
    to a region, a `tier` claim names the tier."""
    from extauth.identity import Identity
    from extauth.oidc import OidcVerifier
    from tests.idp import running_idp

    now = [1_800_000_000.0]
    with running_idp(clock=lambda: now[0]) as idp:
        config = parse_config({**__import__("yaml").safe_load(REGIONAL_GATEWAY_YAML), "identity": {"oidc": [
            {"issuer": idp.issuer, "audiences": ["ccr"], "extra_claims": ["region", "tier"],
             "group_map": {"eng": ["default"]}}]}})
        idp.add_user("eve", email="eve@example.com", groups=("eng",))
        idp.add_user("cole", email="cole@example.com", groups=("eng",))

        async def scenario() -> list[pb.CheckResponse]:
            verifier = OidcVerifier(config.identity.oidc, clock=lambda: now[0])
            keys = KeyStore("postgresql://unused@127.0.0.1:1/unused")  # never consulted for IdP tokens
            auth = Authorizer(config, Identity(keys, [verifier]), PolicyEngine.load(shipped, ENTRYPOINT))

            def check(token: str, model: str = "claude-sonnet-4-5", **h: str) -> pb.CheckRequest:
                return http_check({"authorization": f"Bearer {token}", **h}, body=body(model))
            try:
                eu = idp.mint("eve", claims={"region": "eu"})
                contractor = idp.mint("cole", claims={"tier": "contractor"})
                return [await auth.check(c) for c in (
                    check(eu), check(eu, **{H_REGION_HINT: "us"}), check(contractor),
                    check(contractor, "claude-haiku-4-5"))]
            finally:
                await verifier.close()
                auth.policy.close()

        bound, foreign, tier_sonnet, tier_haiku = asyncio.run(scenario())
    assert bound.status.code == code_pb2.OK and meta(bound)[AUTHZ_REGION] == "eu"
    status, err = denied_error(foreign)
    assert status == 403 and "'eve@example.com' is bound to region 'eu' and may not use region 'us'" in err["message"]
    status, err = denied_error(tier_sonnet)
    assert status == 403 and "tier 'contractor' may use only models" in err["message"]
    assert tier_haiku.status.code == code_pb2.OK and meta(tier_haiku)[AUTHZ_LABELS]["tier"] == "contractor"


def test_every_denial_status_is_one_envoy_accepts() -> None:
    from envoy.type.v3 import http_status_pb2

    from extauth.policy import DENY_STATUS

    defined = {v.number for v in http_status_pb2.StatusCode.DESCRIPTOR.values}
    assert set(DENY_STATUS) <= defined


def test_openai_chat_bodies_are_decided_as_the_messages_request_they_become() -> None:
    """Ceilings, tool rules and PII blocking see a Chat Completions body in Anthropic form: its
    function tools, max_completion_tokens, tool-call arguments and tool results included."""
    from extauth.pii import scan
    from extauth.server import Deny, _as_anthropic

    doc = {
        "model": "claude-sonnet-4-5", "max_completion_tokens": 50,
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "find my account"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "lookup", "arguments": '{"ssn": "123-45-6789"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "card on file 4111 1111 1111 1111"},
        ],
    }
    facts = body_facts(_as_anthropic(doc))
    assert facts.tools == ("lookup",) and facts.max_tokens == 50
    kinds = {f.kind: f.location for f in scan(_as_anthropic(doc))}
    assert set(kinds) == {"ssn", "card"}
    assert "input" in kinds["ssn"] and "content" in kinds["card"]
    with pytest.raises(Deny) as e:
        _as_anthropic({**doc, "n": 3})
    assert e.value.status == 400 and "n:" in e.value.message

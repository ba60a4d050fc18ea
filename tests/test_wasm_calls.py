"""Direct calls into the policy's WASM exports (extauth/wasm_calls.py): installed for the pinned
library versions, the same decisions as opa-py-wasm's own calls, and an evaluation error still
fails the decision (and the instance it poisoned is replaced by one that also calls directly)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extauth import wasm_calls
from extauth.endpoints import match
from extauth.pii import Finding
from extauth.policy import PolicyEngine, PolicyError
from extauth.policy_input import RequestFacts, body_facts
from extauth.principal import Principal, PrincipalKind
from tests.test_policy_input import bundle_of, shipped_data

CONFLICT = """package t

import data.ccr.authz

# Two values for one complete rule when the model is "boom": a runtime error in the WASM.
decision := {"allow": true, "reason": "a"} if input.request.model == "boom"

decision := {"allow": true, "reason": "b"} if input.request.model == "boom"

decision := authz.decision if input.request.model != "boom"
"""


def _calls_directly(eng: PolicyEngine) -> bool:
    with eng._policy._pool.borrow() as loan:  # noqa: SLF001
        return loan.instance.abi._call.__qualname__.startswith("speed_up.")  # noqa: SLF001


def _inputs() -> list[tuple]:
    ep = match("POST", "/v1/messages")
    key = Principal(PrincipalKind.KEY, "key_1", "ci-bot", ("default",), tenant="acme-eu", key_id="key_1")
    contractor = Principal(PrincipalKind.KEY, "key_2", "temp", ("contractors",), key_id="key_2")
    out = []
    for p, hint in ((key, None), (key, "us"), (contractor, None)):
        for model, max_tokens, pii in (("claude-sonnet-4-5", 16, None), ("claude-haiku-4-5", 9000, None),
                                       ("claude-haiku-4-5", 16, None),
                                       ("claude-haiku-4-5", 16, (Finding("ssn", "messages[0].content"),))):
            body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
            facts = RequestFacts(host="gw", size=100, body=body_facts(body), region_hint=hint)
            out.append((p, "POST", "/v1/messages", model, ep, pii, facts))
    return out


def test_direct_calls_decide_as_opa_py_wasm_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = shipped_data()
    data["pii"]["mode"] = "block"
    bundle = bundle_of(tmp_path, data)
    fast = PolicyEngine.load(bundle, "ccr/authz/decision")
    with monkeypatch.context() as m:
        m.setattr(wasm_calls, "install", lambda policy: False)
        plain = PolicyEngine.load(bundle, "ccr/authz/decision")
    try:
        assert fast.fast_calls and _calls_directly(fast)
        assert not plain.fast_calls and not _calls_directly(plain)
        got = [(fast.decide(*i), plain.decide(*i)) for i in _inputs()]
        assert all(a == b and a.input_sha256 == b.input_sha256 for a, b in got)
        assert {d.allow for d, _ in got} == {True, False}  # both outcomes compared
        assert any("bound to region 'eu' and may not use region 'us'" in d.reason for d, _ in got)
        assert any(d.reason.startswith("prompt contains a US SSN") for d, _ in got)
    finally:
        fast.close()
        plain.close()


def test_an_evaluation_error_still_fails_and_the_next_instance_calls_directly(tmp_path: Path) -> None:
    eng = PolicyEngine.load(bundle_of(tmp_path, shipped_data(), CONFLICT), "t/decision")
    p = Principal(PrincipalKind.KEY, "key_1", "ci-bot", ("default",), key_id="key_1")
    ep = match("POST", "/v1/messages")
    try:
        assert eng.fast_calls
        for _ in range(3):  # more than the pool's instances: each poisoned one is replaced
            with pytest.raises(PolicyError, match="policy evaluation failed"):
                eng.decide(p, "POST", "/v1/messages", "boom", ep)
        assert eng._policy.instances_recreated >= 1  # noqa: SLF001
        assert eng.decide(p, "POST", "/v1/messages", "claude-sonnet-4-5", ep).allow
        assert _calls_directly(eng)
    finally:
        eng.close()

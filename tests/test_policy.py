"""The Rego policy: `opa test`, the WASM bundle build, and evaluation through opapywasm."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from extauth.bundle import BundleError, build_bundle, find_opa, read_bundle
from extauth.endpoints import match
from extauth.policy import PolicyEngine
from extauth.principal import Principal, PrincipalKind
from tests.harness import copy_policy_modules

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
ENTRYPOINT = "ccr/authz/decision"


def P(key_id: str, name: str, groups: tuple[str, ...]) -> Principal:  # noqa: N802
    return Principal(PrincipalKind.KEY, key_id, name, groups, key_id=key_id)


def test_opa_test_passes() -> None:
    proc = subprocess.run([find_opa(), "test", "-v", str(POLICIES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "PASS: " in proc.stdout


def test_opa_fmt_clean() -> None:
    proc = subprocess.run([find_opa(), "fmt", "-l", str(POLICIES)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    out = build_bundle(POLICIES, tmp_path_factory.mktemp("bundle") / "policy.tar.gz", ENTRYPOINT)
    eng = PolicyEngine.load(out, ENTRYPOINT)
    yield eng
    eng.close()


def test_bundle_contents(engine: PolicyEngine) -> None:
    b = read_bundle(engine.bundle.path)
    assert b.wasm[:4] == b"\0asm"
    assert b.data["model_access"]["default"] == ["claude-*"]
    assert len(b.digest) == 64
    # Everything the policy uses compiles to WASM: no per-call trips into Python.
    assert engine.host_builtins == {}


def test_bundle_decisions(engine: PolicyEngine) -> None:
    allow = engine.decide(P("key_a", "alice", ("default",)), "POST", "/v1/messages", "claude-sonnet-4-5")
    assert allow.allow
    haiku = engine.decide(P("key_b", "bob", ("haiku-only",)), "POST", "/v1/messages", "claude-haiku-4-5")
    assert haiku.allow
    deny = engine.decide(P("key_b", "bob", ("haiku-only",)), "POST", "/v1/messages", "claude-opus-4-1")
    assert not deny.allow
    assert "claude-opus-4-1" in deny.reason and "claude-haiku-*" in deny.reason and "bob" in deny.reason
    other = engine.decide(P("key_a", "alice", ("default",)), "POST", "/v1/messages", "gpt-4o")
    assert not other.allow
    nomodel = engine.decide(P("key_c", "carol", ()), "GET", "/v1/models", None)
    assert nomodel.allow


def test_decision_cache_is_per_fact_set(engine: PolicyEngine) -> None:
    a = engine.decide(P("key_x", "x", ("default",)), "POST", "/v1/messages", "claude-haiku-4-5")
    assert engine.decide(P("key_x", "x", ("default",)), "POST", "/v1/messages", "claude-haiku-4-5") is a
    b = engine.decide(P("key_x", "x", ("haiku-only",)), "POST", "/v1/messages", "claude-sonnet-4-5")
    assert not b.allow and a.allow


def test_decision_cache_keys_on_the_endpoint(tmp_path: Path) -> None:
    """Same principal, method, path and model, another endpoint or id: another decision."""
    src = tmp_path / "policies"
    src.mkdir()
    copy_policy_modules(src)
    (src / "data.json").write_text(json.dumps({"endpoint_access": {"*": ["messages.create", "batches.get"]},
                                               "model_access": {"default": ["claude-*"]}}))
    eng = PolicyEngine.load(build_bundle(src, tmp_path / "b.tar.gz", ENTRYPOINT), ENTRYPOINT)
    try:
        p = P("key_e", "eve", ("default",))
        path = "/v1/messages/batches"
        # A request inside a batch is decided as messages.create; the batch call itself is not granted.
        inner = eng.decide(p, "POST", path, "claude-haiku-4-5", match("POST", "/v1/messages"))
        outer = eng.decide(p, "POST", path, "claude-haiku-4-5")
        assert inner.allow and not outer.allow and "batches.create" in outer.reason
        assert eng.decide(p, "POST", path, "claude-haiku-4-5", match("POST", "/v1/messages")) is inner
        # Path parameters reach the policy: an unknown endpoint shape is denied, a known one allowed.
        assert eng.decide(p, "GET", "/v1/messages/batches/b1", None).allow
        assert not eng.decide(p, "GET", "/v1/messages/batches/b1/results", None).allow
        assert not eng.decide(p, "GET", "/v1/messages/batches/b%31", None).allow  # no endpoint
    finally:
        eng.close()


def test_build_failure_shows_opa_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "p.rego").write_text("package ccr.authz\n\ndecision := {\"allow\": true\n")
    with pytest.raises(BundleError) as ei:
        build_bundle(bad, tmp_path / "out.tar.gz", ENTRYPOINT)
    msg = str(ei.value)
    assert "opa build" in msg and "p.rego" in msg
    assert not (tmp_path / "out.tar.gz").exists()


def test_unknown_entrypoint_is_rejected(tmp_path: Path) -> None:
    out = build_bundle(POLICIES, tmp_path / "b.tar.gz", ENTRYPOINT)
    with pytest.raises(BundleError, match="entrypoint 'ccr/authz/allow' not in bundle"):
        PolicyEngine.load(out, "ccr/authz/allow")


def test_missing_opa_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert shutil.which("opa") is None
    with pytest.raises(BundleError, match="`opa` CLI was not found"):
        build_bundle(POLICIES, tmp_path / "b.tar.gz", ENTRYPOINT)


def test_not_a_bundle(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(BundleError, match="not a valid OPA bundle"):
        read_bundle(junk)

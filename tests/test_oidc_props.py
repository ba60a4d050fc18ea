"""Property-based: no token text, however built, crashes the OIDC path or gets in.

Random text, random base64url segments, forged JSON headers/payloads naming a trusted
issuer and a real kid, and single-character mutations of a valid token: each is refused
with a 401 (Deny), or, for a mutation, accepted only if it decodes to the very same bytes
(base64url's unused trailing bits) and so names the same principal.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.rpc import code_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccr.config import parse_config
from extauth.bundle import build_bundle
from extauth.deny import Deny
from extauth.identity import Identity
from extauth.keys import KeyStore
from extauth.oidc import OidcVerifier, unverified_parts
from extauth.policy import PolicyEngine
from extauth.server import Authorizer
from tests.idp import TestIdP, running_idp
from tests.test_extauth import http_check, msg_body

REPO = Path(__file__).resolve().parent.parent
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Env:
    def __init__(self, idp: TestIdP, policy: PolicyEngine) -> None:
        self.idp = idp
        self.loop = asyncio.new_event_loop()
        config = parse_config({"version": 1, "providers": [{"name": "anthropic"}],
                               "models": [{"match": "claude-*", "provider": "anthropic"}],
                               "identity": {"oidc": [{"issuer": idp.issuer, "audiences": ["ccr"],
                                                      "group_map": {"eng": ["default"]}}]}})
        self.verifier = OidcVerifier(config.identity.oidc)
        self.auth = Authorizer(config, Identity(KeyStore("postgresql://unused@127.0.0.1:1/x"), [self.verifier]),
                               policy)
        self.good = idp.mint("alice", exp_in=3600)
        self.principal = self.run(self.verifier.verify(self.good))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def refused(self, token: str) -> None:
        self.verifier.accepts(token)  # must not raise
        with pytest.raises(Deny) as e:
            self.run(self.verifier.verify(token))
        assert e.value.status == 401 and e.value.err_type == "authentication_error"

    def check_refused(self, header_value: str) -> None:
        resp = self.run(self.auth.check(http_check({"authorization": header_value}, body=msg_body())))
        assert resp.status.code == code_pb2.UNAUTHENTICATED and not resp.HasField("ok_response")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    bundle = build_bundle(REPO / "policies", tmp_path_factory.mktemp("props") / "b.tar.gz", "ccr/authz/decision")
    policy = PolicyEngine.load(bundle, "ccr/authz/decision")
    with running_idp() as idp:
        e = Env(idp, policy)
        try:
            yield e
        finally:
            e.run(e.verifier.close())
            e.loop.close()
            policy.close()


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


segment = st.one_of(st.text(alphabet=B64URL, max_size=80), st.binary(max_size=120).map(b64),
                    st.text(max_size=40))
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=12)


@PROPS
@given(st.text(max_size=300))
def test_random_text_never_crashes_or_allows(env: Env, text: str) -> None:
    if text.strip().startswith("ccr_"):
        return  # API keys go to the key store, not the OIDC verifier
    env.refused(text)
    if text.strip() and "\n" not in text and "\r" not in text:
        env.check_refused(f"Bearer {text}")


@PROPS
@given(st.lists(segment, min_size=1, max_size=5))
def test_random_segments_never_crash_or_allow(env: Env, parts: list[str]) -> None:
    env.refused(".".join(parts))


@PROPS
@given(alg=st.sampled_from(["RS256", "ES256", "EdDSA", "none", "HS256", "RS512", "", "PS256"]) | st.text(max_size=10),
       kid=st.none() | st.just("real") | st.text(max_size=12),
       extra_header=st.dictionaries(st.sampled_from(["crit", "jku", "x5u", "typ", "b64", "zip"]), json_value,
                                    max_size=3),
       claims=st.dictionaries(st.sampled_from(["sub", "aud", "exp", "nbf", "iat", "groups"]), json_value, max_size=6),
       sig=st.binary(max_size=300))
def test_forged_tokens_for_a_trusted_issuer_are_refused(env: Env, alg, kid, extra_header, claims, sig) -> None:
    header = {"alg": alg, **extra_header}
    if kid == "real":
        kid = env.idp.active_kid()
    if kid is not None:
        header["kid"] = kid
    payload = {"iss": env.idp.issuer, **claims}
    token = ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(sig)])
    env.refused(token)


@PROPS
@given(pos=st.integers(min_value=0), ch=st.sampled_from(list(B64URL + ".=+/ ~")))
def test_mutated_valid_token_never_names_someone_else(env: Env, pos: int, ch: str) -> None:
    good = env.good
    i = pos % len(good)
    mutated = good[:i] + ch + good[i + 1:]
    if mutated == good:
        return
    try:
        p = env.run(env.verifier.verify(mutated))
    except Deny as e:
        assert e.status == 401
        return
    # Accepted only when it decodes to exactly the same header, payload and signature bytes.
    assert p == env.principal
    canon = [base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)) for s in good.split(".")]
    assert [base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)) for s in mutated.split(".")] == canon
    assert unverified_parts(mutated) == unverified_parts(good)

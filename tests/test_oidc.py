"""OIDC bearer tokens through the extauth Check handler, against real test IdPs over HTTP.

Every hostile token is refused with a 401 Anthropic-shaped error and no ok_response (so
nothing is forwarded); the clock is injected into both the IdPs and the verifier.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.rpc import code_pb2

from ccr.config import ConfigError, parse_config
from extauth.bundle import build_bundle
from extauth.deny import Deny
from extauth.identity import Identity
from extauth.keys import KeyStore
from extauth.oidc import MAX_TOKEN_BYTES, REFETCH_MIN_INTERVAL_S, OidcVerifier
from extauth.policy import PolicyEngine
from extauth.server import Authorizer
from tests.idp import TestIdP, running_idp
from tests.test_extauth import http_check, msg_body, ok_headers

REPO = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: dict | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def segments(token: str) -> tuple[dict, dict, str]:
    h, p, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(h))), json.loads(base64.urlsafe_b64decode(pad(p))), s


def issuer_cfg(idp: TestIdP, **over) -> dict:
    return {"issuer": idp.issuer, "audiences": ["ccr"], "extra_claims": ["dept"],
            "group_map": {"eng": ["default"], "sales": ["haiku-only"]}, **over}


GATEWAY = {"version": 1, "providers": [{"name": "anthropic"}],
           "models": [{"match": "claude-*", "provider": "anthropic"}]}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(REPO / "policies", tmp_path_factory.mktemp("oidc") / "b.tar.gz", "ccr/authz/decision")


@dataclass
class Rig:
    clock: Clock
    a: TestIdP
    b: TestIdP
    verifier: OidcVerifier
    auth: Authorizer

    async def check(self, token: str, model: str = "claude-sonnet-4-5") -> pb.CheckResponse:
        return await self.auth.check(http_check({"authorization": f"Bearer {token}"}, body=msg_body(model)))

    async def refused(self, token: str) -> str:
        """Asserts a 401 authentication_error with nothing forwarded; returns the message."""
        resp = await self.check(token)
        assert resp.status.code == code_pb2.UNAUTHENTICATED
        assert not resp.HasField("ok_response"), "a refused token must not be forwarded"
        d = resp.denied_response
        body = json.loads(d.body)
        assert d.status.code == 401 and body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
        return str(body["error"]["message"])

    async def allowed(self, token: str, model: str = "claude-sonnet-4-5") -> dict[str, str]:
        resp = await self.check(token, model)
        assert resp.status.code == code_pb2.OK, resp.denied_response.body
        return ok_headers(resp)


@pytest.fixture
def rig_factory(bundle: Path) -> Iterator[Callable[[Callable[[Rig], Awaitable[None]]], None]]:
    with ExitStack() as stack:
        clock = Clock()
        a = stack.enter_context(running_idp(clock=clock))
        b = stack.enter_context(running_idp(clock=clock, audience="ccr-b", path="/realms/b"))
        config = parse_config({**GATEWAY, "identity": {"oidc": [
            issuer_cfg(a), issuer_cfg(b, audiences=["ccr-b"], group_map={}, name_claims=["preferred_username"])]}})
        policy = PolicyEngine.load(bundle, "ccr/authz/decision")
        stack.callback(policy.close)

        def run(scenario: Callable[[Rig], Awaitable[None]]) -> None:
            async def main() -> None:
                verifier = OidcVerifier(config.identity.oidc, clock=clock)
                # The key store is never consulted for bearer tokens that are not ccr_ keys.
                keys = KeyStore("postgresql://unused@127.0.0.1:1/unused")
                auth = Authorizer(config, Identity(keys, [verifier]), policy)
                try:
                    await scenario(Rig(clock, a, b, verifier, auth))
                finally:
                    await verifier.close()

            asyncio.run(main())

        yield run


# -- accepted ------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_valid_token_becomes_a_user_principal(rig_factory, alg: str) -> None:
    async def scenario(r: Rig) -> None:
        h = await r.allowed(r.a.mint("alice", alg=alg, claims={"dept": "r&d"}))
        assert h["x-ccr-principal-id"] == f"oidc:{r.a.issuer}#alice"
        assert h["x-ccr-principal"] == "alice@example.com" and "x-ccr-key-id" not in h
        resp = await r.check(r.a.mint("alice", alg=alg))
        meta = dict(resp.dynamic_metadata)
        assert meta["principal_kind"] == "user" and meta["tenant"] == "acme"
        assert list(meta["groups"]) == ["default"]  # "eng" mapped by group_map
        # What the route's rate limit descriptors read: a person's id as `user`, the groups as one string.
        assert meta["user_id"] == f"oidc:{r.a.issuer}#alice" and meta["group_list"] == "default"

    rig_factory(scenario)


def test_groups_decide_model_access(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        tok = r.a.mint("bob")  # sales -> haiku-only
        await r.allowed(tok, "claude-haiku-4-5")
        resp = await r.check(tok, "claude-opus-4-1")
        assert resp.denied_response.status.code == 403 and not resp.HasField("ok_response")
        assert "user 'bob@example.com'" in json.loads(resp.denied_response.body)["error"]["message"]
        # An IdP group that group_map does not name grants nothing.
        r.a.add_user("carol", email="carol@example.com", groups=("default",))
        assert (await r.check(r.a.mint("carol"))).denied_response.status.code == 403

    rig_factory(scenario)


def test_extra_claims_and_principal_fields(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        p = await r.verifier.verify(r.a.mint("alice", claims={"dept": "r&d", "ignored": "x"}))
        assert p.kind == "user" and p.issuer == r.a.issuer and p.tenant == "acme"
        assert p.claims == (("dept", "r&d"),) and p.policy_input()["claims"] == {"dept": "r&d"}

    rig_factory(scenario)


def test_second_trusted_issuer(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        h = await r.allowed(r.b.mint("bob", claims={"groups": ["default"]}))
        assert h["x-ccr-principal-id"] == f"oidc:{r.b.issuer}#bob"
        assert h["x-ccr-principal"] == "bob"  # issuer b names users by preferred_username
        # Each issuer's audience is its own: a token for a's audience from b is refused.
        assert "audience" in await r.refused(r.b.mint("bob", aud="ccr"))
        # b's key cannot sign for a: the kid is unknown to a.
        assert "unknown kid" in await r.refused(r.b.mint("bob", iss=r.a.issuer, aud="ccr"))

    rig_factory(scenario)


def test_cached_token_does_no_signature_work(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        tok = r.a.mint("alice", exp_in=600)
        await r.allowed(tok)
        checks, fetches = r.verifier.signature_checks, r.a.jwks_fetches
        for _ in range(50):
            await r.allowed(tok)
        assert r.verifier.signature_checks == checks and r.a.jwks_fetches == fetches
        # ...until it expires (plus the allowed skew): then it is judged again and refused.
        r.clock.now += 600 + 60
        assert "expired" in await r.refused(tok)

    rig_factory(scenario)


def test_skew_within_leeway_is_accepted(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        await r.allowed(r.a.mint("alice", exp_in=-30))  # expired 30 s ago; leeway is 60 s
        await r.allowed(r.a.mint("alice", nbf=r.clock.now + 30))

    rig_factory(scenario)


def test_rotation_new_kid_works_and_retired_key_goes(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        old_kid = r.a.active_kid()
        old_tok = r.a.mint("alice")
        await r.allowed(old_tok)
        r.clock.now += REFETCH_MIN_INTERVAL_S  # on-demand fetches are at most one per interval
        fetches = r.a.jwks_fetches
        new_kid = r.a.rotate()
        new_tok = r.a.mint("alice")
        assert segments(new_tok)[0]["kid"] == new_kid != old_kid
        await r.allowed(new_tok)
        assert r.a.jwks_fetches == fetches + 1  # the unknown kid refetched once
        r.a.retire(old_kid)
        await r.verifier.issuers[r.a.issuer].fetch()  # what the background refresh does
        assert "unknown kid" in await r.refused(r.a.mint("alice", kid=old_kid))

    rig_factory(scenario)


# -- refused -------------------------------------------------------------------


def test_alg_none_is_refused(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        h, p, _ = segments(r.a.mint("alice"))
        for alg in ("none", "None", "NONE"):
            unsigned = f"{b64({**h, 'alg': alg})}.{b64(p)}."
            await r.refused(unsigned)
            assert "not allowed" in await r.refused(unsigned + "AAAA")

    rig_factory(scenario)


def hs256(header: dict, claims: dict, secret: bytes) -> str:
    """What an attacker builds by hand (joserfc itself refuses to use a public key as an HMAC secret)."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def test_hs256_keyed_with_the_rsa_public_key_is_refused(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        kid = r.a.active_kid("RS256")
        claims = segments(r.a.mint("alice"))[1]
        pem = r.a.private_key(kid).as_pem(private=False)
        jwk_n = r.a.public_jwks()["keys"][0]["n"].encode()
        for secret in (pem, pem.strip(), jwk_n, json.dumps(r.a.public_jwks()["keys"][0]).encode()):
            assert "'HS256' is not allowed" in await r.refused(hs256({"alg": "HS256", "kid": kid}, claims, secret))
            await r.refused(hs256({"alg": "HS256"}, claims, secret))
            await r.refused(hs256({"alg": "HS512", "kid": kid}, claims, secret))

    rig_factory(scenario)


def test_alg_not_fitting_the_key_is_refused(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        h, p, s = r.a.mint("alice", alg="ES256").split(".")
        header = segments(r.a.mint("alice", alg="ES256"))[0]
        swapped = f"{b64({**header, 'alg': 'RS256'})}.{p}.{s}"
        await r.refused(swapped)

    rig_factory(scenario)


def test_expired_and_not_yet_valid(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        assert "expired" in await r.refused(r.a.mint("alice", exp_in=-61))
        early = r.a.mint("alice", nbf=r.clock.now + 300)
        assert "not valid yet" in await r.refused(early)
        assert "not valid yet" in await r.refused(r.a.mint("alice", iat=r.clock.now + 300))
        r.clock.now += 300
        await r.allowed(early)  # "not yet" is not "never"
        assert "exp" in await r.refused(r.a.mint("alice", drop=("exp",)))

    rig_factory(scenario)


def test_wrong_issuer_and_audience(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        msg = await r.refused(r.a.mint("alice", iss="https://evil.example"))
        assert "neither a gateway API key nor a token from a trusted identity provider" in msg
        assert "audience" in await r.refused(r.a.mint("alice", aud="someone-else"))
        assert "aud" in await r.refused(r.a.mint("alice", aud=None))
        await r.allowed(r.a.mint("alice", aud=["other", "ccr"]))  # one of several audiences is enough

    rig_factory(scenario)


def test_unknown_kid_refetches_once_then_rate_limited(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        await r.allowed(r.a.mint("alice"))
        r.clock.now += REFETCH_MIN_INTERVAL_S
        base = r.a.jwks_fetches
        hidden = r.a.add_key("RS256", publish=False, activate=False)
        assert "unknown kid" in await r.refused(r.a.mint("alice", kid=hidden))
        assert r.a.jwks_fetches == base + 1
        # Garbage kids in a burst: no further fetch while inside the interval.
        h, p, s = r.a.mint("alice").split(".")
        header = segments(r.a.mint("alice"))[0]
        await asyncio.gather(*(r.refused(f"{b64({**header, 'kid': f'junk-{i}'})}.{p}.{s}") for i in range(30)))
        assert r.a.jwks_fetches == base + 1
        r.clock.now += REFETCH_MIN_INTERVAL_S
        await r.refused(f"{b64({**header, 'kid': 'junk-late'})}.{p}.{s}")
        assert r.a.jwks_fetches == base + 2

    rig_factory(scenario)


def test_tampered_payload_is_refused(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        h, p, s = r.a.mint("bob").split(".")
        claims = segments(r.a.mint("bob"))[1]
        for change in ({"sub": "alice"}, {"groups": ["eng"]}, {"exp": claims["exp"] + 86400}):
            assert "signature" in await r.refused(f"{h}.{b64({**claims, **change})}.{s}")

    rig_factory(scenario)


def test_garbage_and_oversized(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        for junk in ("x", "a.b.c", "eyJ.eyJ.x", "....", "eyJhbGciOiJSUzI1NiJ9..sig", "Bearer"):
            await r.refused(junk)
        good = r.a.mint("alice")
        big = r.a.mint("alice", claims={"pad": "x" * MAX_TOKEN_BYTES})
        assert f"larger than {MAX_TOKEN_BYTES}" in await r.refused(big)
        await r.allowed(good)

    rig_factory(scenario)


def test_idp_outage_refuses_and_does_not_hammer(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        r.a.outage = True
        tok = r.a.mint("alice")
        for _ in range(10):
            assert "unknown kid" in await r.refused(tok)
        assert r.a.jwks_fetches == 0 and r.a.discovery_fetches == 1
        r.a.outage = False
        r.clock.now += REFETCH_MIN_INTERVAL_S
        await r.allowed(tok)

    rig_factory(scenario)


def test_discovery_naming_another_issuer_is_not_trusted(bundle: Path) -> None:
    clock = Clock()
    with running_idp(clock=clock) as idp:
        # Configured under a different spelling than the one the IdP's discovery document names.
        other = idp.issuer.replace("127.0.0.1", "localhost")
        config = parse_config({**GATEWAY, "identity": {"oidc": [
            {"issuer": other, "audiences": ["ccr"], "discovery_url": idp.url("/.well-known/openid-configuration")}]}})

        async def main() -> None:
            v = OidcVerifier(config.identity.oidc, clock=clock)
            try:
                with pytest.raises(Deny, match="unknown kid"):
                    await v.verify(idp.mint("alice", iss=other))
                assert idp.jwks_fetches == 0
            finally:
                await v.close()

        asyncio.run(main())


# -- config --------------------------------------------------------------------


@pytest.mark.parametrize("algs", [["none"], ["HS256"], ["RS256", "HS512"]])
def test_config_refuses_unsafe_algorithms(algs: list[str]) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        parse_config({**GATEWAY, "identity": {"oidc": [
            {"issuer": "https://idp.example", "audiences": ["ccr"], "algorithms": algs}]}})


def test_config_refuses_plain_http_and_duplicates() -> None:
    with pytest.raises(ConfigError, match="https"):
        parse_config({**GATEWAY, "identity": {"oidc": [{"issuer": "http://idp.example", "audiences": ["a"]}]}})
    with pytest.raises(ConfigError, match="unique"):
        parse_config({**GATEWAY, "identity": {"oidc": [{"issuer": "https://i.example", "audiences": ["a"]}] * 2}})
    with pytest.raises(ConfigError, match="audiences"):
        parse_config({**GATEWAY, "identity": {"oidc": [{"issuer": "https://i.example", "audiences": []}]}})
    cfg = parse_config({**GATEWAY, "identity": {"oidc": [{"issuer": "https://i.example", "audiences": ["a"]}]}})
    assert cfg.identity.oidc[0].algorithms == ["RS256", "ES256", "EdDSA"] and cfg.identity.oidc[0].leeway_s == 60


def test_payload_helpers_roundtrip() -> None:
    # The test's own helper must agree with the real encoding, or the tamper test proves nothing.
    assert segments(f"{b64({'a': 1})}.{b64(orjson.dumps({'b': 2}))}.x")[:2] == ({"a": 1}, {"b": 2})


def test_example_config_identity_block_parses() -> None:
    """The commented identity.oidc example in ccr.example.yaml is a valid config once uncommented."""
    import yaml

    text = (REPO / "ccr.example.yaml").read_text()
    head, _, block = text.partition("\n  # oidc:")
    lines = ["  oidc:"] + ["  " + ln[4:] for ln in block.splitlines()[1:] if ln.startswith("  # ") and
                                not ln[4:].lstrip().startswith("#")]
    cfg = parse_config(yaml.safe_load(head + "\n" + "\n".join(lines)))
    iss = cfg.identity.oidc[0]
    assert iss.issuer == "https://login.example.com/realms/acme" and iss.group_map == {"engineering": ["default"]}


def test_jwks_symmetric_and_private_keys_are_never_used(rig_factory) -> None:
    async def scenario(r: Rig) -> None:
        kid = r.a.active_kid()
        pem = r.a.private_key(kid).as_pem(private=False)
        r.a.extra_jwks = [
            {"kty": "oct", "kid": "hmac", "k": b64(pem)},
            {**r.a.private_key(kid).as_dict(private=True), "kid": "leaked"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "XYZ", "kid": "odd"},
            "not a key",
        ]
        await r.allowed(r.a.mint("alice"))  # the real keys still work beside the junk
        keys = r.verifier.issuers[r.a.issuer].keys
        assert kid in keys and not {"hmac", "leaked", "enc", "odd"} & set(keys)
        claims = segments(r.a.mint("alice"))[1]
        await r.refused(hs256({"alg": "HS256", "kid": "hmac"}, claims, pem))
        assert "unknown kid" in await r.refused(r.a.mint("alice", kid=kid, header={"kid": "leaked"}))

    rig_factory(scenario)

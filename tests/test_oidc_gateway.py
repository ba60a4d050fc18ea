"""OIDC through the whole gateway: real Envoy, extauth fetching JWKS from test IdPs over HTTP,
the emulator upstream, and the anthropic SDK sending `auth_token=` (Authorization: Bearer).

Refused tokens get the SDK's AuthenticationError (401, authentication_error) and the
emulator sees nothing; accepted ones reach it without the user's token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from ccr.supervisor import Gateway
from tests.harness import emulator_mark, gateway_config, log_row, running_gateway
from tests.idp import TestIdP, running_idp
from tests.test_e2e import envoy_request_id

MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def idps() -> Iterator[tuple[TestIdP, TestIdP]]:
    with running_idp() as a, running_idp(audience="ccr-b", path="/realms/b") as b:
        yield a, b


@pytest.fixture(scope="module")
def gw(idps: tuple[TestIdP, TestIdP], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    a, b = idps
    with running_gateway(tmp_path_factory.mktemp("oidc-gw"), lambda cfg: cfg.update(identity={"oidc": [
        {"issuer": a.issuer, "audiences": ["ccr"], "group_map": {"eng": ["default"], "sales": ["haiku-only"]}},
        {"issuer": b.issuer, "audiences": ["ccr-b"]},
    ]})) as g:
        yield g


def sdk(gw: Gateway, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=None, auth_token=token, max_retries=0)


def b64(raw: bytes | dict) -> str:
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def payload(token: str) -> dict:
    p = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))


def test_idp_token_reaches_the_model_without_leaking(gw: Gateway, idps) -> None:
    a, _ = idps
    token = a.mint("alice")
    mark = emulator_mark(gw)
    msg = sdk(gw, token).messages.create(model=MODEL, max_tokens=32, messages=HELLO)
    assert msg.type == "message" and msg.content[0].text
    [rec] = mark.arrived()
    upstream = rec["headers"]
    assert token not in json.dumps(upstream), "the user's IdP token must not reach the provider"
    assert not any(h.startswith("x-ccr-") for h in upstream)
    row = log_row(gw.runtime.postgres_dsn, envoy_request_id(gw))
    assert row["principal"] == "alice@example.com" and row["status"] == 200


def test_second_issuer_and_api_keys_side_by_side(gw: Gateway, idps) -> None:
    _, b = idps
    tok = b.mint("bob", claims={"groups": ["default"]})
    assert sdk(gw, tok).messages.create(model=MODEL, max_tokens=8, messages=HELLO).type == "message"
    key_client = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
    assert key_client.messages.create(model=MODEL, max_tokens=8, messages=HELLO).type == "message"


def test_policy_applies_to_users(gw: Gateway, idps) -> None:
    a, _ = idps
    mark = emulator_mark(gw)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        sdk(gw, a.mint("bob")).messages.create(model=MODEL, max_tokens=8, messages=HELLO)  # haiku-only
    assert "bob@example.com" in str(e.value)
    assert mark.arrived() == []


def test_key_rotation_at_the_idp(gw: Gateway, idps) -> None:
    a, _ = idps
    new_kid = a.rotate("ES256")
    token = a.mint("alice", alg="ES256")
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "==="))["kid"] == new_kid
    assert sdk(gw, token).messages.create(model=MODEL, max_tokens=8, messages=HELLO).type == "message"


def hostile_tokens(a: TestIdP) -> dict[str, str]:
    good = a.mint("bob")
    h, p, s = good.split(".")
    claims = payload(good)
    kid = a.active_kid()
    pem = a.private_key(kid).as_pem(private=False)
    hs_input = f"{b64({'alg': 'HS256', 'kid': kid, 'typ': 'JWT'})}.{b64({**claims, 'sub': 'alice'})}"
    return {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({**claims, 'sub': 'alice'})}.",
        "hs256 with the rsa public key": f"{hs_input}.{b64(hmac.new(pem, hs_input.encode(), hashlib.sha256).digest())}",
        "expired": a.mint("alice", exp_in=-3600),
        "not yet valid": a.mint("alice", nbf=a.clock() + 3600),
        "wrong issuer": a.mint("alice", iss="https://idp.evil.example"),
        "wrong audience": a.mint("alice", aud="someone-else"),
        "tampered payload": f"{h}.{b64({**claims, 'sub': 'alice', 'groups': ['eng']})}.{s}",
        "garbage": "eyJhbGciOiJSUzI1NiJ9.%%%.???",
        "oversized": a.mint("alice", claims={"pad": "A" * 20_000}),
    }


@pytest.mark.parametrize("case", ["alg none", "hs256 with the rsa public key", "expired", "not yet valid",
                                  "wrong issuer", "wrong audience", "tampered payload", "garbage", "oversized"])
def test_hostile_tokens_are_refused_and_nothing_is_forwarded(gw: Gateway, idps, case: str) -> None:
    a, _ = idps
    token = hostile_tokens(a)[case]
    mark = emulator_mark(gw)
    with pytest.raises(anthropic.AuthenticationError) as e:
        sdk(gw, token).messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert e.value.status_code == 401
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["message"].startswith("invalid bearer token")
    assert mark.arrived() == []


def test_config_dump_has_no_surprises(tmp_path: Path, idps) -> None:
    # The example config stays valid and OIDC-free unless configured.
    from ccr.config import load_config

    assert load_config(gateway_config(tmp_path)).identity.oidc == []

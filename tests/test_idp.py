"""The test IdP (tests/idp.py) behaves like a standards-compliant OpenID provider."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sys
import urllib.parse
from pathlib import Path

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from ccr.procs import spawn, wait_ready_file
from tests.idp import DEVICE_GRANT, TestIdP, running_idp

REPO = Path(__file__).resolve().parent.parent
ALGS = ["RS256", "ES256", "EdDSA"]


def verify(idp: TestIdP, token: str) -> dict:
    jwks = httpx.get(idp.url("/jwks")).json()
    return jwt.decode(token, KeySet.import_key_set(jwks), algorithms=ALGS).claims


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def test_discovery_and_jwks(idp: TestIdP) -> None:
    doc = httpx.get(idp.url("/.well-known/openid-configuration")).json()
    assert doc["issuer"] == idp.issuer and doc["jwks_uri"] == idp.url("/jwks")
    assert doc["code_challenge_methods_supported"] == ["S256"]
    keys = httpx.get(doc["jwks_uri"]).json()["keys"]
    assert {k["kty"] for k in keys} == {"RSA", "EC", "OKP"}
    assert all("d" not in k and "p" not in k for k in keys), "private parts must never be published"
    assert idp.discovery_fetches == 1 and idp.jwks_fetches == 1


@pytest.mark.parametrize("alg", ALGS)
def test_minted_tokens_verify_with_published_keys(idp: TestIdP, alg: str) -> None:
    claims = verify(idp, idp.mint("alice", alg=alg, claims={"dept": "r&d"}))
    assert claims["iss"] == idp.issuer and claims["aud"] == "ccr" and claims["sub"] == "alice"
    assert claims["email"] == "alice@example.com" and claims["groups"] == ["eng"] and claims["dept"] == "r&d"


def test_mint_with_chosen_times_and_dropped_claims() -> None:
    now = [1_000_000.0]
    with running_idp(clock=lambda: now[0]) as idp:
        claims = verify(idp, idp.mint("bob", exp_in=10, nbf=now[0] + 5, drop=("jti",), aud=["a", "b"]))
    assert claims["iat"] == 1_000_000 and claims["exp"] == 1_000_010 and claims["nbf"] == 1_000_005
    assert "jti" not in claims and claims["aud"] == ["a", "b"]


def test_rotation_and_retirement(idp: TestIdP) -> None:
    old = idp.active_kid("RS256")
    new = idp.rotate("RS256")
    tok = idp.mint()
    assert jwt.decode(tok, KeySet.import_key_set(idp.public_jwks()), algorithms=ALGS).header["kid"] == new
    idp.retire(old)
    kids = [k["kid"] for k in httpx.get(idp.url("/jwks")).json()["keys"]]
    assert new in kids and old not in kids


def test_authorization_code_with_pkce(idp: TestIdP) -> None:
    verifier, challenge = pkce()
    redirect = "http://127.0.0.1:9/callback"
    r = httpx.get(idp.url("/authorize"), params={
        "response_type": "code", "client_id": "ccr", "redirect_uri": redirect, "state": "s1", "nonce": "n1",
        "scope": "openid email", "code_challenge": challenge, "code_challenge_method": "S256"})
    assert r.status_code == 302
    loc = urllib.parse.urlsplit(r.headers["location"])
    q = dict(urllib.parse.parse_qsl(loc.query))
    assert loc.path == "/callback" and q["state"] == "s1"
    form = {"grant_type": "authorization_code", "code": q["code"], "redirect_uri": redirect, "client_id": "ccr"}
    bad = httpx.post(idp.url("/token"), data={**form, "code_verifier": "wrong" * 10})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    # the code was spent by the failed attempt: a right verifier now fails too
    again = httpx.post(idp.url("/token"), data={**form, "code_verifier": verifier})
    assert again.json()["error"] == "invalid_grant"

    r = httpx.get(idp.url("/authorize"), params={
        "response_type": "code", "client_id": "ccr", "redirect_uri": redirect, "nonce": "n2",
        "code_challenge": challenge, "code_challenge_method": "S256"})
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r.headers["location"]).query))["code"]
    tokens = httpx.post(idp.url("/token"), data={**form, "code": code, "code_verifier": verifier}).json()
    assert tokens["token_type"] == "Bearer"
    assert verify(idp, tokens["access_token"])["aud"] == "ccr"
    id_claims = verify(idp, tokens["id_token"])
    assert id_claims["aud"] == "ccr" and id_claims["nonce"] == "n2"


def test_authorize_refuses_bad_clients_and_plain_pkce(idp: TestIdP) -> None:
    base = {"response_type": "code", "client_id": "ccr", "code_challenge": "x", "code_challenge_method": "S256"}
    assert httpx.get(idp.url("/authorize"), params={**base, "redirect_uri": "https://evil.example/cb"}
                     ).status_code == 400
    assert httpx.get(idp.url("/authorize"), params={**base, "client_id": "nope",
                                                    "redirect_uri": "http://127.0.0.1/cb"}).status_code == 400
    r = httpx.get(idp.url("/authorize"), params={**base, "redirect_uri": "http://127.0.0.1/cb",
                                                 "code_challenge_method": "plain"})
    assert r.status_code == 302 and "error=invalid_request" in r.headers["location"]


def test_confidential_client_needs_its_secret(idp: TestIdP) -> None:
    idp.add_client("gw", secret="s3cret", redirect_uris=["http://127.0.0.1:1/cb"])
    r = httpx.post(idp.url("/device_authorization"), data={"client_id": "gw"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = httpx.post(idp.url("/device_authorization"), data={"client_id": "gw"}, auth=("gw", "s3cret"))
    assert r.status_code == 200 and r.json()["user_code"]


def test_device_flow_pending_slow_down_approve_and_refresh() -> None:
    now = [5_000.0]
    with running_idp(clock=lambda: now[0]) as idp:
        d = httpx.post(idp.url("/device_authorization"), data={"client_id": "ccr", "scope": "openid"}).json()
        assert d["interval"] == 5 and d["user_code"] == idp.last_user_code
        poll = {"grant_type": DEVICE_GRANT, "device_code": d["device_code"], "client_id": "ccr"}
        assert httpx.post(idp.url("/token"), data=poll).json()["error"] == "authorization_pending"
        now[0] += 1
        assert httpx.post(idp.url("/token"), data=poll).json()["error"] == "slow_down"
        now[0] += 11
        assert httpx.post(idp.url("/token"), data=poll).json()["error"] == "authorization_pending"
        idp.approve_device(d["user_code"], "bob")
        tokens = httpx.post(idp.url("/token"), data=poll).json()
        assert verify(idp, tokens["access_token"])["sub"] == "bob"
        assert httpx.post(idp.url("/token"), data=poll).json()["error"] == "invalid_grant"  # used once

        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": "ccr"}
        again = httpx.post(idp.url("/token"), data=refresh).json()
        assert verify(idp, again["access_token"])["sub"] == "bob"
        assert httpx.post(idp.url("/token"), data=refresh).json()["error"] == "invalid_grant"  # rotated
        idp.disable_user("bob")
        r = httpx.post(idp.url("/token"), data={**refresh, "refresh_token": again["refresh_token"]})
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_device_code_expires_and_can_be_denied() -> None:
    now = [0.0]
    with running_idp(clock=lambda: now[0]) as idp:
        codes = [httpx.post(idp.url("/device_authorization"), data={"client_id": "ccr"}).json() for _ in range(2)]
        idp.deny_device(codes[0]["user_code"])
        poll = {"grant_type": DEVICE_GRANT, "client_id": "ccr"}
        assert httpx.post(idp.url("/token"), data={**poll, "device_code": codes[0]["device_code"]}
                          ).json()["error"] == "access_denied"
        now[0] += 601
        assert httpx.post(idp.url("/token"), data={**poll, "device_code": codes[1]["device_code"]}
                          ).json()["error"] == "expired_token"


def test_userinfo_and_outage(idp: TestIdP) -> None:
    r = httpx.get(idp.url("/userinfo"), headers={"Authorization": f"Bearer {idp.mint('alice')}"})
    assert r.json()["email"] == "alice@example.com"
    idp.outage = True
    assert httpx.get(idp.url("/jwks")).status_code == 503


def test_subprocess_mode_with_issuer_path(tmp_path) -> None:
    ready = tmp_path / "idp.ready"
    child = spawn("test-idp", [sys.executable, "-m", "tests.idp", "--port", "0", "--ready-file", str(ready),
                               "--path", "/realms/t"], tmp_path / "logs", cwd=REPO)
    try:
        info = wait_ready_file(child, ready)
        issuer = str(info["issuer"])
        assert issuer.endswith("/realms/t")
        assert httpx.get(issuer + "/.well-known/openid-configuration").json()["issuer"] == issuer
        kid = httpx.post(issuer + "/_test/keys", json={"alg": "ES256"}).json()["kid"]
        tok = httpx.post(issuer + "/_test/mint", json={"sub": "bob", "alg": "ES256"}).json()["token"]
        jwks = httpx.get(issuer + "/jwks").json()
        t = jwt.decode(tok, KeySet.import_key_set(jwks), algorithms=ALGS)
        assert t.header["kid"] == kid and t.claims["iss"] == issuer
        assert json.loads(httpx.get(issuer + "/_test/stats").text)["jwks_fetches"] == 1
    finally:
        assert child.stop() == 0

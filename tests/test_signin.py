"""Sign-in without long-lived secrets: the gateway as an OIDC relying party (tests/idp.py as a
real HTTP IdP), its session tokens through the real gateway (Envoy, extauth, policy) with the
anthropic SDK, and `ccr login` as a user runs it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anthropic
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, OKPKey

from ccr.contract import SIGNIN_PREFIX
from ccr.supervisor import Gateway
from signin import tokens
from signin.keys import load_signing_key
from tests.harness import emulator_mark, running_gateway
from tests.idp import TestIdP, running_idp

CCR = [sys.executable, "-m", "ccr.cli"]
REPO = Path(__file__).resolve().parent.parent
# Run this checkout's ccr, whatever the current directory (the venv may point at another one).
CHECKOUT_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SONNET, HAIKU = "claude-sonnet-4-6", "claude-haiku-4-5"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIdP]:
    with running_idp() as p:
        p.device_interval = 1  # the CLI waits this long between polls
        p.add_user("dana", email="dana@example.com", groups=("default",), tenant="acme")
        p.add_user("erin", email="erin@example.com", groups=("haiku-only",), tenant="acme")
        p.add_user("frank", email="frank@example.com", groups=("default",))
        p.add_user("gina", email="gina@example.com", groups=("default",))
        p.login_as("dana")
        yield p


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, idp: TestIdP) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("signin"), lambda cfg: cfg.update(identity={
            "oidc": [{"issuer": idp.issuer, "audiences": ["ccr"]}],
            "signin": {"issuer": idp.issuer, "client_id": "ccr"}}), local_key=False) as g:
        yield g


def auth(gw: Gateway, path: str) -> str:
    return gw.url + SIGNIN_PREFIX + path


def sdk(gw: Gateway, token: str) -> anthropic.Anthropic:
    # auth_token: sent as `Authorization: Bearer`, as Claude Code does with ANTHROPIC_AUTH_TOKEN.
    return anthropic.Anthropic(base_url=gw.url, auth_token=token, api_key=None, max_retries=0)


def device_sign_in(gw: Gateway, idp: TestIdP, sub: str) -> dict[str, Any]:
    start = httpx.post(auth(gw, "device"))
    assert start.status_code == 200, start.text
    s = start.json()
    pending = httpx.post(auth(gw, "token"), data={"grant_type": DEVICE_GRANT, "device_code": s["device_code"]})
    assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending"
    idp.approve_device(s["user_code"], sub=sub)
    r = httpx.post(auth(gw, "token"), data={"grant_type": DEVICE_GRANT, "device_code": s["device_code"]})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return r.json()  # type: ignore[no-any-return]


def refresh(gw: Gateway, refresh_token: str) -> httpx.Response:
    return httpx.post(auth(gw, "token"), data={"grant_type": "refresh_token", "refresh_token": refresh_token})


def assert_refused_within_a_second(gw: Gateway, token: str, what: str) -> None:
    deadline = time.monotonic() + 1.0
    while True:
        try:
            sdk(gw, token).messages.create(model=SONNET, max_tokens=8, messages=HELLO)
        except anthropic.AuthenticationError as e:
            assert "session has ended" in e.message, e.message
            return
        assert time.monotonic() < deadline, f"{what}: session token still accepted after 1 s"


# -- device flow ------------------------------------------------------------------------


def test_ccr_login_device_flow_then_claude_code_style_call(gw: Gateway, idp: TestIdP, tmp_path: Path) -> None:
    session_file = tmp_path / "cfg" / "session.json"
    proc = subprocess.Popen([*CCR, "login", "--gateway", gw.url, "--session-file", str(session_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CHECKOUT_ENV)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline() + proc.stdout.readline()
        m = re.search(r"confirm the code: (\S+)", first)
        assert m, first
        assert idp.url("/device?user_code=") in first  # the IdP's verification page, as the IdP named it
        idp.approve_device(m.group(1), sub="dana")
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "ANTHROPIC_AUTH_TOKEN" in out and "apiKeyHelper" in out and f"ANTHROPIC_BASE_URL={gw.url}" in out
    assert f"--session-file {session_file}" in out
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    doc = json.loads(session_file.read_text())
    assert doc["gateway"] == gw.url and doc["refresh_token"].startswith("ccrr_")
    assert "dana" in out

    # What apiKeyHelper runs: the token only, on one line.
    printed = subprocess.run([*CCR, "login", "--print-token", "--session-file", str(session_file)],
                             capture_output=True, text=True, timeout=60, env=CHECKOUT_ENV)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == doc["access_token"] + "\n"
    msg = sdk(gw, printed.stdout.strip()).messages.create(model=SONNET, max_tokens=8, messages=HELLO)
    assert msg.content[0].type == "text"
    # Claude Code sends an apiKeyHelper's output as both x-api-key and Authorization: Bearer.
    r = httpx.post(f"{gw.url}/v1/messages", json={"model": SONNET, "max_tokens": 8, "messages": HELLO},
                   headers={"x-api-key": doc["access_token"], "authorization": f"Bearer {doc['access_token']}",
                            "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text

    # Close to expiry (as the CLI's clock sees it), --print-token refreshes through the gateway.
    doc["expires_at"] = int(time.time()) + 10
    session_file.write_text(json.dumps(doc))
    again = subprocess.run([*CCR, "login", "--print-token", "--session-file", str(session_file)],
                           capture_output=True, text=True, timeout=60, env=CHECKOUT_ENV)
    assert again.returncode == 0, again.stderr
    new = json.loads(session_file.read_text())
    assert again.stdout.strip() == new["access_token"] != doc["access_token"]
    assert new["refresh_token"] != doc["refresh_token"]
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    assert sdk(gw, new["access_token"]).messages.create(model=SONNET, max_tokens=8, messages=HELLO).content

    # ccr logout ends the session: its tokens stop working within a second.
    out = subprocess.run([*CCR, "logout", "--session-file", str(session_file)], capture_output=True, text=True,
                         timeout=60, env=CHECKOUT_ENV)
    assert out.returncode == 0, out.stderr
    assert not session_file.exists()
    assert_refused_within_a_second(gw, new["access_token"], "after ccr logout")


def test_device_flow_refusals_pass_through(gw: Gateway, idp: TestIdP) -> None:
    s = httpx.post(auth(gw, "device")).json()
    idp.deny_device(s["user_code"])
    r = httpx.post(auth(gw, "token"), data={"grant_type": DEVICE_GRANT, "device_code": s["device_code"]})
    assert r.status_code == 400 and r.json()["error"] == "access_denied"
    # A device_code the gateway did not issue (the IdP's raw code shape, or garbage) is refused.
    for bad in ("", "x" * 43, s["device_code"][:-2] + "AA"):
        r = httpx.post(auth(gw, "token"), data={"grant_type": DEVICE_GRANT, "device_code": bad})
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant", bad
    r = httpx.post(auth(gw, "token"), data={"grant_type": "password", "username": "a", "password": "b"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_groups_and_tenant_come_from_the_idp(gw: Gateway, idp: TestIdP) -> None:
    tok = device_sign_in(gw, idp, "erin")
    claims = jwt.decode(tok["access_token"], load_signing_key(gw.runtime.signin_key_dir), algorithms=["Ed25519"]).claims  # type: ignore[union-attr]
    assert claims["groups"] == ["haiku-only"] and claims["tenant"] == "acme" and claims["name"] == "erin@example.com"
    assert claims["sub"] == "erin" and claims["idp"] == idp.issuer and claims["exp"] - claims["iat"] == 3600
    c = sdk(gw, tok["access_token"])
    assert c.messages.create(model=HAIKU, max_tokens=8, messages=HELLO).content
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        c.messages.create(model=SONNET, max_tokens=8, messages=HELLO)
    assert "user 'erin@example.com'" in e.value.message


# -- browser flow ---------------------------------------------------------------------------


def _follow_to_callback(gw: Gateway, client: httpx.Client, login_url: str) -> httpx.URL:
    """login -> IdP authorize -> the gateway's callback URL (not followed)."""
    r = client.get(login_url)
    assert r.status_code == 302, r.text
    to_idp = httpx.URL(r.headers["location"])
    q = parse_qs(to_idp.query.decode())
    assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) == 43
    assert q["state"][0] and q["nonce"][0] and q["redirect_uri"] == [auth(gw, "callback")]
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and f"Path={SIGNIN_PREFIX}" in cookie
    # Nothing of the flow is readable in the cookie: state, nonce and verifier are sealed.
    assert q["state"][0] not in cookie and q["nonce"][0] not in cookie
    r = client.get(to_idp)
    assert r.status_code == 302, r.text
    back = httpx.URL(r.headers["location"])
    assert str(back).startswith(auth(gw, "callback"))
    return back


def test_browser_flow_with_pkce(gw: Gateway, idp: TestIdP) -> None:
    with httpx.Client() as client:
        back = _follow_to_callback(gw, client, auth(gw, "login"))
        page = client.get(back)
    assert page.status_code == 200, page.text
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    token = re.search(r"<pre id=token>([^<]+)</pre>", page.text)
    assert token, page.text
    assert "ANTHROPIC_AUTH_TOKEN" in page.text and "Signed in as dana@example.com" in page.text
    msg = sdk(gw, token.group(1)).messages.create(model=SONNET, max_tokens=8, messages=HELLO)
    assert msg.content[0].type == "text"
    # The callback can be used once: the flow cookie is gone, so a replay is refused.
    with httpx.Client() as client:
        assert client.get(back).status_code == 400


def test_ccr_login_browser(gw: Gateway, idp: TestIdP, tmp_path: Path) -> None:
    session_file = tmp_path / "s.json"
    proc = subprocess.Popen([*CCR, "login", "--browser", "--no-open", "--gateway", gw.url,
                             "--session-file", str(session_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=CHECKOUT_ENV)
    try:
        assert proc.stdout is not None
        lines = proc.stdout.readline() + proc.stdout.readline()
        url = lines.split()[-1]
        assert url.startswith(auth(gw, "login?")), lines
        with httpx.Client(follow_redirects=True) as client:
            # login -> IdP -> gateway callback -> the CLI's loopback listener
            final = client.get(url)
        assert final.status_code == 200 and "Signed in" in final.text
        assert final.url.host == "127.0.0.1" and final.url.path == "/callback"
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    doc = json.loads(session_file.read_text())
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    assert sdk(gw, doc["access_token"]).messages.create(model=SONNET, max_tokens=8, messages=HELLO).content
    assert refresh(gw, doc["refresh_token"]).status_code == 200


def test_callback_refuses_state_mismatch_and_crossed_flows(gw: Gateway, idp: TestIdP) -> None:
    with httpx.Client() as a, httpx.Client() as b:
        back_a = _follow_to_callback(gw, a, auth(gw, "login"))
        cookie_a = a.cookies["ccr_signin_flow"]
        back_b = _follow_to_callback(gw, b, auth(gw, "login"))
        # Login CSRF: the attacker's code and state in the victim's browser (b's cookie).
        r = b.get(back_a)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert "state does not match" in r.json()["error"]["message"]
        # The flow cookie is one-shot: after a failed callback, even the right state is refused.
        assert b.get(back_b).status_code == 400
        # A forged state on a's own flow is refused too.
        q = parse_qs(back_a.query.decode())
        for forged in (q["state"][0][:-1] + "x", "é" * 10, ""):
            r = a.get(back_a.copy_with(params={"code": q["code"][0], "state": forged}))
            assert r.status_code == 400 and "state does not match" in r.json()["error"]["message"], forged
            a.cookies.set("ccr_signin_flow", cookie_a, path=SIGNIN_PREFIX)  # each refusal spends the cookie
    # No flow cookie at all (another browser, or cookie stripped).
    r = httpx.get(back_a)
    assert r.status_code == 400 and "no sign-in is in progress" in r.json()["error"]["message"]
    # A tampered cookie does not open.
    with httpx.Client() as c:
        back = _follow_to_callback(gw, c, auth(gw, "login"))
        sealed = c.cookies["ccr_signin_flow"]
        c.cookies.set("ccr_signin_flow", sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB"),
                      path=SIGNIN_PREFIX)
        r = c.get(back)
        assert r.status_code == 400 and "no sign-in is in progress" in r.json()["error"]["message"]


def test_cli_handoff_code_needs_the_cli_verifier_once(gw: Gateway, idp: TestIdP) -> None:
    verifier = "v" * 43 + "-cli-verifier"
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    params = {"cli_redirect": "http://127.0.0.1:9/callback", "cli_challenge": challenge.decode(), "cli_state": "st"}
    login = auth(gw, "login") + "?" + str(httpx.QueryParams(params))
    with httpx.Client() as client:
        back = _follow_to_callback(gw, client, login)
        r = client.get(back)
    assert r.status_code == 302
    to_cli = urlsplit(r.headers["location"])
    assert f"{to_cli.scheme}://{to_cli.netloc}{to_cli.path}" == "http://127.0.0.1:9/callback"
    q = parse_qs(to_cli.query)
    assert q["state"] == ["st"]
    code = q["code"][0]

    def redeem(v: str) -> httpx.Response:
        return httpx.post(auth(gw, "token"), data={"grant_type": "authorization_code", "code": code,
                                                   "code_verifier": v})

    wrong = redeem("w" * 43)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    ok = redeem(verifier)
    assert ok.status_code == 200 and ok.json()["access_token"]
    again = redeem(verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # Only loopback redirects: a sign-in cannot be handed to another host.
    for bad in ("https://evil.example/cb", "http://10.0.0.1/cb", "http://127.0.0.1.evil.example/cb"):
        r = httpx.get(auth(gw, "login"), params={"cli_redirect": bad, "cli_challenge": challenge.decode()})
        assert r.status_code == 400 and "loopback" in r.json()["error"]["message"], bad


# -- session token lifecycle ------------------------------------------------------------------


def test_expired_session_token_refused(gw: Gateway, idp: TestIdP) -> None:
    tok = device_sign_in(gw, idp, "dana")
    claims = tokens.verify(tok["access_token"], _public(gw), "urn:ccr:gateway", time.time(), 0)
    key = load_signing_key(gw.runtime.signin_key_dir)  # type: ignore[union-attr]
    # Same key, same live session, but its hour is over (minted two hours ago).
    old, _ = tokens.mint(key, "urn:ccr:gateway", claims.sid, claims.sub, claims.idp, claims.name, claims.groups,
                         claims.tenant, 3600, time.time() - 7200)
    with pytest.raises(anthropic.AuthenticationError) as e:
        sdk(gw, old).messages.create(model=SONNET, max_tokens=8, messages=HELLO)
    assert "session token has expired" in e.value.message
    assert sdk(gw, tok["access_token"]).messages.create(model=SONNET, max_tokens=8, messages=HELLO).content


def test_revoked_session_refused_within_a_second(gw: Gateway, idp: TestIdP) -> None:
    tok = device_sign_in(gw, idp, "dana")
    c = sdk(gw, tok["access_token"])
    assert c.messages.create(model=SONNET, max_tokens=8, messages=HELLO).content
    r = httpx.post(auth(gw, "revoke"), headers={"Authorization": f"Bearer {tok['access_token']}"})
    assert r.status_code == 200 and r.json() == {"revoked": True}
    assert_refused_within_a_second(gw, tok["access_token"], "after revoke")
    assert refresh(gw, tok["refresh_token"]).json()["error"] == "invalid_grant"


def test_refresh_fails_once_the_idp_disables_the_user(gw: Gateway, idp: TestIdP) -> None:
    tok = device_sign_in(gw, idp, "frank")
    r = refresh(gw, tok["refresh_token"])
    assert r.status_code == 200, r.text
    tok = r.json()
    assert sdk(gw, tok["access_token"]).messages.create(model=SONNET, max_tokens=8, messages=HELLO).content
    idp.disable_user("frank")
    try:
        r = refresh(gw, tok["refresh_token"])
    finally:
        idp.enable_user("frank")
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert "no longer accepts" in r.json()["error_description"]
    # The session is over: its still-unexpired token stops working too, and it cannot be revived.
    assert_refused_within_a_second(gw, tok["access_token"], "after the IdP refused the refresh")
    assert refresh(gw, tok["refresh_token"]).status_code == 400


def test_replayed_refresh_token_ends_the_session(gw: Gateway, idp: TestIdP) -> None:
    first = device_sign_in(gw, idp, "gina")
    second = refresh(gw, first["refresh_token"]).json()
    # The replaced refresh token shows up again: someone copied it. The session ends for both.
    r = refresh(gw, first["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert refresh(gw, second["refresh_token"]).status_code == 400
    assert_refused_within_a_second(gw, second["access_token"], "after refresh token replay")


# -- forged tokens ------------------------------------------------------------------------------


def _public(gw: Gateway) -> Any:
    from signin.keys import load_public_keys

    return load_public_keys(gw.runtime.signin_key_dir)  # type: ignore[union-attr]


def _b64(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def live(gw: Gateway, idp: TestIdP) -> dict[str, Any]:
    tok = device_sign_in(gw, idp, "dana")
    claims = jwt.decode(tok["access_token"], _public(gw), algorithms=["Ed25519"]).claims
    return {"token": tok["access_token"], "claims": claims, "key": load_signing_key(gw.runtime.signin_key_dir)}  # type: ignore[union-attr]


def _forge(live: dict[str, Any], how: str) -> str:
    key: OKPKey = live["key"]
    claims = dict(live["claims"])
    head = {"alg": "Ed25519", "kid": key.kid, "typ": tokens.TYP}
    if how == "wrong-key":
        other = OKPKey.generate_key("Ed25519", parameters={"kid": key.kid})
        return jwt.encode(head, claims, other, algorithms=["Ed25519"])
    if how == "alg-none":
        return f"{_b64({**head, 'alg': 'none'})}.{_b64({**claims, 'groups': ['admin']})}."
    if how == "wrong-iss":
        return jwt.encode(head, {**claims, "iss": "https://evil.example"}, key, algorithms=["Ed25519"])
    if how == "wrong-aud":
        return jwt.encode(head, {**claims, "aud": "someone-else"}, key, algorithms=["Ed25519"])
    if how == "tampered-payload":
        h, _, sig = live["token"].split(".")
        return f"{h}.{_b64({**claims, 'groups': ['admin'], 'sub': 'root'})}.{sig}"
    if how == "hs256-with-public-key":
        secret = OctKey.import_key(key.as_dict(private=False)["x"].encode())
        return jwt.encode({**head, "alg": "HS256"}, claims, secret, algorithms=["HS256"])
    if how == "unknown-kid":
        return jwt.encode({**head, "kid": "nope"}, claims, key, algorithms=["Ed25519"])
    if how == "unknown-session":
        return jwt.encode(head, {**claims, "sid": "ses_doesnotexist"}, key, algorithms=["Ed25519"])
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["wrong-key", "alg-none", "wrong-iss", "wrong-aud", "tampered-payload",
                                 "hs256-with-public-key", "unknown-kid", "unknown-session"])
def test_forged_session_tokens_refused(gw: Gateway, live: dict[str, Any], how: str) -> None:
    forged = _forge(live, how)
    for headers in ({"authorization": f"Bearer {forged}"}, {"x-api-key": forged}):
        r = httpx.post(f"{gw.url}/v1/messages", headers={**headers, "anthropic-version": "2023-06-01"},
                       json={"model": SONNET, "max_tokens": 8, "messages": HELLO})
        assert r.status_code == 401, (how, r.text)
        body = r.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    # The genuine token still works: the refusal is about the forgery, not the session.
    assert sdk(gw, live["token"]).messages.create(model=SONNET, max_tokens=8, messages=HELLO).content


# -- the route ---------------------------------------------------------------------------------------


def test_signin_prefix_never_reaches_a_provider(gw: Gateway) -> None:
    mark = emulator_mark(gw)
    for method, path in (("POST", "v1/messages"), ("GET", "../v1/models"), ("POST", "token/../../v1/messages")):
        r = httpx.request(method, gw.url + SIGNIN_PREFIX + path,
                          headers={"x-ccr-cluster": "provider_anthropic", "x-api-key": "ccr_x"},
                          json={"model": SONNET, "max_tokens": 8, "messages": HELLO})
        assert r.status_code in (400, 401, 404, 405), (path, r.status_code, r.text)
    assert mark.arrived() == []
    r = httpx.get(auth(gw, "nothing-here"))
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(auth(gw, "token"))
    assert r.status_code == 405 and r.json()["type"] == "error"


def test_signin_service_started_by_ccr_up_with_private_keys(gw: Gateway) -> None:
    assert gw.runtime is not None and gw.runtime.signin
    d = Path(gw.runtime.signin_key_dir or "")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "session-signing.jwk").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "sealing.key").stat().st_mode) == 0o600
    jwks = httpx.get(auth(gw, "jwks")).json()
    assert jwks["keys"][0]["kid"] == load_signing_key(d).kid  # the current key first (rotation keeps one more)
    assert all("d" not in k for k in jwks["keys"])  # public halves only
    assert os.path.exists(d / "session-signing.pub.jwks")


def test_admin_revokes_every_session_of_a_user(gw: Gateway, idp: TestIdP) -> None:
    idp.add_user("hank", email="hank@example.com", groups=("default",))
    a, b = device_sign_in(gw, idp, "hank"), device_sign_in(gw, idp, "hank")
    other = device_sign_in(gw, idp, "dana")
    cfg = ["-c", str(gw.config_path)]
    listed = subprocess.run([*CCR, *cfg, "sessions", "list", "--user", "hank"], capture_output=True, text=True,
                            timeout=60, env=CHECKOUT_ENV)
    assert listed.returncode == 0, listed.stderr
    assert a["session_id"] in listed.stdout and b["session_id"] in listed.stdout
    assert other["session_id"] not in listed.stdout
    out = subprocess.run([*CCR, *cfg, "sessions", "revoke", "--user", "hank"], capture_output=True, text=True,
                         timeout=60, env=CHECKOUT_ENV)
    assert out.returncode == 0 and "revoked 2 session(s)" in out.stdout, out.stdout + out.stderr
    for tok in (a, b):
        assert_refused_within_a_second(gw, tok["access_token"], "after ccr sessions revoke --user")
        assert refresh(gw, tok["refresh_token"]).status_code == 400
    assert sdk(gw, other["access_token"]).messages.create(model=SONNET, max_tokens=8, messages=HELLO).content
    again = subprocess.run([*CCR, *cfg, "sessions", "revoke", "--user", "hank"], capture_output=True, text=True,
                           timeout=60, env=CHECKOUT_ENV)
    assert again.returncode == 1 and "no live session" in again.stderr


def test_signing_key_rotation_on_a_running_gateway(gw: Gateway, idp: TestIdP) -> None:
    before = device_sign_in(gw, idp, "dana")
    out = subprocess.run([*CCR, "-c", str(gw.config_path), "sessions", "rotate-key"], capture_output=True,
                         text=True, timeout=60, env=CHECKOUT_ENV)
    assert out.returncode == 0, out.stderr
    new_kid = re.search(r"signed with key (\S+);", out.stdout)
    assert new_kid, out.stdout
    # The sign-in service and extauth re-read the key files at most once a second.
    deadline = time.monotonic() + 3.0
    while True:
        after = device_sign_in(gw, idp, "dana")
        if tokens.header_of(after["access_token"])["kid"] == new_kid.group(1):  # type: ignore[index]
            break
        assert time.monotonic() < deadline, "the sign-in service still signs with the old key"
    while True:
        try:
            assert sdk(gw, after["access_token"]).messages.create(model=SONNET, max_tokens=8, messages=HELLO).content
            break
        except anthropic.AuthenticationError:
            assert time.monotonic() < deadline, "extauth did not pick up the new public key"
    # Tokens signed before the rotation stay valid until they expire.
    assert sdk(gw, before["access_token"]).messages.create(model=SONNET, max_tokens=8, messages=HELLO).content
    jwks = httpx.get(auth(gw, "jwks")).json()
    assert [k["kid"] for k in jwks["keys"]][0] == new_kid.group(1) and len(jwks["keys"]) == 2


def test_signin_serves_metrics(gw: Gateway) -> None:
    assert httpx.get(gw.url + SIGNIN_PREFIX + "jwks").status_code == 200
    text = httpx.get(f"http://{gw.runtime.metrics['signin']}/metrics").text  # type: ignore[union-attr]
    assert 'ccr_http_request_duration_seconds_count{code="2xx",route="/ccr/auth/jwks",service="signin"}' in text


def _signin_as(gw: Gateway, tmp: Path, part: str | None) -> httpx.Response:
    """GET jwks straight from the sign-in service over TLS, presenting `part`'s SVID (None: no certificate)."""
    import ssl

    assert gw.spire is not None and gw.runtime is not None
    ctx = ssl.create_default_context(cafile=str(gw.spire.bundle_pem))
    ctx.check_hostname = False  # an X.509-SVID names a SPIFFE ID, not a host
    if part is not None:
        chain, key = gw.spire.mint_x509(part)
        (tmp / "c.pem").write_bytes(chain)
        (tmp / "k.pem").write_bytes(key)
        ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return httpx.get(f"https://{gw.runtime.signin}{SIGNIN_PREFIX}jwks", verify=ctx, timeout=10)


def test_signin_service_answers_only_envoy_over_spiffe_mtls(gw: Gateway, tmp_path: Path) -> None:
    assert gw.runtime is not None
    with pytest.raises(httpx.HTTPError):  # plaintext: the service speaks only TLS
        httpx.get(f"http://{gw.runtime.signin}{SIGNIN_PREFIX}jwks", timeout=10)
    with pytest.raises(httpx.HTTPError):  # TLS without a client SVID
        _signin_as(gw, tmp_path, None)
    r = _signin_as(gw, tmp_path, "ratelimit")  # a valid SVID of the run, but not Envoy's
    assert r.status_code == 403
    log = (Path(gw.runtime.run_dir) / "logs" / "signin.log").read_text()
    assert "(peer identity spiffe://ccr.local/ratelimit;" in log
    assert _signin_as(gw, tmp_path, "envoy").json()["keys"]

"""Sign-in pieces on their own: key files, session tokens with an injected clock, the extauth
session verifier (cache, revocation by NOTIFY), config checks and the generated Envoy route."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ccr.config import ConfigError, load_config, parse_config
from ccr.contract import SIGNIN_PREFIX
from extauth.deny import Deny
from extauth.sessions import SessionStatus, SessionTokenVerifier
from router import resources
from signin import tokens
from signin.keys import (
    PUBLIC_KEYS,
    SIGNING_KEY,
    KeyFile,
    KeyFileError,
    Sealer,
    ensure_keys,
    load_public_keys,
    load_signing_key,
    rotate_signing_key,
)
from signin.store import SessionStore
from tests.test_router import _runtime, _validate

REPO = Path(__file__).resolve().parent.parent
ISS = "urn:ccr:gateway"


def test_keys_are_private_and_stable(tmp_path: Path) -> None:
    d = ensure_keys(tmp_path / "k")
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert oct((d / "session-signing.jwk").stat().st_mode & 0o777) == "0o600"
    assert oct((d / "sealing.key").stat().st_mode & 0o777) == "0o600"
    kid = load_signing_key(d).kid
    ensure_keys(d)  # a second start keeps the key
    assert load_signing_key(d).kid == kid
    assert [k.kid for k in load_public_keys(d).keys] == [kid]
    assert "\"d\"" not in (d / "session-signing.pub.jwks").read_text()
    os.chmod(d / "session-signing.jwk", 0o644)
    with pytest.raises(KeyFileError, match="readable by group or others"):
        load_signing_key(d)


def test_sealed_values_are_bound_to_their_purpose(tmp_path: Path) -> None:
    s = Sealer.load(ensure_keys(tmp_path))
    sealed = s.seal_json({"dc": "x"}, "device")
    assert s.open_json(sealed, "device") == {"dc": "x"}
    assert s.open_json(sealed, "browser-flow") is None
    assert s.open_json(sealed[:-2] + ("AA" if sealed[-2:] != "AA" else "BB"), "device") is None
    assert s.open_json("not base64 !", "device") is None
    other = Sealer.load(ensure_keys(tmp_path / "other"))
    assert other.open_json(sealed, "device") is None


class _Status:
    """SessionStatus stand-in for clock tests: every session is live."""

    async def live(self, sid: str) -> bool:
        return True


def test_session_token_expiry_follows_the_clock(tmp_path: Path) -> None:
    d = ensure_keys(tmp_path)
    now = [1_800_000_000.0]
    v = SessionTokenVerifier(load_public_keys(d), ISS, _Status(), leeway_s=30,  # type: ignore[arg-type]
                             clock=lambda: now[0])
    tok, exp = tokens.mint(load_signing_key(d), ISS, "ses_1", "u", "https://idp", "u@x", ("default",), "acme",
                           3600, now[0])
    assert v.accepts(tok) and not v.accepts("eyJhbGciOiJSUzI1NiJ9.e30.sig") and not v.accepts("ccr_abc")
    p = asyncio.run(v.verify(tok))
    assert (p.id, p.name, p.groups, p.tenant, p.issuer) == ("oidc:https://idp#u", "u@x", ("default",), "acme", ISS)
    # Cached: the second check does no signature work.
    asyncio.run(v.verify(tok))
    assert v.signature_checks == 1
    now[0] = exp + 29  # inside the leeway
    asyncio.run(v.verify(tok))
    now[0] = exp + 30
    with pytest.raises(Deny) as e:
        asyncio.run(v.verify(tok))
    assert e.value.status == 401 and "expired" in e.value.message
    # Not yet valid (minted in the future beyond the leeway) is refused too.
    future, _ = tokens.mint(load_signing_key(d), ISS, "ses_1", "u", "https://idp", "u@x", (), None, 3600,
                            now[0] + 120)
    with pytest.raises(Deny, match="not valid yet"):
        asyncio.run(v.verify(future))


def test_revocation_reaches_the_verifier_by_notify(postgres_dsn: str, tmp_path: Path) -> None:
    d = ensure_keys(tmp_path)

    async def run() -> None:
        store = SessionStore(postgres_dsn, Sealer.load(d))
        await store.start()
        status = SessionStatus(postgres_dsn, ttl_s=3600)  # only the notification can end it
        await status.start()
        try:
            sid, refresh = await store.create(idp_issuer="https://idp", subject="u", name="u", groups=(),
                                              tenant=None, flow="device", idp_refresh="idp-rt", max_age_s=600)
            assert refresh.startswith("ccrr_")
            s = await store.by_refresh_token(refresh)
            assert s is not None and store.idp_refresh_token(s) == "idp-rt"
            with psycopg.connect(postgres_dsn) as conn:  # sealed at rest, not the token itself
                raw = conn.execute("SELECT idp_refresh_sealed FROM signin_sessions WHERE id = %s", (sid,)).fetchone()
            assert raw is not None and b"idp-rt" not in bytes(raw[0])
            assert await status.live(sid)
            assert await store.revoke(sid, "test") is not None
            deadline = time.monotonic() + 1.0
            while await status.live(sid):
                assert time.monotonic() < deadline, "revocation not heard within a second"
                await asyncio.sleep(0.01)
            assert not await status.live("ses_unknown")
        finally:
            await status.close()
            await store.close()

    asyncio.run(run())


def _signin_config(tmp_path: Path, **signin: object) -> dict:
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["identity"] = {"oidc": [{"issuer": "https://idp.example", "audiences": ["ccr"]}],
                       "signin": {"issuer": "https://idp.example", "client_id": "ccr", **signin}}
    return cfg


def test_signin_config_is_checked(tmp_path: Path) -> None:
    assert parse_config(_signin_config(tmp_path)).identity.signin is not None
    cfg = _signin_config(tmp_path)
    cfg["identity"]["signin"]["issuer"] = "https://other.example"
    with pytest.raises(ConfigError, match="must be one of the identity.oidc issuers"):
        parse_config(cfg)
    with pytest.raises(ConfigError, match="public_url must be https"):
        parse_config(_signin_config(tmp_path, public_url="http://gateway.example"))
    with pytest.raises(ConfigError, match="session_ttl_s"):
        parse_config(_signin_config(tmp_path, session_ttl_s=10))
    with pytest.raises(ConfigError, match="openid"):
        parse_config(_signin_config(tmp_path, scopes=["email"]))


def test_signin_route_passes_envoy_validate_and_is_first(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(_signin_config(tmp_path)))
    cfg = load_config(f)
    rt = _runtime(signin="127.0.0.1:7005")
    routes = resources.route_config(cfg)["virtual_hosts"][0]["routes"]
    assert routes[0]["match"] == {"prefix": SIGNIN_PREFIX}
    assert routes[0]["route"] == {"cluster": resources.SIGNIN, "timeout": "30s"}
    assert routes[0]["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True
    # ext_authz stays on for every route that can reach a provider.
    for r in routes[1:]:
        authz = r.get("typed_per_filter_config", {}).get(resources.EXT_AUTHZ_FILTER, {})
        assert not authz.get("disabled") or "direct_response" in r, r
    r = _validate(tmp_path, json.dumps(resources.static_bootstrap(cfg, rt, 18080)))
    assert r.returncode == 0, r.stderr[-4000:]
    with pytest.raises(ValueError, match="signin"):
        resources.clusters(cfg, _runtime())
    # Without identity.signin there is no such route or cluster.
    plain = load_config(REPO / "ccr.example.yaml")
    assert all(r["match"].get("prefix") != SIGNIN_PREFIX for r in resources.route_config(plain)["virtual_hosts"][0]
               ["routes"])
    assert resources.SIGNIN not in [c["name"] for c in resources.clusters(plain, _runtime())]


# -- properties: no text gets in as a session token -------------------------------------------

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
PROPS = settings(max_examples=200, deadline=None)


@pytest.fixture(scope="module")
def session_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[SessionTokenVerifier, str, str]:
    d = ensure_keys(tmp_path_factory.mktemp("props"))
    v = SessionTokenVerifier(load_public_keys(d), ISS, _Status(), clock=lambda: 1_800_000_000.0)  # type: ignore[arg-type]
    tok, _ = tokens.mint(load_signing_key(d), ISS, "ses_p", "u", "https://idp", "u", ("default",), None, 3600,
                         1_800_000_000.0)
    return v, tok, asyncio.run(v.verify(tok)).id


def _verdict(v: SessionTokenVerifier, token: str) -> str | None:
    """The principal id, or None when refused with a 401; anything else (a crash) fails the test."""
    try:
        return asyncio.run(v.verify(token)).id
    except Deny as e:
        assert e.status == 401 and e.err_type == "authentication_error"
        return None


@PROPS
@given(st.text(max_size=300) | st.lists(st.text(alphabet=B64URL, max_size=80), min_size=1, max_size=5)
       .map(".".join))
def test_random_text_is_refused(session_env: tuple, text: str) -> None:
    v = session_env[0]
    tokens.header_of(text)  # never raises
    assert _verdict(v, text) is None


@PROPS
@given(st.data())
def test_mutated_tokens_are_refused_or_identical(session_env: tuple, data: st.DataObject) -> None:
    v, tok, pid = session_env
    i = data.draw(st.integers(0, len(tok) - 1))
    c = data.draw(st.sampled_from(B64URL + "."))
    mutated = tok[:i] + c + tok[i + 1:]
    got = _verdict(v, mutated)
    # base64url's spare trailing bits can decode a different string to the same bytes: then it
    # is the same signed token, and only then may it pass.
    assert got is None or (got == pid and _same_bytes(tok, mutated))


@PROPS
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u"]),
                              st.sampled_from(["none", "HS256", "Ed25519", "RS256", tokens.TYP, "", "x"])),
       payload=st.dictionaries(st.sampled_from(["iss", "aud", "sub", "sid", "idp", "exp", "iat", "name", "groups"]),
                               st.one_of(st.text(max_size=10), st.integers(), st.just(ISS), st.just(["x"]))))
def test_forged_headers_and_payloads_are_refused(session_env: tuple, header: dict, payload: dict) -> None:
    v, tok, _ = session_env
    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    sig = tok.rsplit(".", 1)[1]
    for forged in (f"{b64(header)}.{b64(payload)}.", f"{b64(header)}.{b64(payload)}.{sig}"):
        assert _verdict(v, forged) is None


def _same_bytes(a: str, b: str) -> bool:
    def dec(t: str) -> list[bytes]:
        return [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in t.split(".")]
    try:
        return dec(a) == dec(b)
    except ValueError:
        return False


class _StubIdp:
    issuer = "https://idp.example"

    def __init__(self) -> None:
        self.calls = 0

    async def device_authorization(self) -> dict:
        self.calls += 1
        return {"device_code": "dc", "user_code": "ABCD-EFGH", "verification_uri": "https://idp.example/device"}

    async def authorization_url(self, redirect_uri: str, state: str, nonce: str, challenge: str) -> str:
        self.calls += 1
        return "https://idp.example/authorize"


def test_sign_in_starts_are_budgeted(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from ccr.config import SigninSettings
    from signin.service import SigninService, StartBudget

    d = ensure_keys(tmp_path)
    idp = _StubIdp()
    svc = SigninService(SigninSettings(issuer=idp.issuer, client_id="ccr", starts_per_minute=60),
                        idp, None, KeyFile(d / SIGNING_KEY, load_signing_key),  # type: ignore[arg-type]
                        KeyFile(d / PUBLIC_KEYS, load_public_keys), Sealer.load(d),
                        lambda: "http://127.0.0.1:1")
    now = [100.0]
    svc.starts = StartBudget(60, clock=lambda: now[0])  # 1 per second, bursts of 10

    async def run() -> None:
        async with TestClient(TestServer(svc.app())) as c:
            for _ in range(10):
                assert (await c.post(SIGNIN_PREFIX + "device")).status == 200
            r = await c.post(SIGNIN_PREFIX + "device")
            assert r.status == 429 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["type"] == "rate_limit_error"
            assert (await c.get(SIGNIN_PREFIX + "login", allow_redirects=False)).status == 429
            now[0] += 1.0
            r = await c.get(SIGNIN_PREFIX + "login", allow_redirects=False)
            assert r.status == 302 and r.headers["Location"] == "https://idp.example/authorize"

    asyncio.run(run())
    assert idp.calls == 11  # refused starts never reached the IdP


def test_client_secret_goes_only_to_the_signin_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ccr.supervisor import Gateway, services_for

    cfg = parse_config(_signin_config(tmp_path, client_secret_env="CCR_TEST_OIDC_SECRET"))
    monkeypatch.setenv("CCR_TEST_OIDC_SECRET", "s3cret")
    assert "signin" in services_for(cfg)
    assert Gateway._service_env("signin", cfg) == {"CCR_TEST_OIDC_SECRET": "s3cret"}
    for other in ("extauth", "ratelimit", "accesslog", "adapter"):
        assert Gateway._service_env(other, cfg) is None
    assert "signin" not in services_for(load_config(REPO / "ccr.example.yaml"))


def test_ccr_login_explains_a_gateway_without_sign_in_and_a_missing_session(tmp_path: Path) -> None:
    import http.server
    import io
    import threading

    from ccr import login
    from ccr.errors import error_body

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = error_body("not_found_error", "Not found")
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(login.LoginError, match="does not offer sign-in .*identity.signin"):
            login.device_login(f"http://127.0.0.1:{server.server_address[1]}", io.StringIO())
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(login.LoginError, match="no session at .*ccr login"):
        login.current_token(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(login.LoginError, match="not a ccr session file"):
        login.current_token(tmp_path / "bad.json")


def test_signing_key_rotation_is_followed_without_a_restart(tmp_path: Path) -> None:
    d = ensure_keys(tmp_path)
    t = [0.0]
    signing = KeyFile(d / SIGNING_KEY, load_signing_key, clock=lambda: t[0])
    v = SessionTokenVerifier(KeyFile(d / PUBLIC_KEYS, load_public_keys, clock=lambda: t[0]), ISS,
                             _Status(), clock=lambda: 1_800_000_000.0)  # type: ignore[arg-type]

    def mint() -> str:
        signing.refresh()
        return tokens.mint(signing.value, ISS, "ses_r", "u", "https://idp", "u", (), None, 3600, 1_800_000_000.0)[0]

    first = mint()
    asyncio.run(v.verify(first))
    k1, k2 = rotate_signing_key(d)
    assert oct((d / SIGNING_KEY).stat().st_mode & 0o777) == "0o600"
    t[0] += 1.0  # files are re-checked at most once a second
    second = mint()
    assert tokens.header_of(second)["kid"] == k2 != k1  # type: ignore[index]
    asyncio.run(v.verify(second))  # the verifier picked up the new public key
    asyncio.run(v.verify(first))  # tokens of the previous key stay valid until they expire
    rotate_signing_key(d)
    t[0] += 1.0
    with pytest.raises(Deny, match="key this gateway does not know"):
        asyncio.run(v.verify(first))  # two keys ago: gone, even though it was verified (cached) before
    asyncio.run(v.verify(second))

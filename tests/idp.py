"""A real OpenID Connect provider for tests: discovery, JWKS, token minting, key rotation,
authorization code + PKCE, the device authorization grant and refresh tokens.

It is a real aiohttp HTTP server on a free loopback port, so the gateway's whole OIDC path
(discovery over HTTP, JWKS fetches, redirects, token endpoint calls) runs for real.

In-process (pytest)
-------------------
    from tests.idp import TestIdP, running_idp

    def test_x(idp: TestIdP):              # fixture from tests/conftest.py: a fresh IdP per test
        token = idp.mint("alice")          # RS256 access token for user "alice", aud=idp.audience
        ...

    with running_idp(audience="ccr", clock=my_clock) as idp:   # your own scope / options
        ...

`running_idp(**kwargs)` starts `TestIdP(**kwargs)` on its own event loop in a daemon thread
and stops it on exit; every method below is plain synchronous Python, callable from tests.

TestIdP(audience="ccr", path="", clock=time.time, host="127.0.0.1")
    .issuer               "http://127.0.0.1:<port><path>" (set once started)
    .url(p)               issuer + p
    .audience             default `aud` of access tokens
    .clock                callable returning unix seconds (inject to control exp/iat, device expiry)

  Keys and tokens
    .add_key(alg="RS256"|"ES256"|"EdDSA", kid=None, publish=True, activate=True) -> kid
        New signing key; when activate, mint() uses it for that alg family from now on.
    .rotate(alg="RS256") -> kid        add_key + make active (the old key stays published)
    .retire(kid)                       stop publishing kid in the JWKS (tokens already minted keep it)
    .published_kids() -> list[str]
    .mint(sub="alice", *, alg="RS256", kid=None, aud=<audience>, iss=<issuer>, exp_in=300,
          iat=None, nbf=None, claims=None, drop=(), header=None) -> str
        A signed JWT. Standard claims come from the user (if `sub` is a known user: email,
        preferred_username, name, groups, tenant), then `claims` override/add, then names in
        `drop` are removed (e.g. drop=("exp",)). `exp_in` is relative to `clock()`; `iat`/`nbf`
        absolute if given (default iat=clock(), no nbf). `header` adds/overrides JOSE header
        fields (but the signature is made with the chosen key and alg). aud=None omits aud.
    .public_jwks() -> dict             the JWKS document as served
    .extra_jwks: list[dict]            raw JWK dicts appended to the served JWKS (for hostile-IdP tests)

  Users and clients
    .add_user(sub, email=None, groups=(), tenant=None, name=None) -> TestUser
        Users "alice" (groups ["eng"], tenant "acme") and "bob" (groups ["sales"], tenant
        "acme") exist from the start.
    .disable_user(sub) / .enable_user(sub)
        A disabled user's refresh tokens fail (invalid_grant), and it cannot sign in.
    .login_as(sub)                     who the authorization endpoint auto-consents as (default alice)
    .add_client(client_id, secret=None, redirect_uris=None) -> TestClient
        redirect_uris=None accepts any http://127.0.0.1 / http://localhost / http://[::1] URI.
        With a secret, the token endpoint requires it (client_secret_basic or client_secret_post).
        Client "ccr" (public, loopback redirects) exists from the start.

  Device flow
    .approve_device(user_code, sub=None)   the user (default: login_as user) approves
    .deny_device(user_code)
    .device_interval = 5               seconds clients must wait between polls
    .device_expires_in = 600
    .last_user_code                    user_code of the latest device authorization

  Counters (ints): .jwks_fetches, .discovery_fetches, .token_requests, .authorize_requests,
  .userinfo_requests;  .outage = True makes discovery and JWKS answer 503.

HTTP endpoints (relative to the issuer)
    GET  /.well-known/openid-configuration
    GET  /jwks
    GET  /authorize      response_type=code, client_id, redirect_uri, state, nonce, scope,
                         code_challenge, code_challenge_method=S256 (required; plain refused).
                         Auto-consents as the login_as user; 302 to redirect_uri?code=..&state=..
                         Errors about the client or redirect_uri are a 400 page (never redirected).
    POST /token          grant_type=authorization_code (code, redirect_uri, client_id, code_verifier),
                         urn:ietf:params:oauth:grant-type:device_code (device_code, client_id):
                             authorization_pending / slow_down (interval grows by 5 s) /
                             expired_token / access_denied, then tokens once,
                         refresh_token (refresh_token, client_id): rotates the refresh token (the old
                             one stops working); invalid_grant once the user is disabled.
                         Success: {access_token, id_token, refresh_token, token_type: "Bearer",
                         expires_in, scope}. Errors: RFC 6749 JSON {error, error_description}, 400
                         (401 invalid_client).
                         Access token: iss, sub, aud=audience, exp, iat, jti, client_id, scope, email,
                         preferred_username, name, groups, tenant. ID token: aud=client_id, nonce.
    POST /device_authorization   client_id, scope -> device_code, user_code ("ABCD-EFGH"),
                         verification_uri, verification_uri_complete, expires_in, interval
    GET  /device         the verification page (shows the user_code; tests approve via the API)
    GET  /userinfo       Bearer access token -> the user's claims

  Test control (for the subprocess mode; JSON in and out):
    POST /_test/mint {sub, alg, kid, aud, exp_in, iat, nbf, claims, drop, header} -> {token}
    POST /_test/keys {alg, kid?, activate?} -> {kid};   POST /_test/keys/{kid}/retire
    POST /_test/users {sub, email, groups, tenant, name};  POST /_test/users/{sub}/disable | /enable
    POST /_test/login_as {sub};  POST /_test/device/approve {user_code, sub?};  /_test/device/deny
    POST /_test/clock {advance: seconds}   (moves the IdP clock forward)
    POST /_test/outage {on: bool};   GET /_test/stats -> the counters

Subprocess
    python -m tests.idp --port 0 --ready-file F [--audience ccr] [--path /realms/x]
    writes {"issuer": ..., "address": "127.0.0.1:port", "pid": n} to F when serving; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import secrets
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, Key, KeySet, OKPKey, RSAKey

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_FAMILY = {"RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA",
           "ES256": "EC", "EdDSA": "OKP", "Ed25519": "OKP"}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


@dataclass
class TestUser:
    sub: str
    email: str | None = None
    groups: tuple[str, ...] = ()
    tenant: str | None = None
    name: str | None = None
    enabled: bool = True

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preferred_username": self.sub, "groups": list(self.groups)}
        if self.email:
            out["email"] = self.email
        if self.name:
            out["name"] = self.name
        if self.tenant:
            out["tenant"] = self.tenant
        return out


@dataclass
class TestClient:
    client_id: str
    secret: str | None = None
    redirect_uris: tuple[str, ...] | None = None  # None: any loopback http URI

    def redirect_ok(self, uri: str) -> bool:
        if self.redirect_uris is not None:
            return uri in self.redirect_uris
        u = urllib.parse.urlsplit(uri)
        return u.scheme == "http" and (u.hostname or "") in _LOOPBACK_HOSTS | {"::1"}


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    sub: str
    nonce: str | None
    scope: str
    expires_at: float


@dataclass
class _Device:
    client_id: str
    user_code: str
    scope: str
    expires_at: float
    state: str = "pending"  # pending | approved | denied | used
    sub: str | None = None
    last_poll: float | None = None
    interval: int = 5


@dataclass
class _Refresh:
    client_id: str
    sub: str
    scope: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _generate(alg: str, kid: str) -> Key:
    family = _FAMILY.get(alg)
    params = {"kid": kid, "alg": alg, "use": "sig"}
    if family == "RSA":
        return RSAKey.generate_key(2048, parameters=params)
    if family == "EC":
        return ECKey.generate_key("P-256", parameters=params)
    if family == "OKP":
        return OKPKey.generate_key("Ed25519", parameters=params)
    raise ValueError(f"test IdP cannot make keys for alg {alg!r}")


class TestIdP:
    __test__ = False  # not a pytest test class

    def __init__(self, audience: str = "ccr", path: str = "", clock: Callable[[], float] = time.time,
                 host: str = "127.0.0.1") -> None:
        self.audience = audience
        self.path = path.rstrip("/")
        self.clock = clock
        self.host = host
        self.issuer = ""
        self._lock = threading.RLock()
        self._keys: dict[str, Key] = {}
        self._published: list[str] = []
        self._active: dict[str, str] = {}  # family -> kid
        self.users: dict[str, TestUser] = {}
        self.clients: dict[str, TestClient] = {}
        self._codes: dict[str, _Code] = {}
        self._devices: dict[str, _Device] = {}  # device_code -> state
        self._user_codes: dict[str, str] = {}  # user_code -> device_code
        self._refresh: dict[str, _Refresh] = {}
        self._login_sub = "alice"
        self.device_interval = 5
        self.device_expires_in = 600
        self.token_lifetime = 300
        self.last_user_code: str | None = None
        self.outage = False
        self.extra_jwks: list[dict[str, Any]] = []
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.token_requests = 0
        self.authorize_requests = 0
        self.userinfo_requests = 0
        for alg in ("RS256", "ES256", "EdDSA"):
            self.add_key(alg)
        self.add_user("alice", email="alice@example.com", groups=("eng",), tenant="acme", name="Alice")
        self.add_user("bob", email="bob@example.com", groups=("sales",), tenant="acme", name="Bob")
        self.add_client("ccr")
        self._runner: web.AppRunner | None = None

    # -- keys and tokens -------------------------------------------------------

    def add_key(self, alg: str = "RS256", kid: str | None = None, publish: bool = True,
                activate: bool = True) -> str:
        kid = kid or f"{alg.lower()}-{secrets.token_hex(4)}"
        key = _generate(alg, kid)
        with self._lock:
            self._keys[kid] = key
            if publish:
                self._published.append(kid)
            if activate:
                self._active[_FAMILY[alg]] = kid
        return kid

    def rotate(self, alg: str = "RS256") -> str:
        return self.add_key(alg, activate=True)

    def retire(self, kid: str) -> None:
        with self._lock:
            if kid in self._published:
                self._published.remove(kid)

    def published_kids(self) -> list[str]:
        with self._lock:
            return list(self._published)

    def public_jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [self._keys[k].as_dict(private=False) for k in self._published] + self.extra_jwks}

    def private_key(self, kid: str) -> Key:
        return self._keys[kid]

    def active_kid(self, alg: str = "RS256") -> str:
        return self._active[_FAMILY[alg]]

    def mint(self, sub: str = "alice", *, alg: str = "RS256", kid: str | None = None,
             aud: Any = ..., iss: str | None = None, exp_in: float = 300,
             iat: float | None = None, nbf: float | None = None, claims: dict[str, Any] | None = None,
             drop: tuple[str, ...] = (), header: dict[str, Any] | None = None) -> str:
        now = self.clock()
        body: dict[str, Any] = {"iss": iss or self.issuer, "sub": sub,
                                "iat": int(now if iat is None else iat), "exp": int(now + exp_in),
                                "jti": secrets.token_hex(8)}
        if aud is ...:
            body["aud"] = self.audience
        elif aud is not None:
            body["aud"] = aud
        if nbf is not None:
            body["nbf"] = int(nbf)
        user = self.users.get(sub)
        if user is not None:
            body.update(user.claims())
        body.update(claims or {})
        for name in drop:
            body.pop(name, None)
        with self._lock:
            kid = kid or self._active[_FAMILY[alg]]
            key = self._keys[kid]
        hdr = {"alg": alg, "kid": kid, "typ": "JWT", **(header or {})}
        return jwt.encode(hdr, body, key, algorithms=[hdr["alg"]])

    # -- users and clients -----------------------------------------------------

    def add_user(self, sub: str, email: str | None = None, groups: tuple[str, ...] | list[str] = (),
                 tenant: str | None = None, name: str | None = None) -> TestUser:
        u = TestUser(sub=sub, email=email, groups=tuple(groups), tenant=tenant, name=name)
        with self._lock:
            self.users[sub] = u
        return u

    def disable_user(self, sub: str) -> None:
        self.users[sub].enabled = False

    def enable_user(self, sub: str) -> None:
        self.users[sub].enabled = True

    def login_as(self, sub: str) -> None:
        if sub not in self.users:
            raise KeyError(sub)
        self._login_sub = sub

    def add_client(self, client_id: str, secret: str | None = None,
                   redirect_uris: list[str] | tuple[str, ...] | None = None) -> TestClient:
        c = TestClient(client_id, secret, tuple(redirect_uris) if redirect_uris is not None else None)
        with self._lock:
            self.clients[client_id] = c
        return c

    # -- device flow -----------------------------------------------------------

    def _device_by_user_code(self, user_code: str) -> _Device:
        dc = self._user_codes.get(user_code.strip().upper())
        if dc is None:
            raise KeyError(f"unknown user_code {user_code!r}")
        return self._devices[dc]

    def approve_device(self, user_code: str, sub: str | None = None) -> None:
        with self._lock:
            d = self._device_by_user_code(user_code)
            if d.state != "pending":
                raise ValueError(f"device authorization is {d.state}, not pending")
            d.sub = sub or self._login_sub
            d.state = "approved"

    def deny_device(self, user_code: str) -> None:
        with self._lock:
            self._device_by_user_code(user_code).state = "denied"

    # -- serving ---------------------------------------------------------------

    def url(self, p: str = "") -> str:
        return self.issuer + p

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.url("/authorize"),
            "token_endpoint": self.url("/token"),
            "device_authorization_endpoint": self.url("/device_authorization"),
            "userinfo_endpoint": self.url("/userinfo"),
            "jwks_uri": self.url("/jwks"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", DEVICE_GRANT],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
            "scopes_supported": ["openid", "profile", "email", "groups", "offline_access"],
        }

    def app(self) -> web.Application:
        app = web.Application()
        p = self.path
        app.router.add_get(p + "/.well-known/openid-configuration", self._h_discovery)
        app.router.add_get(p + "/jwks", self._h_jwks)
        app.router.add_get(p + "/authorize", self._h_authorize)
        app.router.add_post(p + "/token", self._h_token)
        app.router.add_post(p + "/device_authorization", self._h_device_authorization)
        app.router.add_get(p + "/device", self._h_device_page)
        app.router.add_get(p + "/userinfo", self._h_userinfo)
        app.router.add_post(p + "/_test/{action:.+}", self._h_test)
        app.router.add_get(p + "/_test/stats", self._h_stats)
        return app

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        real_port = self._runner.addresses[0][1]
        self.issuer = f"http://{self.host}:{real_port}{self.path}"
        return self.issuer

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers --------------------------------------------------------------

    async def _h_discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        if self.outage:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return web.json_response(self.discovery())

    async def _h_jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        if self.outage:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return web.json_response(self.public_jwks())

    async def _h_authorize(self, request: web.Request) -> web.Response:
        self.authorize_requests += 1
        q = request.query
        client = self.clients.get(q.get("client_id", ""))
        redirect_uri = q.get("redirect_uri", "")
        if client is None:
            return web.Response(status=400, text="unknown client_id")
        if not redirect_uri or not client.redirect_ok(redirect_uri):
            return web.Response(status=400, text="redirect_uri is not registered for this client")

        def back(**params: str) -> web.HTTPFound:
            if q.get("state") is not None:
                params["state"] = q["state"]
            sep = "&" if "?" in redirect_uri else "?"
            return web.HTTPFound(redirect_uri + sep + urllib.parse.urlencode(params))

        if q.get("response_type") != "code":
            raise back(error="unsupported_response_type")
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            raise back(error="invalid_request", error_description="PKCE with S256 is required")
        user = self.users.get(self._login_sub)
        if user is None or not user.enabled:
            raise back(error="access_denied", error_description="user is disabled")
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = _Code(client.client_id, redirect_uri, q["code_challenge"], user.sub,
                                      q.get("nonce"), q.get("scope", "openid"), self.clock() + 60)
        raise back(code=code)

    def _client_auth(self, request: web.Request, form: dict[str, str]) -> TestClient | None:
        cid, secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                raw = base64.b64decode(auth[6:]).decode()
            except Exception:
                return None
            u, _, pw = raw.partition(":")
            cid, secret = urllib.parse.unquote(u), urllib.parse.unquote(pw)
        client = self.clients.get(cid or "")
        if client is None:
            return None
        if client.secret is not None and not secrets.compare_digest(client.secret, secret or ""):
            return None
        return client

    def _issue(self, client: TestClient, sub: str, scope: str, nonce: str | None = None) -> dict[str, Any]:
        access = self.mint(sub, exp_in=self.token_lifetime,
                           claims={"client_id": client.client_id, "scope": scope})
        id_claims: dict[str, Any] = {}
        if nonce:
            id_claims["nonce"] = nonce
        id_token = self.mint(sub, aud=client.client_id, exp_in=self.token_lifetime, claims=id_claims)
        refresh = secrets.token_urlsafe(32)
        with self._lock:
            self._refresh[refresh] = _Refresh(client.client_id, sub, scope)
        return {"access_token": access, "id_token": id_token, "refresh_token": refresh,
                "token_type": "Bearer", "expires_in": self.token_lifetime, "scope": scope}

    @staticmethod
    def _oauth_error(error: str, desc: str = "", status: int = 400) -> web.Response:
        body = {"error": error}
        if desc:
            body["error_description"] = desc
        return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})

    async def _h_token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        client = self._client_auth(request, form)
        if client is None:
            return self._oauth_error("invalid_client", "unknown client or bad secret", 401)
        grant = form.get("grant_type")
        if grant == "authorization_code":
            return self._grant_code(client, form)
        if grant == DEVICE_GRANT:
            return self._grant_device(client, form)
        if grant == "refresh_token":
            return self._grant_refresh(client, form)
        return self._oauth_error("unsupported_grant_type", f"grant_type {grant!r}")

    def _grant_code(self, client: TestClient, form: dict[str, str]) -> web.Response:
        with self._lock:
            code = self._codes.pop(form.get("code", ""), None)  # one use, even when it fails below
        if code is None or code.client_id != client.client_id or self.clock() > code.expires_at:
            return self._oauth_error("invalid_grant", "unknown, used or expired code")
        if form.get("redirect_uri") != code.redirect_uri:
            return self._oauth_error("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier", "")
        if not verifier or _b64url(hashlib.sha256(verifier.encode()).digest()) != code.challenge:
            return self._oauth_error("invalid_grant", "PKCE verification failed")
        if not self.users[code.sub].enabled:
            return self._oauth_error("invalid_grant", "user is disabled")
        return web.json_response(self._issue(client, code.sub, code.scope, code.nonce),
                                 headers={"Cache-Control": "no-store"})

    def _grant_device(self, client: TestClient, form: dict[str, str]) -> web.Response:
        now = self.clock()
        with self._lock:
            d = self._devices.get(form.get("device_code", ""))
            if d is None or d.client_id != client.client_id or d.state == "used":
                return self._oauth_error("invalid_grant", "unknown or used device_code")
            if now > d.expires_at:
                return self._oauth_error("expired_token", "the device code has expired")
            if d.state == "denied":
                return self._oauth_error("access_denied", "the user denied the request")
            if d.state == "pending":
                too_soon = d.last_poll is not None and now - d.last_poll < d.interval
                d.last_poll = now
                if too_soon:
                    d.interval += 5
                    return self._oauth_error("slow_down", f"poll at most every {d.interval} s")
                return self._oauth_error("authorization_pending", "the user has not approved yet")
            d.state = "used"
            sub = d.sub or self._login_sub
        if not self.users[sub].enabled:
            return self._oauth_error("invalid_grant", "user is disabled")
        return web.json_response(self._issue(client, sub, d.scope), headers={"Cache-Control": "no-store"})

    def _grant_refresh(self, client: TestClient, form: dict[str, str]) -> web.Response:
        with self._lock:
            r = self._refresh.get(form.get("refresh_token", ""))
            if r is None or r.client_id != client.client_id:
                return self._oauth_error("invalid_grant", "unknown or revoked refresh token")
            if not self.users[r.sub].enabled:
                return self._oauth_error("invalid_grant", "user is disabled")
            del self._refresh[form["refresh_token"]]  # rotation: the old refresh token is spent
        return web.json_response(self._issue(client, r.sub, r.scope), headers={"Cache-Control": "no-store"})

    async def _h_device_authorization(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        client = self._client_auth(request, form)
        if client is None:
            return self._oauth_error("invalid_client", "unknown client or bad secret", 401)
        device_code = secrets.token_urlsafe(32)
        alphabet = "BCDFGHJKLMNPQRSTVWXZ"
        raw = "".join(secrets.choice(alphabet) for _ in range(8))
        user_code = f"{raw[:4]}-{raw[4:]}"
        with self._lock:
            self._devices[device_code] = _Device(client.client_id, user_code, form.get("scope", "openid"),
                                                 self.clock() + self.device_expires_in,
                                                 interval=self.device_interval)
            self._user_codes[user_code] = device_code
            self.last_user_code = user_code
        verify = self.url("/device")
        return web.json_response({
            "device_code": device_code, "user_code": user_code, "verification_uri": verify,
            "verification_uri_complete": f"{verify}?user_code={user_code}",
            "expires_in": self.device_expires_in, "interval": self.device_interval,
        })

    async def _h_device_page(self, request: web.Request) -> web.Response:
        code = request.query.get("user_code", "")
        return web.Response(text=f"<html><body>Approve sign-in for code {code!s:.20}?</body></html>",
                            content_type="text/html")

    async def _h_userinfo(self, request: web.Request) -> web.Response:
        self.userinfo_requests += 1
        auth = request.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return web.json_response({"error": "invalid_token"}, status=401)
        try:
            with self._lock:
                keys = [self._keys[k] for k in self._published]
            tok = jwt.decode(auth[7:].strip(), KeySet(keys), algorithms=["RS256", "ES256", "EdDSA"])
        except Exception:
            return web.json_response({"error": "invalid_token"}, status=401)
        user = self.users.get(tok.claims.get("sub", ""))
        if user is None or not user.enabled:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"sub": user.sub, **user.claims()})

    async def _h_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def stats(self) -> dict[str, int]:
        return {"jwks_fetches": self.jwks_fetches, "discovery_fetches": self.discovery_fetches,
                "token_requests": self.token_requests, "authorize_requests": self.authorize_requests,
                "userinfo_requests": self.userinfo_requests}

    async def _h_test(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        body = await request.json() if request.can_read_body else {}
        try:
            if action == "mint":
                kw = {k: body[k] for k in ("alg", "kid", "iss", "exp_in", "iat", "nbf", "claims", "header")
                      if k in body}
                if "aud" in body:
                    kw["aud"] = body["aud"]
                kw["drop"] = tuple(body.get("drop", ()))
                return web.json_response({"token": self.mint(body.get("sub", "alice"), **kw)})
            if action == "keys":
                kid = self.add_key(body.get("alg", "RS256"), body.get("kid"),
                                   activate=body.get("activate", True))
                return web.json_response({"kid": kid})
            if action.startswith("keys/") and action.endswith("/retire"):
                self.retire(action.split("/")[1])
                return web.json_response({"ok": True})
            if action == "users":
                u = self.add_user(body["sub"], body.get("email"), body.get("groups", ()), body.get("tenant"),
                                  body.get("name"))
                return web.json_response({"sub": u.sub})
            if action.startswith("users/"):
                _, sub, op = action.split("/", 2)
                (self.disable_user if op == "disable" else self.enable_user)(sub)
                return web.json_response({"ok": True})
            if action == "login_as":
                self.login_as(body["sub"])
                return web.json_response({"ok": True})
            if action == "device/approve":
                self.approve_device(body["user_code"], body.get("sub"))
                return web.json_response({"ok": True})
            if action == "device/deny":
                self.deny_device(body["user_code"])
                return web.json_response({"ok": True})
            if action == "clock":
                base, offset = self.clock, float(body["advance"])
                self.clock = lambda: base() + offset
                return web.json_response({"now": self.clock()})
            if action == "outage":
                self.outage = bool(body.get("on", True))
                return web.json_response({"ok": True})
        except (KeyError, ValueError) as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({"error": f"unknown test action {action!r}"}, status=404)


@contextmanager
def running_idp(**kwargs: Any) -> Iterator[TestIdP]:
    """A started TestIdP on its own event loop in a daemon thread; stopped on exit."""
    idp = TestIdP(**kwargs)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-idp", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(idp.start(), loop).result(30)
        yield idp
    finally:
        asyncio.run_coroutine_threadsafe(idp.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


async def _serve(args: argparse.Namespace) -> None:
    idp = TestIdP(audience=args.audience, path=args.path, host=args.host)
    await idp.start(args.port)
    if args.ready_file:
        tmp = Path(f"{args.ready_file}.tmp")
        address = idp.issuer.removeprefix("http://").split("/", 1)[0]
        tmp.write_text(json.dumps({"issuer": idp.issuer, "address": address, "pid": os.getpid()}))
        tmp.replace(args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await idp.stop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.idp", description="OpenID provider for tests")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ready-file")
    ap.add_argument("--audience", default="ccr")
    ap.add_argument("--path", default="", help="issuer path, e.g. /realms/test")
    asyncio.run(_serve(ap.parse_args()))


if __name__ == "__main__":
    main()

"""The sign-in HTTP service, reached through Envoy under SIGNIN_PREFIX (/ccr/auth/).

Browser:  GET  login    -> 302 to the IdP (state, nonce, PKCE S256; all three kept in a sealed,
                           HttpOnly cookie, so any replica can finish the flow)
          GET  callback -> checks state against the cookie, exchanges the code with the verifier,
                           validates the ID token (nonce included), starts a session. For
                           `ccr login --browser` (login?cli_redirect=<loopback>&cli_challenge=..)
                           it redirects to the CLI's loopback listener with a one-time code the
                           CLI redeems at `token` with its own PKCE verifier.
Device:   POST device   -> the IdP's device authorization, with the IdP's device_code sealed into
                           the handle the CLI polls with
          POST token    -> grant_type=device_code: one poll of the IdP; on approval a session
OAuth:    POST token    -> grant_type=refresh_token: only if the IdP still refreshes the user;
                           grant_type=authorization_code: the browser handoff code
          POST revoke   -> signs a session out (refresh token, or the session token as Bearer)
          GET  jwks     -> the public keys session tokens are signed with

Why the gateway runs its own device codes on top of the IdP's instead of letting the CLI talk
to the IdP: the CLI then needs to know nothing but the gateway URL, the client secret (for a
confidential client) stays in this process, and the IdP's refresh token never reaches a
laptop; the laptop holds a one-hour session token and a gateway refresh token that the
gateway can revoke, and that stops working when the IdP stops refreshing the user.

Token endpoint errors use the OAuth shape (RFC 6749 5.2, RFC 8628 3.5: clients branch on
`authorization_pending`/`slow_down`); other refusals use the Anthropic error shape.
"""

from __future__ import annotations

import html
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from joserfc.jwk import KeySet, OKPKey

from ccr.config import SigninSettings
from ccr.contract import SIGNIN_PREFIX
from ccr.errors import error_body
from signin import tokens
from signin.idp import (
    DEVICE_GRANT,
    LOOPBACK,
    IdpClient,
    IdpError,
    IdpUnavailable,
    IdTokenInvalid,
    Who,
    pkce_pair,
    s256,
    who_from_claims,
)
from signin.keys import KeyFile, Sealer
from signin.store import REFRESH_PREFIX, Session, SessionStore

log = logging.getLogger(__name__)

FLOW_COOKIE = "ccr_signin_flow"
FLOW_TTL_S = 600
# RFC 7636: a verifier is 43-128 unreserved characters; its S256 challenge is 43 base64url characters.
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")
# Errors from the IdP's device grant that the CLI must see as they are (RFC 8628 3.5).
_DEVICE_ERRORS = frozenset({"authorization_pending", "slow_down", "access_denied", "expired_token"})
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# The page that shows a session token runs no script, loads nothing, and cannot be framed.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
                 "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def oauth_error(error: str, description: str, status: int = 400) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status, headers=_NO_STORE)


def redirect(url: str) -> web.Response:
    return web.Response(status=302, headers={"Location": url, **_NO_STORE})


def refusal(status: int, kind: str, message: str) -> web.Response:
    return web.Response(status=status, body=error_body(kind, message), content_type="application/json",
                        headers=_NO_STORE)


@web.middleware
async def _anthropic_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method, body too large) and crashes, in our error shape."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = {404: "not_found_error", 413: "request_too_large"}.get(e.status, "invalid_request_error")
        return refusal(e.status, kind, f"{e.reason}: {request.method} {request.path} (sign-in endpoints: "
                                       f"GET login, GET callback, POST device, POST token, POST revoke, GET jwks)")
    except Exception:
        log.exception("sign-in request failed: %s %s", request.method, request.path)
        return refusal(500, "api_error", "the sign-in service failed on this request; try again shortly")


class StartBudget:
    """A token bucket over all callers: how many sign-ins may start, so open endpoints
    cannot be used to flood the IdP through the gateway."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(max(1, per_minute // 6))
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self) -> float:
        """0 when a start is allowed now, else the seconds until one will be."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


def _too_many(wait_s: float) -> web.Response:
    resp = refusal(429, "rate_limit_error", "too many sign-ins are starting right now; retry shortly")
    resp.headers["Retry-After"] = str(max(1, int(wait_s + 0.999)))
    return resp


def _seconds(value: object, default: int) -> int:
    """A positive whole number of seconds from the IdP, or the RFC 8628 default."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 86400 else default


def _loopback_redirect(uri: str) -> bool:
    u = urlsplit(uri)
    return u.scheme == "http" and u.hostname in LOOPBACK and not u.username and not u.fragment


class SigninService:
    def __init__(self, settings: SigninSettings, idp: IdpClient, store: SessionStore,
                 signing_key: KeyFile[OKPKey], public_keys: KeyFile[KeySet], sealer: Sealer,
                 public_url: Callable[[], str], clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.idp = idp
        self.store = store
        # Both follow `ccr sessions rotate-key` on disk.
        self._signing_key = signing_key
        self._public_keys = public_keys
        self.sealer = sealer
        self.public_url = public_url
        self.clock = clock
        self.starts = StartBudget(settings.starts_per_minute)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024, middlewares=[_anthropic_errors])
        p = SIGNIN_PREFIX
        app.router.add_get(p + "login", self.login)
        app.router.add_get(p + "callback", self.callback)
        app.router.add_post(p + "device", self.device)
        app.router.add_post(p + "token", self.token)
        app.router.add_post(p + "revoke", self.revoke)
        app.router.add_get(p + "jwks", self.jwks)
        return app

    def callback_url(self) -> str:
        return self.public_url().rstrip("/") + SIGNIN_PREFIX + "callback"

    def _who(self, claims: dict[str, Any]) -> Who:
        return who_from_claims(self.idp.cfg, claims)

    @property
    def signing_key(self) -> OKPKey:
        self._signing_key.refresh()
        return self._signing_key.value

    @property
    def public_keys(self) -> KeySet:
        self._public_keys.refresh()
        return self._public_keys.value

    def _mint(self, sid: str, who: Who) -> tuple[str, int]:
        return tokens.mint(self.signing_key, self.settings.token_issuer, sid, who.subject, self.idp.issuer,
                           who.name, who.groups, who.tenant, self.settings.session_ttl_s, self.clock())

    def _token_response(self, sid: str, who: Who, refresh: str) -> web.Response:
        access, exp = self._mint(sid, who)
        return web.json_response({"access_token": access, "token_type": "Bearer",
                                  "expires_in": exp - int(self.clock()), "refresh_token": refresh,
                                  "session_id": sid, "name": who.name}, headers=_NO_STORE)

    async def _new_session(self, who: Who, flow: str, idp_refresh: str | None,
                           handoff_challenge: str | None = None) -> tuple[str, str]:
        return await self.store.create(idp_issuer=self.idp.issuer, subject=who.subject, name=who.name,
                                       groups=who.groups, tenant=who.tenant, flow=flow, idp_refresh=idp_refresh,
                                       max_age_s=self.settings.session_max_age_s,
                                       handoff_challenge=handoff_challenge)

    # -- browser: authorization code + PKCE ----------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        if wait := self.starts.take():
            return _too_many(wait)
        q = request.query
        flow: dict[str, Any] = {}
        if "cli_redirect" in q:
            cli_redirect, challenge, cli_state = q["cli_redirect"], q.get("cli_challenge", ""), q.get("cli_state", "")
            if not _loopback_redirect(cli_redirect):
                return refusal(400, "invalid_request_error",
                               "cli_redirect must be an http:// loopback URL (127.0.0.1, [::1] or localhost)")
            if not _CHALLENGE.match(challenge):
                return refusal(400, "invalid_request_error",
                               "cli_challenge must be the S256 PKCE challenge of the CLI's verifier")
            if len(cli_state) > 512:
                return refusal(400, "invalid_request_error", "cli_state is too long")
            flow.update(cr=cli_redirect, cc=challenge, cs=cli_state)
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier, challenge = pkce_pair()
        redirect_uri = self.callback_url()
        flow.update(s=state, n=nonce, v=verifier, ru=redirect_uri, exp=int(self.clock()) + FLOW_TTL_S)
        try:
            url = await self.idp.authorization_url(redirect_uri, state, nonce, challenge)
        except IdpUnavailable as e:
            log.warning("IdP unavailable at login: %s", e)
            return refusal(503, "api_error", "the identity provider is unreachable; try again shortly")
        resp = redirect(url)
        resp.set_cookie(FLOW_COOKIE, self.sealer.seal_json(flow, "browser-flow"), max_age=FLOW_TTL_S,
                        path=SIGNIN_PREFIX, httponly=True, samesite="Lax", secure=redirect_uri.startswith("https:"))
        return resp

    async def callback(self, request: web.Request) -> web.Response:
        resp = await self._callback(request)
        resp.del_cookie(FLOW_COOKIE, path=SIGNIN_PREFIX)  # one sign-in per cookie, whatever the outcome
        return resp

    async def _callback(self, request: web.Request) -> web.Response:
        q = request.query
        flow = self.sealer.open_json(request.cookies.get(FLOW_COOKIE, ""), "browser-flow")
        if flow is None:
            return refusal(400, "invalid_request_error",
                           f"no sign-in is in progress in this browser; start at {SIGNIN_PREFIX}login")
        if self.clock() > flow["exp"]:
            return refusal(400, "invalid_request_error",
                           f"this sign-in took too long; start again at {SIGNIN_PREFIX}login")
        if not secrets.compare_digest(q.get("state", "").encode(), flow["s"].encode()):
            return refusal(400, "invalid_request_error",
                           "state does not match the sign-in this browser started; start again")
        if "error" in q:
            return refusal(403, "permission_error",
                           f"the identity provider refused the sign-in: {q['error'][:64]} "
                           f"{q.get('error_description', '')[:200]}".strip())
        code = q.get("code", "")
        if not code:
            return refusal(400, "invalid_request_error", "the identity provider returned no code")
        try:
            resp = await self.idp.exchange_code(code, flow["v"], flow["ru"])
            claims = await self.idp.validate_id_token(str(resp.get("id_token", "")), flow["n"])
            who = self._who(claims)
        except IdpError as e:
            return refusal(403, "permission_error", f"the identity provider refused the code: {e}")
        except IdTokenInvalid as e:
            return refusal(403, "permission_error", f"the identity provider's ID token is not acceptable: {e}")
        except IdpUnavailable as e:
            log.warning("IdP unavailable at callback: %s", e)
            return refusal(503, "api_error", "the identity provider is unreachable; try again shortly")
        idp_refresh = resp.get("refresh_token") if isinstance(resp.get("refresh_token"), str) else None
        if "cr" in flow:
            sid, handoff = await self._new_session(who, "cli-browser", idp_refresh, handoff_challenge=flow["cc"])
            log.info("browser sign-in for the CLI: session %s", sid)
            sep = "&" if "?" in flow["cr"] else "?"
            return redirect(flow["cr"] + sep + urlencode({"code": handoff, "state": flow["cs"]}))
        # A browser on its own gets a session token to copy; no refresh (use `ccr login` for that).
        sid, _ = await self._new_session(who, "browser", None)
        access, exp = self._mint(sid, who)
        log.info("browser sign-in: session %s", sid)
        return web.Response(content_type="text/html", headers={**_NO_STORE, **_PAGE_HEADERS}, text=_signed_in_page(
            who.name, access, exp - int(self.clock()), self.public_url()))

    # -- device authorization grant -----------------------------------------------

    async def device(self, request: web.Request) -> web.Response:
        if wait := self.starts.take():
            return _too_many(wait)
        try:
            doc = await self.idp.device_authorization()
        except IdpError as e:
            return oauth_error(e.error, f"identity provider: {e.description or e.error}")
        except IdpUnavailable as e:
            log.warning("IdP unavailable at device start: %s", e)
            return oauth_error("temporarily_unavailable", "the identity provider is unreachable", 503)
        expires_in = _seconds(doc.get("expires_in"), 600)
        interval = _seconds(doc.get("interval"), 5)
        handle = self.sealer.seal_json({"dc": doc["device_code"], "exp": int(self.clock()) + expires_in}, "device")
        out = {"device_code": handle, "user_code": doc["user_code"], "verification_uri": doc["verification_uri"],
               "expires_in": expires_in, "interval": interval}
        if isinstance(doc.get("verification_uri_complete"), str):
            out["verification_uri_complete"] = doc["verification_uri_complete"]
        return web.json_response(out, headers=_NO_STORE)

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant = form.get("grant_type")
        try:
            if grant == DEVICE_GRANT:
                return await self._device_grant(str(form.get("device_code", "")))
            if grant == "refresh_token":
                return await self._refresh_grant(str(form.get("refresh_token", "")))
            if grant == "authorization_code":
                return await self._handoff_grant(str(form.get("code", "")), str(form.get("code_verifier", "")))
        except IdpUnavailable as e:
            log.warning("IdP unavailable at token (%s): %s", grant, e)
            return oauth_error("temporarily_unavailable", "the identity provider is unreachable; retry shortly", 503)
        return oauth_error("unsupported_grant_type",
                           f"grant_type must be {DEVICE_GRANT}, refresh_token or authorization_code")

    async def _device_grant(self, handle: str) -> web.Response:
        d = self.sealer.open_json(handle, "device")
        if d is None:
            return oauth_error("invalid_grant", "device_code was not issued by this gateway")
        if self.clock() > d["exp"]:
            return oauth_error("expired_token", "the sign-in code has expired; run `ccr login` again")
        try:
            resp = await self.idp.poll_device(d["dc"])
            claims = await self.idp.validate_id_token(str(resp.get("id_token", "")), None)
            who = self._who(claims)
        except IdpError as e:
            if e.error in _DEVICE_ERRORS:
                return oauth_error(e.error, e.description or e.error)
            return oauth_error("invalid_grant", f"identity provider: {e}")
        except IdTokenInvalid as e:
            return oauth_error("invalid_grant", f"the identity provider's ID token is not acceptable: {e}")
        idp_refresh = resp.get("refresh_token") if isinstance(resp.get("refresh_token"), str) else None
        sid, refresh = await self._new_session(who, "device", idp_refresh)
        log.info("device sign-in: session %s", sid)
        return self._token_response(sid, who, refresh)

    async def _handoff_grant(self, code: str, verifier: str) -> web.Response:
        if not _VERIFIER.match(verifier):
            return oauth_error("invalid_request", "code_verifier must be 43-128 unreserved characters")
        got = await self.store.redeem_handoff(code, s256(verifier))
        if got is None:
            return oauth_error("invalid_grant", "unknown, used or expired code, or the verifier does not match")
        s, refresh = got
        return self._token_response(s.id, Who(s.subject, s.name, s.groups, s.tenant), refresh)

    async def _refresh_grant(self, refresh: str) -> web.Response:
        s = await self.store.by_refresh_token(refresh) if refresh.startswith(REFRESH_PREFIX) else None
        if s is None:
            return oauth_error("invalid_grant", "the session has ended or the refresh token is unknown; "
                                                "sign in again (`ccr login`)")
        idp_refresh = self.store.idp_refresh_token(s)
        if idp_refresh is None:
            await self.store.revoke(s.id, "no identity provider refresh token to refresh with")
            return oauth_error("invalid_grant", "this session cannot be refreshed; sign in again (`ccr login`)")
        try:
            resp = await self.idp.refresh(idp_refresh)
            who = await self._refreshed_who(s, resp)
        except (IdpError, IdTokenInvalid) as e:
            # The IdP no longer vouches for this person: the session ends, and with it every
            # session token minted for it (extauth hears the revocation).
            await self.store.revoke(s.id, f"identity provider refused the refresh: {e}")
            log.info("session %s ended: the IdP refused the refresh (%s)", s.id, e)
            return oauth_error("invalid_grant", "the identity provider no longer accepts this sign-in; "
                                                "sign in again (`ccr login`)")
        new_refresh = await self.store.rotate(
            s, refresh, idp_refresh=resp.get("refresh_token") if isinstance(resp.get("refresh_token"), str) else None,
            name=who.name, groups=who.groups, tenant=who.tenant)
        if new_refresh is None:
            return oauth_error("invalid_grant", "the session was refreshed or ended meanwhile; sign in again")
        return self._token_response(s.id, who, new_refresh)

    async def _refreshed_who(self, s: Session, resp: dict[str, Any]) -> Who:
        """Who the session is after a refresh: the new ID token's claims (groups may have
        changed at the IdP), which must still be about the same person."""
        if not isinstance(resp.get("id_token"), str):
            return Who(s.subject, s.name, s.groups, s.tenant)
        who = self._who(await self.idp.validate_id_token(resp["id_token"], None))
        if who.subject != s.subject:
            raise IdTokenInvalid("the refreshed ID token names another user")
        return who

    # -- sign out, keys -------------------------------------------------------------

    async def revoke(self, request: web.Request) -> web.Response:
        form = await request.post()
        token = str(form.get("token", ""))
        auth = request.headers.get("Authorization", "")
        if not token and auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        sid: str | None = None
        if token.startswith(REFRESH_PREFIX):
            s = await self.store.by_refresh_token(token)
            sid = s.id if s else None
        elif tokens.looks_like_session_token(token):
            try:
                sid = tokens.verify(token, self.public_keys, self.settings.token_issuer, self.clock(), 0,
                                    check_times=False).sid
            except tokens.TokenRejected as e:
                return oauth_error("invalid_request", f"not a session token of this gateway: {e}")
        elif token:
            return oauth_error("unsupported_token_type", "send a gateway refresh token or session token")
        else:
            return oauth_error("invalid_request", "send the token to revoke as `token` or as Bearer")
        ended = await self.store.revoke(sid, "signed out") if sid else None
        if ended is not None:
            log.info("session %s signed out", sid)
            idp_refresh = self.store.idp_refresh_token(ended)
            if idp_refresh:
                await self.idp.revoke(idp_refresh)
        # RFC 7009: an unknown or already revoked token is not an error.
        return web.json_response({"revoked": ended is not None}, headers=_NO_STORE)

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.public_keys.as_dict(private=False))


def _signed_in_page(name: str, token: str, ttl_s: int, gateway_url: str) -> str:
    t, n, g = html.escape(token), html.escape(name), html.escape(gateway_url)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>ccr: signed in</title></head><body>"
            f"<h1>Signed in as {n}</h1><p>Your gateway session token (valid {ttl_s // 60} minutes):</p>"
            f"<pre id=token>{t}</pre><p>Use it with Claude Code:</p>"
            f"<pre>export ANTHROPIC_BASE_URL={g}\nexport ANTHROPIC_AUTH_TOKEN={t}</pre>"
            f"<p>For a session that refreshes itself, run <code>ccr login</code> instead.</p></body></html>")

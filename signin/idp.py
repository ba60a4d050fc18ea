"""The gateway as an OIDC client of one IdP: discovery, the authorization code grant with
PKCE, the device authorization grant, refresh, and ID token validation.

Only the sign-in service talks to the IdP as a client; the client secret (if the IdP
requires one) and the IdP's refresh tokens never leave it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from joserfc import jwt
from joserfc.errors import JoseError

from ccr.config import OidcIssuer
from extauth.oidc import IssuerKeys, OidcVerifier

log = logging.getLogger(__name__)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def https_or_loopback(url: str) -> bool:
    u = urlsplit(url)
    return u.scheme == "https" or (u.scheme == "http" and u.hostname in LOOPBACK)


class IdpError(Exception):
    """The IdP answered a token request with an OAuth error (RFC 6749 section 5.2)."""

    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status


class IdpUnavailable(Exception):
    """The IdP could not be reached or answered something that is not OAuth."""


class IdTokenInvalid(Exception):
    pass


@dataclass(frozen=True)
class Metadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None


@dataclass(frozen=True)
class Who:
    """The person an ID token names, in the gateway's terms (the issuer's claim mapping)."""

    subject: str  # the value of the issuer's user_claim: Principal.id is "oidc:<issuer>#<subject>"
    name: str
    groups: tuple[str, ...]
    tenant: str | None


def who_from_claims(cfg: OidcIssuer, claims: dict[str, Any]) -> Who:
    """The same mapping (user claim, name claims, groups with group_map, tenant) that extauth
    applies to this issuer's tokens, so a person is one principal whichever way they come in."""
    try:
        p = OidcVerifier._principal(cfg, claims)
    except Exception as e:  # extauth.oidc's refusal type: a claim is missing or malformed
        raise IdTokenInvalid(str(e)) from None
    return Who(str(claims[cfg.user_claim]), p.name, p.groups, p.tenant)


class IdpClient:
    def __init__(self, cfg: OidcIssuer, client_id: str, client_secret: str | None, scopes: list[str],
                 http: aiohttp.ClientSession, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.issuer = cfg.issuer  # exactly the ID tokens' `iss`
        self.client_id = client_id
        self._secret = client_secret
        self.scopes = scopes
        self._http = http
        self.clock = clock
        self._meta: Metadata | None = None
        # The issuer's keys as extauth keeps them: cached, refetched on an unknown kid (rate limited).
        self._keys = IssuerKeys(cfg, clock, lambda: http)
        self._lock = asyncio.Lock()

    # -- discovery and keys ------------------------------------------------------

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    raise IdpUnavailable(f"GET {url}: HTTP {r.status}")
                doc = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise IdpUnavailable(f"GET {url}: {e}") from None
        if not isinstance(doc, dict):
            raise IdpUnavailable(f"GET {url}: not a JSON object")
        return doc

    async def metadata(self) -> Metadata:
        if self._meta is not None:
            return self._meta
        async with self._lock:
            if self._meta is None:
                doc = await self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
                if doc.get("issuer") != self.issuer:
                    raise IdpUnavailable(f"discovery names issuer {doc.get('issuer')!r}, expected {self.issuer!r}")
                for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                    if not isinstance(doc.get(k), str) or not https_or_loopback(doc[k]):
                        raise IdpUnavailable(f"discovery document lacks a usable {k}")
                self._meta = Metadata(doc["issuer"], doc["authorization_endpoint"], doc["token_endpoint"],
                                      doc["jwks_uri"], doc.get("device_authorization_endpoint"),
                                      doc.get("revocation_endpoint"))
        return self._meta

    async def validate_id_token(self, id_token: str, nonce: str | None) -> dict[str, Any]:
        """The ID token's claims after checking signature, alg, iss, aud/azp, exp, iat and nonce
        (OpenID Connect Core 3.1.3.7)."""
        from signin.tokens import header_of

        header = header_of(id_token)
        if header is None:
            raise IdTokenInvalid("ID token is malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.cfg.algorithms:
            raise IdTokenInvalid(f"ID token algorithm {str(alg)[:20]!r} is not accepted")
        kid = header.get("kid")
        key = await self._keys.key_for(kid if isinstance(kid, str) else None)
        if key is None:
            raise IdTokenInvalid("ID token is signed with a key the identity provider does not publish")
        try:
            claims = jwt.decode(id_token, key, algorithms=[alg]).claims
        except JoseError as e:
            raise IdTokenInvalid(f"ID token signature is invalid ({e.error})") from None
        except ValueError:
            raise IdTokenInvalid("ID token is malformed") from None
        if claims.get("iss") != self.issuer:
            raise IdTokenInvalid("ID token was issued by another issuer")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.client_id not in auds:
            raise IdTokenInvalid("ID token is not for this gateway's client_id")
        if len(auds) > 1 and claims.get("azp") != self.client_id:
            raise IdTokenInvalid("ID token has several audiences and azp is not this gateway's client_id")
        now = self.clock()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or isinstance(exp, bool) or now >= exp + self.cfg.leeway_s:
            raise IdTokenInvalid("ID token has expired")
        if not isinstance(iat, int | float) or isinstance(iat, bool) or iat > now + self.cfg.leeway_s:
            raise IdTokenInvalid("ID token was issued in the future")
        if nonce is not None and not (isinstance(claims.get("nonce"), str)
                                      and secrets.compare_digest(claims["nonce"].encode(), nonce.encode())):
            raise IdTokenInvalid("ID token nonce does not match this sign-in")
        return claims

    # -- grants ------------------------------------------------------------------

    def _client_form(self) -> dict[str, str]:
        form = {"client_id": self.client_id}
        if self._secret is not None:
            form["client_secret"] = self._secret  # client_secret_post: one code path for all IdPs
        return form

    async def _post(self, url: str, form: dict[str, str]) -> dict[str, Any]:
        try:
            async with self._http.post(url, data={**self._client_form(), **form},
                                       headers={"Accept": "application/json"},
                                       timeout=aiohttp.ClientTimeout(total=15)) as r:
                try:
                    doc = await r.json(content_type=None)
                except ValueError:
                    doc = None
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise IdpUnavailable(f"POST {url}: {e}") from None
        if not isinstance(doc, dict):
            raise IdpUnavailable(f"POST {url}: HTTP {status} without a JSON object")
        if status == 200:
            return doc
        if isinstance(doc.get("error"), str):
            raise IdpError(doc["error"], str(doc.get("error_description") or ""), status)
        raise IdpUnavailable(f"POST {url}: HTTP {status}")

    async def authorization_url(self, redirect_uri: str, state: str, nonce: str, challenge: str) -> str:
        meta = await self.metadata()
        q = urlencode({"response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
                       "scope": " ".join(self.scopes), "state": state, "nonce": nonce,
                       "code_challenge": challenge, "code_challenge_method": "S256"})
        sep = "&" if "?" in meta.authorization_endpoint else "?"
        return meta.authorization_endpoint + sep + q

    async def exchange_code(self, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        meta = await self.metadata()
        return await self._post(meta.token_endpoint, {"grant_type": "authorization_code", "code": code,
                                                      "redirect_uri": redirect_uri, "code_verifier": verifier})

    async def device_authorization(self) -> dict[str, Any]:
        meta = await self.metadata()
        if not meta.device_authorization_endpoint:
            raise IdpError("unsupported_grant_type", "the identity provider does not offer the device flow")
        doc = await self._post(meta.device_authorization_endpoint, {"scope": " ".join(self.scopes)})
        for k in ("device_code", "user_code", "verification_uri"):
            if not isinstance(doc.get(k), str):
                raise IdpUnavailable(f"device authorization response lacks {k}")
        return doc

    async def poll_device(self, device_code: str) -> dict[str, Any]:
        meta = await self.metadata()
        return await self._post(meta.token_endpoint, {"grant_type": DEVICE_GRANT, "device_code": device_code})

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        meta = await self.metadata()
        return await self._post(meta.token_endpoint, {"grant_type": "refresh_token",
                                                      "refresh_token": refresh_token})

    async def revoke(self, refresh_token: str) -> None:
        """Best effort (RFC 7009): the gateway session is revoked whatever the IdP says."""
        meta = await self.metadata()
        if not meta.revocation_endpoint:
            return
        try:
            await self._post(meta.revocation_endpoint, {"token": refresh_token, "token_type_hint": "refresh_token"})
        except (IdpError, IdpUnavailable) as e:
            log.warning("IdP refresh token revocation failed: %s", e)

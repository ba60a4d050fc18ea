"""Gateway session tokens: short-lived JWTs the sign-in service mints after an IdP sign-in.

Signed with the gateway's Ed25519 key (signin/keys.py); `typ` marks them so extauth can
tell them from IdP tokens without signature work. Claims:
`iss` (the gateway, `identity.signin.token_issuer`), `aud` ("ccr"), `sub` (the IdP's
subject), `idp` (the IdP's issuer), `sid` (the session: revoking it ends every token
minted for it), `name`, `groups`, `tenant` (optional), `iat`, `nbf`, `exp`, `jti`.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OKPKey

from signin.keys import ALG

TYP = "ccr-session+jwt"
AUDIENCE = "ccr"
# A session token is a few hundred bytes; anything far larger is not one of ours.
MAX_TOKEN_BYTES = 8192


class TokenRejected(Exception):
    """Why a session token is refused, in words for the caller."""


@dataclass(frozen=True, slots=True)
class SessionClaims:
    sid: str
    sub: str
    idp: str
    name: str
    groups: tuple[str, ...]
    tenant: str | None
    iat: int
    exp: int

    @property
    def principal_id(self) -> str:
        # The same id an IdP token for this user gets: limits and audit rows join up.
        return f"oidc:{self.idp}#{self.sub}"


def mint(key: OKPKey, issuer: str, sid: str, sub: str, idp: str, name: str, groups: tuple[str, ...],
         tenant: str | None, ttl_s: int, now: float) -> tuple[str, int]:
    """A signed session token and its expiry (unix seconds)."""
    iat = int(now)
    exp = iat + ttl_s
    claims: dict[str, object] = {
        "iss": issuer, "aud": AUDIENCE, "sub": sub, "idp": idp, "sid": sid, "name": name,
        "groups": list(groups), "iat": iat, "nbf": iat, "exp": exp, "jti": secrets.token_urlsafe(12),
    }
    if tenant is not None:
        claims["tenant"] = tenant
    token = jwt.encode({"alg": ALG, "kid": key.kid, "typ": TYP}, claims, key, algorithms=[ALG])
    return token, exp


def header_of(token: str) -> dict | None:
    """The JOSE header of a compact JWT, or None; no signature work."""
    head, dot, _ = token.partition(".")
    if not dot or len(head) > 1024:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def looks_like_session_token(token: str) -> bool:
    h = header_of(token)
    return h is not None and h.get("typ") == TYP


def _str(claims: dict, name: str) -> str:
    v = claims.get(name)
    if not isinstance(v, str) or not v:
        raise TokenRejected(f"session token lacks the '{name}' claim")
    return v


def _time(claims: dict, name: str) -> int:
    v = claims.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TokenRejected(f"session token's '{name}' claim is not a whole number of seconds")
    return v


def verify(token: str, keys: KeySet, issuer: str, now: float, leeway_s: int, check_times: bool = True) -> SessionClaims:
    """Check signature, algorithm, issuer, audience and times; raise TokenRejected with the reason.

    `check_times=False` is for signing out with a token that may have expired meanwhile."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("session token is too large")
    header = header_of(token)
    if header is None:
        raise TokenRejected("session token is malformed")
    if header.get("alg") != ALG:
        raise TokenRejected(f"session token algorithm {header.get('alg')!r} is not accepted (only {ALG})")
    kid = header.get("kid")
    if not isinstance(kid, str) or not any(k.kid == kid for k in keys.keys):
        raise TokenRejected("session token was signed by a key this gateway does not know")
    try:
        claims = jwt.decode(token, keys, algorithms=[ALG]).claims
    except JoseError as e:
        raise TokenRejected(f"session token signature is invalid ({e.error})") from None
    except ValueError:
        raise TokenRejected("session token is malformed") from None
    if claims.get("iss") != issuer:
        raise TokenRejected("session token was not issued by this gateway (iss)")
    aud = claims.get("aud")
    if aud != AUDIENCE and not (isinstance(aud, list) and AUDIENCE in aud):
        raise TokenRejected("session token is not meant for this gateway (aud)")
    exp, iat = _time(claims, "exp"), _time(claims, "iat")
    nbf = _time(claims, "nbf") if "nbf" in claims else iat
    if check_times and now >= exp + leeway_s:
        raise TokenRejected("session token has expired; refresh it (`ccr login --print-token`) or sign in again "
                            "(`ccr login`)")
    if check_times and now + leeway_s < max(nbf, iat):
        raise TokenRejected("session token is not valid yet (check the clock)")
    groups = claims.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise TokenRejected("session token's 'groups' claim is not a list of strings")
    tenant = claims.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise TokenRejected("session token's 'tenant' claim is not a string")
    return SessionClaims(sid=_str(claims, "sid"), sub=_str(claims, "sub"), idp=_str(claims, "idp"),
                         name=_str(claims, "name"), groups=tuple(groups), tenant=tenant, iat=iat, exp=exp)

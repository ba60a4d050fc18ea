"""OIDC bearer tokens (JWT access or ID tokens from trusted IdPs) -> a USER Principal.

Several issuers at once, from `identity.oidc` in the config. A token's unverified `iss`
only picks which issuer's keys to try; the signature, then iss/aud/exp/nbf/iat are
verified with joserfc against that issuer's JWKS (fetched via discovery, cached and
refreshed in the background). An unknown `kid` triggers one JWKS refetch, at most once
per REFETCH_MIN_INTERVAL_S per issuer, so garbage kids cannot make us hammer the IdP.

Verified tokens are cached by sha256 until they expire, so a token already seen costs a
hash and a dict lookup, no signature work. Every failure is Deny(401, authentication_error).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import ssl
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import certifi
import orjson
from joserfc import jwt
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError, SecurityWarning
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey
from joserfc.jwt import JWTClaimsRegistry

from ccr.config import OidcIssuer, https_or_loopback
from extauth.deny import Deny
from extauth.principal import Principal, PrincipalKind

log = logging.getLogger(__name__)

# "EdDSA" is the name every IdP publishes today; RFC 9864's rename is not a weakness.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)

MAX_TOKEN_BYTES = 16 * 1024  # refused before any parsing
MAX_JWKS_BYTES = 1024 * 1024
REFETCH_MIN_INTERVAL_S = 30.0  # JWKS fetches on demand (unknown kid, no keys yet), per issuer
REFRESH_INTERVAL_S = 300.0  # background JWKS refresh
FETCH_TIMEOUT_S = 5.0
TOKEN_CACHE_MAX = 100_000
REJECT_CACHE_MAX = 10_000
MAX_GROUPS = 256

_KEY_TYPES: dict[str, type[Key]] = {"RSA": RSAKey, "EC": ECKey, "OKP": OKPKey}  # never "oct"
_ALG_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


def _refuse(reason: str) -> Deny:
    return Deny(401, "authentication_error", f"invalid bearer token: {reason}")


def _b64json(segment: str) -> Any:
    pad = "=" * (-len(segment) % 4)
    try:
        return orjson.loads(base64.urlsafe_b64decode(segment + pad))
    except (binascii.Error, ValueError):
        return None


def unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(header, payload) of a compact JWS, or None when it is not one. Nothing is trusted yet."""
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        return None
    h, p, s = token.split(".")
    if not (h and p and s):
        return None
    header, payload = _b64json(h), _b64json(p)
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    return header, payload


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    exp: float


class IssuerKeys:
    """One issuer's signing keys: discovery + JWKS over HTTP, cached, refetched on demand (rate limited)."""

    def __init__(self, cfg: OidcIssuer, clock: Callable[[], float], http: Callable[[], aiohttp.ClientSession]):
        self.cfg = cfg
        self.clock = clock
        self._http = http
        self.keys: dict[str, Key] = {}
        self._jwks_url = cfg.jwks_url
        self._last_fetch: float | None = None  # clock() of the last on-demand attempt
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def _get_json(self, url: str) -> Any:
        async with self._http().get(url, allow_redirects=False) as r:
            if r.status != 200:
                raise OSError(f"GET {url}: HTTP {r.status}")
            body = await r.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise OSError(f"GET {url}: document larger than {MAX_JWKS_BYTES} bytes")
            return orjson.loads(body)

    async def fetch(self) -> None:
        """Discovery (unless jwks_url is configured) then the JWKS; keeps the old keys on failure."""
        self.fetches += 1
        if self._jwks_url is None:
            url = self.cfg.discovery_url or self.cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = await self._get_json(url)
            named = doc.get("issuer") if isinstance(doc, dict) else None
            if named != self.cfg.issuer:  # OIDC discovery: the document must name the same issuer
                raise OSError(f"discovery at {url} names issuer {named!r}, not {self.cfg.issuer!r}")
            jwks_uri = doc.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not https_or_loopback(jwks_uri):
                raise OSError(f"discovery at {url}: jwks_uri must be an https URL, got {str(jwks_uri)[:200]!r}")
            self._jwks_url = jwks_uri
        jwks = await self._get_json(self._jwks_url)
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise OSError(f"{self._jwks_url}: not a JWK set")
        keys: dict[str, Key] = {}
        for i, raw in enumerate(jwks["keys"]):
            if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
                continue
            cls = _KEY_TYPES.get(raw.get("kty"))  # symmetric ("oct") keys are never imported
            if cls is None or any(p in raw for p in ("d", "p", "q", "k")):
                continue  # private parts published by mistake: do not use that key at all
            try:
                key = cls.import_key(raw)
            except (JoseError, ValueError, TypeError) as e:
                log.warning("issuer %s: skipping JWK %d: %s", self.cfg.issuer, i, e)
                continue
            keys[str(raw.get("kid", ""))] = key
        self.keys = keys

    async def refetch(self, reason: str) -> bool:
        """An on-demand fetch, at most once per REFETCH_MIN_INTERVAL_S; True when one ran and succeeded."""
        async with self._lock:
            now = self.clock()
            if self._last_fetch is not None and now - self._last_fetch < REFETCH_MIN_INTERVAL_S:
                return False
            self._last_fetch = now
            try:
                await self.fetch()
            except Exception as e:  # an IdP problem must refuse the token (401), never fail the check (503)
                log.warning("issuer %s: JWKS fetch (%s) failed: %s", self.cfg.issuer, reason, e)
                return False
            return True

    async def key_for(self, kid: str | None) -> Key | None:
        key = self._lookup(kid)
        if key is None:
            # Maybe the IdP rotated. Concurrent callers queue on the lock, so one fetch serves them all.
            await self.refetch("unknown kid" if self.keys else "no keys yet")
            key = self._lookup(kid)
        return key

    def _lookup(self, kid: str | None) -> Key | None:
        if kid is not None:
            return self.keys.get(kid)
        # No kid: only unambiguous when the issuer publishes exactly one key.
        return next(iter(self.keys.values())) if len(self.keys) == 1 else None


class OidcVerifier:
    """A TokenVerifier for JWTs from the configured issuers."""

    def __init__(self, issuers: Sequence[OidcIssuer], clock: Callable[[], float] = time.time,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.clock = clock
        self._session = session
        self.issuers = {i.issuer: IssuerKeys(i, clock, self._http) for i in issuers}
        self._verified: dict[bytes, _Verified] = {}
        self._rejected: dict[bytes, str] = {}  # tokens whose signature or shape is bad, for good
        self._refresher: asyncio.Task | None = None
        self.signature_checks = 0  # how many tokens needed signature work (the cache's proof)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # The same CA bundle the router trusts for providers; no proxy from the environment.
            tls = ssl.create_default_context(cafile=certifi.where())
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S),
                                                  connector=aiohttp.TCPConnector(ssl=tls))
        return self._session

    # -- lifecycle --------------------------------------------------------------

    async def start(self, refresh_interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Fetch every issuer's keys once (failures are logged, not fatal) and keep them fresh."""
        async def first(k: IssuerKeys) -> None:
            try:  # not an on-demand fetch: a rotation right after start may still refetch at once
                await k.fetch()
            except Exception as e:
                log.warning("issuer %s: first JWKS fetch failed (retrying in the background): %s", k.cfg.issuer, e)

        await asyncio.gather(*(first(k) for k in self.issuers.values()))
        self._refresher = asyncio.create_task(self._refresh_loop(refresh_interval_s), name="oidc-jwks-refresh")

    async def _refresh_loop(self, interval_s: float) -> None:
        while True:
            # An issuer with no keys yet (IdP down at start) is retried sooner, still at a gentle pace.
            keyless = any(not k.keys for k in self.issuers.values())
            await asyncio.sleep(min(interval_s, 5.0) if keyless else interval_s)
            for k in self.issuers.values():
                try:
                    await k.fetch()
                except Exception as e:  # keep the keys we have; try again next round
                    log.warning("issuer %s: background JWKS refresh failed: %s", k.cfg.issuer, e)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._session is not None:
            await self._session.close()

    # -- TokenVerifier ------------------------------------------------------------

    def accepts(self, token: str) -> bool:
        """Ours if already verified, too large to judge (refused clearly), or its `iss` is one of ours."""
        if len(token) > MAX_TOKEN_BYTES:
            return token.startswith("eyJ")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in self._verified or digest in self._rejected:
            return True
        parts = unverified_parts(token)
        return parts is not None and parts[1].get("iss") in self.issuers

    async def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise _refuse(f"larger than {MAX_TOKEN_BYTES} bytes")
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = self._verified.get(digest)
        if hit is not None:
            if now < hit.exp:
                return hit.principal
            del self._verified[digest]
        reason = self._rejected.get(digest)
        if reason is not None:
            raise _refuse(reason)
        try:
            principal, exp = await self._verify_new(token, now)
        except _Permanent as e:
            if len(self._rejected) >= REJECT_CACHE_MAX:
                self._rejected.clear()
            self._rejected[digest] = e.reason
            raise _refuse(e.reason) from None
        self._remember(digest, principal, exp, now)
        return principal

    def _remember(self, digest: bytes, principal: Principal, exp: float, now: float) -> None:
        if len(self._verified) >= TOKEN_CACHE_MAX:
            for d in [d for d, v in self._verified.items() if v.exp <= now]:
                del self._verified[d]
            if len(self._verified) >= TOKEN_CACHE_MAX:
                self._verified.clear()
        self._verified[digest] = _Verified(principal, exp)

    async def _verify_new(self, token: str, now: float) -> tuple[Principal, float]:
        parts = unverified_parts(token)
        if parts is None:
            raise _Permanent("not a signed JWT (expected three base64url JSON segments)")
        header, payload = parts
        iss = payload.get("iss")
        keys = self.issuers.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise _refuse("issuer is not trusted by this gateway")
        cfg = keys.cfg
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            raise _Permanent(f"algorithm {str(alg)[:20]!r} is not allowed (allowed: {', '.join(cfg.algorithms)})")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Permanent("kid must be a string")
        key = await keys.key_for(kid)
        if key is None:
            # Not permanent: the IdP may publish this kid later (rotation).
            raise _refuse("signed with a key this issuer does not publish (unknown kid)")
        key_alg = key.get("alg")
        if key_alg is not None and key_alg != alg:
            raise _Permanent(f"key {kid!r} is for {key_alg}, not {alg}")
        if _ALG_KTY.get(alg[:2]) != key.key_type:
            raise _Permanent(f"algorithm {alg} does not fit a {key.key_type} key")
        self.signature_checks += 1
        try:
            claims = jwt.decode(token, key, algorithms=[alg]).claims
        except JoseError as e:
            raise _Permanent(f"signature or encoding is invalid ({e.error})") from None
        except (ValueError, TypeError):
            raise _Permanent("signature or encoding is invalid") from None
        registry = JWTClaimsRegistry(
            now=int(now), leeway=cfg.leeway_s,
            iss={"essential": True, "value": cfg.issuer},
            aud={"essential": True, "values": list(cfg.audiences)},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise _Permanent("the token has expired; sign in again") from None
        except MissingClaimError as e:
            raise _Permanent(f"required claim missing: {e.claim}") from None
        except InvalidClaimError as e:
            if e.claim == "aud":
                raise _Permanent("audience is not accepted by this gateway") from None
            if e.claim in ("nbf", "iat"):
                raise _refuse(f"not valid yet ({e.claim} is in the future)") from None
            raise _Permanent(f"claim {e.claim!r} is invalid") from None
        return self._principal(cfg, claims), float(claims["exp"]) + cfg.leeway_s

    @staticmethod
    def _principal(cfg: OidcIssuer, claims: dict[str, Any]) -> Principal:
        uid = claims.get(cfg.user_claim)
        if not isinstance(uid, str) or not uid:
            raise _Permanent(f"claim {cfg.user_claim!r} (the user id) is missing or not a string")
        name = next((v for c in cfg.name_claims if isinstance(v := claims.get(c), str) and v), uid)
        raw_groups = claims.get(cfg.groups_claim, [])
        if isinstance(raw_groups, str):
            raw_groups = [raw_groups]
        if not isinstance(raw_groups, list):
            raise _Permanent(f"claim {cfg.groups_claim!r} must be a list of strings")
        idp_groups = [g for g in raw_groups[:MAX_GROUPS] if isinstance(g, str) and g]
        if cfg.group_map:
            groups = tuple(dict.fromkeys(m for g in idp_groups for m in cfg.group_map.get(g, ())))
        else:
            groups = tuple(dict.fromkeys(idp_groups))
        tenant = claims.get(cfg.tenant_claim) if cfg.tenant_claim else None
        extra = tuple(sorted((c, v if isinstance(v, str) else orjson.dumps(v).decode())
                             for c in cfg.extra_claims if (v := claims.get(c)) is not None))
        return Principal(kind=PrincipalKind.USER, id=f"oidc:{cfg.issuer}#{uid}", name=name, groups=groups,
                         tenant=tenant if isinstance(tenant, str) and tenant else None, issuer=cfg.issuer,
                         claims=extra)


class _Permanent(Exception):
    """A refusal that no later state (key rotation, time passing) can turn into an accept."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

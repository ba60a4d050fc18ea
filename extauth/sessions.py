"""Gateway session tokens in extauth: signature and claims, then "is the session still live?".

Checking a token costs an Ed25519 verification (~0.2 ms), so a verified token is
remembered until it expires and later requests with it do no signature work. Whether
its session is live is cached per session id; the sign-in service NOTIFYs
SESSIONS_CHANNEL when it revokes one, and the listener drops it from the cache, so a
revocation takes effect within milliseconds (the TTL is the backstop for a missed
notification, as for API keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from joserfc.jwk import KeySet
from psycopg_pool import AsyncConnectionPool

from ccr.config import GatewayConfig
from ccr.contract import SESSIONS_CHANNEL
from ccr.listen import listen_forever
from ccr.runtime import Runtime
from extauth.deny import Deny
from extauth.principal import Principal, PrincipalKind
from signin import tokens
from signin.keys import PUBLIC_KEYS, KeyFile, KeyFileError, load_public_keys

log = logging.getLogger(__name__)

SESSION_ENDED = ("your gateway session has ended (signed out, revoked, or the identity provider no longer "
                 "knows you); sign in again with `ccr login`")


class SessionStatus:
    """Is a session live? Cached per session id, invalidated by NOTIFY."""

    def __init__(self, dsn: str, ttl_s: float = 10.0, max_entries: int = 100_000) -> None:
        self._dsn = dsn
        self._ttl = ttl_s
        self._max = max_entries
        self._cache: dict[str, tuple[float, bool]] = {}
        self._generation = 0
        self._pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True})
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    async def start(self) -> None:
        await self._pool.open(wait=True, timeout=10)
        self._listener = asyncio.create_task(self._listen(), name="sessions-listen")
        await asyncio.wait_for(self.listening.wait(), timeout=10)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pool.close()

    def forget(self, sid: str | None = None) -> None:
        self._generation += 1
        if sid is None:
            self._cache.clear()
        else:
            self._cache.pop(sid, None)

    async def live(self, sid: str) -> bool:
        hit = self._cache.get(sid)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        gen = self._generation
        async with self._pool.connection(timeout=5) as conn:
            cur = await conn.execute("SELECT revoked_at IS NULL AND expires_at > now() FROM signin_sessions"
                                     " WHERE id = %s", (sid,))
            row = await cur.fetchone()
        ok = bool(row and row[0])
        # A revocation heard while we were reading must not be overwritten by what we read.
        if gen == self._generation:
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[sid] = (time.monotonic() + self._ttl, ok)
        return ok

    async def _listen(self) -> None:
        # Also forget on loss: while deaf to revocations, ask the database every time.
        await listen_forever(self._dsn, SESSIONS_CHANNEL, on_connected=self.forget,
                             on_notify=lambda payload: self.forget(payload or None), on_lost=self.forget,
                             listening=self.listening, what="session revocation")

class SessionTokenVerifier:
    """extauth's TokenVerifier for the gateway's own session tokens."""

    def __init__(self, keys: KeySet | KeyFile[KeySet], issuer: str, status: SessionStatus, leeway_s: int = 30,
                 clock: Callable[[], float] = time.time, max_cached: int = 50_000) -> None:
        # A KeyFile follows key rotation on disk (checked at most once a second).
        self._keyfile = keys if isinstance(keys, KeyFile) else None
        self.keys: KeySet = keys.value if isinstance(keys, KeyFile) else keys
        self.issuer = issuer
        self.status = status
        self.leeway_s = leeway_s
        self.clock = clock
        self._max = max_cached
        self._verified: dict[str, tokens.SessionClaims] = {}
        self.signature_checks = 0

    def accepts(self, token: str) -> bool:
        return tokens.looks_like_session_token(token)

    def _claims(self, token: str) -> tokens.SessionClaims:
        if self._keyfile is not None and self._keyfile.refresh():
            # New key set: a removed key must stop working now, so forget what it verified.
            self.keys = self._keyfile.value
            self._verified.clear()
        now = self.clock()
        claims = self._verified.get(token)
        if claims is not None:
            if now < claims.exp + self.leeway_s:
                return claims
            del self._verified[token]
        self.signature_checks += 1
        try:
            claims = tokens.verify(token, self.keys, self.issuer, now, self.leeway_s)
        except tokens.TokenRejected as e:
            raise Deny(401, "authentication_error", f"invalid session token: {e}") from None
        if len(self._verified) >= self._max:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    async def verify(self, token: str) -> Principal:
        c = self._claims(token)
        if not await self.status.live(c.sid):
            raise Deny(401, "authentication_error", SESSION_ENDED)
        return Principal(kind=PrincipalKind.USER, id=c.principal_id, name=c.name, groups=c.groups,
                         tenant=c.tenant, issuer=self.issuer)


async def session_verifier(config: GatewayConfig, runtime: Runtime) -> SessionTokenVerifier | None:
    """The started verifier when sign-in is configured (stop it with `await v.status.close()`)."""
    s = config.identity.signin
    if s is None:
        return None
    if not runtime.signin_key_dir:
        raise SystemExit("extauth: identity.signin is set but the runtime names no signin_key_dir")
    try:
        keys = KeyFile(Path(runtime.signin_key_dir) / PUBLIC_KEYS, load_public_keys)
    except (OSError, KeyFileError) as e:
        raise SystemExit(f"extauth: {e}") from None
    status = SessionStatus(runtime.postgres_dsn)
    await status.start()
    return SessionTokenVerifier(keys, s.token_issuer, status, s.leeway_s)

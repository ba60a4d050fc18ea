"""The sessions table (migration 5) as the sign-in service uses it.

A session is one sign-in of one person. The gateway hands the client a session token
(a JWT, minted per refresh) and an opaque refresh token stored only as its sha256; the
IdP's refresh token stays here, sealed. Every revocation is announced on
SESSIONS_CHANNEL in the same transaction, so extauth drops the session at commit.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from ccr.contract import SESSIONS_CHANNEL
from signin.keys import Sealer

REFRESH_PREFIX = "ccrr_"
HANDOFF_PREFIX = "ccrh_"

_COLS = "id, idp_issuer, subject, name, groups, tenant, idp_refresh_sealed, expires_at"


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    idp_issuer: str
    subject: str
    name: str
    groups: tuple[str, ...]
    tenant: str | None
    idp_refresh_sealed: bytes | None
    expires_at: datetime


def _session(row: tuple) -> Session:
    sid, iss, sub, name, groups, tenant, sealed, exp = row
    return Session(sid, iss, sub, name, tuple(groups or ()), tenant, bytes(sealed) if sealed else None, exp)


class SessionStore:
    def __init__(self, dsn: str, sealer: Sealer) -> None:
        self._pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True})
        self._sealer = sealer

    async def start(self) -> None:
        await self._pool.open(wait=True, timeout=10)

    async def close(self) -> None:
        await self._pool.close()

    def _seal_idp_refresh(self, sid: str, token: str | None) -> bytes | None:
        # Bound to its row: a sealed token copied into another session does not open.
        return self._sealer.seal(token.encode(), f"idp-refresh:{sid}") if token else None

    def idp_refresh_token(self, s: Session) -> str | None:
        if s.idp_refresh_sealed is None:
            return None
        plain = self._sealer.open(s.idp_refresh_sealed, f"idp-refresh:{s.id}")
        return plain.decode() if plain is not None else None

    async def create(self, *, idp_issuer: str, subject: str, name: str, groups: tuple[str, ...],
                     tenant: str | None, flow: str, idp_refresh: str | None, max_age_s: int,
                     handoff_challenge: str | None = None, handoff_ttl_s: int = 120) -> tuple[str, str]:
        """A new session: (session id, secret). The secret is the gateway refresh token,
        or, with `handoff_challenge`, a one-time code for the CLI's loopback redirect."""
        sid = "ses_" + secrets.token_urlsafe(12)
        if handoff_challenge is None:
            secret = REFRESH_PREFIX + secrets.token_urlsafe(32)
            refresh_hash, handoff_hash = digest(secret), None
        else:
            secret = HANDOFF_PREFIX + secrets.token_urlsafe(32)
            refresh_hash, handoff_hash = None, digest(secret)
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO signin_sessions (id, idp_issuer, subject, name, groups, tenant, flow, refresh_hash,"
                " idp_refresh_sealed, handoff_hash, handoff_challenge, handoff_expires_at, expires_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " now() + make_interval(secs => %s), now() + make_interval(secs => %s))",
                (sid, idp_issuer, subject, name, list(groups), tenant, flow, refresh_hash,
                 self._seal_idp_refresh(sid, idp_refresh), handoff_hash, handoff_challenge,
                 handoff_ttl_s, max_age_s))
        return sid, secret

    async def redeem_handoff(self, code: str, challenge: str) -> tuple[Session, str] | None:
        """Trade a one-time handoff code (with the S256 challenge of the caller's verifier) for
        the session and its first refresh token; None if unknown, used, expired or mismatched."""
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"UPDATE signin_sessions SET handoff_hash = NULL, handoff_challenge = NULL, refresh_hash = %s"
                f" WHERE handoff_hash = %s AND handoff_challenge = %s AND handoff_expires_at > now()"
                f" AND revoked_at IS NULL AND expires_at > now() RETURNING {_COLS}",
                (digest(refresh), digest(code), challenge))
            row = await cur.fetchone()
        return (_session(row), refresh) if row else None

    async def by_refresh_token(self, token: str) -> Session | None:
        """The live session this refresh token belongs to. A token that was already
        replaced by a refresh revokes its session: someone else holds a copy."""
        h = digest(token)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLS} FROM signin_sessions WHERE refresh_hash = %s"
                f" AND revoked_at IS NULL AND expires_at > now()", (h,))
            row = await cur.fetchone()
            if row is not None:
                return _session(row)
            cur = await conn.execute("SELECT id FROM signin_sessions WHERE prev_refresh_hash = %s"
                                     " AND revoked_at IS NULL", (h,))
            reused = await cur.fetchone()
        if reused is not None:
            await self.revoke(reused[0], "a replaced refresh token was presented again")
        return None

    async def rotate(self, s: Session, old_token: str, *, idp_refresh: str | None, name: str,
                     groups: tuple[str, ...], tenant: str | None) -> str | None:
        """After a successful IdP refresh: a new gateway refresh token replaces `old_token`
        and the IdP's (possibly rotated) refresh token is stored. None if a concurrent
        refresh or a revocation got there first."""
        new = REFRESH_PREFIX + secrets.token_urlsafe(32)
        sealed = self._seal_idp_refresh(s.id, idp_refresh) if idp_refresh else s.idp_refresh_sealed
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE signin_sessions SET refresh_hash = %s, prev_refresh_hash = refresh_hash,"
                " idp_refresh_sealed = %s, name = %s, groups = %s, tenant = %s, refreshed_at = now()"
                " WHERE id = %s AND refresh_hash = %s AND revoked_at IS NULL AND expires_at > now() RETURNING id",
                (digest(new), sealed, name, list(groups), tenant, s.id, digest(old_token)))
            row = await cur.fetchone()
        return new if row else None

    async def revoke(self, sid: str, reason: str) -> Session | None:
        """Revoke a live session; extauth hears of it at commit. None if it was not live."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                f"UPDATE signin_sessions SET revoked_at = now(), revoked_reason = %s, refresh_hash = NULL,"
                f" handoff_hash = NULL WHERE id = %s AND revoked_at IS NULL RETURNING {_COLS}", (reason, sid))
            row = await cur.fetchone()
            if row is not None:
                await conn.execute("SELECT pg_notify(%s, %s)", (SESSIONS_CHANNEL, sid))
        return _session(row) if row else None

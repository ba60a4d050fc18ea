"""`ccr sessions list|revoke`: what an administrator sees and ends (sync, for the CLI).

Revoking every session of a person is the offboarding step that does not wait for the
IdP: their session tokens stop working within a second (NOTIFY, as for the sign-in
service's own revocations) and their refresh tokens are dead at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from ccr.contract import SESSIONS_CHANNEL


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    idp_issuer: str
    subject: str
    name: str
    groups: tuple[str, ...]
    flow: str
    created_at: datetime
    refreshed_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None


_COLS = ("id, idp_issuer, subject, name, groups, flow, created_at, refreshed_at, expires_at, revoked_at,"
         " revoked_reason")


def list_sessions(dsn: str, include_ended: bool = False, subject: str | None = None) -> list[SessionRow]:
    where, params = [], []
    if not include_ended:
        where.append("revoked_at IS NULL AND expires_at > now()")
    if subject is not None:
        where.append("subject = %s")
        params.append(subject)
    sql = f"SELECT {_COLS} FROM signin_sessions" + (f" WHERE {' AND '.join(where)}" if where else "")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(sql + " ORDER BY created_at, id", params).fetchall()
    return [SessionRow(r[0], r[1], r[2], r[3], tuple(r[4] or ()), *r[5:]) for r in rows]


def revoke_sessions(dsn: str, *, session_id: str | None = None, subject: str | None = None,
                    reason: str = "revoked by an administrator") -> list[str]:
    """Revoke one live session, or every live session of a subject; returns the ids ended."""
    if (session_id is None) == (subject is None):
        raise ValueError("name exactly one of a session id or a subject")
    column, value = ("id", session_id) if session_id is not None else ("subject", subject)
    with psycopg.connect(dsn) as conn:
        ids = [r[0] for r in conn.execute(
            f"UPDATE signin_sessions SET revoked_at = now(), revoked_reason = %s, refresh_hash = NULL,"
            f" handoff_hash = NULL WHERE {column} = %s AND revoked_at IS NULL RETURNING id", (reason, value))]
        for sid in ids:  # delivered at commit, once the revocation is visible
            conn.execute("SELECT pg_notify(%s, %s)", (SESSIONS_CHANNEL, sid))
    return ids

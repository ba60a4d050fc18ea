"""Ownership of provider-side objects (Message Batches, Files) in PostgreSQL.

The provider sees one credential for the whole organisation, so it cannot tell whose
batch or file an id is; this table can. The adapter records an object when the
provider's create reply comes back and marks a batch metered when its results are
first fetched; extauth reads the owner before any request that names an object id.
Table: `provider_objects` (ccr/db.py migration 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from psycopg_pool import AsyncConnectionPool


class ObjectKind(StrEnum):
    BATCH = "batch"
    FILE = "file"


@dataclass(frozen=True, slots=True)
class Owned:
    provider: str
    owner_principal_id: str
    # Batches: the gateway request id of the create, whose budget hold its results release (migration 13).
    create_request_id: str | None = None


class ObjectStore:
    """A small pool opened on first use: only batch and file requests ever touch it."""

    def __init__(self, dsn: str, max_size: int = 4) -> None:
        self._pool = AsyncConnectionPool(dsn, min_size=0, max_size=max_size, open=False,
                                         kwargs={"autocommit": True})
        self._opened = False

    async def _conn(self):  # type: ignore[no-untyped-def]
        if not self._opened:
            await self._pool.open(wait=False)
            self._opened = True
        # Under the ext_proc message timeout (5s), so a database outage gets our own error.
        return self._pool.connection(timeout=3)

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()

    async def owner(self, kind: ObjectKind, object_id: str) -> Owned | None:
        async with await self._conn() as conn:
            cur = await conn.execute(
                "SELECT provider, owner_principal_id, create_request_id FROM provider_objects"
                " WHERE kind = %s AND object_id = %s", (str(kind), object_id))
            row = await cur.fetchone()
        return None if row is None else Owned(row[0], row[1], row[2])

    async def record(self, kind: ObjectKind, object_id: str, provider: str, owner: str,
                     request_count: int | None = None, create_request_id: str | None = None) -> None:
        """Claim a new object for `owner`. An id already owned by someone else is never re-assigned."""
        async with await self._conn() as conn:
            cur = await conn.execute(
                "INSERT INTO provider_objects (kind, object_id, provider, owner_principal_id, request_count,"
                " create_request_id) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (kind, object_id) DO NOTHING"
                " RETURNING owner_principal_id",
                (str(kind), object_id, provider, owner, request_count, create_request_id))
            if await cur.fetchone() is None:
                raise ValueError(f"{kind} {object_id} is already recorded; ownership is not re-assigned")

    async def owned_among(self, kind: ObjectKind, ids: list[str], owner: str) -> set[str]:
        """Which of `ids` belong to `owner`."""
        if not ids:
            return set()
        async with await self._conn() as conn:
            cur = await conn.execute(
                "SELECT object_id FROM provider_objects"
                " WHERE kind = %s AND owner_principal_id = %s AND object_id = ANY(%s)",
                (str(kind), owner, ids))
            return {r[0] for r in await cur.fetchall()}

    async def mark_metered(self, object_id: str) -> bool:
        """True exactly once per batch: for the fetch whose results are metered."""
        async with await self._conn() as conn:
            cur = await conn.execute(
                "UPDATE provider_objects SET metered_at = now()"
                " WHERE kind = 'batch' AND object_id = %s AND metered_at IS NULL RETURNING 1",
                (object_id,))
            return await cur.fetchone() is not None

    async def mark_deleted(self, kind: ObjectKind, object_id: str) -> None:
        async with await self._conn() as conn:
            await conn.execute(
                "UPDATE provider_objects SET deleted_at = now() WHERE kind = %s AND object_id = %s"
                " AND deleted_at IS NULL", (str(kind), object_id))

"""API keys: creation, listing and revocation (sync, for the CLI) and the async
lookup cache the ext_authz service uses on every request.

A key is `ccr_` + 43 url-safe characters. Only its sha256 is stored; the plaintext
exists once, in the return value of `create_key`. Changes are announced with
NOTIFY on `KEYS_CHANNEL`; a running extauth LISTENs and drops its cache, so a
revocation takes effect within milliseconds. The cache TTL is the backstop for a
missed notification (listener reconnecting, DB failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

KEY_PREFIX = "ccr_"
KEYS_CHANNEL = "ccr_api_keys"
# Characters of the key kept in clear to recognise it in listings ("ccr_" + 8).
DISPLAY_PREFIX_LEN = 12
DEFAULT_GROUPS = ("default",)

_COLUMNS = "id, name, key_prefix, groups, rpm, created_at, revoked_at"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    key_prefix: str
    groups: tuple[str, ...]
    rpm: int | None
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _record(row: tuple) -> KeyRecord:
    kid, name, prefix, groups, rpm, created, revoked = row
    return KeyRecord(kid, name, prefix, tuple(groups or ()), rpm, created, revoked)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# -- sync functions for `ccr keys create|list|revoke` ---------------------------


def create_key(
    dsn: str, name: str, groups: list[str] | None = None, rpm: int | None = None
) -> tuple[KeyRecord, str]:
    """Create a key; returns its record and the plaintext key, shown only this once."""
    if not name.strip():
        raise ValueError("key name must not be empty")
    if rpm is not None and rpm <= 0:
        raise ValueError(f"rpm must be a positive integer, got {rpm}")
    grp = list(groups) if groups else list(DEFAULT_GROUPS)
    key = generate_key()
    kid = "key_" + secrets.token_hex(6)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"INSERT INTO api_keys (id, name, key_hash, key_prefix, groups, rpm)"
            f" VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (kid, name, hash_key(key), key[:DISPLAY_PREFIX_LEN], grp, rpm),
        ).fetchone()
        # A running extauth may hold a negative cache entry for this hash (someone
        # tried the key early); tell it to forget.
        conn.execute("SELECT pg_notify(%s, %s)", (KEYS_CHANNEL, kid))
    assert row is not None
    return _record(row), key


def list_keys(dsn: str, include_revoked: bool = False) -> list[KeyRecord]:
    where = "" if include_revoked else " WHERE revoked_at IS NULL"
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, id").fetchall()
    return [_record(r) for r in rows]


def revoke_key(dsn: str, key_id: str) -> bool:
    """Revoke an active key; False when no active key has that id."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL RETURNING id",
            (key_id,),
        ).fetchone()
        if row is not None:
            # Delivered at commit, i.e. only once the revocation is visible.
            conn.execute("SELECT pg_notify(%s, %s)", (KEYS_CHANNEL, key_id))
    return row is not None


# -- async lookup with cache (extauth hot path) ----------------------------------


def _consume_exception(task: asyncio.Task) -> None:
    # Every caller may have gone away; don't log "exception never retrieved".
    if not task.cancelled():
        task.exception()


class KeyStore:
    """Looks keys up by hash with an in-memory cache of hits and misses.

    Invalidation: NOTIFY on `KEYS_CHANNEL` clears the cache; entries also expire
    after `ttl_s`. A lookup that was in flight while the cache was cleared does
    not store its (possibly stale) result.
    """

    def __init__(self, dsn: str, ttl_s: float = 10.0, max_entries: int = 100_000) -> None:
        self._dsn = dsn
        self._ttl = ttl_s
        self._max = max_entries
        self._cache: dict[bytes, tuple[float, KeyRecord | None]] = {}
        self._inflight: dict[bytes, asyncio.Task[KeyRecord | None]] = {}
        self._generation = 0
        self._pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True})
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    async def start(self) -> None:
        await self._pool.open(wait=True, timeout=10)
        self._listener = asyncio.create_task(self._listen(), name="keys-listen")
        # Serve only once revocations are being heard.
        await asyncio.wait_for(self.listening.wait(), timeout=10)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pool.close()

    def invalidate(self) -> None:
        self._generation += 1
        self._cache.clear()
        # Queries already running may have read the row before the change: later
        # callers must not join them.
        self._inflight.clear()

    async def lookup(self, key: str) -> KeyRecord | None:
        """The active key record for a plaintext key, or None if unknown/revoked.

        Raises on database errors so the caller can fail closed.
        """
        if not key.startswith(KEY_PREFIX):
            return None  # not one of ours: no DB round trip, no cache entry
        h = hash_key(key)
        hit = self._cache.get(h)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        # Single flight: concurrent requests with the same key share one query, run
        # as its own task so a cancelled caller (Envoy timeout) cannot cancel it
        # for the others.
        task = self._inflight.get(h)
        if task is None:
            task = asyncio.create_task(self._load(h))
            task.add_done_callback(_consume_exception)
            self._inflight[h] = task
        return await asyncio.shield(task)

    async def _load(self, h: bytes) -> KeyRecord | None:
        gen = self._generation
        try:
            rec = await self._fetch(h)
        finally:
            if self._inflight.get(h) is asyncio.current_task():
                del self._inflight[h]
        # Skip storing if the cache was invalidated meanwhile: the row may predate
        # the change that caused the invalidation.
        if gen == self._generation:
            if len(self._cache) >= self._max:
                self._cache.clear()  # bound memory under a flood of random keys
            self._cache[h] = (time.monotonic() + self._ttl, rec)
        return rec

    async def _fetch(self, h: bytes) -> KeyRecord | None:
        async with self._pool.connection(timeout=5) as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL", (h,)
            )
            row = await cur.fetchone()
        return _record(row) if row else None

    async def _listen(self) -> None:
        delay = 0.2
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {KEYS_CHANNEL}")
                    # Notifications may have been missed while disconnected.
                    self.invalidate()
                    self.listening.set()
                    delay = 0.2
                    async for note in conn.notifies():
                        log.info("api key change (%s): cache cleared", note.payload)
                        self.invalidate()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # reconnect; the TTL covers the gap
                log.warning("key change listener lost (%s); reconnecting in %.1fs", e, delay)
            self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

"""API keys for machines: creation, rotation, revocation and listing (sync, for the
CLI) and the async lookup cache the ext_authz service uses on every request.

A key is `ccr_` + 43 url-safe characters. Only its sha256 is stored; the plaintext
exists once, in the return value of `create_key` / `rotate_key`. A key belongs to an
owner, groups and a tenant, may expire, and is refused from `expires_at` on; rotation
issues a successor and lets the old key expire after a grace period. Every change is
written together with its `admin_log` row in one transaction, and announced with
NOTIFY on `KEYS_CHANNEL`; a running extauth LISTENs and drops its cache, so a
revocation takes effect within milliseconds. The cache TTL is the backstop for a
missed notification (listener reconnecting, DB failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from audit.admin import append_admin
from ccr.listen import listen_forever

log = logging.getLogger(__name__)

KEY_PREFIX = "ccr_"
KEYS_CHANNEL = "ccr_api_keys"
# Characters of the key kept in clear to recognise it in listings ("ccr_" + 8).
DISPLAY_PREFIX_LEN = 12
DEFAULT_GROUPS = ("default",)
DEFAULT_ACTOR = "unknown"

_COLUMNS = ("id, name, key_prefix, groups, rpm, created_at, revoked_at,"
            " owner, tenant, expires_at, last_used_at, replaced_by")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    key_prefix: str
    groups: tuple[str, ...]
    rpm: int | None
    created_at: datetime
    revoked_at: datetime | None = None
    owner: str | None = None
    tenant: str | None = None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    replaced_by: str | None = None  # the successor issued by `rotate_key`

    @property
    def active(self) -> bool:
        """Not revoked (it may still have expired: see `usable`)."""
        return self.revoked_at is None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def audit_view(self) -> dict[str, Any]:
        """What an admin_log row records about the key (never the key or its hash)."""
        def ts(t: datetime | None) -> str | None:
            return t.isoformat() if t is not None else None

        return {"id": self.id, "name": self.name, "key_prefix": self.key_prefix, "owner": self.owner,
                "tenant": self.tenant, "groups": list(self.groups), "rpm": self.rpm,
                "created_at": ts(self.created_at), "expires_at": ts(self.expires_at),
                "revoked_at": ts(self.revoked_at), "replaced_by": self.replaced_by}


def _record(row: tuple) -> KeyRecord:
    kid, name, prefix, groups, rpm, created, revoked, owner, tenant, expires, used, replaced = row
    return KeyRecord(kid, name, prefix, tuple(groups or ()), rpm, created, revoked,
                     owner, tenant, expires, used, replaced)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '12h', '30d', '2w' or combinations such as '1h30m'."""
    t = text.strip().lower()
    if not t or _DURATION.sub("", t) != "":
        raise ValueError(f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. 30d or 1h30m")
    return timedelta(seconds=sum(int(n) * _UNIT_S[u] for n, u in _DURATION.findall(t)))


def parse_instant(text: str) -> datetime:
    """An ISO 8601 instant with its UTC offset ('2027-01-31T00:00:00Z')."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use ISO 8601, e.g. 2027-01-31T00:00:00Z") from None
    if t.tzinfo is None:
        raise ValueError(f"time {text!r} has no UTC offset: add one, e.g. 2027-01-31T00:00:00Z")
    return t


# -- sync functions for `ccr keys ...`: each change and its admin_log row commit together --


def _admin_log(conn: psycopg.Connection, actor: str, action: str, target: str,
               before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    # A link of the admin hash chain (audit/admin.py), in the change's own transaction.
    append_admin(conn, actor, action, target, before, after)


def _locked(conn: psycopg.Connection, key_id: str) -> KeyRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = %s FOR UPDATE", (key_id,)).fetchone()
    return _record(row) if row else None


def _insert_key(conn: psycopg.Connection, name: str, groups: list[str], rpm: int | None, owner: str | None,
                tenant: str | None, expires_at: datetime | None,
                expires_in: timedelta | None) -> tuple[KeyRecord, str]:
    key = generate_key()
    kid = "key_" + secrets.token_hex(6)
    row = conn.execute(
        f"INSERT INTO api_keys (id, name, key_hash, key_prefix, groups, rpm, owner, tenant, expires_at)"
        f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, COALESCE(%s::timestamptz, now() + %s::interval))"
        f" RETURNING {_COLUMNS}",
        (kid, name, hash_key(key), key[:DISPLAY_PREFIX_LEN], groups, rpm, owner, tenant, expires_at, expires_in),
    ).fetchone()
    assert row is not None
    return _record(row), key


def create_key(
    dsn: str, name: str, groups: list[str] | None = None, rpm: int | None = None, *,
    owner: str | None = None, tenant: str | None = None,
    expires_at: datetime | None = None, expires_in: timedelta | None = None, actor: str = DEFAULT_ACTOR,
) -> tuple[KeyRecord, str]:
    """Create a key; returns its record and the plaintext key, shown only this once."""
    if not name.strip():
        raise ValueError("key name must not be empty")
    if rpm is not None and rpm <= 0:
        raise ValueError(f"rpm must be a positive integer, got {rpm}")
    if expires_at is not None and expires_in is not None:
        raise ValueError("give either an expiry time or a lifetime, not both")
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= utcnow()):
        raise ValueError(f"expiry {expires_at.isoformat()} must be a future time with a UTC offset")
    if expires_in is not None and expires_in <= timedelta(0):
        raise ValueError("key lifetime must be positive")
    grp = list(groups) if groups else list(DEFAULT_GROUPS)
    with psycopg.connect(dsn) as conn:
        rec, key = _insert_key(conn, name, grp, rpm, owner, tenant, expires_at, expires_in)
        _admin_log(conn, actor, "key.create", rec.id, None, rec.audit_view())
        # A running extauth may hold a negative cache entry for this hash (someone
        # tried the key early); tell it to forget. Delivered at commit.
        conn.execute("SELECT pg_notify(%s, %s)", (KEYS_CHANNEL, rec.id))
    return rec, key


def list_keys(dsn: str, include_revoked: bool = False) -> list[KeyRecord]:
    """Usable keys (not revoked, not expired); with include_revoked, every key."""
    where = "" if include_revoked else " WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, id").fetchall()
    return [_record(r) for r in rows]


def revoke_key(dsn: str, key_id: str, *, actor: str = DEFAULT_ACTOR) -> bool:
    """Revoke a key; False when no unrevoked key has that id."""
    with psycopg.connect(dsn) as conn:
        before = _locked(conn, key_id)
        if before is None or before.revoked_at is not None:
            return False
        row = conn.execute(f"UPDATE api_keys SET revoked_at = now() WHERE id = %s RETURNING {_COLUMNS}",
                           (key_id,)).fetchone()
        assert row is not None
        _admin_log(conn, actor, "key.revoke", key_id, before.audit_view(), _record(row).audit_view())
        # Delivered at commit, i.e. only once the revocation is visible.
        conn.execute("SELECT pg_notify(%s, %s)", (KEYS_CHANNEL, key_id))
    return True


class KeyChangeError(ValueError):
    """The key cannot take this change (unknown, revoked, expired, already rotated)."""


def rotate_key(dsn: str, key_id: str, grace: timedelta = timedelta(0), *,
               actor: str = DEFAULT_ACTOR) -> tuple[KeyRecord, KeyRecord, str]:
    """Issue a successor with the same owner, groups, tenant, limit and expiry; the old
    key stays valid for `grace`, then is refused. Returns (old, new, new plaintext key)."""
    if grace < timedelta(0):
        raise ValueError("grace period must not be negative")
    with psycopg.connect(dsn) as conn:
        old = _locked(conn, key_id)
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        if old is None:
            raise KeyChangeError(f"no key with id {key_id}")
        if old.replaced_by is not None:
            raise KeyChangeError(f"key {key_id} was already rotated to {old.replaced_by}; rotate that one instead")
        if not old.usable(now):
            raise KeyChangeError(f"key {key_id} is revoked or expired; create a new key instead")
        new, key = _insert_key(conn, old.name, list(old.groups), old.rpm, old.owner, old.tenant,
                               old.expires_at, None)
        row = conn.execute(
            f"UPDATE api_keys SET replaced_by = %s,"
            f" expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + %s::interval)"
            f" WHERE id = %s RETURNING {_COLUMNS}",
            (new.id, grace, key_id),
        ).fetchone()
        assert row is not None
        old_after = _record(row)
        _admin_log(conn, actor, "key.rotate", key_id, old.audit_view(),
                   {"old": old_after.audit_view(), "new": new.audit_view()})
        conn.execute("SELECT pg_notify(%s, %s)", (KEYS_CHANNEL, key_id))
    return old_after, new, key


# -- async lookup with cache (extauth hot path) ----------------------------------


def _consume_exception(task: asyncio.Task) -> None:
    # Every caller may have gone away; don't log "exception never retrieved".
    if not task.cancelled():
        task.exception()


class KeyStore:
    """Looks keys up by hash with an in-memory cache of hits and misses.

    Invalidation: NOTIFY on `KEYS_CHANNEL` clears the cache; entries also expire
    after `ttl_s`. A lookup that was in flight while the cache was cleared does
    not store its (possibly stale) result. Expiry is checked on every lookup,
    cached or not, against `clock`.

    Last use is recorded off the hot path: a lookup only notes the key id (at most
    once per `last_used_every_s` per key) and a background task writes the noted
    times in one UPDATE every `flush_every_s`.
    """

    def __init__(self, dsn: str, ttl_s: float = 10.0, max_entries: int = 100_000, *,
                 clock: Callable[[], datetime] = utcnow, last_used_every_s: float = 30.0,
                 flush_every_s: float = 5.0) -> None:
        self._dsn = dsn
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._cache: dict[bytes, tuple[float, KeyRecord | None]] = {}
        self._inflight: dict[bytes, asyncio.Task[KeyRecord | None]] = {}
        self._generation = 0
        self._changed = asyncio.Event()
        self._pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True})
        self._listener: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self._used_every = timedelta(seconds=last_used_every_s)
        self._flush_every = flush_every_s
        self._noted: dict[str, datetime] = {}  # key id -> when its last use was last noted
        self._pending: dict[str, datetime] = {}  # key id -> last use not yet written

    async def start(self) -> None:
        await self._pool.open(wait=True, timeout=10)
        self._listener = asyncio.create_task(self._listen(), name="keys-listen")
        self._flusher = asyncio.create_task(self._flush_loop(), name="keys-last-used")
        # Serve only once revocations are being heard.
        await asyncio.wait_for(self.listening.wait(), timeout=10)

    async def close(self) -> None:
        for task in (self._listener, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await self.flush_last_used()
        await self._pool.close()

    @property
    def generation(self) -> int:
        """Bumped by every cache invalidation (key change heard, listener reconnected)."""
        return self._generation

    async def wait_changed(self, since: int) -> None:
        """Return once the cache has been invalidated after generation `since`."""
        while self._generation == since:
            await self._changed.wait()

    def invalidate(self) -> None:
        self._generation += 1
        self._cache.clear()
        # Queries already running may have read the row before the change: later
        # callers must not join them.
        self._inflight.clear()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def lookup(self, key: str) -> KeyRecord | None:
        """The usable key record for a plaintext key, or None if unknown, revoked or expired.

        Raises on database errors so the caller can fail closed.
        """
        if not key.startswith(KEY_PREFIX):
            return None  # not one of ours: no DB round trip, no cache entry
        rec = await self._record(hash_key(key))
        if rec is None:
            return None
        now = self._clock()
        if not rec.usable(now):
            return None  # expired (e.g. the grace period after a rotation ended) while cached
        self._note_use(rec.id, now)
        return rec

    async def _record(self, h: bytes) -> KeyRecord | None:
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
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL"
                f" AND (expires_at IS NULL OR expires_at > now())", (h,)
            )
            row = await cur.fetchone()
        return _record(row) if row else None

    # -- last use: noted in memory, written in batches ---------------------------

    def _note_use(self, key_id: str, now: datetime) -> None:
        last = self._noted.get(key_id)
        if last is not None and now - last < self._used_every:
            return
        if len(self._noted) >= self._max:
            self._noted.clear()
        self._noted[key_id] = now
        self._pending[key_id] = now

    async def flush_last_used(self) -> int:
        """Write the noted last-use times in one statement; returns how many keys."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        try:
            async with self._pool.connection(timeout=5) as conn:
                # GREATEST: another replica may have written a later time already.
                await conn.execute(
                    "UPDATE api_keys AS k SET last_used_at = GREATEST(k.last_used_at, u.t)"
                    " FROM unnest(%s::text[], %s::timestamptz[]) AS u(id, t) WHERE k.id = u.id",
                    (list(batch), list(batch.values())),
                )
        except BaseException:
            for kid, t in batch.items():  # keep them for the next round
                self._pending.setdefault(kid, t)
            raise
        return len(batch)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every)
            try:
                await self.flush_last_used()
            except Exception as e:  # a database hiccup must not stop the loop
                log.warning("could not record key last use (%s); retrying later", e)

    async def _listen(self) -> None:
        await listen_forever(self._dsn, KEYS_CHANNEL, on_connected=self.invalidate, on_notify=self._key_changed,
                             listening=self.listening, what="key change")

    def _key_changed(self, payload: str) -> None:
        log.info("api key change (%s): cache cleared", payload)
        self.invalidate()

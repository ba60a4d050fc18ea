"""Admin-chain rows for the changes that are not a database transaction of their own: live config
versions (the router), policy bundles going live (extauth) and pushed (`ccr policy push`).

Who writes: the process that makes the change live, with the owner DSN every admin row is
written with today (`Runtime.postgres_dsn`; the access-log writer role has no write on
`admin_log`). What a failed write does (fail closed): a config version or a bundle is recorded
*before* it goes live, and when that write fails it does not go live (refused, with the reason,
the last good one keeps serving). A refusal changes nothing, so its row is best-effort: kept and
retried with the next admin write of the process, and logged.

Never secrets: a config row names the changed paths (`models`, `limits.rules.eng-rpm.amount`),
never their values, except for the `limits` section (which holds none), whose before and after are
recorded whole so a limit change is readable from the admin trail alone.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from audit.admin import ADMIN_CHAIN_LOCK, append_admin

log = logging.getLogger("ccr.audit.admin")

CONFIG_APPLY = "config.apply"  # a version accepted: recorded before it is distributed
CONFIG_REFUSED = "config.refused"  # an edit refused (invalid, start-only, rolled back, or not recordable)
CONFIG_START = "config.start"  # the version a run starts on (`ccr up`)
POLICY_ACTIVATE = "policy.activate"  # a bundle revision going live in extauth (one row per set and change)
POLICY_PUSH = "policy.push"  # `ccr policy push`: who installed or uploaded which bundle
MAX_REASON = 2000
_MAX_DEPTH = 4
# List items keyed by one of these fields are compared item by item (providers and rules by name).
_ITEM_KEYS = ("name", "match")


class NotRecorded(Exception):
    """The admin row could not be written; the change must not go live."""


def changed_paths(old: Any, new: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """The dotted paths where `new` differs from `old` (values never included)."""
    if old == new:
        return []
    if depth < _MAX_DEPTH and isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_paths(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k), depth + 1)
        return out
    if depth < _MAX_DEPTH and isinstance(old, list) and isinstance(new, list):
        key = _item_key(old + new)
        if key is not None:
            a = {str(i[key]): i for i in old}
            b = {str(i[key]): i for i in new}
            if len(a) == len(old) and len(b) == len(new):
                out = []
                for k in sorted(set(a) | set(b)):
                    out += changed_paths(a.get(k), b.get(k), f"{prefix}.{k}", depth + 1)
                if [k for k in a if k in b] != [k for k in b if k in a]:  # model routes match in order
                    out.append(f"{prefix} (order)")
                return out
    return [prefix or "(top level)"]


def _item_key(items: list) -> str | None:
    for key in _ITEM_KEYS:
        if items and all(isinstance(i, dict) and isinstance(i.get(key), str) for i in items):
            return key
    return None


def config_change(old: dict | None, new: dict) -> tuple[list[str], dict | None, dict | None]:
    """(changed paths, limits before, limits after): the limits only when they changed."""
    paths = changed_paths(old or {}, new)
    if old is not None and old.get("limits") != new.get("limits"):
        return paths, old.get("limits"), new.get("limits")
    return paths, None, None


class AdminRecorder:
    """Writes admin rows for one process; refusals that could not be written wait for the next write."""

    def __init__(self, dsn: str | None) -> None:
        self.dsn = dsn
        self.pending: list[tuple[str, str, str, dict | None, dict | None]] = []

    def record(self, actor: str, action: str, target: str, before: dict | None, after: dict | None) -> None:
        """Write one row (and any pending ones first); NotRecorded when it is not committed."""
        if not self.dsn:
            raise NotRecorded("no database for the admin log")
        rows = [*self.pending, (actor, action, target, before, after)]
        try:
            with psycopg.connect(self.dsn, connect_timeout=5) as conn, conn.transaction():
                for r in rows:
                    append_admin(conn, *r)
        except psycopg.Error as e:
            raise NotRecorded(f"the admin log write failed: {str(e).strip() or type(e).__name__}") from None
        self.pending.clear()

    def record_or_keep(self, actor: str, action: str, target: str, before: dict | None, after: dict | None) -> bool:
        """For what changes nothing (a refusal): write it, or keep it for the next write and log."""
        try:
            self.record(actor, action, target, before, after)
            return True
        except NotRecorded as e:
            self.pending.append((actor, action, target, before, after))
            log.error("%s %s not yet in the admin log (retried with the next admin write): %s", action, target, e)
            return False

    def record_once(self, actor: str, action: str, target: str, before: dict | None, after: dict,
                    same: str) -> bool:
        """Write the row unless the last row for `target` already has the same `after[same]` (several
        workers making the same change live: the first one records it). True when this call wrote it."""
        if not self.dsn:
            raise NotRecorded("no database for the admin log")
        try:
            with psycopg.connect(self.dsn, connect_timeout=5) as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADMIN_CHAIN_LOCK,))
                last = conn.execute("SELECT after FROM admin_log WHERE target = %s AND action = %s"
                                    " ORDER BY id DESC LIMIT 1", (target, action)).fetchone()
                if last and isinstance(last[0], dict) and last[0].get(same) == after.get(same):
                    return False
                append_admin(conn, actor, action, target, before, after)
                return True
        except psycopg.Error as e:
            raise NotRecorded(f"the admin log write failed: {str(e).strip() or type(e).__name__}") from None


def reason_text(message: str) -> str:
    return message if len(message) <= MAX_REASON else message[:MAX_REASON] + "..."

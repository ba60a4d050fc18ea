"""Follow a PostgreSQL NOTIFY channel for cache invalidation, reconnecting for ever.

Used by the caches in extauth (API keys, session status): writers NOTIFY a channel
when they change a row, and the process holding the cache LISTENs and drops what
may be stale. Notifications sent while the listener is disconnected are lost, so
`on_connected` runs on every (re)connect to drop everything; the caches' TTL covers
the gap until then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.2
MAX_RETRY_S = 5.0


async def listen_forever(dsn: str, channel: str, *, on_connected: Callable[[], None],
                         on_notify: Callable[[str], None], listening: asyncio.Event, what: str,
                         on_lost: Callable[[], None] | None = None) -> None:
    """LISTEN on `channel` until cancelled; `listening` is set exactly while connected.

    `on_notify` gets each payload; `on_lost` (if given) runs after a connection is
    lost; `what` names the listener in the reconnect warning.
    """
    delay = FIRST_RETRY_S
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            async with conn:
                await conn.execute(f"LISTEN {channel}")
                on_connected()  # anything may have been missed while disconnected
                listening.set()
                delay = FIRST_RETRY_S
                async for note in conn.notifies():
                    on_notify(note.payload)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reconnect; the caches' TTL covers the gap
            log.warning("%s listener lost (%s); reconnecting in %.1fs", what, e, delay)
        listening.clear()
        if on_lost is not None:
            on_lost()
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_RETRY_S)

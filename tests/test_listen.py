"""ccr.listen: notifications reach the callback, and a lost connection is re-established."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import psycopg

from ccr.listen import listen_forever


def test_notifies_are_heard_and_a_killed_listener_reconnects(postgres_dsn: str) -> None:
    channel = f"t_{uuid.uuid4().hex[:10]}"
    events: list[str] = []
    changed = asyncio.Condition()

    async def run() -> None:
        def record(what: str) -> None:
            events.append(what)

            async def wake() -> None:
                async with changed:
                    changed.notify_all()
            asyncio.get_running_loop().create_task(wake())

        async def until(pred) -> None:  # type: ignore[no-untyped-def]
            async with changed:
                await asyncio.wait_for(changed.wait_for(pred), timeout=10)

        listening = asyncio.Event()
        task = asyncio.create_task(listen_forever(
            postgres_dsn, channel, on_connected=lambda: record("connected"),
            on_notify=lambda payload: record(f"note:{payload}"), on_lost=lambda: record("lost"),
            listening=listening, what="test"))
        try:
            await asyncio.wait_for(listening.wait(), timeout=10)
            async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
                await conn.execute("SELECT pg_notify(%s, 'one')", (channel,))
                await until(lambda: "note:one" in events)
                # Kill the listener's backend: it must notice, drop, and LISTEN again.
                cur = await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                         " WHERE query = %s", (f"LISTEN {channel}",))
                assert (await cur.fetchall()) == [(True,)]
                await until(lambda: events.count("connected") == 2)
                assert listening.is_set()
                await conn.execute("SELECT pg_notify(%s, 'two')", (channel,))
                await until(lambda: "note:two" in events)
            assert events == ["connected", "note:one", "lost", "connected", "note:two"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(run())

"""A byte relay from Unix sockets to TCP addresses, for bench/envoy_features.py's "services over a Unix
socket" step: Envoy's side of the hop is what is measured; this relay's own CPU is not counted.

    python bench/_uds_relay.py SOCKET=HOST:PORT [SOCKET=HOST:PORT ...]
"""

from __future__ import annotations

import asyncio
import sys


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(1 << 18):
            w.write(data)
            await w.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        w.close()


async def serve(path: str, host: str, port: int) -> asyncio.AbstractServer:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(host, port)
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    return await asyncio.start_unix_server(handle, path)


async def main(pairs: list[str]) -> None:
    servers = []
    for p in pairs:
        path, _, addr = p.partition("=")
        host, _, port = addr.rpartition(":")
        servers.append(await serve(path, host, int(port)))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))

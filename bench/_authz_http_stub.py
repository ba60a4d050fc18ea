"""A fixed-answer HTTP ext_authz server for bench/gateway_floor.py: every check gets the same response bytes
(read from a file: status line, headers, empty body), on asyncio + uvloop with httptools parsing the requests, and
no other work. Writes its port to PORT_FILE when serving.

    python bench/_authz_http_stub.py RESPONSE_FILE PORT_FILE
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httptools
import uvloop


async def serve(answer: bytes, port_file: Path) -> None:
    class Check(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                assert self.transport is not None
                self.transport.close()

        def on_message_complete(self) -> None:
            assert self.transport is not None
            self.transport.write(answer)

    server = await asyncio.get_running_loop().create_server(Check, "127.0.0.1", 0)
    port_file.write_text(str(server.sockets[0].getsockname()[1]))
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])))

"""A fixed-answer ext_authz server for bench/envoy_features.py: every Check gets the same
CheckResponse (read from a file of its serialized bytes), so Envoy's side of the call can be
measured with answers of different sizes. Writes its port to PORT_FILE when serving.

    python bench/_authz_stub.py RESPONSE_FILE PORT_FILE
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.service import GRPC_OPTIONS  # noqa: E402


class Fixed(pb_grpc.AuthorizationServicer):
    def __init__(self, answer: pb.CheckResponse) -> None:
        self.answer = answer

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:  # noqa: N802
        return self.answer


async def main(response_file: str, port_file: str) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_AuthorizationServicer_to_server(Fixed(pb.CheckResponse.FromString(Path(response_file).read_bytes())),
                                                server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

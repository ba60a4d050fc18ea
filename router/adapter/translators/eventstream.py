"""AWS event-stream framing (application/vnd.amazon.eventstream) for Bedrock's streamed replies.

Decoding is botocore's (botocore.eventstream.EventStreamBuffer). botocore has no encoder, so the
few lines that frame a message are here: the gateway produces event-stream for Bedrock clients
served by other providers, and the Bedrock emulator speaks it. Only string headers are written.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterator

import orjson
from botocore.eventstream import EventStreamBuffer, EventStreamMessage

_STRING = 7  # header value type: UTF-8 string with a 2-byte length


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC32), headers, payload, CRC32."""
    hb = b"".join(
        struct.pack("B", len(k.encode())) + k.encode() + struct.pack("!BH", _STRING, len(v.encode())) + v.encode()
        for k, v in headers.items())
    total = 12 + len(hb) + len(payload) + 4
    prelude = struct.pack("!II", total, len(hb))
    prelude += struct.pack("!I", binascii.crc32(prelude))
    body = prelude + hb + payload
    return body + struct.pack("!I", binascii.crc32(body))


def chunk_event(event: dict[str, object]) -> bytes:
    """A Bedrock InvokeModelWithResponseStream `chunk` carrying one Anthropic stream event."""
    payload = orjson.dumps({"bytes": base64.b64encode(orjson.dumps(event)).decode()})
    return frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload)


def exception_event(exception_type: str, message: str) -> bytes:
    return frame({":exception-type": exception_type, ":content-type": "application/json",
                  ":message-type": "exception"}, orjson.dumps({"message": message}))


class Decoder:
    """Event-stream bytes -> messages, for any chunking (botocore's parser)."""

    def __init__(self) -> None:
        self._buf = EventStreamBuffer()

    def feed(self, data: bytes) -> Iterator[EventStreamMessage]:
        self._buf.add_data(data)
        yield from self._buf

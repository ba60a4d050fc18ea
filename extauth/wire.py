"""A serialized CheckRequest split into the request without its body and a view of the body.

Parsing a CheckRequest copies its raw_body into the protobuf message, and reading the field
copies it again into a Python bytes: with the gRPC message itself that is three copies of a
20 MB body. Here the body stays where gRPC received it: the wire format is walked down to
attributes.request.http.raw_body, the rest (headers, path, peer: a few KB) is parsed with the
three enclosing lengths rewritten, and the body is a memoryview into the received bytes.

Anything unusual (a field of the path repeated, so protobuf would merge it; groups; a
malformed varint) is left to the protobuf parser: the split is an optimisation, never a
second interpretation.
"""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2 as pb

# CheckRequest.attributes -> AttributeContext.request -> Request.http -> HttpRequest.raw_body
_PATH = (1, 4, 2, 12)
_LEN = 2
# Messages smaller than this are parsed whole: the walk costs more than the copy it saves.
SPLIT_FROM_BYTES = 256 * 1024


class _Unusual(Exception):
    pass


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unusual
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _find(data: bytes, start: int, end: int, number: int) -> tuple[int, int, int, int] | None:
    """(offsets of the tag and of the length varint, content start, content end) of the one
    length-delimited field `number` in data[start:end]; None if absent; _Unusual if repeated or malformed."""
    found = None
    pos = start
    while pos < end:
        tag_at = pos
        tag, pos = _varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LEN:
            len_at = pos
            n, pos = _varint(data, pos, end)
            if field == number:
                if found is not None:
                    raise _Unusual  # protobuf would merge (message) or keep the last (bytes)
                found = (tag_at, len_at, pos, pos + n)
            pos += n
        else:
            raise _Unusual  # groups: never sent by Envoy
        if field == number and wire != _LEN:
            raise _Unusual
    if pos != end:
        raise _Unusual
    return found


def split_check(data: bytes) -> tuple[pb.CheckRequest, memoryview | None]:
    """The CheckRequest in `data` and its raw_body as a view into `data` (None: the request's own
    raw_body field holds it, as when parsed whole)."""
    if len(data) >= SPLIT_FROM_BYTES:
        try:
            split = _split(data)
        except _Unusual:
            split = None
        if split is not None:
            return split
    return pb.CheckRequest.FromString(data), None


def _split(data: bytes) -> tuple[pb.CheckRequest, memoryview] | None:
    spans = []
    start, end = 0, len(data)
    for number in _PATH:
        found = _find(data, start, end, number)
        if found is None:
            return None
        spans.append(found)
        _, _, start, end = found
    tag_at, _, body_start, body_end = spans[-1]
    # Each enclosing message loses the body field and whatever its inner length varints lost.
    shrink = body_end - tag_at
    lengths: list[bytes] = []
    for _, len_at, content_start, content_end in reversed(spans[:-1]):
        new_len = _encode_varint(content_end - content_start - shrink)
        shrink += (content_start - len_at) - len(new_len)
        lengths.append(new_len)
    lengths.reverse()
    pieces: list[bytes | memoryview] = []
    view = memoryview(data)
    last = 0
    for (_, len_at, content_start, _), new_len in zip(spans[:-1], lengths, strict=True):
        pieces.append(view[last:len_at])
        pieces.append(new_len)
        last = content_start
    pieces.append(view[last:tag_at])
    pieces.append(view[body_end:])
    req = pb.CheckRequest.FromString(b"".join(pieces))
    return req, view[body_start:body_end]

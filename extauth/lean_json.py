"""A request body read as a JSON object without materialising its big strings.

orjson needs about 13 times a document's size while it parses (its reader sizes its buffer for
the worst case; for a 20 MB body that is 260 MB) and then holds every string as a Python str: a
20 MB image or text block would cost extauth far more than the body itself. What a check needs
from a body is small: is it valid JSON, is it an object, its top-level "model" and every
"file_id" value. So a large body is read as a *skeleton*: a copy in which every long string
value is replaced by a short, unique placeholder, and parsed; the long strings are checked in
place (same rules as orjson) and decoded only when a model or a file id is one of them.

Verdicts are orjson's: the skeleton has the body's structure, keys and short strings byte for
byte, and whenever the skeleton or a long string is not valid, the whole body is parsed, and an
invalid one gets orjson's own verdict and error message. Only bodies whose size is in long string
values gain: a body of millions of tiny tokens makes a skeleton as large as itself.

The parser is jiter (pydantic's, a Rust extension), which also refuses what no single reading
covers (`Ambiguous`): a key given twice in one object. orjson keeps the last value, and so do most
parsers, but not all, and JSON does not say which counts: a policy that read `"text": "hi"` could
allow the `"text"` before it, holding what the policy refuses, to a provider that reads the first.
jiter compares keys as decoded (`"model"` and `"mod\\u0065l"` are one key). Where jiter refuses a
body, orjson reads it again for its verdict and message (clients and tests know those), so an invalid
body is refused exactly as orjson refuses it. Two readings differ from orjson's: an integer beyond
64 bits stays an integer (orjson reads it as a double), and a number beyond a double's range reads as
infinity (orjson refuses it); every check that reads a number from a body takes integers only and
bounds them (extauth/policy_input.py).
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import jiter
import orjson

from extauth.pii import PLAIN_KEY

# Bodies up to this size are parsed whole (fast; the parser's transient buffer stays small).
SKELETON_FROM_BYTES = 1024 * 1024
# String values at least this long (raw bytes between the quotes) are left in the body.
LONG_STRING_BYTES = 1024
# Bytes per step of the UTF-8 check: the str decoded from one step takes up to 4 times as much
# (one astral character makes a str 4 bytes a character), so at most 1 MiB.
_UTF8_CHUNK = 256 * 1024
# The values checks read (model, file references, a batch request's custom_id for messages):
# never left as placeholders.
RESTORED_KEYS = frozenset({"model", "file_id", "custom_id"})

Buffer = bytes | memoryview
JSONDecodeError = orjson.JSONDecodeError

# Structure and short escape-free strings, skipped in C: a run of non-quote bytes, or a string
# of at most 255 bytes without a backslash. Possessive, so it never backtracks and always stops
# either at the end or at the opening quote of a string it did not take.
_SKIP = re.compile(rb'(?:[^"]++|"[^"\\]{0,255}+")*+')
# One string literal from its opening quote, as orjson accepts it: no raw control characters,
# only JSON's escapes, and \u escapes of surrogates only as high-low pairs (UTF-8 is checked
# apart). A string that does not match makes the body invalid: orjson then says why.
_STRING = re.compile(
    rb'"(?:[ -!#-\[\]-\xff]++'  # bytes 0x20-0xff but '"' and '\\' (ranges: twice as fast in sre as [^...])
    rb'|\\["\\/bfnrt]'
    rb"|\\u(?![dD][89a-fA-F])[0-9a-fA-F]{4}"
    rb"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb')*+"'
)
_IS_KEY = re.compile(rb"[ \t\n\r]*:")


# jiter's messages for the two refusals it makes where orjson does not (tests/test_one_reading.py pins
# them against the installed jiter).
_DUPLICATE = re.compile(r'Detected duplicate key "(.*)" at line (\d+) column (\d+)\Z', re.S)
_TOO_DEEP = re.compile(r"recursion limit exceeded at line (\d+) column (\d+)\Z")


class Ambiguous(ValueError):
    """A document orjson reads but a check must not: a key given twice in one object, or (where
    that cannot be checked) nesting deeper than Python's parser reaches."""


def loads_one_reading(data: Buffer | str) -> Any:
    """The document in `data`, read once (jiter), refused (Ambiguous) when a key repeats in one object. An invalid
    document raises orjson's JSONDecodeError: its verdict and message, which clients and tests know."""
    try:
        return jiter.from_json(data.encode() if isinstance(data, str) else bytes(data), cache_mode="keys",
                               catch_duplicate_keys=True, allow_inf_nan=False)
    except ValueError as e:
        why = str(e)
    doc = orjson.loads(data)  # raises for a document orjson finds invalid too
    if (m := _DUPLICATE.match(why)) is not None:
        raise Ambiguous(f"{_name(m[1])} is given twice in one object (line {m[2]} column {m[3]}); parsers differ "
                        "on which one counts, so give each key once")
    if _TOO_DEEP.match(why) is not None:  # deeper than jiter goes: the standard library's parser reads on
        key = _repeated_deep(data)
        if key is None:
            return doc
        raise Ambiguous(f"{_name(key)} is given twice in one object; parsers differ on which one counts, so give "
                        "each key once")
    raise Ambiguous("the body could not be checked for repeated keys")


class _Repeated(Exception):
    pass


def _repeated_deep(data: Buffer | str) -> str | None:
    """A key given twice in one object of `data` (nested deeper than jiter reads, within orjson's 1024 levels),
    or None. Slower than jiter, and only for such bodies."""
    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(kv)
        if len(d) != len(kv):
            seen: set[str] = set()
            for k, _ in kv:
                if k in seen:
                    raise _Repeated(k)
                seen.add(k)
        return d

    try:
        json.loads(data if isinstance(data, (bytes, str)) else bytes(data), object_pairs_hook=pairs)
    except _Repeated as e:
        return str(e.args[0])
    except RecursionError:
        raise Ambiguous("objects and arrays nest too deep to check for repeated keys") from None
    return None


def _name(key: str) -> str:
    """A key for a refusal's message: named only when it cannot carry data (a denial is shown and logged)."""
    return f'"{key}"' if PLAIN_KEY.fullmatch(key) else "a key"


class _NotSimple(Exception):
    """The body needs orjson's own verdict (invalid somewhere, or not worth a skeleton)."""


def _valid_utf8(body: Buffer, start: int, end: int) -> bool:
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    view = memoryview(body)
    try:
        for pos in range(start, end, _UTF8_CHUNK):
            dec.decode(view[pos:min(end, pos + _UTF8_CHUNK)])  # chunk-sized str, dropped at once
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _skeleton(body: Buffer) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The body with each long string value replaced by a placeholder; placeholder -> its literal's span."""
    view = memoryview(body)
    tag = "\x00ccr-" + secrets.token_hex(8) + "-"  # unguessable: a client's own string never collides
    pieces: list[Buffer] = []
    spans: dict[str, tuple[int, int]] = {}
    last = pos = 0
    n = len(view)
    while True:
        pos = _SKIP.match(view, pos).end()  # type: ignore[union-attr]  # matches the empty string at least
        if pos >= n:
            break
        m = _STRING.match(view, pos)
        if m is None:
            raise _NotSimple  # unterminated, or not a string orjson accepts
        end = m.end()
        if end - pos - 2 >= LONG_STRING_BYTES and _IS_KEY.match(view, end) is None:
            if not _valid_utf8(view, pos + 1, end - 1):
                raise _NotSimple
            name = f"{tag}{len(spans)}"
            pieces.append(view[last:pos])
            pieces.append(orjson.dumps(name))
            spans[name] = (pos, end)
            last = end
        pos = end
    if not spans:
        raise _NotSimple  # nothing to leave out: parse the body itself
    pieces.append(view[last:])
    return b"".join(pieces), spans


def _decode(body: Buffer, span: tuple[int, int]) -> str:
    """A long string literal (already checked as orjson would) as its value."""
    text = str(memoryview(body)[span[0]:span[1]], "utf-8")
    return json.decoder.scanstring(text, 1, True)[0]


def _restore(doc: Any, body: Buffer, spans: dict[str, tuple[int, int]]) -> None:
    """Put the real strings back wherever a check reads them (RESTORED_KEYS, at any depth)."""
    stack: list[Any] = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, sub in v.items():
                if k in RESTORED_KEYS and isinstance(sub, str) and sub in spans:
                    v[k] = _decode(body, spans[sub])
                elif isinstance(sub, (dict, list)):
                    stack.append(sub)
        elif isinstance(v, list):
            stack.extend(x for x in v if isinstance(x, (dict, list)))


def loads(body: Buffer) -> Any:
    """The JSON document in `body` as orjson reads it, except that long string values (other than
    those of RESTORED_KEYS) are opaque placeholders. Raises orjson.JSONDecodeError
    exactly when orjson would, with its message, and Ambiguous for a key given twice in one object."""
    return loads_lazy(body)[0]


def _same(s: str) -> str:
    return s


# Raw bytes of a long string decoded per step by LongStrings.chunks: the str of one step is at most
# 4 times as large (an astral character makes a str 4 bytes a character), so at most 256 KiB.
CHUNK_BYTES = 64 * 1024
_HIGH_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")


def _starts_escape(raw: memoryview, start: int, i: int) -> bool:
    """Whether the backslash at i begins an escape: an even number of backslashes right before it
    (`start` is always at an escape boundary)."""
    before = bytes(raw[start:i])
    return (len(before) - len(before.rstrip(b"\\"))) % 2 == 0


def _chunk_end(raw: memoryview, start: int, end: int, want: int) -> int:
    """Where a step of a checked string literal's contents [start, end) may stop, at or before
    start + want (want >= 32): never inside an escape (a high-low surrogate pair counts as one),
    never inside a UTF-8 sequence. It moves back at most 21 bytes, so a step is never empty."""
    c = start + want
    if c >= end:
        return end
    lo = max(start, c - 12)  # an escape is at most 6 bytes: one crossing c begins after c - 6
    k = bytes(raw[lo:c]).rfind(b"\\")
    if k != -1 and _starts_escape(raw, start, k + lo):
        c = k + lo  # the last escape before c may cross it: stop before it
        if c - 6 >= start and _HIGH_SURROGATE_ESCAPE.match(bytes(raw[c - 6:c])) is not None \
                and _starts_escape(raw, start, c - 6):
            c -= 6  # it may be the low half of a surrogate pair: keep the pair together
    while raw[c] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back to its lead byte
        c -= 1
    return c


class LongStrings:
    """The strings a skeleton left in the body, by placeholder. Called with any string of the
    document: its real value (a placeholder is decoded from the body on demand; any other string
    is itself). `chunks` gives a value in pieces, so a 20 MB text is never one Python str (the PII
    scan reads text that way: extauth/pii.py); `size` bounds a value's length without decoding it."""

    __slots__ = ("body", "spans")

    def __init__(self, body: Buffer, spans: dict[str, tuple[int, int]]) -> None:
        self.body, self.spans = body, spans

    def __call__(self, s: str) -> str:
        span = self.spans.get(s)
        return s if span is None else _decode(self.body, span)

    def size(self, s: str) -> int:
        """At least the value's length in characters (its literal's bytes for a placeholder)."""
        span = self.spans.get(s)
        return len(s) if span is None else span[1] - span[0] - 2

    def chunks(self, s: str, step: int | None = None) -> Iterator[str]:
        """The value in consecutive pieces that join to it (a few KB to CHUNK_BYTES of the literal each)."""
        step = max(step or CHUNK_BYTES, 32)
        span = self.spans.get(s)
        if span is None:
            for i in range(0, len(s), step):
                yield s[i:i + step]
            return
        raw = memoryview(self.body)
        pos, end = span[0] + 1, span[1] - 1
        while pos < end:
            stop = _chunk_end(raw, pos, end, step)
            text = str(raw[pos:stop], "utf-8")
            if "\\" in text:
                text = json.decoder.scanstring('"' + text + '"', 1, True)[0]
            yield text
            pos = stop


def loads_lazy(body: Buffer) -> tuple[Any, Callable[[str], str]]:
    """`loads`, and a function giving any string of the document its real value (a placeholder
    is decoded from the body on demand, one string at a time; other strings are themselves):
    a LongStrings when the body was read as a skeleton. The PII scan reads text through it
    (extauth/pii.py)."""
    if len(body) < SKELETON_FROM_BYTES:
        return loads_one_reading(body), _same
    try:
        skeleton, spans = _skeleton(body)
        doc = loads_one_reading(skeleton)  # its keys are the body's, byte for byte: a repeated one is the body's
    except (_NotSimple, orjson.JSONDecodeError):
        return loads_one_reading(body), _same
    del skeleton
    _restore(doc, body, spans)
    return doc, LongStrings(body, spans)

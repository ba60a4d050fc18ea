"""Find personal data in the text a Messages request carries (the PII policy's facts).

The decision stays in Rego (policies/authz.rego, "prompt PII"); this module only says *what kind* of data was
found *where* (`system`, `messages[3].content[1]`, `messages[2].content[0].input.path`, ...),
never the value, so neither the policy input nor any log ever holds it.

Texts scanned: the system prompt, message text (string content, text and thinking blocks,
plain-text documents), every string inside a tool_use input, and tool_result content (a string
or its blocks). Adjacent text blocks of one container (a message's content, a tool_result's
content, the system blocks) are also scanned joined without a separator, so a number split across
blocks is found; the finding names the block where it starts.

Hostile spellings are normalised first: NFKC (fullwidth digits and letters, odd spaces), any
Unicode decimal digit to ASCII, dash look-alikes to '-', and zero-width / invisible format
characters removed. ASCII-only text (the common case) skips all of that.

Every pattern is linear: fixed-width or bounded quantifiers after a literal-class anchor, no
nested unbounded repetition, so a 2 MB adversarial string costs one pass (bench/pii_scan.py).

A run of text over STREAM_FROM_CHARS is decoded and scanned a chunk at a time in overlapping
windows (`_Windows`), so its memory is bounded whatever the body's size (docs/large-bodies.md);
each chunk is normalised on its own (a combining mark right after a chunk boundary is composed
without its base, which no detector looks at).
"""

from __future__ import annotations

import bisect
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

KINDS = ("ssn", "card", "iban", "email")
MAX_FINDINGS = 32  # enough to decide and to explain; a text full of numbers stops here
MAX_DEPTH = 64  # tool inputs nested deeper are scanned as far as this (and reported)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    location: str

    def policy_input(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.location}


@dataclass(frozen=True, slots=True)
class Pattern:
    """A pattern a team adds as data: `{"name": ..., "regex": ...}` (Python `re` syntax)."""

    name: str
    regex: re.Pattern[str]


def compile_patterns(specs: Any) -> list[Pattern]:
    """data.pii.patterns as Pattern objects; a bad entry raises ValueError (the bundle is refused)."""
    out: list[Pattern] = []
    for i, s in enumerate(specs or ()):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("regex"), str):
            raise ValueError(f"pii.patterns[{i}]: expected {{\"name\": string, \"regex\": string}}")
        try:
            out.append(Pattern(s["name"], re.compile(s["regex"])))
        except re.error as e:
            raise ValueError(f"pii.patterns[{i}] ({s['name']}): invalid regex: {e}") from None
    return out


# -- normalisation ------------------------------------------------------------------

_INVISIBLE = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e"
              "\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff")
_DASHES = "\u2010-\u2015\u2212\ufe58\ufe63\uff0d"
# Every non-ASCII decimal digit (Unicode Nd; all of them lie below U+20000) and what it stands for.
_DIGITS = {cp: str(unicodedata.digit(chr(cp))) for cp in range(0x80, 0x20000)
           if unicodedata.category(chr(cp)) == "Nd"}
_TABLE: dict[int, str | None] = {**_DIGITS, **{cp: "-" for cp in (*range(0x2010, 0x2016), 0x2212, 0xFE58,
                                                                   0xFE63, 0xFF0D)}}

# Two passes, each one small class sre scans fast (one class of every Nd range is 4x slower):
# invisible characters and dash look-alikes, then non-ASCII decimal digits.
_ODD = re.compile("[" + _INVISIBLE + _DASHES + "]")
_NON_ASCII_DIGIT = re.compile(r"[^\D0-9]")


def _invisible_table() -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    for part in re.findall(r".-.|.", _INVISIBLE):
        lo, hi = (part[0], part[2]) if len(part) == 3 else (part, part)
        out.update({cp: None for cp in range(ord(lo), ord(hi) + 1)})
    return out


_TABLE.update(_invisible_table())


_REPLACE = {chr(cp): to or "" for cp, to in _TABLE.items()}


def _replace(m: re.Match[str]) -> str:
    return _REPLACE[m.group()]


def normalise(text: str) -> str:
    if text.isascii():
        return text
    # sub with a callback only where a character needs fixing: str.translate costs ~45 ns a character.
    text = _ODD.sub(_replace, unicodedata.normalize("NFKC", text))
    return _NON_ASCII_DIGIT.sub(_replace, text)


# -- detectors --------------------------------------------------------------------------

# Every pattern starts with a character class (sre then skips ahead in C) and has no nested
# unbounded repetition. Numbers: one pass finds runs of 9+ digits (single spaces or dashes between
# them); SSN and card patterns run only inside those runs.
_NUMBER = re.compile(r"[0-9](?:[ -]?[0-9]){8,}")
# Everything before the next run of 9+ digits, in one possessive match: text without digits, and groups
# of at most 8 digits (single spaces or dashes between them) that end there. One match call crosses a
# text's short numbers (line numbers, dates, amounts) in C; _NUMBER.finditer tries, and fails, a match at
# each of their digits (~0.1 us each).
_TO_NUMBER = re.compile(r"(?:[^0-9]++|[0-9](?:[ -]?[0-9]){0,7}+(?![ -]?[0-9]))*+")


def number_runs(text: str) -> Iterator[tuple[int, int]]:
    """The spans of _NUMBER.finditer(text): runs of 9+ digits, single spaces or dashes between them."""
    pos, n = 0, len(text)
    while True:
        pos = _TO_NUMBER.match(text, pos).end()  # type: ignore[union-attr]  # matches the empty string at least
        if pos >= n:
            return
        m = _NUMBER.match(text, pos)
        if m is None:  # cannot happen (the skip stops only before a run); stay exact all the same
            pos += 1
            continue
        yield m.span()
        pos = m.end()


# SSN: AAA-GG-SSSS with the same separator twice ('-', ' ' or none); not part of a longer number.
_SSN = re.compile(r"[0-9](?<![0-9-][0-9])([0-9]{2})([- ]?)([0-9]{2})\2([0-9]{4})(?![0-9]|-[0-9])")
# Card: 13-19 digits, single spaces or dashes between them.
_CARD = re.compile(r"[0-9](?<![0-9][0-9])(?:[ -]?[0-9]){12,18}(?![0-9])")
# IBAN: country, 2 check digits, BBAN in groups (single spaces allowed); cut to the country's length below.
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z][0-9]{2}((?: ?[A-Za-z0-9]){10,30})")
# Email, from its '@': a dotted domain after it, a local part (at most 64) right before it.
_AT = re.compile(r"@")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])")
_LOCAL = re.compile(r"[A-Za-z0-9](?<![A-Za-z0-9._%+-][A-Za-z0-9])[A-Za-z0-9._%+-]{0,63}\Z")

# IBAN lengths by country (the IBAN registry).
_IBAN_LEN = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def ssn_valid(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# Issuer prefixes of the major networks: a Luhn-valid 16-digit number is otherwise 1 in 10.
_CARD_IIN = re.compile(
    r"4|5[1-5]|2(?:2[2-9][1-9]|2[3-9]|[3-6]|7[01]|720)|3[47]|3(?:0[0-5]|[689])|6(?:011|5|4[4-9]|22)|35|62|81"
)


def card_valid(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and _CARD_IIN.match(digits) is not None and luhn_valid(digits)


def iban_valid(compact: str) -> bool:
    """`compact`: upper-case, no spaces, exactly the country's length."""
    rearranged = compact[4:] + compact[:4]
    n = 0
    for ch in rearranged:  # mod 97 digit by digit: letters are 10..35
        v = ord(ch) - 48 if ch <= "9" else ord(ch) - 55
        n = (n * 100 + v) % 97 if v > 9 else (n * 10 + v) % 97
    return n == 1


def _iban_at(m: re.Match[str]) -> bool:
    country = m.group()[:2]
    want = _IBAN_LEN.get(country)
    if want is None:
        return False
    bban = m.group(1).replace(" ", "")
    if len(bban) < want - 4:
        return False
    return iban_valid((m.group()[:4] + bban[: want - 4]).upper())


def _detect(text: str, kinds: frozenset[str], custom: list[Pattern]) -> Iterator[tuple[str, int]]:
    """(kind, start offset) of each valid hit in a normalised text."""
    # SSNs, cards and IBANs all hold ASCII digits (once normalised): a text without any skips their
    # passes. Ten `in` tests run at memchr speed (~3 us for 25 KB); each regex pass costs ~3.5 ns a
    # character (~85 us for 25 KB), since sre tests a character class one character at a time.
    digits = any(d in text for d in "0123456789")
    if digits and ("ssn" in kinds or "card" in kinds):
        for s, e in number_runs(text):  # maximal: what follows never extends a run, so lookaheads see the same
            if "ssn" in kinds:
                for m in _SSN.finditer(text, s, e):
                    if ssn_valid(text[m.start():m.start() + 1] + m.group(1), m.group(3), m.group(4)):
                        yield "ssn", m.start()
            if "card" in kinds:
                for m in _CARD.finditer(text, s, e):
                    if card_valid(m.group().replace(" ", "").replace("-", "")):
                        yield "card", m.start()
    if digits and "iban" in kinds:
        for m in _IBAN.finditer(text):
            if _iban_at(m):
                yield "iban", m.start()
    if "email" in kinds and "@" in text:
        for at in _AT.finditer(text):
            i = at.start()
            if _DOMAIN.match(text, i + 1) is not None:
                local = _LOCAL.search(text, max(0, i - 64), i)
                if local is not None:
                    yield "email", local.start()
    for p in custom:
        for m in p.regex.finditer(text):
            yield p.name, m.start()


# -- walking the request ------------------------------------------------------------

# (location, text) pieces of one container, in order; None separates runs that must not be joined.
Piece = tuple[str, str] | None
TextOf = Callable[[str], str]


# A key that cannot carry data (no more than 2 digits, 42 characters): the only kind a denial names.
PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z_]{0,39}[0-9]{0,2}")


def _ident(s: str) -> str:
    return s


def _strings(v: Any, loc: str, out: list[Piece], text_of: TextOf, depth: int) -> None:
    """Every string inside a JSON value (tool_use input), each its own run."""
    if depth > MAX_DEPTH:
        return
    if isinstance(v, str):
        out.append((loc, v))
        out.append(None)
    elif isinstance(v, dict):
        for i, (k, sub) in enumerate(v.items()):
            # A location names a key only when it cannot carry data itself (it is echoed in the
            # denial); any other key is named by position, and is scanned like a value.
            if PLAIN_KEY.fullmatch(k) is not None:
                key = f"{loc}.{k}"
            else:
                key = f"{loc}.<key {i}>"
                out.append((key, k))
                out.append(None)
            _strings(sub, key, out, text_of, depth + 1)
    elif isinstance(v, list):
        for i, sub in enumerate(v):
            _strings(sub, f"{loc}[{i}]", out, text_of, depth + 1)


def _blocks(content: Any, loc: str, out: list[Piece], text_of: TextOf, depth: int) -> None:
    """A content value (string or list of blocks): text blocks in a run are joined."""
    if isinstance(content, str):
        out.append((loc, content))
        out.append(None)
        return
    if not isinstance(content, list) or depth > MAX_DEPTH:
        return
    for i, b in enumerate(content):
        bl = f"{loc}[{i}]"
        if not isinstance(b, dict):
            out.append(None)
            continue
        t = b.get("type")
        if t in ("text", "thinking"):
            s = b.get(t)
            if isinstance(s, str):
                out.append((bl, s))
                continue  # the run goes on into the next block
        out.append(None)
        if t == "tool_use" or t == "server_tool_use":
            _strings(b.get("input"), f"{bl}.input", out, text_of, depth + 1)
        elif t == "tool_result" or (isinstance(t, str) and t.endswith("_tool_result")):
            _blocks(b.get("content"), f"{bl}.content", out, text_of, depth + 1)
        elif t == "document":
            src = b.get("source")
            if isinstance(src, dict):
                if src.get("type") == "text" and isinstance(src.get("data"), str):
                    out.append((f"{bl}.source.data", src["data"]))
                    out.append(None)
                elif src.get("type") == "content":
                    _blocks(src.get("content"), f"{bl}.source.content", out, text_of, depth + 1)
    out.append(None)


def pieces(doc: dict[str, Any], text_of: TextOf = _ident) -> list[Piece]:
    """The texts a Messages body carries, with locations, as the body holds them: a long string may
    still be a placeholder (extauth/lean_json.py), which `text_of` decodes."""
    out: list[Piece] = []
    _blocks(doc.get("system"), "system", out, text_of, 0)
    msgs = doc.get("messages")
    if isinstance(msgs, list):
        for i, m in enumerate(msgs):
            if isinstance(m, dict):
                _blocks(m.get("content"), f"messages[{i}].content", out, text_of, 0)
    return out


# A run of text (one string, or adjacent blocks) up to this size is scanned whole; a longer one is
# decoded and scanned a chunk at a time, so a 20 MB text never becomes one Python str (issue 6: two
# copies of a body at most in any process). Sizes are the body's bytes, which bound the characters.
STREAM_FROM_CHARS = 256 * 1024
# Characters (as sliced from a str already in memory) per chunk of the streamed scan.
CHUNK_CHARS = 64 * 1024
# Each window of the streamed scan holds WINDOW_CHARS of new text, AHEAD characters after it and
# BACK before it. A built-in kind's match with its lookarounds is at most ~600 characters (an email
# with 8 domain labels), so one that starts in the new text lies wholly in the window and is found
# there, also when a chunk boundary splits it; a match is kept only where it starts in the new text,
# so none is found twice and no lookaround sees an artificial end. A team pattern is found across
# a boundary when its match (with its lookarounds) is at most AHEAD characters.
WINDOW_CHARS = 64 * 1024
AHEAD = 4096
BACK = 128


class _Windows:
    """Detection over a text that arrives in chunks (see WINDOW_CHARS): (kind, offset in the whole text)."""

    __slots__ = ("_base", "_custom", "_kinds", "_pending", "_pending_len", "_tail")

    def __init__(self, kinds: frozenset[str], custom: list[Pattern]) -> None:
        self._kinds, self._custom = kinds, custom
        self._tail = ""  # up to BACK characters before the new text: context only
        self._pending: list[str] = []  # the new text not scanned yet
        self._pending_len = 0
        self._base = 0  # offset of _tail[0] in the whole text

    def feed(self, chunk: str) -> list[tuple[str, int]]:
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        return self._scan(False) if self._pending_len >= WINDOW_CHARS + AHEAD else []

    def finish(self) -> list[tuple[str, int]]:
        return self._scan(True)

    def _scan(self, final: bool) -> list[tuple[str, int]]:
        window = self._tail + "".join(self._pending)
        own_from = len(self._tail)
        own_to = len(window) if final else len(window) - AHEAD
        base = self._base
        hits = [(kind, base + at) for kind, at in _detect(window, self._kinds, self._custom)
                if own_from <= at < own_to]
        cut = max(0, own_to - BACK)
        self._base = base + cut
        self._tail = window[cut:own_to]
        rest = window[own_to:]
        self._pending = [rest] if rest else []
        self._pending_len = len(rest)
        return hits


def _chunks(value: str, text_of: TextOf) -> Iterator[str]:
    """A text of the body in pieces: decoded piecewise from the body when it was left there
    (extauth/lean_json.py LongStrings), else sliced."""
    chunks = getattr(text_of, "chunks", None)
    if chunks is not None:
        yield from chunks(value)
        return
    text = text_of(value)
    for i in range(0, len(text), CHUNK_CHARS):
        yield text[i:i + CHUNK_CHARS]


def scan(doc: dict[str, Any], custom: list[Pattern] | None = None, kinds: frozenset[str] | None = None,
         text_of: TextOf = _ident, limit: int = MAX_FINDINGS) -> list[Finding]:
    """What personal data the request's text holds, and where: kind and location, never the value."""
    kinds = frozenset(KINDS) if kinds is None else kinds
    custom = custom or []
    found: list[Finding] = []
    seen: set[Finding] = set()
    size_of: Callable[[str], int] = getattr(text_of, "size", len)

    def add(f: Finding) -> bool:
        if f not in seen:
            seen.add(f)
            found.append(f)
        return len(found) >= limit

    def whole(run: list[tuple[str, str]]) -> bool:
        texts = [normalise(text_of(v)) for _, v in run]
        if len(run) == 1:
            return any(add(Finding(kind, run[0][0])) for kind, _ in _detect(texts[0], kinds, custom))
        # Each block alone (a joined text can hide one: "123-45-6789" + "1..." is a longer number),
        # then the joined run for what is split across blocks.
        for (loc, _), t in zip(run, texts, strict=True):
            if any(add(Finding(kind, loc)) for kind, _ in _detect(t, kinds, custom)):
                return True
        starts = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
        for kind, at in _detect("".join(texts), kinds, custom):
            if add(Finding(kind, run[bisect.bisect_right(starts, at) - 1][0])):
                return True
        return False

    def streamed(run: list[tuple[str, str]]) -> bool:
        # The same two scans as whole(), fed one normalised chunk at a time.
        joined = _Windows(kinds, custom) if len(run) > 1 else None
        starts: list[int] = []
        pos = 0
        for loc, v in run:
            starts.append(pos)
            alone = _Windows(kinds, custom)
            for raw in _chunks(v, text_of):
                t = normalise(raw)
                pos += len(t)
                if any(add(Finding(kind, loc)) for kind, _ in alone.feed(t)):
                    return True
                if joined is not None and any(add(Finding(kind, run[bisect.bisect_right(starts, at) - 1][0]))
                                              for kind, at in joined.feed(t)):
                    return True
            if any(add(Finding(kind, loc)) for kind, _ in alone.finish()):
                return True
        return joined is not None and any(add(Finding(kind, run[bisect.bisect_right(starts, at) - 1][0]))
                                          for kind, at in joined.finish())

    run: list[tuple[str, str]] = []
    for p in pieces(doc, text_of):
        if p is not None:
            run.append(p)
            continue
        if run:
            if (whole if sum(size_of(v) for _, v in run) <= STREAM_FROM_CHARS else streamed)(run):
                return found
            run = []
    if run:
        (whole if sum(size_of(v) for _, v in run) <= STREAM_FROM_CHARS else streamed)(run)
    return found

"""The PII scan of long texts in bounded chunks (extauth/pii.py `_Windows`, extauth/lean_json.py
`LongStrings.chunks`): what it finds is what scanning each text whole finds, also for a match a
chunk or window boundary cuts in two, and a long string of a body is decoded a piece at a time."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauth import lean_json, pii
from extauth.pii import Finding, compile_patterns, scan

TEAM = compile_patterns([{"name": "employee_id", "regex": r"EMP-[0-9]{6}"}])

# Text made of what the detectors look at: digits (ASCII, fullwidth, Arabic-Indic), separators and their
# look-alikes, invisible characters, letters, '@' and '.', JSON's escapes, astral characters, and whole
# values of every kind (valid and almost valid) so that matches are frequent and cut anywhere.
_atoms = st.sampled_from([
    "1", "7", "0", "９", "\u0663", "-", " ", "\u2011", "\u200b", "\ufeff", "a", "Z", "é", "😀", "@", ".", "\n", '"',
    "\\", "123-45-6789", "123 45 6789", "666-45-6789", "4111 1111 1111 1111", "4111-1111-1111-1112",
    "GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765432", "jo.hn@example.com", "x@y", "EMP-123456",
    "１２３-４５-６７８９", "4111\u200b1111\u200b1111\u200b1111",
])
_text = st.lists(_atoms, max_size=120).map("".join)


def _doc(texts: list[str]) -> dict:
    """The texts as one run of text blocks, and again each in a tool_use input (runs of their own)."""
    return {"system": texts[0] if texts else "", "messages": [
        {"role": "user", "content": [{"type": "text", "text": t} for t in texts]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {"v": texts}}]},
    ]}


def _small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run streamed, in chunks and windows far smaller than a match, with the same context bounds."""
    monkeypatch.setattr(pii, "STREAM_FROM_CHARS", 0)
    monkeypatch.setattr(pii, "CHUNK_CHARS", 7)
    monkeypatch.setattr(pii, "WINDOW_CHARS", 5)
    monkeypatch.setattr(pii, "AHEAD", 700)  # still more than the longest built-in match with its context
    monkeypatch.setattr(lean_json, "CHUNK_BYTES", 32)  # the smallest step LongStrings takes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_text, min_size=1, max_size=4), ascii_json=st.booleans())
def test_streamed_scan_finds_what_the_whole_scan_finds(monkeypatch: pytest.MonkeyPatch, texts: list[str],
                                                       ascii_json: bool) -> None:
    doc = _doc(texts)
    whole = set(scan(doc, custom=TEAM, limit=1000))
    with monkeypatch.context() as m:
        _small_windows(m)
        streamed = set(scan(doc, custom=TEAM, limit=1000))
        # The same texts left in a body as placeholders, decoded from it 32 bytes at a time (escapes,
        # \u escapes and surrogate pairs with ascii_json, multi-byte UTF-8 otherwise, cut anywhere).
        m.setattr(lean_json, "SKELETON_FROM_BYTES", 0)
        m.setattr(lean_json, "LONG_STRING_BYTES", 16)
        body = json.dumps(doc).encode() if ascii_json else orjson.dumps(doc)
        lazy, text_of = lean_json.loads_lazy(body)
        from_body = set(scan(lazy, custom=TEAM, text_of=text_of, limit=1000))
    assert streamed == whole
    assert from_body == whole


@settings(max_examples=200, deadline=None)
@given(text=st.lists(st.sampled_from(["a", "é", "😀", "\\", '"', "\n", "\u2028", "\x01", "1", "\ud7ff"]),
                     min_size=40, max_size=400).map("".join),
       ascii_json=st.booleans(), step=st.integers(32, 80))
def test_long_strings_decode_in_pieces_that_join_to_the_value(text: str, ascii_json: bool, step: int) -> None:
    body = (json.dumps({"t": text}) if ascii_json else orjson.dumps({"t": text}).decode()).encode()
    start = body.index(b'"', body.index(b":"))
    spans = {"p": (start, len(body) - 1)}  # the literal of "t", quotes included
    assert body[-2:] == b'"}'
    parts = list(lean_json.LongStrings(body, spans).chunks("p", step))
    assert "".join(parts) == text and all(parts)
    assert all(len(p.encode()) <= step for p in parts)  # a piece is never more than its step of the body


def _big(text: str) -> tuple[dict, object]:
    """A Messages body over the skeleton threshold, read as extauth reads it."""
    body = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8,
                         "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]})
    assert len(body) >= lean_json.SKELETON_FROM_BYTES
    doc, text_of = lean_json.loads_lazy(body)
    assert isinstance(text_of, lean_json.LongStrings)
    return doc, text_of


# Where the real-size scan of an ASCII text cuts: decoding steps (CHUNK_BYTES of the literal) and the
# end of each window's own text (where a window is scanned, AHEAD before what it holds).
_STEP = lean_json.CHUNK_BYTES
_WINDOW_END = 2 * lean_json.CHUNK_BYTES - pii.AHEAD  # the first window: two steps pending, then scanned


@pytest.mark.parametrize("boundary", [_STEP, _WINDOW_END, 3 * _STEP], ids=["step", "window", "step3"])
def test_an_ssn_straddling_a_chunk_boundary_is_found_and_no_boundary_makes_one(boundary: int) -> None:
    ssn = "123-45-6789"
    size = 1_200_000
    for cut in range(1, len(ssn)):  # the boundary falls after `cut` characters of the number
        at = boundary - cut
        text = "x" * at + ssn + " " + "y" * (size - at - len(ssn) - 1)
        doc, text_of = _big(text)
        assert scan(doc, text_of=text_of) == [Finding("ssn", "messages[0].content[0]")], cut
        # A longer number cut at the same place is not an SSN: no window sees an artificial end.
        longer = "x" * at + ssn + "0" + "y" * (size - at - len(ssn) - 1)
        doc, text_of = _big(longer)
        assert scan(doc, text_of=text_of) == [], cut
    # Nor one that begins right at the boundary after a digit before it (a window's left edge).
    doc, text_of = _big("x" * (boundary - 1) + "9" + ssn + " " + "y" * (size - boundary - len(ssn) - 1))
    assert scan(doc, text_of=text_of) == []


def test_an_escape_or_multibyte_character_at_a_step_boundary_is_decoded_whole() -> None:
    """A step never ends inside `\\u00e9`, a surrogate pair's escapes or a UTF-8 sequence."""
    for filler, piece in (("x", "\\u00e9"), ("x", "\\ud83d\\ude00"), ("x", "\\\\"), ("é", "é")):
        for shift in range(0, 14):
            literal = filler * (_STEP - shift) + piece + "123-45-6789 " + "z" * 1_100_000
            body = ('{"model": "m", "messages": [{"role": "user", "content": "' + literal + '"}]}').encode()
            doc, text_of = lean_json.loads_lazy(body)
            assert isinstance(text_of, lean_json.LongStrings)
            [placeholder] = text_of.spans
            assert "".join(text_of.chunks(placeholder)) == json.loads(body)["messages"][0]["content"]
            assert scan(doc, text_of=text_of) == [Finding("ssn", "messages[0].content")], (piece, shift)


def test_split_across_blocks_of_a_long_run_names_the_block_it_starts_in() -> None:
    """A run of blocks over STREAM_FROM_CHARS is streamed: a number split across two of its blocks is
    still found and named by its first block; a number alone in a block is found too."""
    pad = "w" * (pii.STREAM_FROM_CHARS // 2)
    doc = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": pad}, {"type": "text", "text": pad + " card 4111 1111"},
        {"type": "text", "text": " 1111 1111 end " + pad}, {"type": "text", "text": "ssn 123-45-6789"}]}]}
    assert set(scan(doc)) == {Finding("card", "messages[0].content[1]"), Finding("ssn", "messages[0].content[3]")}


@settings(max_examples=400, deadline=None)
@given(text=st.lists(st.sampled_from(["1", "2", "0", " ", "-", "  ", "--", "a", "Z", "12345678", "123456789",
                                      "1 2 3 4 5 6 7 8 9", "1-2-3-4", " -", "\n"]), max_size=60).map("".join))
def test_number_runs_are_the_number_patterns_matches(text: str) -> None:
    """The skip-ahead reader of digit runs (extauth/pii.py number_runs) finds exactly what the pattern does."""
    assert list(pii.number_runs(text)) == [m.span() for m in pii._NUMBER.finditer(text)]

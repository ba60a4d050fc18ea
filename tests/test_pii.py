"""The prompt PII scanner (extauth/pii.py) and its settings from the bundle's data."""

from __future__ import annotations

import pytest

from extauth.bundle import BundleError
from extauth.pii import Finding, card_valid, compile_patterns, iban_valid, luhn_valid, normalise, scan
from extauth.policy import pii_settings


def user(*blocks) -> dict:
    return {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": list(blocks)}]}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def kinds(doc: dict, **kw) -> list[tuple[str, str]]:
    return [(f.kind, f.location) for f in scan(doc, **kw)]


@pytest.mark.parametrize("ssn", ["123-45-6789", "123 45 6789", "123456789"])
def test_ssn_spellings(ssn: str) -> None:
    assert kinds(user(text(f"my number is {ssn}."))) == [("ssn", "messages[0].content[0]")]


@pytest.mark.parametrize("bad", ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000",
                                 "123-45 6789", "1123-45-6789", "123-45-67890", "123-45-6789-1"])
def test_ssn_invalid_or_embedded_is_not_found(bad: str) -> None:
    assert kinds(user(text(f"x {bad} y"))) == []


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "5500005555555559",
                                  "378282246310005", "6011111111111117"])
def test_cards_with_luhn(card: str) -> None:
    assert kinds({"system": f"pay with {card} please"}) == [("card", "system")]


def test_card_with_bad_luhn_or_unknown_issuer_is_not_found() -> None:
    assert not luhn_valid("4111111111111112")
    assert kinds({"system": "4111 1111 1111 1112 and 1234567812345670"}) == []
    assert luhn_valid("1234567812345670") and not card_valid("1234567812345670")  # Luhn ok, no issuer


def test_iban_checksum() -> None:
    assert iban_valid("GB82WEST12345698765432")
    assert not iban_valid("GB83WEST12345698765432")
    assert kinds({"system": "IBAN GB82 WEST 1234 5698 7654 32 thanks"}) == [("iban", "system")]
    assert kinds({"system": "DE89370400440532013000"}) == [("iban", "system")]
    assert kinds({"system": "GB83 WEST 1234 5698 7654 32; XX82WEST12345698765432"}) == []


def test_email() -> None:
    assert kinds({"system": "write to jane.doe+x@mail.example.co.uk."}) == [("email", "system")]
    assert kinds({"system": "no @ here, nor a@b, nor user@localhost"}) == []


def test_string_system_and_block_system() -> None:
    assert kinds({"system": [text("ok"), text("ssn 123-45-6789")]}) == [("ssn", "system[1]")]


def test_split_across_adjacent_text_blocks_names_the_first() -> None:
    doc = user(text("my ssn is 123-45-"), text("6789 ok"))
    assert kinds(doc) == [("ssn", "messages[0].content[0]")]
    card = user(text("4111 1111"), text(" 1111 "), text("1111"))
    assert kinds(card) == [("card", "messages[0].content[0]")]


def test_blocks_of_different_messages_are_not_joined() -> None:
    doc = {"messages": [{"role": "user", "content": [text("123-45-")]},
                        {"role": "assistant", "content": [text("6789")]}]}
    assert kinds(doc) == []


def test_tool_use_input_strings_at_any_depth() -> None:
    doc = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        text("calling"),
        {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"path": "/x", "rows": [{"acct": "123-45-6789"}]}},
    ]}]}
    assert kinds(doc) == [("ssn", "messages[1].content[1].input.rows[0].acct")]


def test_tool_result_string_and_blocks() -> None:
    as_str = user({"type": "tool_result", "tool_use_id": "t1", "content": "SSN: 123-45-6789"})
    assert kinds(as_str) == [("ssn", "messages[0].content[0].content")]
    as_blocks = user({"type": "tool_result", "tool_use_id": "t1",
                      "content": [text("rows:"), text("4111 1111 1111 1111")]})
    assert kinds(as_blocks) == [("card", "messages[0].content[0].content[1]")]


def test_zero_width_and_lookalike_digits() -> None:
    assert normalise("１２３\u200b-４５-\u20606789") == "123-45-6789"
    hostile = [
        "123\u200b-45-67\u200c89",  # zero-width space / non-joiner inside the number
        "１２３-４５-６７８９",  # fullwidth digits
        "\u0661\u0662\u0663-\u0664\u0665-\u0666\u0667\u0668\u0669",  # Arabic-Indic digits
        "123\u201145\u20116789",  # non-breaking hyphens
        "\ufeff123-45-\u200d6789",
    ]
    for h in hostile:
        assert kinds(user(text(f"id {h} end"))) == [("ssn", "messages[0].content[0]")], h


def test_team_pattern_and_kinds_filter() -> None:
    pats = compile_patterns([{"name": "employee_id", "regex": r"EMP-[0-9]{6}"}])
    doc = {"system": "EMP-123456 and a@example.com and 123-45-6789"}
    assert kinds(doc, custom=pats, kinds=frozenset({"ssn"})) == [("ssn", "system"), ("employee_id", "system")]


def test_findings_are_deduplicated_and_bounded() -> None:
    doc = user(*[text(f"123-45-67{i:02d}") for i in range(1, 60)])
    assert len(scan(doc, limit=5)) == 5  # one run: 59 blocks, each its own location
    assert scan({"system": "123-45-6789 " * 10}) == [Finding("ssn", "system")]


def test_images_and_odd_shapes_are_ignored() -> None:
    doc = {"messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "123-45-6789"}},
                                     "not a block", 7, {"type": "text", "text": 5}]},
        "not a message", {"role": "user", "content": None},
    ], "system": 3}
    assert kinds(doc) == []


def test_deep_nesting_is_bounded() -> None:
    v: object = "123-45-6789"
    for _ in range(5000):
        v = {"a": v}
    doc = {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": v}]}]}
    assert kinds(doc) == []  # deeper than MAX_DEPTH: not walked, and no RecursionError
    shallow: object = "123-45-6789"
    for _ in range(10):
        shallow = [shallow]
    doc["messages"][0]["content"][0]["input"] = shallow
    assert kinds(doc) == [("ssn", "messages[0].content[0].input" + "[0]" * 10)]


def test_adversarial_2mb_strings_are_scanned() -> None:
    # Linear patterns: these finish in a fraction of a second (timed in bench/pii_scan.py, not here).
    for s in ("1" * 2_000_000, "1-" * 1_000_000, "a@" * 1_000_000, "GB82 " * 400_000, "a." * 1_000_000 + "@"):
        assert scan(user(text(s + " 123-45-6789"))) == [Finding("ssn", "messages[0].content[0]")]


def test_settings_from_bundle_data() -> None:
    assert pii_settings({}) is None
    assert pii_settings({"pii": {"mode": "off"}}) is None
    s = pii_settings({"pii": {"mode": "block", "kinds": ["ssn"], "patterns": [{"name": "x", "regex": "X+"}]}})
    assert s is not None and s.mode == "block" and s.kinds == frozenset({"ssn"}) and s.patterns[0].name == "x"
    for bad in ({"mode": "warn"}, {"mode": "block", "kinds": ["phone"]}, {"mode": "log", "patterns": [{"name": "x"}]},
                {"mode": "log", "patterns": [{"name": "x", "regex": "("}]}, "block"):
        with pytest.raises(BundleError):
            pii_settings({"pii": bad})


def test_a_number_in_a_block_is_found_even_when_the_next_block_starts_with_digits() -> None:
    assert kinds(user(text("ssn 123-45-6789"), text("1 item"))) == [("ssn", "messages[0].content[0]")]


def test_compiled_policy_decides_on_the_findings(tmp_path) -> None:
    """The shipped Rego, compiled to WASM as extauth runs it: findings in the input, in the cache key."""
    import json
    import shutil

    from extauth.bundle import build_bundle, read_bundle
    from extauth.decisions import canonical, policy_input
    from extauth.endpoints import match
    from extauth.policy import PolicyEngine
    from extauth.principal import Principal, PrincipalKind
    from tests.harness import REPO

    src = tmp_path / "policies"
    shutil.copytree(REPO / "policies", src)
    data = json.loads((src / "data.json").read_text())
    data["pii"].update(mode="block", exempt_groups=["compliance"])
    (src / "data.json").write_text(json.dumps(data))
    out = build_bundle(src, tmp_path / "b.tar.gz", "ccr/authz/decision")
    eng = PolicyEngine(read_bundle(out), "ccr/authz/decision")
    try:
        assert eng.host_builtins == {}  # WASM-native only
        assert eng.pii is not None and eng.pii.mode == "block"
        p = Principal(PrincipalKind.KEY, "key_1", "ci-bot", ("default",), key_id="key_1")
        ep = match("POST", "/v1/messages")
        found = (Finding("ssn", "messages[0].content"),)
        d = eng.decide(p, "POST", "/v1/messages", "claude-sonnet-4-5", ep, found)
        assert not d.allow and d.reason.startswith("prompt contains a US SSN (messages[0].content)")
        assert eng.decide(p, "POST", "/v1/messages", "claude-sonnet-4-5", ep, ()).allow  # not the cached denial
        assert eng.decide(p, "POST", "/v1/messages", "claude-sonnet-4-5", ep, None).allow
        exempt = Principal(PrincipalKind.KEY, "key_2", "auditor", ("default", "compliance"), key_id="key_2")
        d = eng.decide(exempt, "POST", "/v1/messages", "claude-sonnet-4-5", ep, found)
        assert d.allow and "personal data logged: a US SSN (messages[0].content)" in d.reason
        doc = policy_input(p, "POST", "/v1/messages", "claude-sonnet-4-5", ep, found)
        assert doc["request"]["pii"] == [{"kind": "ssn", "location": "messages[0].content"}]
        assert canonical(doc) != canonical(policy_input(p, "POST", "/v1/messages", "claude-sonnet-4-5", ep))
    finally:
        eng.close()


def test_tool_input_keys_are_scanned_and_never_echoed() -> None:
    doc = {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {
        "path": "/x", "customer 123-45-6789": {"note": "jane@example.com"}}}]}]}
    got = kinds(doc)
    assert got == [("ssn", "messages[0].content[0].input.<key 1>"),
                   ("email", "messages[0].content[0].input.<key 1>.note")]
    assert all("6789" not in loc for _, loc in got)


def test_lookalikes_and_invisible_characters_in_cards_ibans_and_emails() -> None:
    """Every kind, spelled to slip past an ASCII pattern: fullwidth or other-script digits and letters,
    zero-width and other invisible characters inside the number, dash look-alikes, and all of it split
    across the blocks of a tool result."""
    zw = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
    cases = {
        "card": ["４１１１ １１１１ １１１１ １１１１", "4111\u200b1111\u200c1111\u20601111",
                 "\u0664\u0661\u0661\u0661-\u0661\u0661\u0661\u0661\u2011" + "1111\u2212" + "1111",  # Arabic-Indic
                 "5" + zw + "555555555554444"],
        "iban": ["ＧＢ８２ ＷＥＳＴ １２３４ ５６９８ ７６５４ ３２", "GB82\u200bWEST\u00ad12345698765432",
                 "DE89 3704 0044 0532 0130 00".replace(" ", " \u2060")],
        "email": ["ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ", "jo\u200bhn@exa\u200dmple.com"],
    }
    for kind, spellings in cases.items():
        for s in spellings:
            assert kinds(user(text(f"see {s} now")), kinds=frozenset({kind})) == [(kind, "messages[0].content[0]")], s
            # The same spelling cut in three, across a tool result's blocks.
            a, b = len(s) // 3, 2 * len(s) // 3
            doc = user({"type": "tool_result", "tool_use_id": "t",
                        "content": [text("x " + s[:a]), text(s[a:b]), text(s[b:] + " y")]})
            assert kinds(doc, kinds=frozenset({kind})) == [(kind, "messages[0].content[0].content[0]")], s
    # Look-alikes that are not digits stay what they are: no finding from letters that resemble numbers.
    assert kinds(user(text("I23-4S-6789 and O12-34-5678"))) == []

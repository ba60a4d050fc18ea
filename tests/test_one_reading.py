"""A request body is read one way only: a key given twice in one object is refused (extauth/lean_json.py).

orjson, like most parsers, keeps the last value of a repeated key; a provider's parser need not. Each case here
is a way to show the policy one request and the provider another, and each is refused before any check reads the
body, whatever the key, however deep, however it is spelled, in small bodies and in large ones read as skeletons.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extauth import lean_json
from extauth.lean_json import Ambiguous
from extauth.opa_envoy import OpaEnvoyError, parsed_body
from extauth.policy_input import InputError, body_facts
from tests.test_extauth import denied_error, http_check
from tests.test_fallbacks import keys, stub  # noqa: F401  # the real extauth over gRPC, and its keys

SSN = "123-45-6789"
HEAD = '{"model":"claude-haiku-4-5","max_tokens":16,'


@pytest.mark.parametrize("body", [
    b'{"a":1,"a":2}',
    b'{"model":"claude-haiku-4-5","model":"claude-opus-4-8"}',
    b'{"model":"claude-haiku-4-5","mod\\u0065l":"claude-opus-4-8"}',  # one key to every parser, spelled twice
    b'{"messages":[{"role":"user","content":[{"type":"text","text":"' + SSN.encode() + b'","text":"hi"}]}]}',
    b'{"x":[[{"deep":{"k":1,"k":1}}]]}',  # the same value twice is still two readings of the text
])
def test_a_key_given_twice_in_one_object_is_refused(body: bytes) -> None:
    with pytest.raises(Ambiguous, match="is given twice in one object"):
        lean_json.loads(memoryview(body))


def test_the_same_key_in_different_objects_or_inside_a_string_is_one_reading() -> None:
    body = (b'{"messages":[{"role":"user","content":"say \\"role\\": twice"},{"role":"assistant","content":"ok"}],'
            b'"metadata":{"role":1},"k":{"k":{"k":1}}}')
    assert lean_json.loads(body)["messages"][1]["role"] == "assistant"


def test_the_refusal_names_a_key_only_when_it_cannot_carry_data() -> None:
    with pytest.raises(Ambiguous) as e:
        lean_json.loads(b'{"type":"text","type":"image"}')
    assert str(e.value).startswith('"type" is given twice in one object (line 1 column 23)')
    with pytest.raises(Ambiguous) as e:
        lean_json.loads(('{"my ssn ' + SSN + '":1,"my ssn ' + SSN + '":2}').encode())
    assert SSN not in str(e.value) and str(e.value).startswith("a key is given twice")


def _nested(levels: int, repeat_at: int | None = None) -> bytes:
    inner = '"x"'
    for i in range(levels):
        inner = '{"k":' + inner + (',"k":1' if i == repeat_at else "") + "}"
    return inner.encode()


def test_deep_nesting_is_checked_too() -> None:
    # jiter reads 200 levels; deeper (to orjson's 1024) the standard library's parser looks for the repeat.
    assert lean_json.loads(_nested(500)) is not None
    with pytest.raises(Ambiguous, match='"k" is given twice in one object'):
        lean_json.loads(_nested(500, repeat_at=250))
    with pytest.raises(Ambiguous, match='"k" is given twice in one object'):
        lean_json.loads(_nested(500, repeat_at=450))  # jiter sees this one (within its 200 levels of the top)
    # Where neither reaches, orjson would still read it: refused, since a repeat in it could not be found.
    assert orjson.loads(_nested(1010))
    with pytest.raises(Ambiguous, match="nest too deep to check"):
        lean_json.loads(_nested(1010))


def test_invalid_json_keeps_orjson_s_verdict_and_message() -> None:
    bad = b'{"a":1,"a":2,}'  # repeated and invalid: invalid is what the client must fix first
    with pytest.raises(orjson.JSONDecodeError) as e:
        lean_json.loads(bad)
    with pytest.raises(orjson.JSONDecodeError) as want:
        orjson.loads(bad)
    assert str(e.value) == str(want.value)


@pytest.mark.parametrize("small", [True, False])
def test_a_large_body_read_as_a_skeleton_is_refused_too(small: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Large bodies are read as a skeleton (long strings left in the body) or, when that cannot be, whole.
    monkeypatch.setattr(lean_json, "SKELETON_FROM_BYTES", 1 << 40 if small else 0)
    long_text = "x" * 5000
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": long_text}]})[:-1] + b',"model":"n"}'
    with pytest.raises(Ambiguous, match='"model" is given twice'):
        lean_json.loads_lazy(memoryview(body))
    # The repeated key may be one whose value is a long string (left in the body in the skeleton).
    body = b'{"messages":[{"role":"user","content":"' + long_text.encode() + b'","content":"hi"}],"model":"m"}'
    with pytest.raises(Ambiguous, match='"content" is given twice'):
        lean_json.loads_lazy(memoryview(body))
    # Not simple (no long string at all): read whole, and still checked.
    with pytest.raises(Ambiguous):
        lean_json.loads_lazy(memoryview(b'{"model":"m","model":"n","t":"' + b"y" * 10 + b'"}'))


def test_numbers_orjson_reads_otherwise_are_bounded_where_checks_read_them() -> None:
    # The body's parser keeps an integer beyond 64 bits (orjson: a double) and reads a number beyond a double's
    # range as infinity (orjson: invalid). Checks take only bounded integers from a body.
    assert lean_json.loads(b'{"n":123456789012345678901234567890}') == {"n": 123456789012345678901234567890}
    assert lean_json.loads(b'{"n":1e999}') == {"n": float("inf")}
    for v in (2**64, 10**30, 1e999, -1, 1.5):
        with pytest.raises(InputError, match="max_tokens: Input should be a non-negative integer"):
            body_facts({"max_tokens": v})
        with pytest.raises(InputError, match="thinking.budget_tokens: Input should be a non-negative integer"):
            body_facts({"max_tokens": 16, "thinking": {"type": "enabled", "budget_tokens": v}})
    assert body_facts({"max_tokens": 2**64 - 1}).max_tokens == 2**64 - 1


def test_a_refusal_of_the_parser_it_does_not_explain_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fail closed: a body jiter will not read for a reason other than a repeat or depth, which orjson reads, is
    # refused rather than read by orjson alone (its repeats would go unchecked).
    def unexplained(*_a: Any, **_k: Any) -> Any:
        raise ValueError("something jiter has never said")

    monkeypatch.setattr(lean_json.jiter, "from_json", unexplained)
    with pytest.raises(Ambiguous, match="could not be checked for repeated keys"):
        lean_json.loads(b'{"a":1}')
    with pytest.raises(orjson.JSONDecodeError):  # an invalid body still gets orjson's verdict
        lean_json.loads(b'{"a":')


def test_opa_envoy_parsed_body_is_the_same_one_reading() -> None:
    headers = {"content-type": "application/json"}
    assert parsed_body(headers, '{"a":{"b":1},"c":{"b":2}}') == ({"a": {"b": 1}, "c": {"b": 2}}, False)
    with pytest.raises(OpaEnvoyError, match='"b" is given twice'):
        parsed_body(headers, '{"a":{"b":1,"b":2}}')


def _check(stub, key: str, body: bytes, path: str = "/v1/messages") -> tuple[int, dict[str, Any]]:  # noqa: F811
    from google.rpc import code_pb2

    resp = stub.Check(http_check({"x-api-key": key, "content-type": "application/json"}, path=path, body=body))
    return (200, {}) if resp.status.code == code_pb2.OK else denied_error(resp)


def test_extauth_refuses_each_walk_around_with_a_clear_400(stub, keys) -> None:  # noqa: F811
    haiku = keys["haiku"]  # may use claude-haiku-* only
    ok = HEAD + '"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}'
    assert _check(stub, haiku, ok.encode())[0] == 200
    cases = {
        # personal data in the first "text", which a first-key provider reads; the scan would see "hi"
        "text": HEAD + '"messages":[{"role":"user","content":[{"type":"text","text":"' + SSN + '","text":"hi"}]}]}',
        # a document block read as text by the scan, as an image by a first-key provider
        "type": HEAD + '"messages":[{"role":"user","content":[{"type":"image","type":"text","text":"hi"}]}]}',
        # the top-level model, the second spelled with an escape
        "model": '{"model":"claude-opus-4-8","mod\\u0065l":"claude-haiku-4-5","max_tokens":16,'
                 '"messages":[{"role":"user","content":"hi"}]}',
        # a whole messages list given twice
        "messages": HEAD + '"messages":[{"role":"user","content":"' + SSN + '"}],'
                           '"messages":[{"role":"user","content":"hi"}]}',
    }
    for key, body in cases.items():
        status, err = _check(stub, haiku, body.encode())
        assert status == 400 and err["type"] == "invalid_request_error", (key, err)
        assert f'"{key}" is given twice in one object' in err["message"] and SSN not in err["message"], key
    # Numbers the checks cannot take: a clear 400, never a crash.
    for mt in ("123456789012345678901234567890", "1e999"):
        status, err = _check(stub, haiku, (HEAD.replace("16", mt) + '"messages":[{"role":"user","content":"hi"}]}'
                                           ).encode())
        assert status == 400 and "max_tokens: Input should be a non-negative integer" in err["message"], err
    for mt in ("1e999", "123456789012345678901234567890"):
        batch = ('{"requests":[{"custom_id":"a","params":{"model":"claude-haiku-4-5","max_tokens":' + mt + ','
                 '"messages":[{"role":"user","content":"hi"}]}}]}')
        status, err = _check(stub, haiku, batch.encode(), "/v1/messages/batches")
        assert status == 400 and "max_tokens: Input should be a non-negative integer" in err["message"], err
    # A batch: one request's params name the model twice (the parse keeps the allowed Haiku).
    batch = ('{"requests":[{"custom_id":"a","params":{"model":"claude-opus-4-8","model":"claude-haiku-4-5",'
             '"max_tokens":16,"messages":[{"role":"user","content":"hi"}]}}]}')
    status, err = _check(stub, haiku, batch.encode(), "/v1/messages/batches")
    assert status == 400 and '"model" is given twice' in err["message"] and "whole batch" in err["message"]

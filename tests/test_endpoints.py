"""The endpoint registry: exact matching, one canonical spelling per path, and properties
(hypothesis) that no other spelling of an endpoint matches anything."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauth.endpoints import (
    BY_NAME,
    ENDPOINTS,
    MAX_ID_LEN,
    MAX_PATH_BYTES,
    Endpoint,
    Kind,
    match,
    non_canonical,
    path_known,
    split_target,
)

SAMPLE = {"model_id": "claude-sonnet-4-5",
       "bedrock_model": "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "batch_id": "msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d",
          "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", fullmatch=True)


def concrete(e: Endpoint, values: dict[str, str] | None = None) -> str:
    values = values or SAMPLE
    return re.sub(r"\{([a-z_]+)\}", lambda m: values[m.group(1)], e.template)


def test_registry_is_what_ccr_understands() -> None:
    assert {(e.method, e.template) for e in ENDPOINTS} == {
        ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
        ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
        ("POST", "/v1/messages/batches"), ("GET", "/v1/messages/batches"),
        ("GET", "/v1/messages/batches/{batch_id}"), ("GET", "/v1/messages/batches/{batch_id}/results"),
        ("POST", "/v1/messages/batches/{batch_id}/cancel"), ("DELETE", "/v1/messages/batches/{batch_id}"),
        ("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"),
        ("GET", "/v1/files/{file_id}/content"), ("DELETE", "/v1/files/{file_id}"),
        # Other client schemas of a Messages call (translated by the adapter).
        ("POST", "/v1/chat/completions"), ("POST", "/model/{bedrock_model}/invoke"),
        ("POST", "/model/{bedrock_model}/invoke-with-response-stream"),
    }
    assert len(BY_NAME) == len(ENDPOINTS)  # names are unique
    assert [e.name for e in ENDPOINTS if e.model_in_body] == ["messages.create", "messages.count_tokens",
                                                              "messages.openai_chat"]
    assert [e.name for e in ENDPOINTS if e.model_in_path] == ["messages.bedrock_invoke",
                                                              "messages.bedrock_invoke_stream"]


@pytest.mark.parametrize("e", ENDPOINTS, ids=lambda e: e.name)
def test_each_endpoint_matches_itself_only(e: Endpoint) -> None:
    path = concrete(e)
    assert non_canonical(path) is None
    m = match(e.method, path)
    assert m is not None and m.endpoint is e
    assert dict(m.params) == {p: SAMPLE[p] for p in e.params}
    for other in ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "post"):
        hit = match(other, path)
        assert hit is None or hit.endpoint.method == other


def test_params_and_policy_input() -> None:
    m = match("GET", "/v1/messages/batches/msgbatch_01/results")
    assert m is not None and m.name == "batches.results" and m.param("batch_id") == "msgbatch_01"
    assert m.policy_input() == {"endpoint": "batches.results", "kind": "batches",
                                "params": {"batch_id": "msgbatch_01"}}
    assert match("DELETE", "/v1/files/file_1").endpoint.kind is Kind.FILES  # type: ignore[union-attr]


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/messages/"), ("POST", "/V1/messages"), ("POST", "/v1/Messages"), ("POST", "/v1/MESSAGES"),
    ("POST", "//v1/messages"), ("POST", "/v1//messages"), ("POST", "/v1/./messages"), ("POST", "/v1/x/../messages"),
    ("POST", "/v1/%6Dessages"), ("POST", "/v1/messages%2F"), ("POST", "/v1/messages%00"), ("POST", "/v1/messages\x00"),
    ("POST", "/v1/messages;x"), ("POST", "v1/messages"), ("POST", ""), ("GET", "/v1/messages"),
    ("POST", "/v1/complete"), ("POST", "/v1/messages/batches/b1/results"), ("GET", "/v1/files/a/b"),
    ("GET", "/v1/models/.."), ("GET", "/v1/models/."), ("GET", "/v1/models/-x"), ("GET", "/v1/files/_x"),
    ("GET", "/v1/messages/batches/" + "a" * (MAX_ID_LEN + 1)), ("GET", "/v1/models/claude%2Fx"),
    ("GET", "/v1/models/claude\u00e9"), ("GET", "/v1/messages/batches/b 1"), ("GET", "/v1/models?x=1"),
])
def test_no_other_spelling_matches(method: str, path: str) -> None:
    assert match(method, path) is None


@pytest.mark.parametrize("path,why", [
    ("/v1/messages/", "trailing slash"), ("//v1/messages", "'//'"), ("/v1/./messages", "dot segment"),
    ("/v1/x/../messages", "dot segment"), ("/v1/%6Dessages", "percent"), ("/v1/messages\x00", "control"),
    ("/v1/messages\x7f", "control"), ("v1/messages", "start with '/'"), ("/v1/mess ages", "character"),
    ("/v1/m\u00e9ssages", "character"), ("/v1\\messages", "character"), ("/v1/messages;x", "character"),
    ("/v1/" + "a" * MAX_PATH_BYTES, "longer than"),
])
def test_non_canonical_says_why(path: str, why: str) -> None:
    reason = non_canonical(path)
    assert reason is not None and why in reason


def test_split_target_and_path_known() -> None:
    assert split_target("/v1/messages?beta=true") == ("/v1/messages", "beta=true")
    assert split_target("/v1/messages") == ("/v1/messages", "")
    assert path_known("/v1/messages") and path_known("/v1/files/f1")
    assert not path_known("/v1/messages/") and not path_known("/v1/complete")


# -- properties ----------------------------------------------------------------


@given(st.sampled_from(ENDPOINTS), st.fixed_dictionaries({k: ids for k in SAMPLE}))
def test_any_valid_id_matches_its_endpoint(e: Endpoint, values: dict[str, str]) -> None:
    path = concrete(e, values)
    m = match(e.method, path)
    assert m is not None and m.endpoint is e and dict(m.params) == {p: values[p] for p in e.params}


@settings(max_examples=500)
@given(st.sampled_from(sorted({e.method for e in ENDPOINTS}) + ["PUT", "get"]), st.one_of(
    st.text(max_size=200),
    st.sampled_from(ENDPOINTS).flatmap(lambda e: st.from_regex(e.regex, fullmatch=True)),
    st.sampled_from(ENDPOINTS).flatmap(lambda e: st.from_regex(e.regex)),  # with noise around it
))
def test_whatever_matches_is_canonical(method: str, path: str) -> None:
    """No spelling the canonical check refuses can name an endpoint, whatever the text."""
    m = match(method, path)
    if m is not None:
        assert non_canonical(path) is None
        assert re.fullmatch(m.endpoint.regex, path)


def _variants(e: Endpoint) -> st.SearchStrategy[str]:
    path = concrete(e)
    segs = path.split("/")[1:]
    literal = [k for k, t in enumerate(e.template.split("/")[1:]) if not t.startswith("{")]
    i = st.integers(0, len(segs) - 1)

    def encode_char(k: int, j: int) -> str:
        seg = segs[k]
        j %= len(seg)
        enc = "%" + format(ord(seg[j]), "02X")
        return "/" + "/".join(segs[:k] + [seg[:j] + enc + seg[j + 1:]] + segs[k + 1:])

    def recase(k: int) -> str:
        seg = segs[k]
        flipped = seg.upper() if seg.upper() != seg else seg.lower()
        return "/" + "/".join(segs[:k] + [flipped] + segs[k + 1:])

    def insert(k: int, piece: str) -> str:
        return "/" + "/".join(segs[:k] + [piece] + segs[k:])

    return st.one_of(
        st.just(path + "/"), st.just("/" + path), st.just(path.replace("/", "//", 1)),
        st.builds(encode_char, i, st.integers(0, 200)),
        # Ids are case-sensitive (another case is another object); the literal segments are not ids.
        st.builds(recase, st.sampled_from(literal)),
        st.builds(insert, i, st.sampled_from([".", "..", "", "%2e", "%2E%2E"])),
        st.builds(lambda k: insert(k + 1, "..").replace("/..", "/x/..", 1), i),
        st.just(path + "%2F"), st.just(path.replace("/", "\\")), st.just(path + "\x00"), st.just(path + ";"),
        st.builds(lambda c: path + c, st.characters(min_codepoint=0, max_codepoint=0x1F)),
    )


@settings(max_examples=400)
@given(st.sampled_from(ENDPOINTS).flatmap(lambda e: st.tuples(st.just(e), _variants(e))))
def test_no_variant_of_an_endpoint_is_accepted(case: tuple[Endpoint, str]) -> None:
    """Another spelling of an endpoint's path matches no endpoint (with any method)."""
    e, variant = case
    assert variant != concrete(e)
    for method in {x.method for x in ENDPOINTS}:
        assert match(method, variant) is None, f"{variant!r} matched as {method}"

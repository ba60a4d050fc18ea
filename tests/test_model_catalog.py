"""The GET /v1/models catalogue and its pagination, and where a body names its model (aliases)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ccr.config import GatewayConfig
from ccr.model_catalog import catalog, page
from extauth.aliases import model_value_span
from extauth.deny import Deny

REPO = Path(__file__).resolve().parent.parent


def _config() -> GatewayConfig:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    doc["aliases"] = {"sonnet": "claude-sonnet-4-5-20250929", "x-local": "claude-local-1"}
    doc["models"].append({"match": "claude-local-1", "provider": "anthropic"})
    return GatewayConfig.model_validate(doc)


def test_catalogue_lists_exact_ids_listed_ids_and_aliases_newest_first() -> None:
    got = [(x.id, x.served, x.display_name, x.created_at) for x in catalog(_config())]
    assert got == [
        ("claude-fable-5", "claude-fable-5", "Claude Fable 5", "2026-06-09T00:00:00Z"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
        ("sonnet", "claude-sonnet-4-5-20250929", "Claude Sonnet 4.5 (sonnet)", "2025-09-29T00:00:00Z"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
        # Not a published model: its id as the name, the epoch as the date.
        ("claude-local-1", "claude-local-1", "claude-local-1", "1970-01-01T00:00:00Z"),
        ("x-local", "claude-local-1", "claude-local-1 (x-local)", "1970-01-01T00:00:00Z"),
    ]


def test_pagination_follows_the_models_api() -> None:
    items = catalog(_config())
    ids = [x.id for x in items]
    p = page(items, 3, None, None)
    assert [x.id for x in p.data] == ids[:3] and p.has_more
    assert p.api_object()["first_id"] == ids[0] and p.api_object()["last_id"] == ids[2]
    nxt = page(items, 3, ids[2], None)
    assert [x.id for x in nxt.data] == ids[3:6] and nxt.has_more
    end = page(items, 3, ids[5], None)
    assert [x.id for x in end.data] == ids[6:] and not end.has_more
    back = page(items, 2, None, ids[4])  # the two just before the cursor, more before them
    assert [x.id for x in back.data] == ids[2:4] and back.has_more
    assert [x.id for x in page(items, 10, ids[0], ids[3]).data] == ids[1:3]
    empty = page(items, 5, "not-listed", None)
    assert empty.data == [] and empty.api_object() == {"data": [], "has_more": False, "first_id": None,
                                                       "last_id": None}


@pytest.mark.parametrize("body", [
    b'{"model":"a","max_tokens":1}',
    b' { "messages" : [{"role":"user","content":"\\"model\\": \xc3\xa9"}],\n "model"\t:\t"a" } ',
    b'{"metadata":{"model":"b"},"model":"a"}',
])
def test_model_value_span_is_the_top_level_value_in_bytes(body: bytes) -> None:
    s, e = model_value_span(body)
    assert body[s:e] == b'"a"'


@pytest.mark.parametrize("body", [b'{"model":"a","model":"b"}', b'{"max_tokens":1}', b'[1]', b'{"model":"\xff"}'])
def test_a_body_that_does_not_name_its_model_once_is_refused(body: bytes) -> None:
    with pytest.raises(Deny) as e:
        model_value_span(body)
    assert e.value.status == 400


def test_policy_input_names_the_alias_next_to_the_model_it_resolves_to() -> None:
    from extauth.policy_input import RequestFacts, document
    from extauth.principal import Principal, PrincipalKind

    p = Principal(id="key_1", name="svc", groups=("default",), kind=PrincipalKind.KEY)
    aliased = document(p, "POST", "/v1/messages", "claude-sonnet-4-5-20250929", None, None,
                       RequestFacts(model_requested="claude-sonnet"))["request"]
    assert (aliased["model"], aliased["model_requested"]) == ("claude-sonnet-4-5-20250929", "claude-sonnet")
    plain = document(p, "POST", "/v1/messages", "claude-sonnet-4-5-20250929", None, None, RequestFacts())["request"]
    assert "model_requested" not in plain


@pytest.mark.parametrize("raw", ["0", "1001", "-1", "+5", " 5", "5 ", "1_0", "\uff15", "5.0", "1e2", "", "abc",
                                 "00000000000000000000005"])
def test_a_limit_that_is_not_plain_digits_in_range_is_refused(raw: str) -> None:
    from extauth.models_api import _limit

    with pytest.raises(Deny) as e:
        _limit({"limit": (raw,)})
    assert e.value.status == 400 and "limit" in e.value.message


def test_a_plain_limit_is_taken_and_the_last_one_counts() -> None:
    from extauth.models_api import DEFAULT_LIMIT, _limit

    assert _limit({}) == DEFAULT_LIMIT
    assert _limit({"limit": ("1",)}) == 1 and _limit({"limit": ("1000",)}) == 1000
    assert _limit({"limit": ("7", "3")}) == 3


def test_a_cursor_naming_a_model_the_caller_may_not_see_is_an_unknown_cursor() -> None:
    """No existence oracle: a hidden model's id as a cursor pages exactly like an id that does not exist."""
    items = catalog(_config())
    visible = [x for x in items if x.id != "claude-opus-4-1-20250805"]
    for after, before in (("claude-opus-4-1-20250805", None), (None, "claude-opus-4-1-20250805")):
        hidden = page(visible, 5, after, before).api_object()
        unknown = page(visible, 5, after and "no-such-model", before and "no-such-model").api_object()
        assert hidden == unknown and hidden["data"] == []

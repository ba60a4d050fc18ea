"""extauth's part of spend: the worst case, and a spend descriptor only where a budget may apply."""

from __future__ import annotations

import json

from ccr.config import parse_config
from extauth.objects import ObjectFacts
from extauth.principal import Principal, PrincipalKind
from extauth.spend import BudgetSubjects, WorstCase

CFG = parse_config({"providers": [{"name": "a"}], "models": [
    {"match": "claude-*", "provider": "a", "price": {"input": 3, "output": 15, "cache_write": 3.75}}]})
KEY = Principal(PrincipalKind.KEY, "key_1", "ci", groups=("eng",), tenant="acme", key_id="key_1")
USER = Principal(PrincipalKind.USER, "oidc:https://idp#alice", "alice")


def test_messages_create_is_priced_at_its_worst_case() -> None:
    w = WorstCase(CFG)
    worst, spend = w.facts(KEY, "messages.create", "claude-x", {"max_tokens": 1000}, 500)  # type: ignore[misc]
    assert worst == 501 * 6 + 1000 * 15  # dearest input: the 1-hour cache write (2 x input)
    assert spend is not None and json.loads(spend) == {"v": 1, "r": worst, "p": "key_1", "pk": "key", "k": "key_1",
                                                       "g": ["eng"], "t": "acme", "m": "claude-x"}


def test_a_body_that_may_be_a_long_prompt_reserves_at_the_long_context_rates() -> None:
    cfg = parse_config({"providers": [{"name": "a"}], "models": [
        {"match": "claude-*", "provider": "a", "price": {"input": 1, "output": 5, "long_context": {
            "over_prompt_tokens": 1000, "input": 2, "output": 10}}}]})
    w = WorstCase(cfg)
    short, _ = w.facts(KEY, "messages.create", "claude-x", {"max_tokens": 100}, 998)  # type: ignore[misc]
    assert short == 999 * 2 + 100 * 5  # at most 999 tokens: the base rates (1h write: 2 x input)
    long, _ = w.facts(KEY, "messages.create", "claude-x", {"max_tokens": 100}, 1000)  # type: ignore[misc]
    assert long == 1001 * 4 + 100 * 10  # may be 1001 tokens: the long rates


def test_count_tokens_and_other_endpoints_reserve_nothing() -> None:
    w = WorstCase(CFG)
    assert w.facts(KEY, "messages.count_tokens", "claude-x", {"max_tokens": 10}, 100) is None
    assert w.facts(KEY, "models.list", None, None, 0) is None


def test_a_spend_descriptor_only_where_a_budget_may_apply() -> None:
    subjects = BudgetSubjects("unused", 1.0)
    w = WorstCase(CFG, subjects)
    body = {"max_tokens": 10}
    # Budgets not read yet: every principal may have one (the rate limit service decides).
    assert w.facts(KEY, "messages.create", "claude-x", body, 10)[1] is not None  # type: ignore[index]
    subjects.subjects = frozenset()
    worst, spend = w.facts(KEY, "messages.create", "claude-x", body, 10)  # type: ignore[misc]
    assert worst > 0 and spend is None
    for kind, subject, p in (("group", "eng", KEY), ("tenant", "acme", KEY), ("key", "key_1", KEY),
                             ("user", USER.id, USER)):
        subjects.subjects = frozenset({(kind, subject)})
        assert w.facts(p, "messages.create", "claude-x", body, 10)[1] is not None, kind  # type: ignore[index]
    subjects.subjects = frozenset({("user", "key_1")})  # a user budget never matches a key's id
    assert w.facts(KEY, "messages.create", "claude-x", body, 10)[1] is None  # type: ignore[index]


def test_batch_results_are_charged_never_refused() -> None:
    from ccr.budgets import charge_only, parse_spend_facts

    worst, spend = WorstCase(CFG).facts(KEY, "batches.results", None, None, 0)  # type: ignore[misc]
    assert worst is None and spend is not None and charge_only(spend) and parse_spend_facts(spend)[0] == 0
    assert not charge_only(WorstCase(CFG).facts(KEY, "messages.create", "claude-x", {"max_tokens": 1}, 1)[1])  # type: ignore[index,arg-type]


def test_a_batch_create_is_priced_at_every_request_worst_case_at_the_batch_discount() -> None:
    from ccr.pricing import Rates, batch_worst_case_micro

    obj = ObjectFacts("a", "provider_a", hits=3, batch=(("claude-x", 1000), ("claude-y", 200), ("claude-x", 0)))
    worst, spend = WorstCase(CFG).facts(KEY, "batches.create", None, None, 900, obj)  # type: ignore[misc]
    # All requests' input together is at most the body (901 tokens at the dearest input, $6/MTok); each
    # request's max_tokens at $15/MTok; half of it, rounded up.
    assert worst == -(-(901 * 6 + 1200 * 15) // 2) == batch_worst_case_micro(
        [(Rates.of(CFG.models[0].price), 1000), (Rates.of(CFG.models[0].price), 200)], 900)
    assert spend is not None and json.loads(spend) == {"v": 1, "r": worst, "p": "key_1", "pk": "key", "k": "key_1",
                                                       "g": ["eng"], "t": "acme"}
    # Refusable, unlike the results: it has not been spent yet.
    from ccr.budgets import charge_only
    assert not charge_only(spend)
    assert WorstCase(CFG).facts(KEY, "batches.create", None, None, 900, None) is None


def test_batch_results_name_the_create_whose_hold_they_release() -> None:
    from ccr.budgets import batch_hold

    obj = ObjectFacts("a", "provider_a", create_request_id="rid-of-create")
    _, spend = WorstCase(CFG).facts(KEY, "batches.results", None, None, 0, obj)  # type: ignore[misc]
    assert spend is not None and batch_hold(spend) == "rid-of-create"
    _, plain = WorstCase(CFG).facts(KEY, "batches.results", None, None, 0)  # type: ignore[misc]
    assert plain is not None and batch_hold(plain) is None

"""The metric names a PromQL expression reads, and the expressions of the shipped alert rules and
Grafana dashboard: for the test that every one of them is exposed by a running gateway."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """Metric names in `expr`: identifiers that are not functions, keywords, labels or durations."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    out = set()
    for m in _IDENT.finditer(text):
        name = m.group(0)
        start, end = m.span()
        if start > 0 and (text[start - 1].isdigit() or text[start - 1] in "$."):
            continue  # a number's exponent/unit, a Grafana variable
        if text[end:].lstrip().startswith("("):
            continue  # a function or aggregation
        if name in _KEYWORDS:
            continue
        out.add(name)
    return out


def alert_expressions(rules: dict[str, Any]) -> Iterator[str]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard["panels"]):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield t["expr"]

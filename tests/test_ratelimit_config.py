"""envoyproxy/ratelimit YAML config files: loading, errors, matching order, hot reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimit.envoy_config import RuleConfigError, RuleDir, load_dir

# In envoyproxy/ratelimit's documented style: a per-IP limit with an exception, nested
# descriptors, a wildcard value, shadow mode, unlimited and a named limit that replaces another.
EDGE = """\
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unlimited: true
  - key: path
    value: /login*
    shadow_mode: true
    rate_limit:
      unit: minute
      requests_per_unit: 5
  - key: path
    value: /login/admin
    rate_limit:
      unit: hour
      requests_per_unit: 2
  - key: path
    rate_limit:
      name: any_path
      unit: minute
      requests_per_unit: 100
"""

MESSAGING = """\
domain: messaging
descriptors:
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        detailed_metric: true
        rate_limit:
          name: per_number
          replaces:
            - name: per_type
          unit: day
          requests_per_unit: 5
  - key: to_number
    rate_limit:
      name: per_type
      unit: day
      requests_per_unit: 100
"""


def _dir(tmp_path: Path, **files: str) -> Path:
    d = tmp_path / "config"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def test_documented_style_files_load_and_match_in_order(tmp_path: Path) -> None:
    rules = load_dir(_dir(tmp_path, **{"edge.yaml": EDGE, "messaging.yml": MESSAGING}))
    assert set(rules.domains) == {"edge_proxy_per_ip", "messaging"}
    m = rules.match
    # key only: any value
    ip = m("edge_proxy_per_ip", [("remote_address", "10.0.0.1")])
    assert ip is not None and (ip.unit, ip.requests_per_unit, ip.unlimited) == ("second", 10, False)
    # exact value first
    exact = m("edge_proxy_per_ip", [("remote_address", "50.0.0.5")])
    assert exact is not None and exact.unlimited
    # exact beats wildcard beats key-only
    admin = m("edge_proxy_per_ip", [("path", "/login/admin")])
    assert admin is not None and (admin.unit, admin.requests_per_unit) == ("hour", 2)
    login = m("edge_proxy_per_ip", [("path", "/login/x")])
    assert login is not None and login.shadow_mode and (login.unit, login.requests_per_unit) == ("minute", 5)
    other = m("edge_proxy_per_ip", [("path", "/other")])
    assert other is not None and other.name == "any_path"
    # nested: the limit is the one the last entry reaches
    nested = m("messaging", [("message_type", "marketing"), ("to_number", "2061234567")])
    assert nested is not None and nested.name == "per_number" and nested.replaces == ("per_type",)
    assert nested.detailed_metric
    assert m("messaging", [("message_type", "marketing")]) is None  # a node without a limit
    assert m("messaging", [("message_type", "alerts"), ("to_number", "1")]) is None
    assert m("messaging", [("to_number", "1"), ("extra", "x")]) is None  # deeper than the tree
    assert m("nope", [("to_number", "1")]) is None


@pytest.mark.parametrize(("text", "where", "why"), [
    ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
     "    descriptors:\n      - key: b\n        ratelimit: {unit: second}\n",
     "descriptors[0].descriptors[0]", "unknown key(s) ['ratelimit']"),
    ("domain: d\ndescriptors:\n  - key: a\n    value: x\n  - key: a\n    value: x\n",
     "descriptors[1]", "duplicate descriptor a=x"),
    # A key twice in one mapping (PyYAML alone would keep the second silently).
    ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
     "    rate_limit: {unit: hour, requests_per_unit: 100}\n", "not valid YAML", "'rate_limit' appears twice"),
    ("domain: d\ndomain: e\ndescriptors: []\n", "not valid YAML", "'domain' appears twice"),
    ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
     "descriptors[0].rate_limit.unit", "invalid unit 'fortnight'"),
    ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: second}\n",
     "descriptors[0].rate_limit", "unlimited rate_limit must not name a unit"),
    ("domain: d\ndescriptors:\n  - value: x\n", "descriptors[0]", "empty or missing key"),
    ("domain: d\ndescriptor: []\n", "(top level)", "unknown key(s) ['descriptor']"),
    ("descriptors: []\n", "domain", "non-empty domain"),
    ("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1, replaces: [{}]}\n",
     "descriptors[0].rate_limit.replaces[0].name", "must be named"),
])
def test_bad_files_are_refused_naming_file_and_path(tmp_path: Path, text: str, where: str, why: str) -> None:
    d = _dir(tmp_path, **{"bad.yaml": text})
    with pytest.raises(RuleConfigError) as exc:
        load_dir(d)
    msg = str(exc.value)
    assert msg.startswith(str(d / "bad.yaml") + ": "), msg
    assert f"{where}" in msg and why in msg, msg


def test_a_domain_in_two_files_is_refused(tmp_path: Path) -> None:
    d = _dir(tmp_path, **{"a.yaml": "domain: x\ndescriptors: []\n", "b.yaml": "domain: x\n"})
    with pytest.raises(RuleConfigError, match=r"b\.yaml: domain: duplicate domain 'x'"):
        load_dir(d)


def test_reload_keeps_the_last_good_config(tmp_path: Path) -> None:
    d = _dir(tmp_path, **{"edge.yaml": EDGE})
    seen: list[int] = []
    watch = RuleDir(d, on_change=lambda rules: seen.append(len(rules.domains)))
    assert watch.generation == 1 and watch.last_error is None and seen == [1]
    (d / "messaging.yaml").write_text(MESSAGING)
    watch.poll()
    assert watch.generation == 2 and set(watch.current.domains) == {"edge_proxy_per_ip", "messaging"}
    (d / "messaging.yaml").write_text(MESSAGING.replace("requests_per_unit: 5", "requests_per_unit: five"))
    watch.poll()
    assert watch.generation == 2  # not replaced
    assert watch.last_error is not None and "messaging.yaml" in watch.last_error
    assert "requests_per_unit" in watch.last_error
    assert watch.current.match("messaging", [("to_number", "1")]) is not None  # the last good rules
    (d / "messaging.yaml").unlink()
    watch.poll()
    assert watch.generation == 3 and watch.last_error is None and set(watch.current.domains) == {"edge_proxy_per_ip"}
    assert seen == [1, 2, 1]

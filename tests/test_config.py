import argparse
from pathlib import Path

import pytest

from ccr.cli import build_parser, main
from ccr.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "ccr.example.yaml")
    assert cfg.providers[0].cluster == "provider_anthropic"
    route = cfg.route_model("claude-sonnet-4-5-20250929")
    assert route is not None and route.price.output == 15
    assert cfg.route_model("gpt-4o") is None


def test_bad_field_names_file_path_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "providers:\n  - name: anthropic\n    kind: anthropc\n"
        "models:\n  - match: 'claude-*'\n    provider: anthropic\n"
        "limits:\n  requests_per_minute: -5\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert f"{bad}: providers.0.kind:" in msg and "'anthropic'" in msg
    assert f"{bad}: limits.requests_per_minute: Input should be greater than or equal to 1" in msg


def test_unknown_provider_reference_and_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "providers:\n  - name: anthropic\nmodels:\n  - match: 'claude-*'\n    provider: bedrock\n"
        "gateway:\n  listen: {hostt: 0.0.0.0}\n"
    )
    msg = str(pytest.raises(ConfigError, load_config, bad).value)
    assert "gateway.listen.hostt: Extra inputs are not permitted" in msg
    bad.write_text("providers:\n  - name: anthropic\nmodels:\n  - match: 'claude-*'\n    provider: bedrock\n")
    msg = str(pytest.raises(ConfigError, load_config, bad).value)
    assert "models.0.provider: unknown provider 'bedrock'" in msg


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [\n  name: x\n")
    msg = str(pytest.raises(ConfigError, load_config, bad).value)
    assert msg.startswith(f"{bad}: line ") and "not valid YAML" in msg


def test_cli_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(REPO / "ccr.example.yaml")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: []\nmodels: []\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "providers: List should have at least 1 item" in capsys.readouterr().err


def _fail_open(tmp_path: Path, services: str) -> Path:
    f = tmp_path / "ccr.yaml"
    f.write_text(f"services:\n{services}providers:\n  - name: anthropic\n"
                 "models:\n  - match: 'claude-*'\n    provider: anthropic\n")
    return f


def test_fail_open_is_refused_without_the_acknowledgement(tmp_path: Path) -> None:
    f = _fail_open(tmp_path, "  failure_mode_allow: true\n")
    msg = str(pytest.raises(ConfigError, load_config, f).value)
    assert f"{f}: services: " in msg
    assert "unauthenticated" in msg and "credentials" in msg
    assert "services.i_understand_unauthenticated_traffic_reaches_providers: true" in msg
    # A false acknowledgement is no acknowledgement.
    f = _fail_open(tmp_path, "  failure_mode_allow: true\n"
                             "  i_understand_unauthenticated_traffic_reaches_providers: false\n")
    pytest.raises(ConfigError, load_config, f)


def test_fail_open_with_the_acknowledgement_and_fail_closed_default(tmp_path: Path) -> None:
    cfg = load_config(_fail_open(tmp_path, "  failure_mode_allow: true\n"
                                           "  i_understand_unauthenticated_traffic_reaches_providers: true\n"))
    assert cfg.services.failure_mode_allow
    assert not load_config(REPO / "ccr.example.yaml").services.failure_mode_allow


def test_example_config_names_its_emulator() -> None:
    cfg = load_config(REPO / "ccr.example.yaml")
    assert [p.emulator for p in cfg.providers] == [True]
    assert cfg.providers[0].api_key_env == "ANTHROPIC_API_KEY"


def _leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path]
    return [leaf for name, child in subs[0].choices.items() for leaf in _leaf_commands(child, (*path, name))]


def test_every_command_takes_config_after_it() -> None:
    """`ccr up -c my.yaml`, `ccr keys list -c my.yaml`, ...: -c is accepted where users type it,
    and a value given there wins over the top-level default."""
    parser = build_parser()
    leaves = _leaf_commands(parser)
    assert ("up",) in leaves and ("keys", "list") in leaves and ("policy", "status") in leaves
    for leaf in leaves:
        action = parser
        for name in leaf:
            action = next(a for a in action._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        assert "--config" in action._option_string_actions, f"ccr {' '.join(leaf)} lacks -c/--config"
        assert action._option_string_actions["--config"].default is argparse.SUPPRESS, leaf
    args = parser.parse_known_args(["up", "-c", "/x/my.yaml"])[0]
    assert args.config == "/x/my.yaml"
    args = parser.parse_known_args(["-c", "/x/top.yaml", "keys", "list"])[0]
    assert args.config == "/x/top.yaml"


def test_limit_rules_are_validated(tmp_path: Path) -> None:
    base = "providers: [{name: anthropic}]\nmodels: [{match: 'claude-*', provider: anthropic}]\nlimits:\n  rules:\n"
    cases = {
        "    - {name: a, per: team, amount: 5}\n": "limits.rules.0.per",
        "    - {name: a, per: key, amount: 5, burst: 9}\n": "burst applies to algorithm token_bucket only",
        "    - {name: a, per: key, amount: 5, unit: week}\n": "limits.rules.0.unit",
        "    - {name: a, per: key, amount: 5}\n    - {name: a, per: user, amount: 5}\n": "repeated: ['a']",
        "    - {name: a, per: key, amount: 5, on_redis_down: maybe}\n": "limits.rules.0.on_redis_down",
    }
    for rules, why in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(base + rules)
        with pytest.raises(ConfigError) as e:
            load_config(bad)
        assert why in str(e.value), (rules, str(e.value))


def test_config_check_loads_the_envoy_rate_limit_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "ccr.yaml"
    cfg.write_text("providers: [{name: anthropic}]\nmodels: [{match: 'claude-*', provider: anthropic}]\n"
                   "limits: {envoy_config_dir: rls}\n")
    (tmp_path / "rls").mkdir()
    (tmp_path / "rls" / "a.yaml").write_text("domain: a\ndescriptors:\n  - key: x\n"
                                             "    rate_limit: {unit: second, requests_per_unit: 1}\n")
    assert main(["config", "check", str(cfg)]) == 0
    assert "1 rate limit config file(s)" in capsys.readouterr().out
    (tmp_path / "rls" / "a.yaml").write_text("domain: a\ndescriptors:\n  - key: x\n    rate_limits: {}\n")
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"limits.envoy_config_dir: {tmp_path / 'rls' / 'a.yaml'}: descriptors[0]: unknown key(s) ['rate_limits']" \
        in err


def test_limits_admission_names_one_of_its_two_places(tmp_path: Path) -> None:
    """A misspelt place for the request-time limits is refused, not taken as either default."""
    f = tmp_path / "ccr.yaml"
    base = "providers:\n  - name: anthropic\nmodels:\n  - match: 'claude-*'\n    provider: anthropic\n"
    f.write_text("limits:\n  admission: envoy\n" + base)
    msg = str(pytest.raises(ConfigError, load_config, f).value)
    assert "limits.admission: " in msg
    assert "'extauth'" in msg and "'ratelimit'" in msg
    f.write_text("limits:\n  admission: ratelimit\n" + base)
    assert load_config(f).limits.admission == "ratelimit"
    f.write_text(base)
    assert load_config(f).limits.admission == "extauth"


@pytest.mark.parametrize("names", [
    {"headers": ["x-ccr-principal-id"]}, {"headers": ["x-envoy-auth-headers-to-remove"]},
    {"headers": ["x-request-id"]}, {"headers": ["authorization"]}, {"response_headers": ["content-length"]},
    {"response_headers": ["ccr-authz-body-capture"]}, {"metadata": ["principal_id"]}, {"metadata": ["body_capture"]},
])
def test_policy_result_names_refuse_the_gateways_own_and_framing_names(names: dict[str, list[str]]) -> None:
    """Declaring one would only widen what Envoy copies from an HTTP authorization answer."""
    with pytest.raises(ConfigError, match="may not declare the gateway's own or framing names"):
        parse_config({"version": 1, "providers": [{"name": "anthropic"}],
                      "models": [{"match": "claude-*", "provider": "anthropic"}],
                      "policy": {"result_names": names}})


def test_policy_result_names_accept_a_policys_own() -> None:
    cfg = parse_config({"version": 1, "providers": [{"name": "anthropic"}],
                        "models": [{"match": "claude-*", "provider": "anthropic"}],
                        "policy": {"result_names": {"headers": ["x-data-region"], "response_headers": ["x-why"],
                                                    "metadata": ["team"]}}})
    assert cfg.policy.result_names.metadata == ["team"]

from pathlib import Path

import pytest

from ccr.cli import main
from ccr.config import ConfigError, load_config

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

"""Where `ccr up` puts each provider kind's secret: Bedrock and Vertex to the adapter process
only, API keys to Envoy's SDS files only; a missing one stops the start."""

from __future__ import annotations

from typing import Any

import pytest

from ccr.config import ConfigError, parse_config
from ccr.supervisor import Gateway, adapter_secret_vars, provider_credentials

PROVIDERS: list[dict[str, Any]] = [
    {"name": "anthropic", "api_key_env": "T_ANTHROPIC"},
    {"name": "bedrock", "kind": "bedrock", "region": "us-east-1", "aws_access_key_id_env": "T_AKID",
     "aws_secret_access_key_env": "T_SECRET", "aws_session_token_env": "T_SESSION"},
    {"name": "vertex", "kind": "vertex", "region": "us-east5", "project": "p", "service_account_file_env": "T_SA"},
    {"name": "gpu", "kind": "openai", "endpoint": "http://127.0.0.1:1"},
]
ENV = {"T_ANTHROPIC": "sk-a", "T_AKID": "AKID", "T_SECRET": "s3cret", "T_SESSION": "tok", "T_SA": "/x/sa.json"}


def config() -> Any:
    return parse_config({"providers": PROVIDERS, "models": [{"match": "*", "provider": "anthropic"}]})


def test_every_kind_needs_its_variables() -> None:
    assert provider_credentials(config(), "c.yaml", ENV) == ENV  # the keyless openai server needs none
    for missing in ENV:
        env = {k: v for k, v in ENV.items() if k != missing}
        with pytest.raises(ConfigError, match=missing):
            provider_credentials(config(), "c.yaml", env)


def test_signed_kinds_secrets_go_to_the_adapter_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    cfg = config()
    assert adapter_secret_vars(cfg.provider("bedrock")) == ["T_AKID", "T_SECRET", "T_SESSION"]
    assert Gateway._service_env("adapter", cfg) == {"T_AKID": "AKID", "T_SECRET": "s3cret", "T_SESSION": "tok",
                                                    "T_SA": "/x/sa.json"}
    for other in ("extauth", "ratelimit", "accesslog", "router", "signin"):
        env = Gateway._service_env(other, cfg) or {}
        assert not set(env) & set(ENV), other


def test_envoy_gets_api_keys_only(tmp_path: Any) -> None:
    import json

    from ccr.runtime import Runtime

    providers = [*PROVIDERS[:3], {**PROVIDERS[3], "api_key_env": "T_GPU"}]
    cfg = parse_config({"providers": providers, "models": [{"match": "*", "provider": "anthropic"}]})
    rt = Runtime(config_path=str(tmp_path / "c.yaml"), run_dir=str(tmp_path), postgres_dsn="postgresql://x@h/d",
                 redis_url="redis://h:1/0")
    Gateway._write_credentials(cfg, rt, tmp_path, {**ENV, "T_GPU": "gpu-key"})
    assert set(rt.provider_credentials) == {"anthropic", "gpu"}  # no SDS file for Bedrock or Vertex
    written = "".join((tmp_path / "credentials" / f).read_text() for f in ("anthropic.json", "gpu.json"))
    assert "Bearer gpu-key" in written and "sk-a" in written
    assert not any(v in written for v in ("s3cret", "AKID", "/x/sa.json"))
    assert json.loads((tmp_path / "credentials" / "gpu.json").read_text())["resources"][0]["generic_secret"][
        "secret"]["inline_string"] == "Bearer gpu-key"

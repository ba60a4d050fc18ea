"""Prompt PII blocking through the whole gateway: real Envoy, extauth, the compiled Rego, the SDK."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from ccr.supervisor import Gateway
from tests.harness import REPO, emulator_mark, running_gateway

MODEL = "claude-sonnet-4-5"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The shipped policies with data.pii.mode switched to block (all a team changes)."""
    tmp = tmp_path_factory.mktemp("gw-pii")
    pol = tmp / "policies"
    shutil.copytree(REPO / "policies", pol)
    data = json.loads((pol / "data.json").read_text())
    data["pii"]["mode"] = "block"
    (pol / "data.json").write_text(json.dumps(data))

    def edit(cfg: dict[str, Any]) -> None:
        cfg["policy"]["dir"] = str(pol)

    with running_gateway(tmp, edit) as g:
        yield g


def conversation(result: str) -> list[Any]:
    return [
        {"role": "user", "content": "look up the customer"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_01", "name": "crm_lookup", "input": {"name": "Jane"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": result}]},
    ]


def test_ssn_in_a_tool_result_is_refused_before_the_provider(gw: Gateway) -> None:
    c = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
    mark = emulator_mark(gw)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        # Zero-width characters inside the number do not hide it.
        c.messages.create(model=MODEL, max_tokens=8, messages=conversation("Jane, SSN 123-45-\u200b6789, VIP"))
    assert e.value.status_code == 403
    err = e.value.body["error"]  # type: ignore[index]
    assert err["type"] == "permission_error"
    assert err["message"].startswith("prompt contains a US SSN (messages[2].content[0].content)")
    assert "(decision dec_" in err["message"]
    assert "6789" not in err["message"]  # the value is never echoed
    assert mark.arrived() == []  # nothing reached the provider

    ok = c.messages.create(model=MODEL, max_tokens=8, messages=conversation("Jane, customer since 2019, VIP"))
    assert ok.content
    assert len(mark.arrived()) == 1

"""Provider credentials live in Envoy only: an SDS file it reads and re-reads, no Python service's memory."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import pytest

from ccr.credentials import write_secret
from ccr.supervisor import Gateway
from tests.harness import emulator_records, running_gateway

MODEL = "claude-haiku-4-5"
HELLO = [{"role": "user", "content": "hi"}]


def _eventually(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def _status(gw: Gateway) -> int:
    c = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
    try:
        c.messages.create(model=MODEL, max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    except anthropic.APIStatusError as e:
        return e.status_code
    return 200


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def test_only_envoy_holds_the_credential_and_rotation_needs_no_restart(tmp_path: Path) -> None:
    with running_gateway(tmp_path) as gw:
        assert gw.runtime is not None and gw.emulator_key
        key = gw.emulator_key.encode()
        path = Path(gw.runtime.provider_credentials["anthropic"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert key in path.read_bytes()

        assert _status(gw) == 200
        assert emulator_records(gw)[-1]["headers"]["x-api-key"] == gw.emulator_key
        # No gateway process has the key in its environment; the emulator (the provider) does.
        for child in gw.children:
            if child.name != "emulator":
                assert key not in _environ(child.pid), child.name
        assert gw.runtime.postgres_dsn
        assert key not in Path(gw.runtime.run_dir, "runtime.json").read_bytes()

        # Replacing the file rotates what Envoy sends, without a restart: a wrong key is
        # refused by the provider, the right one works again.
        pids = [c.pid for c in gw.children]
        write_secret(path, "anthropic", "sk-ant-revoked-key")
        _eventually("the provider refuses the replaced key", lambda: _status(gw) == 401)
        assert emulator_records(gw)[-1]["headers"]["x-api-key"] == "sk-ant-revoked-key"
        write_secret(path, "anthropic", gw.emulator_key)
        _eventually("the restored key works again", lambda: _status(gw) == 200)
        assert [c.pid for c in gw.children] == pids and not gw.dead_children()
    assert not path.exists()  # the credential ends with the run


def test_a_credential_with_a_line_break_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="line break"):
        write_secret(tmp_path / "p.json", "p", "sk-ant-x\r\nx-evil: 1")
    assert not (tmp_path / "p.json").exists()

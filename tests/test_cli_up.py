"""`ccr up` as a user runs it: readiness lines, the URL and key it prints, a real SDK call,
`ccr keys` against the running gateway, and a clean stop on SIGTERM with no orphans.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import pytest
import yaml

from ccr.config import ConfigError
from ccr.supervisor import Gateway, provider_credentials
from tests.harness import gateway_config

CCR = [sys.executable, "-m", "ccr.cli"]
REPO = Path(__file__).resolve().parent.parent
# `python -m ccr.cli` from another directory must import this checkout, not whatever is installed.
CHECKOUT_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["sigterm", "ctrl-c", "killed"])
def test_ccr_up_serves_and_stops_cleanly(tmp_path: Path, stop_signal: int) -> None:
    config = gateway_config(tmp_path)
    env = {k: v for k, v in CHECKOUT_ENV.items() if k != "ANTHROPIC_API_KEY"}
    proc = subprocess.Popen([*CCR, "-c", str(config), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, env=env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while not any("Ctrl-C stops everything" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "ccr up exited early:\n" + "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "ccr up not ready in time:\n" + "".join(lines)
        out = "".join(lines)
        for part in ("postgres", "redis", "policy", "emulator", "extauth", "ratelimit", "adapter", "accesslog",
                     "router", "envoy"):
            assert re.search(rf"\u2713 {part}\s", out), f"no readiness line for {part}:\n{out}"
        url = re.search(r"gateway URL : (\S+)", out)
        key = re.search(r"API key     : (ccr_\S+)", out)
        assert url and key, out
        assert url.group(1).startswith("http://127.0.0.1:")

        c = anthropic.Anthropic(base_url=url.group(1), api_key=key.group(1), max_retries=0)
        msg = c.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        assert msg.content[0].type == "text"

        keys = subprocess.run([*CCR, "-c", str(config), "keys", "list"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path, env=CHECKOUT_ENV)
        assert keys.returncode == 0, keys.stderr
        assert "ccr-up-local" in keys.stdout and key.group(1) not in keys.stdout

        family = _descendants(proc.pid)
        # postgres, its workers, redis, emulator, 4 services, router, envoy
        assert len(family) >= 9, family
    finally:
        proc.send_signal(stop_signal)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    if stop_signal == signal.SIGKILL:
        # No chance to clean up: the children are told by the kernel (PR_SET_PDEATHSIG).
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0, rest
        assert "ccr: stopped." in rest
    deadline = time.monotonic() + 15
    while [p for p in family if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in family if _alive(p)], "processes left running after ccr up stopped"


@pytest.mark.parametrize("where", ["before", "after"], ids=["ccr -c X up", "ccr up -c X"])
def test_ccr_up_fails_clearly_on_a_bad_config(tmp_path: Path, where: str) -> None:
    """The config named with -c is the one read, wherever the user types it."""
    bad = tmp_path / "ccr.yaml"
    bad.write_text("providers:\n  - name: anthropic\n    endpoint: 5\nmodels: []\n")
    argv = ["-c", str(bad), "up"] if where == "before" else ["up", "-c", str(bad)]
    r = subprocess.run([*CCR, *argv], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert f"{bad}: providers.0.endpoint: Input should be a valid string" in r.stderr
    assert f"{bad}: models: List should have at least 1 item" in r.stderr


def _real_provider_config(tmp_path: Path, var: str) -> Path:
    config = gateway_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    del cfg["providers"][0]["emulator"]
    cfg["providers"][0]["api_key_env"] = var
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_ccr_up_refuses_a_provider_without_its_credential(tmp_path: Path, value: str | None) -> None:
    """No silent emulator: a missing credential stops `ccr up` before anything starts."""
    var = "CCR_TEST_TYPO_ANTHROPIC_KEY"
    config = _real_provider_config(tmp_path, var)
    env = {k: v for k, v in CHECKOUT_ENV.items() if k != var}
    if value is not None:
        env[var] = value
    r = subprocess.run([*CCR, "-c", str(config), "up"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{config}: providers.0 (anthropic): credential variable {var} is " \
           f"{'not set' if value is None else 'empty'}" in r.stderr
    assert "emulator: true" in r.stderr  # says how to ask for the emulator instead
    assert "emulator" not in r.stdout and "\u2713" not in r.stdout  # nothing became ready
    assert not (tmp_path / "data").exists(), "something started before the credential check"


def test_gateway_refuses_before_starting_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    var = "CCR_TEST_TYPO_ANTHROPIC_KEY"
    monkeypatch.delenv(var, raising=False)
    gw = Gateway(_real_provider_config(tmp_path, var))
    with pytest.raises(ConfigError, match=var):
        gw.start()
    assert gw.children == [] and gw.emulator_url is None
    # With the credential set, the check passes and hands it over for the adapter alone.
    monkeypatch.setenv(var, "sk-ant-real-key")
    assert provider_credentials(gw.config, "x") == {var: "sk-ant-real-key"}

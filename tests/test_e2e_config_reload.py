"""Live config edits on a running `ccr up` gateway (real Envoy, SPIRE, every service, two workers per
hot-path service): one version everywhere, no restart, no failed request, refusals, and the order
of each step (docs/config-reload.md).

The ordering tests freeze one of the gateway's own processes (SIGSTOP by its PID, SIGCONT after) so
the router is held at the step that waits for it, and look at what Envoy and the others serve then.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ccr.config_sync import ACKS_DIR, CONFIG_DIR, STATUS_FILE, read_json
from ccr.procs import Child
from ccr.supervisor import Gateway
from emulators import openai_compat
from extauth.keys import create_key
from tests.harness import REPO, running_gateway

HI = [{"role": "user", "content": "hi"}]
FOLLOWERS = ("extauth", "ratelimit", "adapter", "accesslog")


class OpenAIServer:
    """An OpenAI-compatible server without a key (a self-hosted model server) on a background loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner, port, self.emu = self._run(openai_compat.start(api_key=None))
        self.url = f"http://127.0.0.1:{port}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def oss() -> Iterator[OpenAIServer]:
    s = OpenAIServer()
    yield s
    s.close()


@pytest.fixture(scope="module", params=["sotw", "delta"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Over each ADS protocol: Envoy's answers to each step are counted differently (router/xds.py)."""
    def edit(cfg: dict[str, Any]) -> None:
        cfg["services"]["workers"] = 2  # every worker must acknowledge a version
        cfg["gateway"]["xds"] = {"protocol": request.param}

    with running_gateway(tmp_path_factory.mktemp(f"reload-{request.param}"), edit) as g:
        yield g


# -- helpers ------------------------------------------------------------------------------------


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def run_dir(gw: Gateway) -> Path:
    assert gw.runtime is not None
    return Path(gw.runtime.run_dir)


def status(gw: Gateway) -> dict:
    return read_json(run_dir(gw) / CONFIG_DIR / STATUS_FILE) or {}


def ack(gw: Gateway, worker: str) -> dict:
    return read_json(run_dir(gw) / CONFIG_DIR / ACKS_DIR / f"{worker}.json") or {}


def edit_config(gw: Gateway, change: Callable[[dict[str, Any]], object]) -> None:
    cfg = yaml.safe_load(gw.config_path.read_text())
    change(cfg)
    write_config(gw, yaml.safe_dump(cfg))


def write_config(gw: Gateway, text: str) -> None:
    tmp = gw.config_path.with_name("ccr.yaml.tmp")
    tmp.write_text(text)
    tmp.replace(gw.config_path)


def applied(gw: Gateway, seq: int) -> dict:
    """Until the router reports version `seq` applied everywhere."""
    return wait_for(lambda: (st := status(gw)).get("seq") == seq and st.get("state") == "applied" and st,
                    f"config v{seq} applied")


def metric_versions(gw: Gateway) -> dict[str, str]:
    """Process -> the seq label of its ccr_config_version_info series, from its own /metrics."""
    assert gw.runtime is not None
    out = {}
    for name, address in gw.runtime.metrics.items():
        text = httpx.get(f"http://{address}/metrics", timeout=5).text
        m = re.search(r'^ccr_config_version_info\{[^}]*seq="(\d+)"', text, re.M)
        if m:
            out[name] = m.group(1)
    return out


def envoy_clusters(gw: Gateway) -> set[str]:
    doc = httpx.get(f"{gw.admin_url}/clusters?format=json", timeout=5).json()
    return {c["name"] for c in doc.get("cluster_statuses", [])}


def ask(gw: Gateway, model: str, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/messages", timeout=30,
                      headers={"x-api-key": key or gw.api_key, "anthropic-version": "2023-06-01"},
                      json={"model": model, "max_tokens": 16, "messages": HI})


def child(gw: Gateway, name: str) -> Child:
    return next(c for c in gw.children if c.name == name)


@contextmanager
def frozen(c: Child) -> Iterator[None]:
    """One of the gateway's processes stopped (SIGSTOP) for the block, then continued."""
    os.kill(c.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(c.pid, signal.SIGCONT)


def pids(gw: Gateway) -> dict[str, int]:
    return {c.name: c.pid for c in gw.children}


def add_oss(cfg: dict[str, Any], url: str, name: str = "oss", pattern: str = "claude-oss-*") -> None:
    cfg["providers"].append({"name": name, "kind": "openai", "endpoint": url})
    cfg["models"].insert(0, {"match": pattern, "provider": name})


def drop_provider(cfg: dict[str, Any], name: str) -> None:
    cfg["providers"] = [p for p in cfg["providers"] if p["name"] != name]
    cfg["models"] = [m for m in cfg["models"] if m.get("provider") != name]


def ccr(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccr.cli", "-c", str(gw.config_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# -- tests --------------------------------------------------------------------------------------


def test_every_process_starts_on_version_1(gw: Gateway) -> None:
    st = status(gw)
    assert st["seq"] == 1 and st["state"] == "applied"
    for name in FOLLOWERS:
        for i in range(2 if name != "adapter" else 1):
            a = ack(gw, f"{name}.{i}")
            assert (a["seq"], a["digest"], a["error"]) == (1, st["digest"], None), a
    versions = metric_versions(gw)
    assert {n.partition(".")[0] for n in versions} >= {*FOLLOWERS, "router"}
    assert set(versions.values()) == {"1"}
    out = ccr(gw, "config", "status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "consistent: every process serves the same version" in out.stdout


def test_add_a_model_route_live_with_no_failed_request(gw: Gateway, oss: OpenAIServer) -> None:
    before = pids(gw)
    seq = status(gw)["seq"]
    refused = ask(gw, "claude-oss-1")
    assert refused.status_code != 200  # no route for it yet
    failures: list[str] = []
    sent = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal sent
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{gw.url}/v1/messages", json={"model": "claude-sonnet-4-5", "max_tokens": 16,
                                                           "messages": HI},
                           headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"})
                sent += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    t = threading.Thread(target=traffic)
    t.start()
    try:
        wait_for(lambda: sent >= 3, "traffic flowing")
        edit_config(gw, lambda cfg: add_oss(cfg, oss.url))
        applied(gw, seq + 1)
        mark = sent
        wait_for(lambda: sent >= mark + 3, "traffic after the change")
    finally:
        stop.set()
        t.join(60)
    assert failures == [], failures
    r = ask(gw, "claude-oss-1")
    assert r.status_code == 200, r.text
    assert oss.emu.records and oss.emu.records[-1]["path"] == "/v1/chat/completions"
    assert "provider_oss_translate" in envoy_clusters(gw)
    assert pids(gw) == before and all(c.alive() for c in gw.children)  # no restart
    assert set(metric_versions(gw).values()) == {str(seq + 1)}
    assert ccr(gw, "config", "status").returncode == 0


def test_change_a_limit_live(gw: Gateway) -> None:
    assert gw.runtime is not None
    _, key = create_key(gw.runtime.postgres_dsn, "reload-limit", ["default"], actor="test")
    first = ask(gw, "claude-haiku-4-5", key)
    assert first.status_code == 200, first.text
    assert first.headers["anthropic-ratelimit-requests-limit"] == "600"
    seq = status(gw)["seq"]
    edit_config(gw, lambda cfg: cfg["limits"].update(requests_per_minute=3))
    try:
        applied(gw, seq + 1)
        # Until the first 429: the window is the wall clock's minute, so a boundary may reset the count once
        # on the way (at most 3 + 3 answers before the refusal); what holds either way is the new limit on
        # every answer and a refusal exactly when the last answer had none left.
        codes: list[httpx.Response] = []
        while not codes or codes[-1].status_code != 429:
            assert len(codes) < 8, [(r.status_code, r.headers.get("anthropic-ratelimit-requests-remaining"))
                                    for r in codes]
            codes.append(ask(gw, "claude-haiku-4-5", key))
        assert all(r.status_code == 200 and r.headers["anthropic-ratelimit-requests-limit"] == "3"
                   for r in codes[:-1]), [r.status_code for r in codes]
        assert len(codes) >= 2 and codes[-2].headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert set(metric_versions(gw).values()) == {str(seq + 1)}
    finally:  # the module's other tests run on this gateway: never leave them a limit of 3
        edit_config(gw, lambda cfg: cfg["limits"].update(requests_per_minute=600))
    applied(gw, seq + 2)


def test_invalid_and_restart_only_edits_are_refused_everywhere(gw: Gateway) -> None:
    st = status(gw)
    seq, digest = st["seq"], st["digest"]
    good = gw.config_path.read_text()
    bad = [
        (lambda cfg: cfg["models"].append({"match": "claude-x-*", "provider": "nowhere"}), "unknown provider"),
        (lambda cfg: cfg["gateway"].update(concurrency=3), "gateway.concurrency: changed"),
        (lambda cfg: cfg["storage"].update(data_dir="elsewhere"), "storage: changed"),
        (lambda cfg: cfg["providers"].append({"name": "keyed", "kind": "anthropic", "api_key_env": "X"}),
         "providers.keyed"),
    ]
    try:
        for change, reason in bad:
            n = status(gw)["refusals"]
            edit_config(gw, change)
            got = wait_for(lambda n=n: (s := status(gw))["refusals"] > n and s, "the refusal")
            assert reason in got["last_error"], got["last_error"]
            assert (got["seq"], got["digest"], got["state"]) == (seq, digest, "applied")
            r = ask(gw, "claude-haiku-4-5")
            assert r.status_code == 200, r.text  # traffic continues on the last good version
            write_config(gw, good)
        n = status(gw)["refusals"]
        write_config(gw, "providers: [\n")  # not YAML
        got = wait_for(lambda: (s := status(gw))["refusals"] > n and s, "the refusal")
        assert "not valid YAML" in got["last_error"]
    finally:
        write_config(gw, good)
    for name in FOLLOWERS:
        assert ack(gw, f"{name}.0")["seq"] == seq
    assert set(metric_versions(gw).values()) == {str(seq)}
    out = ccr(gw, "config", "status")
    assert out.returncode == 0 and "last refused edit" in out.stdout, out.stdout


def test_ccr_config_apply(gw: Gateway, oss: OpenAIServer, tmp_path: Path) -> None:
    seq = status(gw)["seq"]
    cfg = yaml.safe_load(gw.config_path.read_text())
    cfg["gateway"]["listen"]["port"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    before = gw.config_path.read_text()
    out = ccr(gw, "config", "apply", str(bad))
    assert out.returncode == 2 and "gateway.listen: changed" in out.stderr, out.stdout + out.stderr
    assert gw.config_path.read_text() == before  # refused before the file is touched
    cfg = yaml.safe_load(before)
    cfg["models"].insert(0, {"match": "claude-applied-*", "provider": "anthropic"})
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cfg))
    out = ccr(gw, "config", "apply", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"applied as v{seq + 1}" in out.stdout
    assert status(gw)["seq"] == seq + 1
    assert ask(gw, "claude-applied-1").status_code == 200


def test_order_of_an_addition(gw: Gateway, oss: OpenAIServer) -> None:
    """Envoy gets the new cluster first; the adapter (and ratelimit, accesslog) switch before extauth
    names it; Envoy's routes move last."""
    seq = status(gw)["seq"]
    with frozen(child(gw, "adapter")):
        edit_config(gw, lambda cfg: add_oss(cfg, oss.url, "oss2", "claude-second-*"))
        wait_for(lambda: status(gw).get("step", "").startswith("services: adapter"), "the services step")
        # Held here by the adapter: Envoy already has the cluster, extauth does not route to it yet.
        assert "provider_oss2_translate" in envoy_clusters(gw)
        assert ack(gw, "extauth.0")["seq"] == seq and ack(gw, "extauth.1")["seq"] == seq
        r = ask(gw, "claude-second-1")
        assert r.status_code == 404 and "claude-second-1" in r.text, r.text  # old version: no such model
    applied(gw, seq + 1)
    assert ask(gw, "claude-second-1").status_code == 200
    steps = [s["step"] for s in status(gw)["history"][-1]["steps"]]
    assert steps[0] == "envoy: add clusters provider_oss2_translate"
    assert steps[1].startswith("services: adapter") and steps[2] == "services: extauth"
    assert steps[3].startswith("envoy: the new version")


def test_order_of_a_removal(gw: Gateway, oss: OpenAIServer) -> None:
    """extauth stops naming the cluster before Envoy loses it."""
    seq = status(gw)["seq"]
    edit_config(gw, lambda cfg: add_oss(cfg, oss.url, "oss4", "claude-fourth-*"))
    applied(gw, seq + 1)
    seq += 1
    assert "provider_oss4_translate" in envoy_clusters(gw)
    with frozen(child(gw, "extauth")):
        edit_config(gw, lambda cfg: drop_provider(cfg, "oss4"))
        wait_for(lambda: status(gw).get("step") == "services: extauth", "the extauth step")
        assert ack(gw, "adapter.0")["seq"] == seq + 1
        # Held by extauth worker 0: Envoy keeps the cluster it may still be sent to.
        assert "provider_oss4_translate" in envoy_clusters(gw)
    applied(gw, seq + 1)
    wait_for(lambda: "provider_oss4_translate" not in envoy_clusters(gw), "Envoy without the cluster")
    steps = [s["step"] for s in status(gw)["history"][-1]["steps"]]
    assert steps[-1] == "envoy: the new version (removes clusters provider_oss4_translate)"
    r = ask(gw, "claude-fourth-1")
    assert r.status_code == 404, r.text


def test_removal_under_traffic_is_never_a_gateway_error(gw: Gateway, oss: OpenAIServer) -> None:
    """Requests for a model whose provider goes away: served (200) until extauth switches, then refused as
    an unknown model (404); never a 5xx (Envoy without the cluster would answer 503 NC)."""
    seq = status(gw)["seq"]
    edit_config(gw, lambda cfg: add_oss(cfg, oss.url, "oss3", "claude-third-*"))
    applied(gw, seq + 1)
    codes: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{gw.url}/v1/messages", json={"model": "claude-third-1", "max_tokens": 16,
                                                           "messages": HI},
                           headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"})
                codes.append(r.status_code)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        wait_for(lambda: codes.count(200) >= 3, "requests served by oss3")
        edit_config(gw, lambda cfg: drop_provider(cfg, "oss3"))
        applied(gw, seq + 2)
        mark = len(codes)
        wait_for(lambda: codes.count(404) >= 3, "requests refused after the removal")
    finally:
        stop.set()
        t.join(60)
    assert set(codes) <= {200, 404}, sorted(set(codes))
    # Every extauth worker switched before `applied`: after the one request then in flight, none is routed there.
    assert 200 not in codes[mark + 1:]
    assert "provider_oss3_translate" not in envoy_clusters(gw)

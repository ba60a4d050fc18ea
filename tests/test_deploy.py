"""The deployment files: docker-compose.yml, the Dockerfile and deploy/k8s.

No container runtime or cluster runs here, so each file is read by the loader its own tool uses
(tools/deploycheck: compose-go, the library behind `docker compose`, and the Kubernetes API
types' strict decoder), and every command in it must be one the `ccr` CLI accepts, with a config
that `ccr serve` accepts.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from ccr.cli import build_parser
from ccr.config import SERVE_NAMES, parse_config
from ccr.standalone import settings

REPO = Path(__file__).resolve().parent.parent
DEPLOYCHECK = REPO / ".venv" / "bin" / "ccr-deploycheck"
# What every deployment runs: each part once (signin only when identity.signin is configured).
PARTS = set(SERVE_NAMES) - {"signin"}


def _deploycheck(*args: str) -> object:
    if not DEPLOYCHECK.exists():
        pytest.fail(f"{DEPLOYCHECK} is missing: run ./install.sh (it builds tools/deploycheck)")
    r = subprocess.run([str(DEPLOYCHECK), *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _ccr_argv(argv: list[str]) -> object:
    """Parse a container's command as `ccr` would; SystemExit (argparse's refusal) fails the test."""
    assert argv[0] == "ccr", argv
    return build_parser().parse_args(argv[1:])


def _standalone_config(text: str, source: str) -> None:
    config = parse_config(yaml.safe_load(text), source)
    settings(config, source)  # raises ConfigError naming whatever `ccr serve` would refuse


def test_compose_file_loads_and_runs_ccr_serve() -> None:
    services = _deploycheck("compose", "docker-compose.yml")["services"]
    served = {}
    for name, svc in services.items():
        if svc["image"] != "ccr:local":
            continue
        args = _ccr_argv(svc["command"])
        if getattr(args, "service", None) and args.func.__name__ == "cmd_serve":
            served[args.service] = name
            assert args.config == "/etc/ccr/ccr.yaml"
        if svc["healthcheck"]:
            test = svc["healthcheck"]
            assert test[0] == "CMD"
            probe = _ccr_argv(test[1:])
            assert probe.func.__name__ == "cmd_probe" and probe.service == args.service
    assert set(served) == PARTS
    # Only the Envoy container holds the provider credential.
    holders = [n for n, s in services.items() if "ANTHROPIC_API_KEY" in (s["environment"] or {})]
    assert holders == [served["envoy"]]
    # Every part waits for the stores and the identities; Envoy also for every decision service.
    for part, name in served.items():
        assert {"postgres", "redis", "pki"} <= set(services[name]["depends_on"]), part
    assert PARTS - {"envoy"} <= set(services[served["envoy"]]["depends_on"])
    mounted = REPO / "deploy" / "compose" / "ccr.yaml"
    _standalone_config(mounted.read_text(), str(mounted))


def test_compose_loader_refuses_a_broken_file(tmp_path: Path) -> None:
    """The check can fail: a misspelled key is an error for the Compose loader."""
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    doc["services"]["extauth"]["comand"] = doc["services"]["extauth"].pop("command")
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(doc))
    (tmp_path / "deploy" / "compose").mkdir(parents=True)
    r = subprocess.run([str(DEPLOYCHECK), "compose", str(tmp_path / "docker-compose.yml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "comand" in r.stderr


def test_kubernetes_manifests_decode_strictly_and_run_ccr_serve() -> None:
    objects = _deploycheck("k8s", *sorted(str(p) for p in (REPO / "deploy" / "k8s").glob("*.yaml")))
    served = {}
    for obj in objects:
        for c in obj.get("containers") or []:
            args = _ccr_argv(c["command"] + (c["args"] or []))
            assert args.func.__name__ == "cmd_serve"
            served[args.service] = obj["name"]
            for probe in c["probe_commands"] or []:
                assert _ccr_argv(probe).func.__name__ == "cmd_probe"
            if args.service != "envoy":
                assert "ANTHROPIC_API_KEY" not in (c["env"] or [])
    assert set(served) == PARTS
    secret = next(o for o in objects if o["kind"] == "Secret" and o["name"] == "ccr-config")
    _standalone_config(secret["stringData"]["ccr.yaml"], "deploy/k8s/ccr.yaml: ccr-config")
    # Each service the config names is a Service of the same name in the namespace.
    services = {o["name"] for o in objects if o["kind"] == "Service"}
    cfg = yaml.safe_load(secret["stringData"]["ccr.yaml"])["services"]["standalone"]
    for part in PARTS - {"envoy"}:
        host = cfg[part]["endpoints"][0].split(":")[0]
        assert host.split(".")[0] in services and host.endswith(".ccr.svc.cluster.local"), host


def test_kubernetes_decoder_refuses_an_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replica: 2\n"
                   "  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n"
                   "    spec: {containers: [{name: c, image: i}]}\n")
    r = subprocess.run([str(DEPLOYCHECK), "k8s", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "replica" in r.stderr


def test_dockerfile_ships_every_package_and_the_pinned_opa() -> None:
    text = (REPO / "Dockerfile").read_text()
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+) ", text, re.M))
    for pattern in include:
        assert pattern.rstrip("*") in copied, f"Dockerfile does not COPY the {pattern} package"
    assert {"envoy", "policies"} <= copied  # the bootstrap template and the default policies
    pinned = re.search(r'^OPA_VERSION="(v[\d.]+)"', (REPO / "install.sh").read_text(), re.M)
    assert pinned and f"ARG OPA_VERSION={pinned.group(1)}" in text

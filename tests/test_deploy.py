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
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from ccr.cli import build_parser
from ccr.config import SERVE_NAMES, parse_config
from ccr.standalone import bind_addresses, settings

REPO = Path(__file__).resolve().parent.parent
CCR = [sys.executable, "-m", "ccr.cli"]
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


# The lines an operator uncomments to choose services.authz_transport: http (the shipped configs stay on gRPC).
HTTP_OPT_IN = re.compile(r"^(\s*)# ((?:authz_transport|authz_http_listen|authz_http_endpoints): .*)$", re.M)


def _extauth_binds(text: str, source: str, args: object) -> tuple[tuple[int, int | None], tuple[int, int | None],
                                                                   list[str]]:
    """The (gRPC, HTTP front) ports `ccr serve extauth` run as `args` binds under the shipped config and under
    the same config with the documented http opt-in uncommented, and the latter's authz_http_endpoints."""
    out = []
    for transport, doc in (("grpc", text), ("http", _http_opt_in(text))):
        config = parse_config(yaml.safe_load(doc), source)
        settings(config, source)
        assert config.services.authz_transport == transport
        _, port, front = bind_addresses(config, "extauth", args.listen, args.authz_http_listen)  # type: ignore[attr-defined]
        out.append((port, front))
    assert config.services.standalone is not None
    return out[0], out[1], config.services.standalone.extauth.authz_http_endpoints


def _http_opt_in(text: str) -> str:
    opted, n = HTTP_OPT_IN.subn(r"\1\2", text)
    assert n == 3, "the config documents the http opt-in as three commented lines"
    return opted


def test_compose_exposes_extauths_http_front_where_the_config_binds_it() -> None:
    """grpc stays the default (no front is bound); an operator who uncomments the http lines of
    deploy/compose/ccr.yaml gets the front `ccr serve extauth` binds on a port the service exposes, at the
    address Envoy is told."""
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    extauth = doc["services"]["extauth"]
    args = _ccr_argv(extauth["command"])
    assert "./deploy/compose/ccr.yaml:/etc/ccr/ccr.yaml:ro" in extauth["volumes"] and args.config == "/etc/ccr/ccr.yaml"
    mounted = REPO / "deploy" / "compose" / "ccr.yaml"
    shipped, opted, endpoints = _extauth_binds(mounted.read_text(), str(mounted), args)
    exposed = {int(p) for p in extauth["expose"]}
    assert shipped[1] is None and shipped[0] in exposed
    assert opted[1] is not None and exposed == {opted[0], opted[1]}
    assert endpoints == [f"extauth:{opted[1]}"]


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


def test_kubernetes_declares_extauths_http_front_where_the_config_binds_it() -> None:
    """The extauth Service and container declare the HTTP front's port (authz-http) that `ccr serve extauth`
    binds once the ccr-config's http opt-in is uncommented (shipped: grpc, no front), and Envoy is told to
    reach it through that Service port."""
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / "ccr.yaml").read_text()) if d]
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    (container,) = by[("Deployment", "ccr-extauth")]["spec"]["template"]["spec"]["containers"]
    args = _ccr_argv(container["command"] + container.get("args", []))
    assert args.service == "extauth" and args.config == "/etc/ccr/ccr.yaml"
    text = by[("Secret", "ccr-config")]["stringData"]["ccr.yaml"]
    shipped, opted, endpoints = _extauth_binds(text, "deploy/k8s/ccr.yaml: ccr-config", args)
    assert shipped == (opted[0], None)
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared == {"grpc": opted[0], "authz-http": opted[1]}
    service = {p["name"]: p for p in by[("Service", "extauth")]["spec"]["ports"]}
    assert {n: p["targetPort"] for n, p in service.items()} == declared
    assert endpoints == [f"extauth.ccr.svc.cluster.local:{service['authz-http']['port']}"]


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


def test_istio_and_envoy_gateway_configs_decode_strictly() -> None:
    files = sorted(str(p) for d in ("istio", "envoy-gateway") for p in (REPO / "deploy" / d).glob("*.yaml"))
    objects = _deploycheck("k8s", *files)
    kinds = {o["kind"]: o for o in objects}
    assert {"ConfigMap", "AuthorizationPolicy", "Telemetry", "EnvoyFilter", "SecurityPolicy",
            "EnvoyPatchPolicy"} <= set(kinds)
    assert kinds["ConfigMap"]["extensionProviders"] == 2  # ext_authz and the access log, parsed as MeshConfig
    # The Envoy config inside the EnvoyFilter is Envoy's own: parse it with Envoy's protos.
    from envoy.config.route.v3 import route_components_pb2
    from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
    from google.protobuf import json_format

    from ccr.contract import RL_DOMAIN, SPEND_DOMAIN, SPEND_STAGE
    from router.rate_limits import RATELIMIT_FILTER, SPEND_FILTER, spend_rate_limits

    doc = next(d for d in yaml.safe_load_all((REPO / "deploy" / "istio" / "policies.yaml").read_text())
               if d and d["kind"] == "EnvoyFilter")
    filters: dict[str, rate_limit_pb2.RateLimit] = {}
    vhost: dict = {}
    for patch in doc["spec"]["configPatches"]:
        value = patch["patch"]["value"]
        if patch["applyTo"] == "HTTP_FILTER":
            typed = dict(value["typed_config"])
            assert typed.pop("@type").endswith("envoy.extensions.filters.http.ratelimit.v3.RateLimit")
            filters[value["name"]] = json_format.ParseDict(typed, rate_limit_pb2.RateLimit())
        elif patch["applyTo"] == "VIRTUAL_HOST":
            vhost = value
    # The request limits and the spend budgets, each as ccr's own Envoy runs them (router/resources.py).
    assert set(filters) == {RATELIMIT_FILTER, SPEND_FILTER}
    limits, spend = filters[RATELIMIT_FILTER], filters[SPEND_FILTER]
    assert (limits.domain, limits.stage, limits.failure_mode_deny) == (RL_DOMAIN, 0, True)
    assert (spend.domain, spend.stage, spend.failure_mode_deny) == (SPEND_DOMAIN, SPEND_STAGE, True)
    assert spend.rate_limited_status.code == 402
    for rl in filters.values():
        assert "ratelimit.ccr.svc.cluster.local" in rl.rate_limit_service.grpc_service.envoy_grpc.cluster_name
    entries = [json_format.ParseDict(e, route_components_pb2.RateLimit()) for e in vhost["rate_limits"]]
    by_stage = {e.stage.value: e for e in entries}
    assert set(by_stage) == {0, SPEND_STAGE}
    assert by_stage[0].actions[0].request_headers.descriptor_key == "principal"
    # The spend descriptor is the one ccr's router gives its own spend filter, entry for entry.
    expected = json_format.ParseDict(spend_rate_limits()[0], route_components_pb2.RateLimit())
    expected.stage.value = SPEND_STAGE
    assert by_stage[SPEND_STAGE] == expected


def test_envoy_gateway_patch_adds_ccrs_limits_and_spend() -> None:
    """deploy/envoy-gateway/ratelimit-patch.yaml (decoded strictly with Envoy Gateway's types in the
    test above): every value it adds is Envoy config that Envoy's own protos accept, and it adds
    what ccr's own Envoy runs: both rate limit filters (domains, stages, 402, fail closed) at ccr's
    rate limit service, and the descriptors the router gives its own filters."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.route.v3 import route_components_pb2
    from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 - registers the type
    from google.protobuf import json_format

    from ccr.contract import RL_DOMAIN, SPEND_DOMAIN, SPEND_STAGE
    from router.rate_limits import spend_rate_limits

    doc = yaml.safe_load((REPO / "deploy" / "envoy-gateway" / "ratelimit-patch.yaml").read_text())
    assert doc["kind"] == "EnvoyPatchPolicy" and doc["spec"]["type"] == "JSONPatch"
    patches = doc["spec"]["jsonPatches"]
    by_type: dict[str, list[dict]] = {}
    for p in patches:
        by_type.setdefault(p["type"].rsplit(".", 1)[1], []).append(p)
    (cluster,) = by_type["Cluster"]
    c = json_format.ParseDict(cluster["operation"]["value"], cluster_pb2.Cluster())
    assert c.name == "ccr_ratelimit" and cluster["operation"]["path"] == ""  # a whole new resource
    ep = c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (ep.address, ep.port_value) == ("ratelimit.ccr.svc.cluster.local", 9002)

    filters = {}
    for p in by_type["Listener"]:
        op = p["operation"]
        # Inserted at the router's own index: in front of it, after Envoy Gateway's ext_authz.
        assert op["op"] == "add" and op["jsonPath"].endswith("[?(@.name == 'envoy.filters.http.router')]")
        f = json_format.ParseDict(op["value"], hcm.HttpFilter())
        rl = rate_limit_pb2.RateLimit()
        assert f.typed_config.Unpack(rl)
        assert rl.rate_limit_service.grpc_service.envoy_grpc.cluster_name == c.name and rl.failure_mode_deny
        filters[f.name] = rl
    assert [n for n in filters] == ["ccr.ratelimit", "ccr.spend"]  # limits first, then the budgets
    assert (filters["ccr.ratelimit"].domain, filters["ccr.ratelimit"].stage) == (RL_DOMAIN, 0)
    assert (filters["ccr.spend"].domain, filters["ccr.spend"].stage) == (SPEND_DOMAIN, SPEND_STAGE)
    assert filters["ccr.spend"].rate_limited_status.code == 402

    (route,) = by_type["RouteConfiguration"]
    assert route["operation"]["path"] == "/typed_per_filter_config"
    per_filter = route["operation"]["value"]
    assert set(per_filter) == set(filters)
    parsed = {name: json_format.ParseDict({k: v for k, v in cfg.items() if k != "@type"},
                                          rate_limit_pb2.RateLimitPerRoute()) for name, cfg in per_filter.items()}
    assert parsed["ccr.ratelimit"].rate_limits[0].actions[0].request_headers.descriptor_key == "principal"
    expected = json_format.ParseDict(spend_rate_limits()[0], route_components_pb2.RateLimit())
    assert parsed["ccr.spend"].rate_limits[0] == expected


def test_istio_mesh_config_refuses_a_misspelled_field(tmp_path: Path) -> None:
    text = (REPO / "deploy" / "istio" / "mesh-config.yaml").read_text().replace("includeRequestBodyInCheck",
                                                                                 "includeRequestBody")
    bad = tmp_path / "mesh.yaml"
    bad.write_text(text)
    r = subprocess.run([str(DEPLOYCHECK), "k8s", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "includeRequestBody" in r.stderr


def test_static_envoy_config_for_a_mesh_envoy_passes_validate(tmp_path: Path) -> None:
    """`ccr config envoy`: the gateway as one static config for an Envoy run elsewhere, pointing its
    ext_authz, rate limit, ext_proc and access log at the standalone services."""
    from ccr.supervisor import envoy_binary

    pki = tmp_path / "pki"
    assert subprocess.run([*CCR, "pki", "issue", str(pki)], capture_output=True, timeout=60).returncode == 0
    cfg = yaml.safe_load((REPO / "deploy" / "compose" / "ccr.yaml").read_text())
    cfg["services"]["standalone"]["pki_dir"] = str(pki)
    cfg["storage"]["data_dir"] = str(tmp_path / "data")
    cfg["policy"]["dir"] = str(REPO / "policies")
    config = tmp_path / "ccr.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([*CCR, "config", "envoy", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    text = json.dumps(doc)
    for filter_type in ("ext_authz.v3.ExtAuthz", "ratelimit.v3.RateLimit", "ext_proc.v3.ExternalProcessor",
                        "access_loggers.grpc.v3"):
        assert filter_type in text
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert clusters["ccr_extauth"]["type"] == "STRICT_DNS"  # Compose service names
    out = tmp_path / "envoy.json"
    out.write_text(r.stdout)
    # The credential SDS files must exist for validate mode; `ccr serve envoy` writes them.
    from ccr.credentials import write_secret

    for provider in cfg["providers"]:
        write_secret(tmp_path / "data" / "standalone" / "envoy" / "credentials" / f"{provider['name']}.json",
                     provider["name"], "sk-ant-test")
    v = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(out), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stderr[-3000:]

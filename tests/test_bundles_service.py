"""The real extauth service polling a real HTTP bundle server: signed revisions swap in while it
serves, a tampered one is refused and the last good one keeps serving, and the status file says so."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2

from ccr.procs import StartError
from ccr.service import GRPC_OPTIONS
from extauth.bundle import build_bundle
from extauth.bundle_source import STATUS_FILE
from extauth.keys import create_key
from tests.bundle_server import BundleServer
from tests.harness import running_service
from tests.test_bundles import ENTRYPOINT, make_keys, policy_src, rewrite, signed
from tests.test_extauth import GATEWAY_YAML, http_check, msg_body


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return make_keys(tmp_path_factory.mktemp("keys"))


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait on a condition the service makes true (its poll runs on its own clock)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def status(run: Path) -> dict:
    try:
        return orjson.loads((run / STATUS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


def config_yaml(url: str, key_file: Path) -> str:
    return GATEWAY_YAML + f"""
policy:
  entrypoint: {ENTRYPOINT}
  bundle:
    url: {url}
    poll_interval_s: 0.5
    timeout_s: 5
  verification:
    key_file: {key_file}
    alg: RS256
"""


def test_service_swaps_signed_bundles_and_refuses_tampered(postgres_dsn: str, tmp_path: Path, keys) -> None:
    r1 = signed(tmp_path, keys, models=["claude-*"], revision="r1").read_bytes()
    r2 = signed(tmp_path, keys, models=["claude-haiku-*"], revision="r2").read_bytes()
    tampered = rewrite(r2, replace={"data.json": b'{"endpoint_access": {"*": ["*"]}, "model_access": {"default": []}}'})
    _, k = create_key(postgres_dsn, "bundle-svc")
    sonnet = http_check({"x-api-key": k}, body=msg_body("claude-sonnet-4-5"))
    run = tmp_path / "run"
    run.mkdir()
    with BundleServer() as srv:
        srv.put("/bundle.tar.gz", r1)
        yaml = config_yaml(srv.url + "/bundle.tar.gz", keys["RS256"][1])
        with running_service("extauth", run, yaml, postgres_dsn=postgres_dsn) as child, \
                grpc.insecure_channel(str(child.info["address"]), options=GRPC_OPTIONS) as ch:
            stub = pb_grpc.AuthorizationStub(ch)
            assert status(run)["revision"] == "r1" and status(run)["signed"] is True
            assert stub.Check(sonnet).status.code == code_pb2.OK
            # Unchanged bundle: the service's polls get 304s.
            wait_for(lambda: 304 in srv.statuses(), "a 304 from the bundle server")

            srv.put("/bundle.tar.gz", tampered)
            wait_for(lambda: "tampered" in (status(run).get("last_error") or ""), "the tampered bundle refused")
            assert status(run)["revision"] == "r1"
            assert stub.Check(sonnet).status.code == code_pb2.OK  # the last good one keeps serving

            srv.put("/bundle.tar.gz", r2)
            wait_for(lambda: status(run).get("revision") == "r2", "revision r2 in use")
            assert status(run)["last_error"] is None
            resp = stub.Check(sonnet)
            assert resp.status.code != code_pb2.OK and resp.denied_response.status.code == 403
        log = (run / "logs" / "extauth.log").read_text()
        assert "refused, keeping revision 'r1'" in log and "revision 'r2'" in log


def test_service_refuses_to_start_on_unsigned_bundle(postgres_dsn: str, tmp_path: Path, keys) -> None:
    unsigned = build_bundle(policy_src(tmp_path, ["claude-*"]), tmp_path / "u.tar.gz", ENTRYPOINT).read_bytes()
    run = tmp_path / "run"
    run.mkdir()
    with BundleServer() as srv:
        srv.put("/bundle.tar.gz", unsigned)
        yaml = config_yaml(srv.url + "/bundle.tar.gz", keys["RS256"][1])
        with pytest.raises(StartError) as e, running_service("extauth", run, yaml, postgres_dsn=postgres_dsn):
            pass
    assert "not signed" in str(e.value) or "not signed" in (run / "logs" / "extauth.log").read_text()
    assert "not signed" in status(run)["last_error"]

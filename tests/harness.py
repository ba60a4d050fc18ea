"""Starting our own processes in tests the way `ccr up` does: tracked children with ready files."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ccr.contract import ID_ADAPTER, ID_ENVOY
from ccr.pki import issue_run_pki
from ccr.procs import Child, spawn, wait_ready_file
from ccr.runtime import Runtime
from ccr.supervisor import Gateway

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def running_service(module: str, run_dir: Path, config_yaml: str, *, env: dict[str, str] | None = None,
                    **runtime: Any) -> Iterator[Child]:
    """`python -m <module>` with a runtime file; yields once it has written its ready file.

    The runtime carries a run PKI (as `ccr up` issues it; pass `mtls=` to replace it) with
    identities for Envoy, the adapter and extauth; `Runtime.load(run_dir / "runtime.json")`
    gives a test their paths. Stops the service with SIGTERM afterwards and checks that it
    shut down cleanly.
    """
    (run_dir / "gateway.yaml").write_text(config_yaml)
    fields: dict[str, Any] = {"postgres_dsn": "postgresql://unused@127.0.0.1:1/unused",
                              "redis_url": "redis://127.0.0.1:1/0", **runtime}
    if "mtls" not in fields:
        fields["mtls"] = issue_run_pki(run_dir / "pki", [ID_ENVOY, ID_ADAPTER, "extauth"])
    Runtime(config_path=str(run_dir / "gateway.yaml"), run_dir=str(run_dir), **fields).save(run_dir / "runtime.json")
    name = module.replace(".", "-")
    ready = run_dir / f"{name}.ready"
    child = spawn(name, [sys.executable, "-m", module, "--runtime", str(run_dir / "runtime.json"),
                         "--ready-file", str(ready)], run_dir / "logs", env=env, cwd=REPO)
    try:
        wait_ready_file(child, ready)
        yield child
    finally:
        code = child.stop()
    assert code == 0, f"{module} did not shut down cleanly on SIGTERM (exit {code}):\n{child.log_tail()}"


def gateway_config(tmp: Path) -> Path:
    """The example config with its data under `tmp` and the repo's policies."""
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["storage"]["data_dir"] = str(tmp / "data")
    cfg["policy"]["dir"] = str(REPO / "policies")
    path = tmp / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextmanager
def running_gateway(tmp: Path) -> Iterator[Gateway]:
    g = Gateway(gateway_config(tmp)).start()
    g.issue_local_key()
    try:
        yield g
    finally:
        g.stop()
    assert all(not c.alive() for c in g.children)

"""A SPIRE server and agent for one `ccr up` run: the X.509-SVIDs of every part of the gateway.

The server (trust domain ccr.local, its CA key held only in memory: KeyManager "memory") and the
agent run as tracked children with their data under the run directory. The agent attests to the
server with a one-time join token. One registration entry per part (contract.SPIFFE_PARTS)
names the SPIFFE ID spiffe://ccr.local/<part>.

How the agent tells the parts apart. They all run as the same user, and the Python services all
run the same interpreter, so `unix:uid` alone would hand every identity to every part. Each part
is therefore launched through an executable path of its own: a hard link (or copy, across file
systems) of the Python interpreter or of the Envoy binary under the run directory, e.g.
`<run>/spiffe-workloads/adapter/bin/python`. The agent's unix workload attestor, with
`discover_workload_path`, reads the caller's /proc/<pid>/exe (the path the kernel exec'd, not a
symlink target), and each entry requires both `unix:uid:<our uid>` and `unix:path:<that part's
path>`. A process that ccr did not launch through a part's path gets no identity; the parts get
only their own.

What this does not cover (docs/spiffe.md): a process running as the same user can exec any
part's path, so code execution as that user is equivalent to holding every identity. Separate
the parts across users (or containers, with SPIRE's k8s/docker attestors) where that matters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ccr.config import ConfigError
from ccr.contract import RUN_TRUST_DOMAIN
from ccr.procs import Child, StartError, free_port, spawn, wait_until

# Unix socket paths are limited to 108 bytes (sun_path); deeper run dirs get a short temp dir.
_MAX_SOCKET_PATH = 100
WORKLOADS_DIR = "spiffe-workloads"


def spire_binary(name: str) -> str:
    """spire-server / spire-agent: next to this Python (install.sh puts them in .venv/bin), else PATH."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed: run ./install.sh (it builds SPIRE with `go install`), "
                          "or set services.spiffe.mode: off (or services.spiffe.agent_socket)")
    return found


def spiffe_id(part: str, trust_domain: str = RUN_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/{part}"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        a, b = src.stat(), dst.stat()
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
            return  # the same file (link), or the same copy from an earlier start
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # same inode: no copy of a 100 MB Envoy; /proc/<pid>/exe still names dst
    except OSError:
        shutil.copy2(src, dst)


def python_workload(root: Path, part: str) -> Path:
    """This Python's interpreter under a path of `part`'s own, set up as the same virtualenv."""
    base = root / part
    exe = base / "bin" / "python"
    _link_or_copy(Path(os.path.realpath(sys.executable)), exe)
    # The interpreter finds its environment from pyvenv.cfg beside/above itself: point it at the
    # same installation (home) and the same site-packages (lib -> this environment's lib).
    (base / "pyvenv.cfg").write_text(
        f"home = {os.path.dirname(os.path.realpath(sys.executable))}\n"
        "include-system-site-packages = false\n"
        f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
    lib = base / "lib"
    if lib.is_symlink() or lib.exists():
        lib.unlink()
    lib.symlink_to(Path(sys.prefix) / "lib")
    # Tools a part looks for beside its interpreter (extauth builds policy bundles with `opa`):
    # the same ones this environment has, so a part finds them without them being on PATH.
    for tool in ("opa",):
        src = Path(sys.executable).parent / tool
        dst = exe.parent / tool
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if src.is_file():
            dst.symlink_to(src.resolve())
    return exe


def binary_workload(root: Path, part: str, binary: str) -> Path:
    exe = root / part / "bin" / Path(binary).name
    _link_or_copy(Path(os.path.realpath(binary)), exe)
    return exe


def _short_dir(preferred: Path) -> Path:
    """`preferred`, or a fresh temp dir when socket paths under it would be too long."""
    if len(str(preferred / "agent.sock")) <= _MAX_SOCKET_PATH:
        preferred.mkdir(mode=0o700, parents=True, exist_ok=True)
        return preferred
    return Path(tempfile.mkdtemp(prefix="ccr-spire-"))


@dataclass
class Spire:
    trust_domain: str
    agent_socket: Path
    server_socket: Path
    agent_id: str
    bundle_pem: Path
    children: list[Child] = field(default_factory=list)
    port: int = 0  # the server's agent API
    base: Path = Path()  # config and data
    svid_ttl_s: int = 3600

    def server_cmd(self, *args: str) -> str:
        """Run `spire-server <args> -socketPath ...` (the admin API); its stdout."""
        return _run([spire_binary("spire-server"), *args, "-socketPath", str(self.server_socket)])

    def register(self, workloads: dict[str, Path]) -> None:
        """One entry per part (part -> its executable path) under this run's agent: SPIFFE ID
        spiffe://<td>/<part> for a process of our uid exec'd from exactly that path."""
        uid = os.getuid()
        entries = {"entries": [{
            "spiffe_id": spiffe_id(part, self.trust_domain), "parent_id": self.agent_id,
            "selectors": [{"type": "unix", "value": f"uid:{uid}"}, {"type": "unix", "value": f"path:{path}"}],
            "x509_svid_ttl": self.svid_ttl_s,
        } for part, path in workloads.items()]}
        fd, name = tempfile.mkstemp(prefix="entries-", suffix=".json", dir=self.base)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        try:
            self.server_cmd("entry", "create", "-data", name)
        finally:
            os.unlink(name)

    def mint_x509(self, part: str, ttl_s: int = 300) -> tuple[bytes, bytes]:
        """(chain PEM, key PEM) of an X.509-SVID for `part`, straight from the server (tests only)."""
        out = Path(tempfile.mkdtemp(prefix="ccr-mint-"))
        try:
            self.server_cmd("x509", "mint", "-spiffeID", spiffe_id(part, self.trust_domain), "-ttl", f"{ttl_s}s",
                            "-write", str(out))
            return (out / "svid.pem").read_bytes(), (out / "key.pem").read_bytes()
        finally:
            shutil.rmtree(out, ignore_errors=True)


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise StartError(f"{' '.join(argv[:3])} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def _server_conf(data: Path, sock: Path, port: int, trust_domain: str, ttl_s: int) -> str:
    return f"""server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{sock}"
  trust_domain = "{trust_domain}"
  data_dir = "{data}"
  log_level = "WARN"
  default_x509_svid_ttl = "{ttl_s}s"
  ca_ttl = "72h"
  experimental {{
    # The entries are created just before the agent attests; its first sync must see them
    # (the default 5s reload left every part waiting for its SVID at start).
    cache_reload_interval = "200ms"
  }}
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{data / 'datastore.sqlite3'}"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
}}
"""


def _agent_conf(data: Path, sock: Path, port: int, trust_domain: str, bundle: Path) -> str:
    return f"""agent {{
  data_dir = "{data}"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "{port}"
  socket_path = "{sock}"
  trust_bundle_path = "{bundle}"
  trust_domain = "{trust_domain}"
  experimental {{
    # The agent's first sync follows attestation at once and can still miss entries created
    # within the server's cache reload (200ms); the default 5s to the next sync then held every
    # part's start for 5-8s. 1s costs ~3ms CPU/s more between agent and server.
    sync_interval = "1s"
  }}
  sds {{
    default_svid_name = "default"
    default_bundle_name = "ROOTCA"
    default_all_bundles_name = "ALL"
  }}
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{
      discover_workload_path = true
    }}
  }}
}}
"""


def _healthy(binary: str, sock: Path) -> bool:
    if not sock.exists():
        return False
    return subprocess.run([binary, "healthcheck", "-socketPath", str(sock)], capture_output=True,
                          timeout=10).returncode == 0


def spawn_spire_server(run_dir: Path, logs: Path, *, x509_svid_ttl_s: int = 3600,
                       trust_domain: str = RUN_TRUST_DOMAIN) -> Spire:
    """The server, started and not waited for: `ccr up` starts PostgreSQL meanwhile, then calls
    `finish_spire`. (Both run on the caller's thread: children get the parent-death signal when
    the thread that spawned them ends, so no helper thread may spawn them.)"""
    server_bin = spire_binary("spire-server")
    spire_binary("spire-agent")  # missing? say so before anything starts
    base = run_dir / "spire"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o700, parents=True)
    socks = _short_dir(base / "sockets")
    server_sock, agent_sock = socks / "server.sock", socks / "agent.sock"
    for s in (server_sock, agent_sock):
        s.unlink(missing_ok=True)
    port = free_port()
    server_conf = base / "server.conf"
    server_conf.write_text(_server_conf(base / "server", server_sock, port, trust_domain, x509_svid_ttl_s))
    server = spawn("spire-server", [server_bin, "run", "-config", str(server_conf)], logs)
    return Spire(trust_domain, agent_sock, server_sock, "", base / "bundle.pem", [server], port=port, base=base,
                 svid_ttl_s=x509_svid_ttl_s)


def remove_spire_state(spire: Spire) -> None:
    """After the server and agent stopped: their data, config and sockets (a run starts afresh)."""
    shutil.rmtree(spire.base, ignore_errors=True)
    if not spire.agent_socket.parent.is_relative_to(spire.base):  # a short temp dir for the sockets
        shutil.rmtree(spire.agent_socket.parent, ignore_errors=True)


def finish_spire(spire: Spire, logs: Path, workloads: dict[str, Path]) -> Spire:
    """Once the server is healthy: entries for `workloads` (part -> its executable path), then the
    agent, healthy when this returns (its first sync, right after it attests, finds the entries).

    The caller tracks (and stops) `spire.children`, also when this raises."""
    server_bin, agent_bin = spire_binary("spire-server"), spire_binary("spire-agent")
    server = spire.children[0]
    wait_until(server, lambda: _healthy(server_bin, spire.server_socket), 30, "healthy", interval=0.1)
    spire.bundle_pem.write_text(spire.server_cmd("bundle", "show"))
    token = str(json.loads(spire.server_cmd("token", "generate", "-ttl", "600", "-output", "json"))["value"])
    td = spire.trust_domain
    spire.agent_id = f"spiffe://{td}/spire/agent/join_token/{token}"
    spire.register(workloads)
    agent_conf = spire.base / "agent.conf"
    agent_conf.write_text(_agent_conf(spire.base / "agent", spire.agent_socket, spire.port, td, spire.bundle_pem))
    agent = spawn("spire-agent", [agent_bin, "run", "-config", str(agent_conf), "-joinToken", token], logs)
    spire.children.append(agent)
    wait_until(agent, lambda: _healthy(agent_bin, spire.agent_socket), 30, "healthy", interval=0.1)
    return spire


def start_spire(run_dir: Path, logs: Path, workloads: dict[str, Path], *, x509_svid_ttl_s: int = 3600,
                trust_domain: str = RUN_TRUST_DOMAIN) -> Spire:
    """Server, entries, agent, in one go; on failure the ones started are stopped here."""
    spire = spawn_spire_server(run_dir, logs, x509_svid_ttl_s=x509_svid_ttl_s, trust_domain=trust_domain)
    try:
        return finish_spire(spire, logs, workloads)
    except BaseException:
        for c in reversed(spire.children):
            c.stop()
        raise

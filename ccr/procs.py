"""Child processes that are tracked by PID and stopped exactly, never by name.

Every child gets PR_SET_PDEATHSIG so that it is told to stop even if its
supervisor dies without cleaning up (no orphans after a crash or SIGKILL).
That and a change of user are done by util-linux's `setpriv` in front of the
program rather than by a Python `preexec_fn`: with no Python code between fork
and exec, CPython starts children with vfork, so no pthread_atfork handler runs
in the child. gRPC registers such handlers; run in a forked child of a process
with live gRPC channels (the test process, a supervisor), they restart a poller
thread that races exec and aborts the child (SIGABRT, "epoll_wait error: Bad
file descriptor") about one start in eight under load.

Children never inherit the supervisor's environment: each gets `minimal_env()` plus
what its caller passes explicitly, so a secret in the operator's shell (a provider
credential) reaches only the one process it is handed to.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1

# What any child may need from the supervisor's environment: finding programs, locale and
# time zone (PostgreSQL's initdb/server, Python's text I/O), a home and temp dir, our log
# level, and how this Python was set up to import (PYTHONPATH for a source checkout).
INHERITED_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "HOME", "TMPDIR", "CCR_LOG_LEVEL", "PYTHONPATH",
                 "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")
INHERITED_ENV_PREFIXES = ("LC_",)


def minimal_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    src = os.environ if environ is None else environ
    return {k: v for k, v in src.items() if k in INHERITED_ENV or k.startswith(INHERITED_ENV_PREFIXES)}


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv")


def launcher(user: str | None = None, *, die_with_parent: bool = True) -> list[str]:
    """The argv prefix that sets the parent-death signal and switches to `user`; empty when
    `setpriv` is missing (then `spawn` and `run_as` fall back to preexec_fn and Popen's user=)."""
    tool = _setpriv()
    if tool is None:
        return []
    out = [tool]
    if user is not None:
        # Before the death signal: the kernel clears it when the effective uid changes.
        out += ["--reuid", user, "--regid", user, "--init-groups"]
    if die_with_parent:
        out += ["--pdeathsig", "TERM"]
    return out + ["--"]


def run_as(user: str | None, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess:
    """subprocess.run as `user` (None: as ourselves), without Python code in the child."""
    prefix = launcher(user, die_with_parent=False) if user is not None else []
    if user is not None and not prefix:
        kw["user"] = user
    return subprocess.run([*prefix, *argv], **kw)  # type: ignore[call-overload]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# Ports free_port picks from: above the well-known and registered-service crowd, below the ephemeral range.
PORT_FLOOR = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections and bind(0) (Linux default 32768)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", attempts: int = 64) -> int:
    """A port that was free a moment ago, for servers that cannot bind port 0 and report it.

    Chosen at random below the kernel's ephemeral range, never in it: between this choice and the server's
    bind (seconds, for Envoy's listener pushed by the router), any outgoing connection on the machine may
    be given a port from that range as its own, and the server then fails to bind (it did: "Address already
    in use" for the gateway's listener). Below the range only explicit binds compete. Falls back to the
    kernel's choice when no port there is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = ephemeral_low()
    for _ in range(attempts if low - PORT_FLOOR >= 1000 else 0):
        port = random.randrange(PORT_FLOOR, low)
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class StartError(RuntimeError):
    """A child did not become ready; the message carries the tail of its log."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM
    info: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(self.stop_signal)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        return self.proc.returncode


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    prefix = launcher(user)
    try:
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**minimal_env(), **(env or {})},
            cwd=cwd,
            user=None if prefix else user,
            preexec_fn=None if prefix else _die_with_parent,
            # Own process group: a terminal's Ctrl-C reaches the supervisor only,
            # which then stops children in order.
            start_new_session=True,
        )
    finally:
        log.close()
    return Child(name, proc, log_path, stop_signal)


def wait_until(
    child: Child, ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not child.alive():
            raise StartError(
                f"{child.name} exited with code {child.proc.returncode} before {what}.\n"
                f"--- last lines of {child.log_path} ---\n{child.log_tail()}"
            )
        time.sleep(interval)
    raise StartError(
        f"{child.name} not {what} after {timeout:.0f}s.\n"
        f"--- last lines of {child.log_path} ---\n{child.log_tail()}"
    )


def wait_ready_file(child: Child, path: Path, timeout: float = 30.0) -> dict[str, object]:
    def present() -> bool:
        return path.exists()

    wait_until(child, present, timeout, "ready")
    data: dict[str, object] = json.loads(path.read_text())
    child.info.update(data)
    return data

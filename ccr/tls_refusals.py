"""Counting the TLS handshakes a gRPC service refuses: plaintext, no client certificate, a certificate
from another CA or trust domain, an expired one.

grpcio verifies the client certificate inside gRPC core, before any Python code sees the
connection, and offers no server-side hook for a refused handshake: the only trace is the line
core writes to the process's stderr (file descriptor 2), e.g.

    ... ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL
    routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired

`tap_handshake_refusals` puts a pipe on fd 2 with a small copier process behind it that copies
every line through to the original stderr and reports each handshake failure back; the service
turns each report into a log line of ours and a count in ccr_mtls_refusals_total{service, reason}.
Python's own logging is pointed at a duplicate of the original stderr first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading

log = logging.getLogger("ccr.tls")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `ccr` is importable from

_HANDSHAKE_FAILED = re.compile(r"Handshake failed with (?:fatal )?error (?P<detail>.*)$")
# (reason label, what gRPC core's line says), first match wins. BoringSSL names the record-layer
# error for a client that does not speak TLS, and the X.509 verify error for a certificate.
_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("plaintext", ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "PACKET_LENGTH_TOO_LONG",
                   "UNEXPECTED_RECORD", "RECORD_TOO_LARGE")),
    ("no_client_certificate", ("PEER_DID_NOT_RETURN_A_CERTIFICATE",)),
    ("expired_certificate", ("certificate has expired",)),
    ("not_yet_valid_certificate", ("certificate is not yet valid",)),
    ("revoked_certificate", ("certificate revoked",)),
    ("untrusted_certificate", ("unable to get local issuer certificate", "self signed certificate",
                               "self-signed certificate", "certificate signature failure",
                               "unable to verify the first certificate", "unable to get issuer certificate",
                               "CERTIFICATE_VERIFY_FAILED")),
)


def handshake_refusal(line: str) -> tuple[str, str] | None:
    """(reason, detail) when `line` is gRPC core's report of a refused TLS handshake, else None."""
    m = _HANDSHAKE_FAILED.search(line)
    if m is None:
        return None
    detail = m.group("detail").strip()
    for reason, needles in _REASONS:
        if any(n in detail for n in needles):
            return reason, detail
    return "other", detail


def count_refusal(service: str, reason: str, detail: str) -> None:
    from ccr.metrics import MTLS_REFUSALS  # here: the copier process never needs prometheus_client

    log.warning("refused a TLS connection to %s: %s (%s)", service, reason, detail)
    MTLS_REFUSALS.labels(service, reason).inc()


def tap_handshake_refusals(service: str) -> None:
    """Route fd 2 through a pipe that counts gRPC core's handshake refusals (see the module doc).
    Call once, before logging starts and before gRPC starts threads."""
    original = os.dup(2)
    # Python-level writers (logging, tracebacks) go straight to the original stderr.
    sys.stderr = io.TextIOWrapper(os.fdopen(original, "wb", buffering=0), write_through=True,
                                  errors="backslashreplace")
    lines_r, lines_w = os.pipe()
    found_r, found_w = os.pipe()
    # The copier is a process of its own, not a thread: what core writes just before it aborts
    # (a CHECK failure, a fatal signal) still reaches the log after this process is gone. It exits
    # at end of file, i.e. once every holder of fd 2 (this process, its children) has exited.
    copier = subprocess.Popen(  # noqa: S603 - this interpreter, this module
        [sys.executable, "-m", "ccr.tls_refusals", str(found_w)], stdin=lines_r, stdout=original,
        stderr=original, pass_fds=(found_w,), close_fds=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")]))})
    os.close(lines_r)
    os.close(found_w)
    os.dup2(lines_w, 2)
    os.close(lines_w)
    log.debug("gRPC core's stderr copied by pid %d", copier.pid)

    def count() -> None:
        with os.fdopen(found_r, "rb") as reports:
            for line in reports:
                reason, _, detail = line.decode(errors="replace").rstrip("\n").partition("\t")
                with contextlib.suppress(Exception):  # a metric or log hiccup must not end the counting
                    count_refusal(service, reason, detail)

    threading.Thread(target=count, name="tls-refusals", daemon=True).start()


def _copy(found_fd: int) -> None:
    """The copier: stdin -> stdout unchanged, and each refusal as `reason<TAB>detail` on `found_fd`.
    Ignores SIGINT/SIGTERM (a signal to the service's process group must not cut the copy short)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.set_blocking(found_fd, False)  # a stalled counter never holds the copying back: reports drop
    pending = b""
    while chunk := os.read(0, 65536):
        os.write(1, chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            hit = handshake_refusal(raw.decode(errors="replace"))
            if hit is not None:
                with contextlib.suppress(OSError):  # full (counter stalled) or closed (service gone)
                    os.write(found_fd, f"{hit[0]}\t{hit[1]}\n".encode())


if __name__ == "__main__":
    _copy(int(sys.argv[1]))

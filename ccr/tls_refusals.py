"""Counting the TLS handshakes a gRPC service refuses: plaintext, no client certificate, a certificate
from another CA or trust domain, an expired one.

grpcio verifies the client certificate inside gRPC core, before any Python code sees the
connection, and offers no server-side hook for a refused handshake: the only trace is the line
core writes to the process's stderr (file descriptor 2), e.g.

    ... ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL
    routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired

`tap_handshake_refusals` puts a pipe on fd 2 and a reader thread behind it that copies every line
through to the original stderr, and turns each handshake failure into a log line of ours and a
count in ccr_mtls_refusals_total{service, reason}. Python's own logging is pointed at a duplicate
of the original stderr first, so a Python thread never writes into the pipe its reader needs the
GIL to empty.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading

from ccr.metrics import MTLS_REFUSALS

log = logging.getLogger("ccr.tls")

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
    log.warning("refused a TLS connection to %s: %s (%s)", service, reason, detail)
    MTLS_REFUSALS.labels(service, reason).inc()


def tap_handshake_refusals(service: str) -> None:
    """Route fd 2 through a pipe that counts gRPC core's handshake refusals (see the module doc).
    Call once, before logging starts and before gRPC starts threads."""
    original = os.dup(2)
    # Python-level writers (logging, tracebacks) go straight to the original stderr.
    sys.stderr = io.TextIOWrapper(os.fdopen(original, "wb", buffering=0), write_through=True,
                                  errors="backslashreplace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                return
            os.write(original, chunk)  # through first: the raw line stays in the log as it was
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                found = handshake_refusal(raw.decode(errors="replace"))
                if found is not None:
                    with contextlib.suppress(Exception):  # counting must never stop the copying
                        count_refusal(service, *found)

    threading.Thread(target=pump, name="tls-refusals", daemon=True).start()

"""Classifying gRPC core's report of a refused TLS handshake (ccr/tls_refusals.py). The end-to-end
counting, with real handshakes against every service, is in tests/test_spire.py."""

from __future__ import annotations

import pytest

from ccr.tls_refusals import handshake_refusal

CORE = "I1126 13:40:41.793896   10751 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "


@pytest.mark.parametrize(("line", "reason"), [
    # Lines as grpcio 1.85's core writes them (captured from a real refused handshake).
    (CORE + "error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification "
     "context", "plaintext"),
    (CORE + "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
     "certificate", "untrusted_certificate"),
    (CORE + "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired",
     "expired_certificate"),
    (CORE + "error:100000c7:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE",
     "no_client_certificate"),
    (CORE + "error:1000009c:SSL routines:OPENSSL_internal:HTTP_REQUEST", "plaintext"),
    (CORE + "error:10000412:SSL routines:OPENSSL_internal:SOMETHING_NEW", "other"),
])
def test_reason_of_a_refused_handshake(line: str, reason: str) -> None:
    found = handshake_refusal(line)
    assert found is not None and found[0] == reason


@pytest.mark.parametrize("line", ["", "I1126 chttp2_transport.cc:123] ping", "serving on 127.0.0.1:1"])
def test_other_lines_are_not_refusals(line: str) -> None:
    assert handshake_refusal(line) is None

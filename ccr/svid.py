"""This process's X.509-SVID and trust bundle, from the SPIRE agent's Workload API, kept current.

The `spiffe` package's X509Source holds a stream to the agent and replaces the SVID when the agent
rotates it. Servers take their TLS material through a gRPC certificate-config fetcher that core
calls at each new handshake: a rotated SVID (or a changed bundle) reaches the next connection
without a restart, and connections already open keep the certificate they were made with.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Collection

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import Certificate
from spiffe import X509Source

log = logging.getLogger("ccr.svid")


def _pem(certs: list[Certificate] | set[Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class SvidMaterial:
    """One consistent snapshot: chain, key, bundle (PEM) and the SVID's identity and serial."""

    def __init__(self, chain: bytes, key: bytes, bundle: bytes, spiffe_id: str, serial: int) -> None:
        self.chain, self.key, self.bundle, self.spiffe_id, self.serial = chain, key, bundle, spiffe_id, serial


class SvidSource:
    """X.509-SVID of this process; `timeout_s` bounds the wait for the first one."""

    def __init__(self, agent_socket: str, timeout_s: float = 60.0) -> None:
        self._source = X509Source(socket_path=f"unix:{agent_socket}", timeout_in_seconds=timeout_s)
        self._lock = threading.Lock()
        self._served: tuple[int, bytes] | None = None

    def material(self) -> SvidMaterial:
        ctx = self._source.get_x509_context()
        svid = ctx.default_svid
        if svid is None:
            raise RuntimeError("the Workload API returned no X.509-SVID for this process")
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        if bundle is None:
            raise RuntimeError(f"no trust bundle for {svid.spiffe_id.trust_domain}")
        key = svid.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        return SvidMaterial(_pem(svid.cert_chain), key, _pem(bundle.x509_authorities), str(svid.spiffe_id),
                            svid.leaf.serial_number)

    def _config(self, m: SvidMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key, m.chain)], root_certificates=m.bundle)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core before each handshake: None keeps the current config.
        try:
            m = self.material()
        except Exception:  # noqa: BLE001 - keep serving with the last good SVID; the agent may be restarting
            log.exception("cannot read the current X.509-SVID; keeping the one in use")
            return None
        with self._lock:
            if self._served == (m.serial, m.bundle):
                return None
            self._served = (m.serial, m.bundle)
        log.info("serving with X.509-SVID %s serial %x", m.spiffe_id, m.serial)
        return self._config(m)

    def server_credentials(self) -> grpc.ServerCredentials:
        """mTLS server credentials: callers must present an SVID that chains to the bundle."""
        m = self.material()
        with self._lock:
            self._served = (m.serial, m.bundle)
        log.info("serving with X.509-SVID %s serial %x", m.spiffe_id, m.serial)
        return grpc.dynamic_ssl_server_credentials(self._config(m), self._fetch,
                                                   require_client_authentication=True)

    def ssl_server_context(self, alpn: Collection[str] = ("http/1.1",)) -> ssl.SSLContext:
        """An ssl.SSLContext (for HTTP servers) that requires a client SVID chaining to the bundle;
        reloaded in place when the agent rotates this process's SVID. The peer's ID is the
        caller's to check (`peer_uri_sans`)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(list(alpn))
        lock = threading.Lock()
        loaded: list[int] = []

        def load() -> None:
            m = self.material()
            with lock:
                if loaded and loaded[-1] == m.serial:
                    return
                _load_chain(ctx, m)
                # Added, not replaced: a CA that leaves the bundle stays trusted until a restart.
                ctx.load_verify_locations(cadata=m.bundle.decode())
                loaded.append(m.serial)
            log.info("serving with X.509-SVID %s serial %x", m.spiffe_id, m.serial)

        load()
        self._source.subscribe_for_updates(load)
        return ctx

    def close(self) -> None:
        self._source.close()


def _load_chain(ctx: ssl.SSLContext, m: SvidMaterial) -> None:
    # ssl reads certificates and keys only from paths: anonymous memory files, so the private key
    # never touches a file system.
    fds = [os.memfd_create("svid-chain", os.MFD_CLOEXEC), os.memfd_create("svid-key", os.MFD_CLOEXEC)]
    try:
        os.write(fds[0], m.chain)
        os.write(fds[1], m.key)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


def peer_uri_sans(peercert: dict | None) -> list[str]:
    """URI SANs of a verified peer certificate as ssl's getpeercert() returns it."""
    return [v for k, v in (peercert or {}).get("subjectAltName", ()) if k == "URI"]

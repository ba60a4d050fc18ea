"""`python -m router.adapter --runtime RUN/runtime.json --ready-file F`."""

from ccr.contract import ID_ENVOY
from ccr.service import run
from router.adapter.server import setup

if __name__ == "__main__":
    # The adapter injects provider credentials: only Envoy, over mutual TLS, may call it.
    run("adapter", setup, mtls_peers=(ID_ENVOY,), require_mtls=True)

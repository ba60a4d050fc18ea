"""`python -m audit --runtime RUN/runtime.json --ready-file F`"""

from audit.service import setup
from ccr.contract import ID_ENVOY
from ccr.service import run

if __name__ == "__main__":
    run("accesslog", setup, mtls_peers=(ID_ENVOY,), fast_loop=True)  # a hot-path service

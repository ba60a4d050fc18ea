"""`python -m ratelimit --runtime RUN/runtime.json --ready-file F`"""

from ccr.contract import ID_ENVOY
from ccr.service import run_threaded
from ratelimit.service import THREADS, setup

if __name__ == "__main__":
    run_threaded("ratelimit", setup, THREADS, mtls_peers=(ID_ENVOY,))

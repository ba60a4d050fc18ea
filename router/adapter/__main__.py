"""`python -m router.adapter --runtime RUN/runtime.json --ready-file F`."""

from ccr.service import run
from router.adapter.server import setup

if __name__ == "__main__":
    run("adapter", setup)

"""`python -m ratelimit --runtime RUN/runtime.json --ready-file F`"""

from ccr.service import run
from ratelimit.service import setup

if __name__ == "__main__":
    run("ratelimit", setup, fast_loop=True)  # a hot-path service

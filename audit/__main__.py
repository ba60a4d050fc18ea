"""`python -m audit --runtime RUN/runtime.json --ready-file F`"""

from audit.service import setup
from ccr.service import run

if __name__ == "__main__":
    run("accesslog", setup, fast_loop=True)  # a hot-path service

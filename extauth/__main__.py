"""`python -m extauth --runtime RUN/runtime.json --ready-file F [--authz-http-port N]`: the ext_authz gRPC
service, and with services.authz_transport: http its HTTP/1.1 front too (extauth/http_front.py)."""

from ccr.contract import ID_ENVOY
from ccr.service import run
from extauth.server import setup

if __name__ == "__main__":
    run("extauth", setup, mtls_peers=(ID_ENVOY,), fast_loop=True)  # a hot-path service

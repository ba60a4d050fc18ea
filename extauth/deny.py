"""A refusal with its HTTP status and Anthropic error type, and the CheckResponse for it."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from ccr.errors import error_body

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_GRPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    413: code_pb2.INVALID_ARGUMENT,
    503: code_pb2.UNAVAILABLE,
}


class Deny(Exception):
    headers: list[base_pb2.HeaderValueOption] = []  # more response headers (a policy set's, extauth/policy_sets.py)
    log_reason: str | None = None  # what the decision log records, when it says more than the client is told

    def __init__(self, status: int, err_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message


def denied(status: int, err_type: str, message: str,
           headers: list[base_pb2.HeaderValueOption] | None = None) -> pb.CheckResponse:
    resp = pb.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(status, code_pb2.PERMISSION_DENIED), message=message),
        denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                    append_action=_OVERWRITE,
                )
            ],
            body=error_body(err_type, message).decode(),
        ),
    )
    if headers:
        resp.denied_response.headers.extend(headers)
    return resp

"""The adapter's translating attempts: requests in one schema, providers in another.

Runs on each provider's `provider_<name>_translate` cluster (router/resources.py) with the
request body buffered and the reply body FULL_DUPLEX_STREAMED. Per attempt: the client's body
becomes the provider's request (path, headers, body, and for Bedrock and Vertex the signature or
token, made here because it covers the final body and URL); the reply comes back in the client's
schema. Streams are translated chunk by chunk as they arrive, with keep-alives on a timer; whole
replies and errors are collected, and their headers answered with them. Usage is metered on the
Anthropic form into `ccr.usage`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ccr.config import GatewayConfig, Provider, ProviderKind
from ccr.contract import UsageStatus
from router.adapter.translators import Translation, client_schema, translation_for
from router.adapter.translators.anthropic_api import AnthropicApi
from router.adapter.translators.base import ProviderSide, TranslationError
from router.adapter.translators.bedrock import AwsKeys, Bedrock
from router.adapter.translators.openai_provider import OpenAICompatible
from router.adapter.translators.vertex import TokenSource, Vertex
from router.usage import Assessment, assess, not_billable

log = logging.getLogger("ccr.adapter")



@dataclass
class TranslatingProvider:
    """A provider as the translating adapter calls it; `side()` is fresh per attempt."""

    name: str
    kind: ProviderKind
    side: Callable[[], ProviderSide]
    ping_interval_s: float

    def attempt(self, path: str, clock: Callable[[], float] | None = None) -> Translation | None:
        schema = client_schema(path)
        if schema is None or (schema == "anthropic" and self.kind == ProviderKind.anthropic):
            return None
        kw = {"clock": clock} if clock is not None else {}
        return translation_for(schema, self.kind, self.side(), ping_interval_s=self.ping_interval_s, **kw)


def _env(name: str | None, provider: str) -> str:
    value = os.environ.get(name or "", "")
    if not value:
        raise ValueError(f"provider {provider}: the adapter has no value for {name}")
    return value


def provider_side_factory(p: Provider, endpoint: str) -> Callable[[], ProviderSide]:
    """How the adapter calls provider `p` at `endpoint` (the emulator's, when overridden).
    Bedrock and Vertex secrets are read here, from the adapter's own environment (ccr up hands
    them to this process only)."""
    if p.kind == ProviderKind.anthropic:
        return AnthropicApi
    if p.kind == ProviderKind.openai:
        return lambda: OpenAICompatible(dict(p.model_ids))
    if p.kind == ProviderKind.bedrock:
        keys = AwsKeys(_env(p.aws_access_key_id_env, p.name), _env(p.aws_secret_access_key_env, p.name),
                       os.environ.get(p.aws_session_token_env or "") or None)
        side = Bedrock(str(p.region), urlsplit(endpoint).netloc, keys, dict(p.model_ids))
        return lambda: side
    if p.kind == ProviderKind.vertex:
        side_v = Vertex(str(p.project), str(p.region), TokenSource.from_file(_env(p.service_account_file_env, p.name)),
                        dict(p.model_ids))
        return lambda: side_v
    raise ValueError(f"provider {p.name}: no translation for kind {p.kind}")


def build_translating(config: GatewayConfig, endpoints: dict[str, str]) -> dict[str, TranslatingProvider]:
    return {p.name: TranslatingProvider(p.name, p.kind, provider_side_factory(p, endpoints.get(p.name, p.endpoint)),
                                        p.ping_interval_s) for p in config.providers}


def request_body_response(up_path: str, up_body: bytes, set_headers: dict[str, str], remove: list[str],
                          set_header: Callable[[str, str], object]) -> pb.ProcessingResponse:
    mutation = pb.HeaderMutation(
        set_headers=[set_header(":path", up_path), set_header("content-length", str(len(up_body))),
                     *(set_header(k, v) for k, v in set_headers.items())],
        remove_headers=remove)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
        header_mutation=mutation, body_mutation=pb.BodyMutation(body=up_body))))


async def on_request_body(t: Translation, path: str, body: bytes, set_header: Callable[[str, str], object]
                          ) -> tuple[pb.ProcessingResponse, Assessment | None]:
    """The provider's request, or the client's error (with the usage it is logged with)."""
    try:
        up = await t.request(path, body, None)
    except TranslationError as e:
        status, headers, err = t.client.error(e.status, e.err_type, str(e))
        return _immediate(status, headers, err, set_header), Assessment(
            UsageStatus.NOT_FORWARDED, None, f"request refused by the translator: {e}")
    except Exception as e:  # a credential that cannot be had (token endpoint down, key refused)
        log.exception("provider request could not be built")
        status, headers, err = t.client.error(502, "api_error", "the gateway could not obtain the provider's "
                                              f"credential or build its request ({type(e).__name__}); retry shortly")
        return _immediate(status, headers, err, set_header), Assessment(
            UsageStatus.NOT_FORWARDED, None, f"provider request not built: {type(e).__name__}")
    return request_body_response(up.path, up.body, up.headers, up.remove, set_header), None


def _immediate(status: int, headers: dict[str, str], body: bytes, set_header: Callable[[str, str], object]
               ) -> pb.ProcessingResponse:
    from envoy.type.v3 import http_status_pb2

    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=pb.HeaderMutation(set_headers=[set_header(k, v) for k, v in headers.items()]),
        body=body, details="ccr_translation_refused"))


def _streamed(body: bytes, end: bool) -> pb.ProcessingResponse:
    """A body chunk for the client (FULL_DUPLEX_STREAMED: the adapter sends the body at its own pace)."""
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=end)))))


def on_response_headers(t: Translation, status: int, end_of_stream: bool, set_header: Callable[[str, str], object]
                        ) -> tuple[pb.ProcessingResponse | None, Assessment | None]:
    """The headers reply now (a stream, or a reply with no body), or None: a whole reply's headers
    wait for its body, which Envoy sends on without waiting (full duplex), so they can change with it."""
    if end_of_stream:
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse()), \
            not_billable(f"provider replied {status} with no body")
    if status < 400 and t.streaming:
        headers = t.start_stream()
        resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        resp.response_headers.response.header_mutation.CopyFrom(pb.HeaderMutation(
            set_headers=[set_header(k, v) for k, v in headers.items()],
            remove_headers=["content-length", "content-encoding"]))
        return resp, assess(t.meter.result, True, ended=False)  # type: ignore[union-attr]
    return None, None


def on_whole_body(t: Translation, status: int, headers: dict[str, str], body: bytes,
                  set_header: Callable[[str, str], object]
                  ) -> tuple[pb.ProcessingResponse, pb.ProcessingResponse, Assessment]:
    """(the deferred headers reply, the body, the usage) of a non-streamed reply or an error."""
    out = t.whole_reply(status, headers, body)
    head = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    head.response_headers.response.header_mutation.CopyFrom(pb.HeaderMutation(
        set_headers=[set_header("content-length", str(len(out.body))),
                     *(set_header(k, v) for k, v in out.headers.items())],
        remove_headers=["content-encoding", "transfer-encoding"]))
    resp = _streamed(out.body, True)
    if status >= 400:
        return head, resp, not_billable(f"provider replied {status}; error replies bill no tokens")
    if t.meter is None:
        return head, resp, not_billable("the provider's reply could not be read as a message")
    return head, resp, assess(t.meter.finish(), False, ended=True)


def on_stream_body(t: Translation, chunk: bytes, end: bool) -> tuple[pb.ProcessingResponse, Assessment | None]:
    out, changed = t.stream_chunk(chunk, end)
    resp = _streamed(out, end)
    if end:
        return resp, assess(t.meter.finish(), True, ended=True)  # type: ignore[union-attr]
    if changed:
        return resp, assess(t.meter.result, True, ended=False)  # type: ignore[union-attr]
    return resp, None


def ping(t: Translation) -> pb.ProcessingResponse | None:
    """A keep-alive chunk when the client has heard nothing for the provider's ping interval."""
    data = t.idle_ping()
    return _streamed(data, False) if data else None

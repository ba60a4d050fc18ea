"""Provider adapter: Envoy's upstream ext_proc filter, one stream per upstream attempt.

Envoy runs it in each provider cluster's `http_filters`, so a retry that fails over
to another provider is handled for that provider. For a passthrough provider (the
Anthropic API) it runs only for Batches and Files, whose owner records it keeps;
Messages replies are metered natively by router/meter.lua (router/resources.py).
The gRPC initial metadata `x-ccr-provider` names the provider of the cluster. Per attempt it:

* removes the client's credential headers (Envoy injects the provider's after it);
* decides from the response headers whether the body can carry usage, and if not
  asks Envoy (mode_override) to stop streaming the body through us;
* asks the provider for an unencoded reply (`accept-encoding: identity`), so no
  client's Accept-Encoding can make usage unreadable (the listener compresses for
  clients that ask);
* reads usage from the streamed body without changing a byte, and returns it as
  dynamic metadata in namespace `ccr.usage`: the counts plus `usage_status` and
  `usage_note` (router.usage.assess), published as soon as they move so that an
  aborted stream is logged with what it produced.

On a provider's translate cluster (`x-ccr-translate` metadata) it translates instead: another
client schema or provider kind (Bedrock, Vertex, OpenAI-compatible), per attempt, with Bedrock
and Vertex signed here (router/adapter/translate.py, router/adapter/translators/).
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from ccr import tracing
from ccr.config import GatewayConfig, ProviderKind
from ccr.config_sync import on_config
from ccr.contract import (
    ADAPTER_PROVIDER_MD,
    ADAPTER_TRANSLATE_MD,
    CCR_HEADER_PREFIX,
    USAGE_METERED_FIELDS,
    USAGE_NOTE,
    USAGE_NS,
    USAGE_STATUS,
    UsageStatus,
)
from ccr.errors import error_body
from ccr.provider_objects import ObjectStore
from ccr.runtime import Runtime
from router.adapter.objects import ObjectAttempt
from router.adapter.translate import (
    TranslatingProvider,
    build_translating,
    on_request_body,
    on_response_headers,
    on_stream_body,
    on_whole_body,
    ping,
)
from router.adapter.translators import Translation
from router.usage import (
    Assessment,
    Usage,
    UsageMeter,
    assess,
    content_codings,
    media_type,
    meterable,
    not_billable,
    unknown,
)
from router.usage import make_meter as make_usage_meter

log = logging.getLogger("ccr.adapter")

PROVIDER_METADATA_KEY = ADAPTER_PROVIDER_MD
USAGE_NAMESPACE = USAGE_NS

_Mode = processing_mode_pb2.ProcessingMode
# Full mode rather than only the changed field: Envoy before 1.34 applied unset
# (DEFAULT) header/trailer modes from an override too.
_NO_RESPONSE_BODY = _Mode(
    request_header_mode=_Mode.SEND,
    response_header_mode=_Mode.SEND,
    request_body_mode=_Mode.NONE,
    response_body_mode=_Mode.NONE,
    request_trailer_mode=_Mode.SKIP,
    response_trailer_mode=_Mode.SKIP,
)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_map(headers: base_pb2.HeaderMap) -> dict[str, str]:
    """Lower-cased name -> value. Envoy sends values in `raw_value` (bytes); older ones in `value`."""
    out: dict[str, str] = {}
    for h in headers.headers:
        v = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        k = h.key.lower()
        out[k] = f"{out[k]},{v}" if k in out else v
    return out


def set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # Envoy reads mutation values from raw_value.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def error_response(status: int, err_type: str, message: str, details: str) -> pb.ProcessingResponse:
    """A local reply in the Anthropic error shape."""
    body = error_body(err_type, message)
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=[set_header("content-type", "application/json")]),
            body=body,
            details=details,
        )
    )


def usage_struct(a: Assessment) -> struct_pb2.Struct:
    # Every field every time: Envoy merges each publication into the namespace, so a
    # field left out would keep an earlier value. Unknown counts are null.
    # The cache-write split is 0 when the provider gave none (Usage.as_dict leaves it out then).
    fields: dict[str, object] = {f: (a.usage.get(f, 0) if a.usage is not None else None)
                                 for f in USAGE_METERED_FIELDS}
    fields[USAGE_STATUS] = a.status.value
    fields[USAGE_NOTE] = a.note
    s = struct_pb2.Struct()
    s.update({USAGE_NAMESPACE: fields})
    return s


class ProviderHandler(ABC):
    """What one provider kind does to an upstream attempt."""

    name: str

    @abstractmethod
    def on_request_headers(self, headers: Mapping[str, str]) -> pb.ProcessingResponse:
        """The reply to request_headers: header mutations, or an immediate response."""

    def meter(self, status: int, headers: Mapping[str, str], has_body: bool) -> UsageMeter | Assessment:
        """A usage meter for this response, or the assessment when its body need not (or cannot) be read."""
        ctype = headers.get("content-type", "")
        if status >= 400:
            return not_billable(f"provider replied {status}; error replies bill no tokens")
        if not has_body:
            return not_billable(f"provider replied {status} with no body")
        if not meterable(ctype):
            return not_billable(f"reply of type {media_type(ctype) or 'none'} carries no usage")
        meter = make_usage_meter(ctype, headers.get("content-encoding", ""))
        if meter is None:
            codings = ",".join(content_codings(headers.get("content-encoding", "")))
            return unknown(f"provider replied with content-encoding {codings!r}, which the meter cannot read")
        return meter


class AnthropicHandler(ProviderHandler):
    """Anthropic API: inspect-without-modify. The credential is not ours: Envoy's credential
    injector, after this filter, adds the provider's key (router/resources.py)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_request_headers(self, headers: Mapping[str, str]) -> pb.ProcessingResponse:
        # The client's gateway key must never reach the provider; the header hygiene filter
        # after this one removes these too, and this one must not rely on it.
        remove = [h for h in headers if h in ("authorization", "x-api-key") or h.startswith(CCR_HEADER_PREFIX)]
        mutation = pb.HeaderMutation(
            set_headers=[
                # The meter reads identity (and gzip/deflate); a client's `br, zstd` must not
                # make usage unreadable. The listener compresses for the client instead.
                set_header("accept-encoding", "identity"),
            ],
            remove_headers=remove,
        )
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))
        )


class UnavailableHandler(ProviderHandler):
    """A provider that must not be called (no credential, unknown): every attempt gets a 500."""

    def __init__(self, name: str, message: str, details: str, status: int = 500, err_type: str = "api_error"
                 ) -> None:
        self.name = name
        self._message = message
        self._details = details
        self._status = status
        self._err_type = err_type

    def on_request_headers(self, headers: Mapping[str, str]) -> pb.ProcessingResponse:
        resp = error_response(self._status, self._err_type, self._message, self._details)
        resp.dynamic_metadata.CopyFrom(usage_struct(Assessment(
            UsageStatus.NOT_FORWARDED, None, f"provider {self.name or '?'} unavailable: {self._details}")))
        return resp


def build_handlers(config: GatewayConfig) -> dict[str, ProviderHandler]:
    """One handler per configured provider. The adapter holds no provider credential."""
    handlers: dict[str, ProviderHandler] = {}
    for p in config.providers:
        if p.kind == ProviderKind.anthropic:
            handlers[p.name] = AnthropicHandler(p.name)
        else:  # translated kinds serve Messages calls only (router/adapter/translate.py)
            msg = (f"this endpoint is not available for models served by provider {p.name} (kind {p.kind}): "
                   "it serves Messages calls only (/v1/messages, /v1/chat/completions, Bedrock invoke)")
            handlers[p.name] = UnavailableHandler(p.name, msg, "ccr_adapter_endpoint_not_translated",
                                                  status=404, err_type="not_found_error")
    return handlers


@dataclass
class _Attempt:
    """State of one upstream attempt (one gRPC stream)."""

    handler: ProviderHandler
    meter: UsageMeter | None = None
    status: int = 0
    streaming: bool = False
    last: Assessment | None = None  # the last one published
    # Set for Batches and Files requests only (router/adapter/objects.py).
    objects: ObjectAttempt | None = None
    # Set for requests translated between schemas (router/adapter/translate.py).
    translation: Translation | None = None
    path: str = ""
    body: bytearray | None = None
    response_headers: dict[str, str] | None = None
    whole_reply: bool = False
    model: str | None = None  # the model the client asked for; read only while tracing


def _model_asked(path: str, body: bytes | bytearray) -> str | None:
    """The model a client asked for (for the span): Bedrock invoke names it in the path, the
    Anthropic and OpenAI schemas in the body."""
    if path.startswith("/model/"):
        return unquote(path.split("/", 3)[2]) or None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return ""


class Adapter(pb_grpc.ExternalProcessorServicer):
    def __init__(self, handlers: dict[str, ProviderHandler], objects: ObjectStore | None = None,
                 translating: dict[str, TranslatingProvider] | None = None,
                 systems: dict[str, str] | None = None) -> None:
        self._handlers = handlers
        self._objects = objects
        self._translating = translating or {}
        self._systems: dict[str, str] = systems or {}  # provider name -> gen_ai.system
        if tracing.TRACER is not None:
            self.Process = self._traced_process  # type: ignore[method-assign]

    def _handler(self, context: grpc.aio.ServicerContext) -> ProviderHandler:
        name = ""
        for key, value in context.invocation_metadata() or ():
            if key == PROVIDER_METADATA_KEY:
                name = value.decode() if isinstance(value, bytes) else value
                break
        h = self._handlers.get(name)
        if h is not None:
            return h
        msg = (
            f"provider {name!r} is not configured in this gateway's adapter; "
            "the gateway operator must fix the provider configuration"
            if name
            else f"the adapter was called without {PROVIDER_METADATA_KEY} metadata; "
            "the gateway operator must fix the Envoy cluster configuration"
        )
        log.error("%s (known: %s)", msg, sorted(self._handlers))
        return UnavailableHandler(name, msg, "ccr_adapter_unknown_provider")

    async def _traced_process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Process, in a span continuing Envoy's (the ext_proc stream's traceparent): one per upstream
        attempt, with the GenAI attributes the attempt showed. Bound in place of Process only when
        tracing is on (__init__), so with it off a message pays nothing for it."""
        attempt = _Attempt(self._handler(context))
        parent = tracing.parent_from_metadata(context.invocation_metadata())
        if parent is None:  # not sampled by Envoy: no span
            async for resp in Adapter.Process(self, request_iterator, context, attempt):
                yield resp
            return
        name = attempt.handler.name
        span = tracing.start_server_span("adapter ExternalProcessor/Process", parent, {
            tracing.GEN_AI_SYSTEM: self._systems.get(name, "unknown"), "ccr.provider": name,
            "ccr.translated": _metadata(context, ADAPTER_TRANSLATE_MD) == "1"})
        try:
            async for resp in Adapter.Process(self, request_iterator, context, attempt):
                yield resp
        finally:
            usage = attempt.last.usage if attempt.last is not None else None
            attrs = {tracing.GEN_AI_REQUEST_MODEL: attempt.model, "http.response.status_code": attempt.status or None,
                     "ccr.usage_status": attempt.last.status.value if attempt.last is not None else None}
            if usage:
                attrs[tracing.GEN_AI_INPUT_TOKENS] = usage.get("input_tokens")
                attrs[tracing.GEN_AI_OUTPUT_TOKENS] = usage.get("output_tokens")
            span.set_attributes({k: v for k, v in attrs.items() if v is not None})
            span.end()

    async def Process(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext,
        attempt: _Attempt | None = None,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        if attempt is None:
            attempt = _Attempt(self._handler(context))
        async for req in request_iterator:
            kind = req.WhichOneof("request")
            if kind == "request_headers" and self._translates(attempt, req):
                async for resp in self._translate_attempt(attempt, req, request_iterator):
                    yield resp
                return
            if kind == "request_headers" and _metadata(context, ADAPTER_TRANSLATE_MD) == "1":
                # The translate cluster serves translations only (its reply body is full duplex).
                path = (attempt.path or "this endpoint").split("?", 1)[0]
                msg = (f"{path} is not available for models served by provider {attempt.handler.name} "
                       "through translation: it serves Messages calls only (/v1/messages, /v1/chat/completions, "
                       "Bedrock invoke)")
                yield UnavailableHandler(attempt.handler.name, msg, "ccr_adapter_not_translated", status=404,
                                         err_type="not_found_error").on_request_headers({})
                return
            if kind == "response_body":
                if attempt.objects is not None and attempt.objects.wants_body():
                    resp = await attempt.objects.on_body(
                        req.response_body, pb.ProcessingResponse(response_body=pb.BodyResponse()),
                        lambda u: self._object_usage(attempt, u))
                    yield resp
                    if resp.HasField("immediate_response"):
                        return
                else:
                    yield self._on_body(attempt, req.response_body)
            elif kind == "response_headers":
                resp = self._on_response_headers(attempt, req.response_headers)
                if attempt.objects is not None:
                    await attempt.objects.on_response_headers(
                        attempt.status, req.response_headers.end_of_stream, resp,
                        lambda u: self._object_usage(attempt, u))
                yield resp
            elif kind == "request_headers":
                headers = header_map(req.request_headers.headers)
                attempt.objects = ObjectAttempt.start(self._objects, attempt.handler.name, headers)
                why = attempt.objects.refuse_early() if attempt.objects is not None else None
                resp = (error_response(500, "api_error", why, "ccr_adapter_no_principal") if why
                        else attempt.handler.on_request_headers(headers))
                if attempt.objects is not None and resp.HasField("request_headers"):
                    sets = resp.request_headers.response.header_mutation.set_headers
                    path = attempt.objects.upstream_path(headers.get(":path", ""))
                    if path is not None:
                        sets.append(set_header(":path", path))
                yield resp
                if resp.HasField("immediate_response"):
                    return  # Envoy sends nothing more on this stream
            elif kind == "request_body":
                yield pb.ProcessingResponse(request_body=pb.BodyResponse())
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            elif kind == "response_trailers":
                # Trailers end a body that had no end_of_stream chunk.
                resp = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                if attempt.objects is not None:
                    await attempt.objects.on_trailers(resp, lambda u: self._object_usage(attempt, u))
                self._finish(attempt, resp)
                yield resp

    def _translates(self, attempt: _Attempt, req: pb.ProcessingRequest) -> bool:
        """Start a translating attempt when this provider and path need one."""
        tp = self._translating.get(attempt.handler.name)
        if tp is None:
            return False
        headers = header_map(req.request_headers.headers)
        attempt.path = headers.get(":path", "")
        attempt.translation = tp.attempt(attempt.path)
        return attempt.translation is not None

    async def _translate_attempt(self, attempt: _Attempt, first: pb.ProcessingRequest,
                                 rest: AsyncIterator[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingResponse]:
        """A translating attempt, from its request headers to the end of the reply.

        The reply body is FULL_DUPLEX_STREAMED (router/resources.py): Envoy sends chunks without
        waiting and the adapter answers at its own pace, so a keep-alive can go out while the provider
        is silent. Requests are read by a task into a queue; the loop waits on it with the ping timer.
        """
        t = attempt.translation
        assert t is not None
        queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for r in rest:
                    queue.put_nowait(r)
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            req: pb.ProcessingRequest | None = first
            while req is not None:
                for resp in await self._translate(attempt, req):
                    yield resp
                    if resp.HasField("immediate_response"):
                        return
                while True:
                    wait = t.next_ping_in() if attempt.streaming else None
                    try:
                        req = await (asyncio.wait_for(queue.get(), wait) if wait is not None else queue.get())
                        break
                    except TimeoutError:
                        keepalive = ping(t)
                        if keepalive is not None:
                            yield keepalive
        finally:
            reader.cancel()

    async def _translate(self, attempt: _Attempt, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        t = attempt.translation
        assert t is not None
        kind = req.WhichOneof("request")
        a: Assessment | None = None
        out: list[pb.ProcessingResponse] = []
        if kind == "request_headers":
            out.append(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))
            attempt.body = bytearray()
        elif kind == "request_body":
            assert attempt.body is not None
            attempt.body += req.request_body.body
            if not req.request_body.end_of_stream:  # BUFFERED sends one message; be safe with more
                return [pb.ProcessingResponse(request_body=pb.BodyResponse())]
            if tracing.TRACER is not None:
                attempt.model = _model_asked(attempt.path, attempt.body)
            resp, a = await on_request_body(t, attempt.path, bytes(attempt.body), set_header)
            attempt.body = None
            out.append(resp)
        elif kind == "response_headers":
            headers = header_map(req.response_headers.headers)
            try:
                attempt.status = int(headers.get(":status", "0"))
            except ValueError:
                attempt.status = 0
            attempt.response_headers = headers
            head, a = on_response_headers(t, attempt.status, req.response_headers.end_of_stream, set_header)
            attempt.streaming = head is not None and t.streaming and attempt.status < 400
            attempt.whole_reply = head is None
            attempt.body = bytearray()
            if head is not None:
                out.append(head)
        elif kind == "response_body":
            body = req.response_body
            end = body.end_of_stream or body.end_of_stream_without_message
            if attempt.whole_reply:
                assert attempt.body is not None
                attempt.body += body.body
                if not end:
                    return []
                head, resp, a = on_whole_body(t, attempt.status, attempt.response_headers or {},
                                              bytes(attempt.body), set_header)
                out += [head, resp]
            else:
                resp, a = on_stream_body(t, body.body, end)
                out.append(resp)
            if end:
                attempt.streaming = False
        elif kind == "request_trailers":
            out.append(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
        elif kind == "response_trailers":  # trailers end a reply whose last chunk had no end_of_stream
            if attempt.whole_reply:
                head, resp, a = on_whole_body(t, attempt.status, attempt.response_headers or {},
                                              bytes(attempt.body or b""), set_header)
                resp.response_body.response.body_mutation.streamed_response.end_of_stream = False
                out += [head, resp]
            elif attempt.streaming:
                resp, _ = on_stream_body(t, b"", True)
                resp.response_body.response.body_mutation.streamed_response.end_of_stream = False
                out.append(resp)
                a = assess(t.meter.finish(), True, ended=True) if t.meter is not None else None
            attempt.streaming = False
            out.append(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))
        if a is not None and out:
            self._publish(attempt, out[-1], a, always=True)
        return out

    @staticmethod
    def _object_usage(attempt: _Attempt, usage: Usage) -> struct_pb2.Struct:
        """Usage decided by an object attempt (batch results), instead of the usage meter's."""
        attempt.meter = None
        if any(usage.as_dict().values()):
            a = Assessment(UsageStatus.COMPLETE, usage.as_dict())
        else:
            a = not_billable("batch results carry no usage to charge (none succeeded, or metered on an earlier fetch)")
        attempt.last = a
        return usage_struct(a)

    def _on_response_headers(self, attempt: _Attempt, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = header_map(msg.headers)
        try:
            attempt.status = int(headers.get(":status", "0"))
        except ValueError:
            attempt.status = 0
        resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        attempt.streaming = media_type(headers.get("content-type", "")) == "text/event-stream"
        got = attempt.handler.meter(attempt.status, headers, has_body=not msg.end_of_stream)
        if isinstance(got, Assessment):
            # Nothing to meter: errors, other content types, bodiless or unreadable replies.
            # Stop streaming the body through us; it passes unmodified either way.
            if not msg.end_of_stream:
                resp.mode_override.CopyFrom(_NO_RESPONSE_BODY)
            if got.status == UsageStatus.UNKNOWN:
                log.warning("provider %s: %s", attempt.handler.name, got.note)
            self._publish(attempt, resp, got)
            return resp
        attempt.meter = got
        # What the row says if the reply stops before any usage is read.
        self._publish(attempt, resp, assess(got.result, attempt.streaming, ended=False))
        return resp

    def _on_body(self, attempt: _Attempt, body: pb.HttpBody) -> pb.ProcessingResponse:
        # Never a body mutation: the client gets the provider's bytes as sent.
        resp = pb.ProcessingResponse(response_body=pb.BodyResponse())
        meter = attempt.meter
        if meter is None:
            return resp
        try:
            changed = meter.feed(body.body)
        except Exception:  # metering must never break the stream
            log.exception("usage meter failed on provider %s; metering stops", attempt.handler.name)
            attempt.meter = None
            self._publish(attempt, resp, unknown("the usage meter failed on this reply (see adapter log)"))
            return resp
        if body.end_of_stream or body.end_of_stream_without_message:
            self._finish(attempt, resp)
        elif changed:
            # Publish as soon as usage or the output estimate moves, so an aborted
            # stream is still charged for what was generated.
            self._publish(attempt, resp, assess(meter.result, attempt.streaming, ended=False))
        return resp

    def _finish(self, attempt: _Attempt, resp: pb.ProcessingResponse) -> None:
        meter, attempt.meter = attempt.meter, None
        if meter is None:
            return
        try:
            result = meter.finish()
        except Exception:
            log.exception("usage meter failed at end of reply from provider %s", attempt.handler.name)
            result = meter.result
        a = assess(result, attempt.streaming, ended=True)
        if a.status != UsageStatus.COMPLETE and a.status != UsageStatus.NOT_BILLABLE:
            log.warning("provider %s (status %d): usage %s: %s", attempt.handler.name, attempt.status,
                        a.status.value, a.note)
        self._publish(attempt, resp, a, always=True)

    @staticmethod
    def _publish(attempt: _Attempt, resp: pb.ProcessingResponse, a: Assessment, always: bool = False) -> None:
        # Mid-stream, only what changed; the end of a reply always says where it ended up.
        if always or a != attempt.last:
            attempt.last = a
            resp.dynamic_metadata.CopyFrom(usage_struct(a))


async def setup(server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime) -> None:
    """`ccr.service.run` hook: register the ExternalProcessor service."""
    # Batches and Files only: the pool opens on the first such request, never for Messages.
    objects = ObjectStore(runtime.postgres_dsn)
    endpoints = {name: o.endpoint for name, o in runtime.upstream_overrides.items()}
    systems = {p.name: tracing.gen_ai_system(config, p.name) or str(p.kind) for p in config.providers}
    adapter = Adapter(build_handlers(config), objects, build_translating(config, endpoints), systems)
    pb_grpc.add_ExternalProcessorServicer_to_server(adapter, server)
    current = {"config": config}

    def use_config(new: GatewayConfig) -> None:
        """A new config version (ccr/config_sync.py). Providers it removes stay known until the next
        version: an attempt Envoy sends under the previous one still finds its provider (the router
        removes their clusters from Envoy only after every service runs the new version)."""
        old = current["config"]
        unchanged = {p.name for p in new.providers if p in old.providers}
        translating = build_translating(
            new.model_copy(update={"providers": [p for p in new.providers if p.name not in unchanged]}), endpoints)
        translating |= {n: t for n, t in adapter._translating.items() if n in unchanged}  # token sources kept
        handlers = build_handlers(new)
        gone = {p.name for p in old.providers} - set(handlers)
        handlers |= {n: adapter._handlers[n] for n in gone if n in adapter._handlers}
        translating |= {n: adapter._translating[n] for n in gone if n in adapter._translating}
        adapter._handlers, adapter._translating = handlers, translating  # on the loop: no await between
        current["config"] = new

    on_config(use_config)
    return objects.close

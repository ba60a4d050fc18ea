"""OpenTelemetry traces of a ccr service: continue the trace Envoy started, export spans with OTLP.

Off unless `telemetry.otlp_endpoint` is set: then `TRACER` stays None, nothing of the SDK is
imported and every hook is one `is None` test. On, Envoy decides sampling (its span's W3C
`traceparent` says sampled or not) and the services only continue: a call without a sampled
parent records nothing (ParentBased(ALWAYS_OFF)), so a service never starts traces of its own.

Spans leave through a BatchSpanProcessor: a bounded queue drained by a background thread. A slow
or absent collector costs dropped spans, never a blocked or failed request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ccr.contract import H_TRACEPARENT, H_TRACESTATE

log = logging.getLogger("ccr.tracing")

TRACER: Any = None  # an opentelemetry Tracer once setup() ran with an endpoint
_provider: Any = None
_propagator: Any = None
_current_span: Any = None  # opentelemetry.trace.get_current_span, bound by setup()
EXPORT_EVERY_MS = 2000  # the BatchSpanProcessor's schedule delay

# GenAI semantic conventions (OpenTelemetry gen_ai.*): the attributes ccr knows.
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
# gen_ai.response.model: not set; the usage meter does not read the model a reply names.
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"


def setup(config: Any, service: str) -> None:
    """Start exporting this process's spans to the configured collector (no-op when none is)."""
    global TRACER, _provider, _propagator, _current_span
    endpoint = config.telemetry.otlp_endpoint
    if endpoint is None or TRACER is not None:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _provider = TracerProvider(resource=Resource.create({"service.name": f"ccr-{service}"}),
                               sampler=ParentBased(root=ALWAYS_OFF))
    # insecure: a plaintext OTLP/gRPC collector next to the gateway (a sidecar or agent).
    # An export costs a process ~0.4 ms of CPU whatever it carries: every 2 s (or per 512 spans) rather
    # than every 0.5 s, so at 5% sampling the exports are few and full (Envoy flushes every 5 s).
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=5),
                                                    max_queue_size=4096, schedule_delay_millis=EXPORT_EVERY_MS))
    _propagator = TraceContextTextMapPropagator()
    _current_span = get_current_span
    TRACER = _provider.get_tracer("ccr")
    log.info("traces to OTLP collector %s", endpoint)


def shutdown() -> None:
    """Export what is queued (bounded by the exporter's timeout), then stop."""
    global TRACER
    if _provider is not None:
        _provider.shutdown()
    TRACER = None


def sampled(traceparent: str) -> bool:
    """Whether a W3C traceparent ("00-<trace id>-<parent id>-<flags>") says sampled. The services
    record only sampled traces, so an unsampled call skips the SDK altogether."""
    if len(traceparent) != 55 or traceparent[52] != "-":
        return False
    try:
        return int(traceparent[53:55], 16) & 1 == 1
    except ValueError:
        return False


def parent(carrier: Mapping[str, str]) -> Any:
    """The OpenTelemetry context of a sampled W3C traceparent/tracestate in `carrier` (lower-case keys),
    else None."""
    tp = carrier.get(H_TRACEPARENT)
    if tp is None or not sampled(tp):
        return None
    return _extract(tp, carrier.get(H_TRACESTATE))


def parent_from_metadata(metadata: Iterable[Any] | None) -> Any:
    """The context of a sampled traceparent in gRPC invocation metadata (Envoy's gRPC client puts its
    span's context there when tracing is on), else None. Every call Envoy makes carries one, sampled
    or not: an unsampled call costs one pass over the metadata and a string test, nothing else."""
    tp = ts = None
    for key, value in metadata or ():
        if key == H_TRACEPARENT:
            tp = value
        elif key == H_TRACESTATE:
            ts = value
    if tp is None or not sampled(tp):
        return None
    return _extract(tp, ts)


def _extract(traceparent: str, tracestate: str | None) -> Any:
    carrier = {H_TRACEPARENT: traceparent}
    if tracestate:  # Envoy sends an empty one: parsing it would cost the propagator a third of its time
        carrier[H_TRACESTATE] = tracestate
    return _propagator.extract(carrier)


def server_span(name: str, context: Any, attributes: Mapping[str, Any] | None = None) -> Any:
    """A context manager: a SERVER span, current while the handler runs, child of `context`."""
    from opentelemetry.trace import SpanKind

    return TRACER.start_as_current_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)


def start_server_span(name: str, context: Any, attributes: Mapping[str, Any] | None = None) -> Any:
    """A SERVER span, child of `context`, NOT made current: for a gRPC stream handled by an async
    generator, whose resumptions must not attach and detach a context; the caller ends it."""
    from opentelemetry.trace import SpanKind

    return TRACER.start_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)


def recording_span() -> Any:
    """The current span if it records (a sampled call's), else None: test this before building the
    attributes, so that an unsampled call builds none. Callers test `TRACER is not None` first."""
    span = _current_span()
    return span if span.is_recording() else None


# Provider kind (ccr.config.ProviderKind) -> gen_ai.system, as the semantic conventions spell them.
_SYSTEMS = {"anthropic": "anthropic", "bedrock": "aws.bedrock", "vertex": "gcp.vertex_ai", "openai": "openai"}


def gen_ai_system(config: Any, provider: str | None) -> str | None:
    for p in config.providers:
        if p.name == provider:
            return _SYSTEMS.get(str(p.kind), str(p.kind))
    return None

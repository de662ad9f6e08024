"""Optional OpenTelemetry tracing of Check and of Redis lookups (off by default).

``extauthz_settings.tracing: otlp`` exports over OTLP/gRPC (the standard
OTEL_EXPORTER_OTLP_* variables apply); ``console`` prints spans (for a try-out).
The Check span continues the caller's trace from the ``traceparent`` header Envoy
passes in the CheckRequest. Needs ``pip install 'extauthz[tracing]'``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

_tracer: Any = None
_propagator: Any = None


def setup(exporter: str, service_name: str = "extauthz") -> None:
    global _tracer, _propagator
    if exporter == "none":
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(formatter=_one_line)))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("extauthz")
    _propagator = TraceContextTextMapPropagator()


def _one_line(span: Any) -> str:
    return span.to_json(indent=None) + "\n"


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def check_span(headers: Mapping[str, str]) -> Iterator[Any]:
    """The Check span, a child of the caller's span when the request carries one."""
    context = _propagator.extract(carrier=dict(headers))
    with _tracer.start_as_current_span("envoy.service.auth.v3.Authorization/Check", context=context,
                                       kind=_server_kind()) as span:
        yield span


@contextlib.contextmanager
def redis_span(operation: str) -> Iterator[None]:
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(f"redis {operation}", attributes={"db.system": "redis",
                                                                          "db.operation": operation}):
        yield


def _server_kind() -> Any:
    from opentelemetry.trace import SpanKind
    return SpanKind.SERVER

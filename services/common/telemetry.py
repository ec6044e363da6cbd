"""OpenTelemetry bootstrap: once per process, at start (STYLE.md principle 9).

The exporter is chosen by configuration (``TRACING: {exporter: none | console |
otlp, endpoint: …}``); it is off unless configured, and off in tests. W3C
``traceparent`` rides in AMQP headers: :func:`inject` and :func:`extract` are
for the places that publish or consume with kombu directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

_configured = False


def make_exporter(settings: Mapping[str, Any] | None) -> SpanExporter | None:
    settings = settings or {}
    kind = str(settings.get("exporter", "none")).lower()
    if kind in ("", "none", "off", "false"):
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        endpoint = settings.get("endpoint") or "http://localhost:4318/v1/traces"
        return OTLPSpanExporter(endpoint=endpoint)
    raise ValueError(f"unknown tracing exporter {kind!r} (none, console, otlp)")


def setup_tracing(
    service_name: str,
    settings: Mapping[str, Any] | None,
    instrument_nameko: bool = False,
    exporter: SpanExporter | None = None,
) -> TracerProvider | None:
    """Install a tracer provider for this process; returns it, or None if off."""
    global _configured
    exporter = exporter or make_exporter(settings)
    if exporter is None or _configured:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if instrument_nameko:
        from nameko_opentelemetry import NamekoInstrumentor

        NamekoInstrumentor().instrument()
    _configured = True
    return provider


def inject(headers: dict[str, Any]) -> dict[str, Any]:
    """Add the current trace context (``traceparent``) to message headers."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, Any]):
    """The trace context carried by received message headers."""
    return propagate.extract({k: v for k, v in headers.items() if isinstance(v, str)})


tracer = trace.get_tracer("computenet")

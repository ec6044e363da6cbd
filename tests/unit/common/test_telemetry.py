import pytest
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import telemetry


def test_tracing_is_off_unless_configured():
    assert telemetry.make_exporter(None) is None
    assert telemetry.make_exporter({"exporter": "none"}) is None


def test_exporter_is_chosen_by_configuration():
    assert isinstance(
        telemetry.make_exporter({"exporter": "console"}), ConsoleSpanExporter
    )
    otlp = telemetry.make_exporter(
        {"exporter": "otlp", "endpoint": "http://127.0.0.1:4318/v1/traces"}
    )
    assert otlp.__class__.__name__ == "OTLPSpanExporter"
    with pytest.raises(ValueError, match="unknown tracing exporter"):
        telemetry.make_exporter({"exporter": "zipkin"})


def test_trace_context_rides_in_message_headers():
    exporter = InMemorySpanExporter()
    provider = telemetry.setup_tracing("test", None, exporter=exporter)
    tracer = provider.get_tracer("test") if provider else telemetry.tracer
    with tracer.start_as_current_span("publish") as span:
        headers = telemetry.inject({"x-key-id": "k"})
        trace_id = span.get_span_context().trace_id
    assert headers["traceparent"].split("-")[1] == f"{trace_id:032x}"
    context = telemetry.extract(headers)
    from opentelemetry import trace

    assert trace.get_current_span(context).get_span_context().trace_id == trace_id

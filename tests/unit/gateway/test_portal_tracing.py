"""The portal makes a span per request when tracing is configured, else none."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from gateway import app as portal
from gateway.audit import AUDIT, AUDIT_DATABASE_URL


@pytest.fixture
def spans(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Not the process-wide provider: other tests must not see these spans.
    monkeypatch.setattr(portal, "setup_tracing", lambda *_args: provider)
    return exporter


@pytest.mark.parametrize("exporter", ["console", "none"])
def test_requests_are_traced_only_when_configured(rpc, tmp_path, spans, exporter):
    app = portal.create_app(
        {
            "rpc": rpc,
            "AMQP_URI": None,
            "TRACING": {"exporter": exporter},
            AUDIT_DATABASE_URL: f"sqlite:///{tmp_path / 'portal.db'}",
        }
    )
    rpc.replies[("city_registry", "list_cities")] = []
    try:
        assert app.test_client().get("/api/v1/cities").status_code == 200
    finally:
        app.extensions[AUDIT].dispose()

    finished = spans.get_finished_spans()
    if exporter == "none":
        assert finished == ()
    else:
        assert len(finished) == 1
        assert "/api/v1/cities" in str(dict(finished[0].attributes))

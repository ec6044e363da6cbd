"""The one error table (gateway/errors.py), one parametrised test."""

from __future__ import annotations

import queue

import pytest
from marshmallow import ValidationError
from nameko.exceptions import RemoteError, RpcTimeout, UnknownService

from services.common.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
)


@pytest.mark.parametrize(
    ("exc", "status", "code", "details"),
    [
        (InvalidRequest("invalid_application", "bad", {"x": ["y"]}), 400,
         "invalid_application", {"x": ["y"]}),
        (Unauthorized(), 401, "unauthorized", {}),
        (Forbidden("forbidden", "no"), 403, "forbidden", {}),
        (NotFound("voucher_not_found", "none"), 404, "voucher_not_found", {}),
        (Conflict("budget_exhausted", "spent"), 409, "budget_exhausted", {}),
        (Unavailable(), 503, "unavailable", {}),
        (ValidationError({"limit": ["Not a valid integer."]}), 400,
         "invalid_request", {"limit": ["Not a valid integer."]}),
        (RpcTimeout(), 503, "service_unavailable", {}),
        (UnknownService("vouchers_atlantis"), 503, "service_unavailable", {}),
        (ConnectionRefusedError(111, "refused"), 503, "service_unavailable", {}),
        (queue.Empty(), 503, "service_unavailable", {}),
        (RemoteError("KeyError", "secret internals"), 500, "internal_error", {}),
        (KeyError("secret internals"), 500, "internal_error", {}),
    ],
)  # fmt: skip
def test_exception_maps_to_status_and_error_body(
    client, rpc, exc, status, code, details
):
    rpc.replies[("city_registry", "network_summary")] = exc

    response = client.get("/api/v1/network/summary")

    assert response.status_code == status
    body = response.get_json()
    assert set(body) == {"error", "message", "details"}
    assert body["error"] == code
    assert body["details"] == details
    assert isinstance(body["message"], str) and body["message"]
    assert "secret internals" not in response.get_data(as_text=True)
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_unknown_route_is_json_404(client):
    response = client.get("/api/v1/nowhere")

    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"

"""The one error table (services/common/http_errors.py), one parametrised test
through the portal; the data-centre gateway's use of it is tested beside its API
(tests/unit/datacenter_gateway/test_dcgw_api.py)."""

from __future__ import annotations

import queue

import amqp.exceptions
import kombu.exceptions
import pytest
from marshmallow import ValidationError
from nameko.exceptions import RemoteError, RpcTimeout, UnknownService
from werkzeug.exceptions import RequestEntityTooLarge

from services.common import http_errors
from services.common.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
)

# (exception, status, code, details): at least one case per row of the table.
CASES = [
    (InvalidRequest("invalid_application", "bad", {"x": ["y"]}), 400,
     "invalid_application", {"x": ["y"]}),
    (Unauthorized(), 401, "unauthorized", {}),
    (Forbidden("forbidden", "no"), 403, "forbidden", {}),
    (NotFound("voucher_not_found", "none"), 404, "voucher_not_found", {}),
    (Conflict("budget_exhausted", "spent"), 409, "budget_exhausted", {}),
    (Unavailable(), 503, "unavailable", {}),
    (ValidationError({"limit": ["Not a valid integer."]}), 400,
     "invalid_request", {"limit": ["Not a valid integer."]}),
    (RequestEntityTooLarge(), 413, "body_too_large", {}),
    (RpcTimeout(), 503, "service_unavailable", {}),
    (UnknownService("vouchers_atlantis"), 503, "service_unavailable", {}),
    (ConnectionRefusedError(111, "refused"), 503, "service_unavailable", {}),
    (queue.Empty(), 503, "service_unavailable", {}),
    (kombu.exceptions.OperationalError("broker gone"), 503,
     "service_unavailable", {}),
    (amqp.exceptions.ConnectionError("socket closed"), 503,
     "service_unavailable", {}),
    (RemoteError("KeyError", "secret internals"), 500, "internal_error", {}),
    (KeyError("secret internals"), 500, "internal_error", {}),
]  # fmt: skip


def _row_index(exc: BaseException) -> int | None:
    """The index of the first row of the one table ``exc`` falls under."""
    for index, (cls, _status, _code) in enumerate(http_errors.ERROR_TABLE):
        if isinstance(exc, cls):
            return index
    return None


def test_the_cases_cover_every_row_of_the_one_table():
    covered = {_row_index(exc) for exc, *_ in CASES}
    assert covered == {*range(len(http_errors.ERROR_TABLE)), None}


@pytest.mark.parametrize(("exc", "status", "code", "details"), CASES)
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

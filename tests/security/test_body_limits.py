"""Request bodies: over the limit is 413 before any work, up to it is served.

A body is read into memory before it is judged, so without a limit one
request can make the portal or a data centre's gateway read whatever a
caller sends. Both refuse a larger body than ``MAX_CONTENT_LENGTH`` with
the same error body (``body_too_large``) before authentication or an RPC,
whether its length is declared or it is sent chunked; a legitimate body up
to the limit, the largest batch of usage records included, is served.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator

import pytest
from werkzeug.serving import make_server

from gateway.app import DEFAULT_MAX_CONTENT_LENGTH as PORTAL_LIMIT
from services.common.config import AGENT_TOKEN, MAX_CONTENT_LENGTH
from services.common.vouchercode import generate
from services.datacenter_gateway.app import DEFAULT_MAX_CONTENT_LENGTH as AGENT_LIMIT
from services.datacenter_gateway.domain import MAX_BATCH, prepare_batch
from tests.security.conftest import OTHER_COMPANY
from tests.support.agent_api import DC
from tests.support.portal_data import datacenter

TOO_LARGE = {
    "error": "body_too_large",
    "message": "the request body is larger than this API accepts",
    "details": {},
}
JSON = {"Content-Type": "application/json"}


def _padded(document: object, size: int) -> bytes:
    """``document`` as JSON of exactly ``size`` bytes (trailing whitespace)."""
    body = json.dumps(document).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


# -- the portal ---------------------------------------------------------------


def test_oversized_body_is_refused_before_any_rpc(client, rpc, token_for):
    body = _padded({"program_id": "p"}, PORTAL_LIMIT + 1)

    response = client.post(
        "/api/v1/cities/shanghai/applications",
        data=body,
        headers=JSON | token_for(f"company:{OTHER_COMPANY}"),
    )

    assert response.status_code == 413
    assert response.get_json() == TOO_LARGE
    assert rpc.calls == []  # not even the token was looked up


def test_oversized_sign_in_form_is_refused(client, rpc):
    response = client.post(
        "/login", data={"token": "t" * PORTAL_LIMIT, "next": "/cities/shanghai"}
    )

    assert response.status_code == 413
    assert response.get_json() == TOO_LARGE
    assert rpc.calls == []


def test_body_up_to_the_limit_is_served(client, rpc, token_for):
    """A data centre registration with a long inventory, padded to exactly the
    limit: the largest real one is a few kilobytes."""
    inventory = [
        {
            "gpu_model": f"{n:0>64}",
            "count": 512,
            "chip_origin": "domestic",
            "price_fen_per_gpu_hour": 1500,
        }
        for n in range(500)
    ]
    registration = datacenter(operator="op", city="x", inventory=inventory)
    assert len(json.dumps(registration)) < PORTAL_LIMIT / 10
    rpc.replies[("city_registry", "register_datacenter")] = lambda body: {
        "datacenter": body,
        "key_id": "k1",
        "secret": "s",
    }

    response = client.post(
        "/api/v1/datacenters",
        data=_padded(registration, PORTAL_LIMIT),
        headers=JSON | token_for("national_admin"),
    )

    assert response.status_code == 201
    assert len(response.get_json()["datacenter"]["inventory"]) == 500


def test_portal_limit_is_configurable(make_app, token_for):
    client = make_app(**{MAX_CONTENT_LENGTH: 100}).test_client()

    response = client.post("/login", data={"token": "t" * 100})

    assert response.status_code == 413


def test_openapi_lists_the_413_where_a_body_is_taken(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    taking = [
        operation
        for operations in spec["paths"].values()
        for operation in operations.values()
        if "requestBody" in operation
    ]

    assert taking
    assert all("413" in operation["responses"] for operation in taking)


# -- a data centre's agent API ------------------------------------------------


def _longest_record() -> dict:
    """A legitimate record with every field at its longest (CONTRACTS §1)."""
    return {
        "record_id": "r" * 128,
        "tenant_id": "t" * 128,
        "voucher_code": generate("SH"),
        "gpu_model": "H800",
        "gpu_count": 512,
        "started_at": "2025-03-01T08:00:00.000000Z",
        "ended_at": "2025-03-01T09:00:00.000000Z",
        "gpu_seconds": 512 * 3600,
        "source": "s" * 32,
        "job_id": "j" * 128,
        "correction_of": "c" * 128,
    }


def test_largest_legitimate_batch_fits_with_room():
    record = _longest_record()
    records, errors = prepare_batch([record], DC, ["H800"])
    assert errors == {} and len(records) == 1

    largest = len(json.dumps([record] * MAX_BATCH, indent=2).encode())

    assert largest * 3 < AGENT_LIMIT


def test_oversized_batch_is_refused_before_authentication(make_client, outbox):
    client = make_client(**{AGENT_TOKEN: "secret"})

    response = client.post("/v1/usage", data=b" " * (AGENT_LIMIT + 1), headers=JSON)

    assert response.status_code == 413
    assert response.get_json() == TOO_LARGE
    assert outbox.backlog(fresh=True) == 0


def test_batch_up_to_the_limit_is_stored(make_client, outbox, record_factory):
    batch = [record_factory() for _ in range(20)]
    body = _padded(batch, len(json.dumps(batch)) + 10)
    client = make_client(**{MAX_CONTENT_LENGTH: len(body)})

    response = client.post("/v1/usage", data=body, headers=JSON)

    assert response.status_code == 202
    assert response.get_json() == {"accepted": 20, "duplicates": 0}


def test_both_apps_answer_413_alike(client, make_client):
    portal = client.post("/login", data=b"x" * (PORTAL_LIMIT + 1))
    agent = make_client().post("/v1/usage", data=b"x" * (AGENT_LIMIT + 1))

    assert portal.status_code == agent.status_code == 413
    assert portal.get_json() == agent.get_json() == TOO_LARGE


# -- over a real socket: declared and chunked bodies --------------------------

LIMIT = 4096


@pytest.fixture
def agent_port(make_client) -> Iterator[int]:
    """The agent API served by Werkzeug's threaded server, as in production
    (``services/datacenter_gateway/__main__.py``), with a small limit."""
    app = make_client(**{MAX_CONTENT_LENGTH: LIMIT}).application
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    thread.join(timeout=5)


def _post(port: int, body: bytes, chunked: bool) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        if chunked:  # no Content-Length: the server cannot judge it up front
            parts = (body[i : i + 1000] for i in range(0, len(body), 1000))
            connection.request(
                "POST", "/v1/usage", body=parts, headers=JSON, encode_chunked=True
            )
        else:
            connection.request("POST", "/v1/usage", body=body, headers=JSON)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_oversized_body_over_a_socket_is_refused(agent_port, outbox, chunked):
    status, body = _post(agent_port, b" " * (LIMIT + 1), chunked)

    assert (status, body) == (413, TOO_LARGE)
    assert outbox.backlog(fresh=True) == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_body_at_the_limit_over_a_socket_is_stored(
    agent_port, outbox, record_factory, chunked
):
    status, body = _post(agent_port, _padded([record_factory()], LIMIT), chunked)

    assert (status, body) == (202, {"accepted": 1, "duplicates": 0})
    assert outbox.backlog(fresh=True) == 1

"""Anonymous refused writes are counted, not each stored (gateway/audit.py).

Anyone can POST without a token for ever: a row each would fill the portal's
database and bury the entries that matter. They are counted per endpoint and
status instead, for the national admin to read; every write by an
authenticated caller, refused or not, is still an audit entry of its own.
"""

from __future__ import annotations

from gateway.audit import AUDIT
from tests.security.conftest import OTHER_COMPANY


def _entries(app) -> list[dict]:
    rows, _ = app.extensions[AUDIT].entries(limit=1000)
    return rows


def _counts(client, token_for) -> dict:
    response = client.get(
        "/api/v1/audit/anonymous", headers=token_for("national_admin")
    )
    assert response.status_code == 200
    return {(row["action"], row["status"]): row["count"] for row in response.get_json()}


def test_anonymous_refused_writes_add_no_entries(app, client, token_for):
    for _ in range(50):
        assert client.post("/api/v1/cities", json={}).status_code == 401
        made_up = {"Authorization": "Bearer made-up"}
        assert (
            client.post("/api/v1/cities", json={}, headers=made_up).status_code == 401
        )
        assert client.post("/api/v1/no/such/thing").status_code == 404

    assert _entries(app) == []
    assert _counts(client, token_for) == {
        ("federation.admit_city", 401): 100,
        ("unknown", 404): 50,
    }


def test_authenticated_writes_are_still_each_audited(app, client, token_for):
    refused = client.post(
        "/api/v1/cities", json={}, headers=token_for(f"company:{OTHER_COMPANY}")
    )
    assert refused.status_code == 403

    (entry,) = _entries(app)
    assert (entry["actor"], entry["status"]) == (f"company:{OTHER_COMPANY}", 403)
    assert _counts(client, token_for) == {}


def test_only_the_national_admin_reads_the_counts(client, token_for):
    client.post("/api/v1/cities", json={})

    assert client.get("/api/v1/audit/anonymous").status_code == 401
    for role in ("city_admin:shanghai", f"company:{OTHER_COMPANY}", "datacenter:dc-1"):
        response = client.get("/api/v1/audit/anonymous", headers=token_for(role))
        assert response.status_code == 403
        assert response.get_json()["error"] == "forbidden"
    assert _counts(client, token_for) == {("federation.admit_city", 401): 1}

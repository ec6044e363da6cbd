"""The schemas the city's RPC answers are dumped through: each must build and
dump what the portal reads (a schema that cannot be built fails every call)."""

from types import SimpleNamespace

import pytest

from services.vouchers import schemas


@pytest.mark.parametrize(
    "name", [n for n in dir(schemas) if n.endswith("Schema") and n != "Schema"]
)
def test_every_schema_builds(name):
    getattr(schemas, name)()


@pytest.mark.parametrize("as_object", [False, True])
def test_an_application_dumps_its_decision_as_status(as_object):
    application = {
        "id": "app-1",
        "program_id": "sh-compute-2025",
        "company_id": "9131",
        "decision": "pending_review",
        "reasons": [],
        "rules_version": "v1",
    }
    source = SimpleNamespace(**application) if as_object else application
    body = schemas.ApplicationSchema(
        only=("application_id", "decision", "status", "program_id")
    ).dump(source)
    assert body == {
        "application_id": "app-1",
        "decision": "pending_review",
        "status": "pending_review",
        "program_id": "sh-compute-2025",
    }

"""A company is one legal person, named by its unified social credit code: an
application naming a mistyped code is refused (400, naming the problem)
before any city is asked; a well-formed one goes through."""

from __future__ import annotations

from services.common import creditcode


def _apply(client, token_for, rpc, registration_id, application_factory=None):
    body = {
        "program_id": "sh-compute-2025",
        "company": {
            "registration_id": registration_id,
            "name": "Deep Shanghai AI Ltd",
            "registered_in": "shanghai",
            "employees": 42,
        },
        "requested_face_value_cny": 1_000_000,
    }
    rpc.replies[("city_registry", "list_cities")] = [
        {"code": "shanghai", "status": "live", "voucher_prefix": "SH"}
    ]
    rpc.replies[("vouchers_shanghai", "apply")] = lambda application: {
        "application_id": "a-1",
        "decision": "approved",
        "reasons": [],
        "rules_version": "v1",
        "voucher": None,
    }
    return client.post(
        "/api/v1/cities/shanghai/applications",
        json=body,
        headers=token_for("city_admin:shanghai"),
    )


def test_a_mistyped_credit_code_is_refused_before_the_city_is_asked(
    client, token_for, rpc
):
    good = creditcode.generate()
    wrong = good[:17] + ("0" if good[17] != "0" else "1")
    answer = _apply(client, token_for, rpc, wrong)
    assert answer.status_code == 400
    message = answer.get_json()["details"]["company"]["registration_id"][0]
    assert "check character" in message and "mistyped" in message
    assert rpc.called("vouchers_shanghai", "apply") == []


def test_a_well_formed_credit_code_reaches_the_city(client, token_for, rpc):
    code = creditcode.generate()
    answer = _apply(client, token_for, rpc, code.lower())
    assert answer.status_code == 201
    [(args, _)] = rpc.called("vouchers_shanghai", "apply")
    assert args[0]["company"]["registration_id"] == code

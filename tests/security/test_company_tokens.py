"""A company is a principal: ``company:<credit code>``, one identity in every
city (DESIGN.md §8). Its token is shown once, in the answer that issues its
first voucher; a re-issue is for the national admin and the staff of a city
where it holds a voucher. Each attack beside the legitimate use: another
company reads, applies, re-issues; another city's staff re-issue; a
mistyped credit code; the token shown a second time.
"""

from __future__ import annotations

import pytest

from gateway.audit import AUDIT
from services.common import creditcode, vouchercode
from services.common.errors import Unavailable
from tests.security.conftest import HOLDER, OTHER_COMPANY

OWN = "/api/v1/cities/shanghai/vouchers"  # what any company may read, its own
MISTYPED = HOLDER[:17] + ("0" if HOLDER[17] != "0" else "1")


@pytest.fixture
def cities(rpc):
    """Shanghai and Beijing; a fake registry that issues a company's first
    token only while it has none, as ``city_registry`` does, and each city
    issuing a voucher to whoever applies (its holder: the application's
    company)."""
    rpc.replies.update(
        {
            ("city_registry", "list_cities"): [
                {"code": "shanghai", "status": "live", "voucher_prefix": "SH"},
                {"code": "beijing", "status": "live", "voucher_prefix": "BJ"},
            ],
            ("city_registry", "voucher_prefixes"): {"SH": "shanghai", "BJ": "beijing"},
        }
    )
    issued: dict[str, list[str]] = {}  # company → its tokens, oldest first
    vouchers: dict[str, list[dict]] = {"shanghai": [], "beijing": []}

    def first_token(code):
        if issued.get(code):
            return None
        return reissue(code)

    def reissue(code):
        token = f"secret-{code}-{len(issued.get(code, []))}"
        revoked = len(issued.get(code, []))
        for old in issued.get(code, []):
            rpc.roles.pop(old, None)
        issued[code] = [token]
        rpc.roles[token] = f"company:{code}"
        n = len(rpc.calls)
        return {
            "token": token,
            "id": f"tok_{n:016x}",
            "role": f"company:{code}",
            "expires_at": "2026-06-01T00:00:00Z",
            "revoked_tokens": revoked,
        }

    rpc.replies[("city_registry", "issue_company_token")] = first_token
    rpc.replies[("city_registry", "reissue_company_token")] = reissue
    for city, prefix in (("shanghai", "SH"), ("beijing", "BJ")):

        def apply(body, city=city, prefix=prefix):
            voucher = {
                "code": vouchercode.generate(prefix),
                "city": city,
                "company_id": body["company"]["registration_id"],
                "program_id": "p-1",
                "status": "active",
                "face_value_fen": 100_000_000,
                "balance_fen": 100_000_000,
                "expires_at": "2026-03-01T08:00:00Z",
            }
            vouchers[city].append(voucher)
            return {"application_id": "a-1", "decision": "approved", "voucher": voucher}

        def list_vouchers(city=city, company_id=None, **_):
            items = [v for v in vouchers[city] if company_id in (None, v["company_id"])]
            return {"items": items, "total": len(items)}

        def get_voucher(code, city=city):
            return next(v for v in vouchers[city] if v["code"] == code)

        rpc.replies[(f"vouchers_{city}", "apply")] = apply
        rpc.replies[(f"vouchers_{city}", "list_vouchers")] = list_vouchers
        rpc.replies[(f"vouchers_{city}", "get_voucher")] = get_voucher
    return {"tokens": issued, "vouchers": vouchers}


def _application(registration_id: str = HOLDER) -> dict:
    return {
        "program_id": "p-1",
        "company": {
            "registration_id": registration_id,
            "name": "Holder AI",
            "registered_in": "shanghai",
        },
        "requested_face_value_cny": 1_000_000,
    }


def _apply(client, headers, city="shanghai", registration_id=HOLDER):
    return client.post(
        f"/api/v1/cities/{city}/applications",
        json=_application(registration_id),
        headers=headers,
    )


def _reissue(client, headers, code=HOLDER):
    return client.post(f"/api/v1/companies/{code}/token", headers=headers)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the token, once ------------------------------------------------------------


def test_the_first_voucher_brings_the_token_and_it_reads_the_voucher(
    client, cities, token_for
):
    answer = _apply(client, token_for("city_admin:shanghai"))

    assert answer.status_code == 201
    body = answer.get_json()
    token = body["company_token"]
    assert cities["tokens"][HOLDER] == [token]
    own = client.get(
        f"/api/v1/vouchers/{body['voucher']['code']}", headers=_bearer(token)
    )
    assert own.status_code == 200
    assert own.get_json()["company_id"] == HOLDER


def test_the_token_is_shown_once_not_with_a_second_voucher_elsewhere(
    client, cities, token_for
):
    first = _apply(client, token_for("city_admin:shanghai")).get_json()
    token = first["company_token"]

    # The company itself applies in another city: a voucher, no token.
    second = _apply(client, _bearer(token), city="beijing")

    assert second.status_code == 201
    assert second.get_json()["voucher"]["city"] == "beijing"
    assert "company_token" not in second.get_json()
    assert cities["tokens"][HOLDER] == [token]  # the first still works
    # Its vouchers in both cities, its own only.
    for city in ("shanghai", "beijing"):
        listed = client.get(f"/api/v1/cities/{city}/vouchers", headers=_bearer(token))
        assert [v["company_id"] for v in listed.get_json()["items"]] == [HOLDER]


def test_the_token_is_in_no_audit_entry(app, client, cities, token_for):
    token = _apply(client, token_for("city_admin:shanghai")).get_json()["company_token"]

    entries, _ = app.extensions[AUDIT].entries()

    assert token not in repr(entries)
    assert entries[0]["details"]["company_token_id"].startswith("tok_")


def test_a_registry_that_cannot_be_asked_costs_the_token_not_the_voucher(
    app, client, rpc, cities, token_for
):
    rpc.replies[("city_registry", "issue_company_token")] = Unavailable(
        "service_unavailable", "registry down"
    )

    answer = _apply(client, token_for("city_admin:shanghai"))

    assert answer.status_code == 201
    assert answer.get_json()["voucher"]["company_id"] == HOLDER
    assert "company_token" not in answer.get_json()
    entries, _ = app.extensions[AUDIT].entries()
    assert entries[0]["details"]["company_token"].startswith("not issued")


def test_a_review_that_issues_the_first_voucher_brings_the_token(
    client, rpc, cities, token_for
):
    voucher = {"code": vouchercode.generate("SH"), "company_id": HOLDER}
    rpc.replies[("vouchers_shanghai", "review_application")] = lambda *a: {
        "application_id": "a-1",
        "company_id": HOLDER,
        "decision": "approved",
        "voucher": voucher,
    }

    answer = client.post(
        "/api/v1/cities/shanghai/applications/a-1/review",
        json={"approve": True, "reason": "documents checked"},
        headers=token_for("city_admin:shanghai"),
    )

    assert answer.status_code == 200
    assert answer.get_json()["company_token"] == cities["tokens"][HOLDER][0]


def test_a_decision_without_a_voucher_asks_for_no_token(client, rpc, token_for, cities):
    rpc.replies[("vouchers_shanghai", "apply")] = lambda body: {
        "application_id": "a-2",
        "decision": "pending_review",
        "voucher": None,
    }

    answer = _apply(client, token_for("city_admin:shanghai"))

    assert "company_token" not in answer.get_json()
    assert rpc.called("city_registry", "issue_company_token") == []


# -- another company --------------------------------------------------------------


def test_another_company_cannot_read_apply_for_or_reissue(
    client, rpc, cities, token_for
):
    code = _apply(client, token_for("city_admin:shanghai")).get_json()["voucher"][
        "code"
    ]
    other = token_for(f"company:{OTHER_COMPANY}")

    read = client.get(f"/api/v1/vouchers/{code}", headers=other)
    listed = client.get(
        f"/api/v1/cities/shanghai/vouchers?company_id={HOLDER}", headers=other
    )
    applied = _apply(client, other)
    reissued = _reissue(client, other)

    assert read.status_code == 404 and read.get_json()["error"] == "voucher_not_found"
    assert listed.status_code == 403
    assert applied.status_code == 403
    assert reissued.status_code == 403
    assert len(rpc.called("vouchers_shanghai", "apply")) == 1  # the city's own
    assert rpc.called("city_registry", "reissue_company_token") == []


def test_a_company_applies_for_itself_in_any_city(client, cities, token_for):
    answer = _apply(client, token_for(f"company:{HOLDER}"), city="beijing")

    assert answer.status_code == 201
    assert answer.get_json()["voucher"]["company_id"] == HOLDER


# -- re-issue ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["national_admin", "city_admin:shanghai"])
def test_reissue_revokes_the_earlier_token_and_shows_the_new_one_once(
    app, client, rpc, cities, token_for, role
):
    first = _apply(client, token_for("city_admin:shanghai")).get_json()["company_token"]
    assert client.get(OWN, headers=_bearer(first)).status_code == 200

    answer = _reissue(client, token_for(role), code=HOLDER.lower())

    assert answer.status_code == 201
    body = answer.get_json()
    assert body["role"] == f"company:{HOLDER}" and body["revoked_tokens"] == 1
    assert rpc.called("city_registry", "reissue_company_token") == [((HOLDER,), {})]
    # The portal forgot the cached role: the old token is refused at once.
    assert client.get(OWN, headers=_bearer(first)).status_code == 401
    assert client.get(OWN, headers=_bearer(body["token"])).status_code == (200)
    entries, _ = app.extensions[AUDIT].entries()
    assert entries[0]["details"]["token_id"] == body["id"]
    assert body["token"] not in repr(entries)


def test_another_citys_staff_cannot_reissue(client, rpc, cities, token_for):
    _apply(client, token_for("city_admin:shanghai"))  # a voucher in shanghai only

    answer = _reissue(client, token_for("city_admin:beijing"))

    assert answer.status_code == 403
    assert rpc.called("city_registry", "reissue_company_token") == []
    # beijing's ledger was asked about this company, about nothing else
    assert rpc.called("vouchers_beijing", "list_vouchers") == [
        ((), {"company_id": HOLDER, "limit": 1, "offset": 0})
    ]


@pytest.mark.parametrize(
    "role", [f"company:{HOLDER}", "datacenter:dc-1", f"company:{OTHER_COMPANY}"]
)
def test_nobody_else_reissues_not_even_the_company_itself(
    client, rpc, cities, token_for, role
):
    _apply(client, token_for("city_admin:shanghai"))

    assert _reissue(client, token_for(role)).status_code == 403
    assert rpc.called("city_registry", "reissue_company_token") == []


def test_anonymous_cannot_reissue(client, rpc, cities):
    assert _reissue(client, {}).status_code == 401
    assert rpc.called("city_registry", "reissue_company_token") == []


# -- malformed credit codes ---------------------------------------------------------


@pytest.mark.parametrize("code", [MISTYPED, "91310000", "C1"])
def test_a_malformed_credit_code_in_the_path_is_400_before_any_rpc(
    client, rpc, cities, token_for, code
):
    headers = token_for("national_admin")
    rpc.calls.clear()

    answer = _reissue(client, headers, code=code)

    assert answer.status_code == 400
    assert answer.get_json()["error"] == "invalid_credit_code"
    assert "unified social credit code" in answer.get_json()["message"]
    assert rpc.calls == []


def test_a_mistyped_credit_code_in_an_application_is_400(
    client, rpc, cities, token_for
):
    answer = _apply(client, token_for("city_admin:shanghai"), registration_id=MISTYPED)

    assert answer.status_code == 400
    body = answer.get_json()
    assert body["error"] == "invalid_credit_code"
    assert "check character" in body["message"]
    assert rpc.called("vouchers_shanghai", "apply") == []


def test_an_application_wrong_elsewhere_keeps_its_own_error(
    client, rpc, cities, token_for
):
    body = _application(creditcode.generate())
    body["requested_face_value_cny"] = "lots"

    answer = client.post(
        "/api/v1/cities/shanghai/applications",
        json=body,
        headers=token_for("city_admin:shanghai"),
    )

    assert answer.status_code == 400
    assert answer.get_json()["error"] == "invalid_request"


# -- the dashboard ------------------------------------------------------------------


def test_a_company_signs_in_and_sees_its_vouchers_in_every_city(
    client, cities, token_for
):
    token = _apply(client, token_for("city_admin:shanghai")).get_json()["company_token"]
    _apply(client, _bearer(token), city="beijing")
    _apply(client, token_for("city_admin:beijing"), "beijing", OTHER_COMPANY)

    signed_in = client.post("/login", data={"token": token})
    assert signed_in.headers["Location"].endswith(f"/companies/{HOLDER}")
    page = client.get(f"/companies/{HOLDER}").get_data(as_text=True)

    for city in ("shanghai", "beijing"):
        (mine,) = [v for v in cities["vouchers"][city] if v["company_id"] == HOLDER]
        assert mine["code"] in page
    (others,) = [v for v in cities["vouchers"]["beijing"] if v["company_id"] != HOLDER]
    assert others["code"] not in page


def test_another_companys_page_is_refused(client, cities, token_for, sign_in):
    _apply(client, token_for("city_admin:shanghai"))
    sign_in(f"company:{OTHER_COMPANY}")

    page = client.get(f"/companies/{HOLDER}")

    assert page.status_code == 403
    assert cities["vouchers"]["shanghai"][0]["code"] not in page.get_data(as_text=True)

"""vouchers_<city> against a real RabbitMQ and PostgreSQL.

Apply over RPC, feed rated usage on the bus (one record twice, a correction,
an unknown voucher, and a burst on one voucher), then check the ledger and the
federation events to the fen.
"""

from pathlib import Path

import nameko
import pytest
from nameko.standalone.rpc import ClusterRpcClient
from sqlalchemy.orm import Session

from services.common import vouchercode
from services.common.config import (
    CITY_CODE,
    DATABASE_URL,
    HEARTBEAT_INTERVAL_S,
    RULES_FILE,
)
from services.common.db import make_engine
from services.common.errors import Conflict, InvalidRequest, NotFound
from services.common.rpc_access import caller_options
from services.vouchers import ledger
from services.vouchers.models import Base
from services.vouchers.service import build
from tests.support.bus import drain
from tests.support.schema import schema_drift
from tests.support.vouchers_books import consent_by_rpc
from tests.support.vouchers_data import EAST_COMMERCIAL as COMMERCIAL
from tests.support.vouchers_data import WEST_GOVERNMENT as GOVERNMENT
from tests.support.vouchers_data import application, publish_usage_rated, rated

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parents[2] / "deploy" / "cities" / "shanghai.yaml"
CITY = "shanghai"
FACE_FEN = 1_000_000_00


@pytest.fixture
def city(vouchers_db, federation, container_factory):
    config = {
        DATABASE_URL: vouchers_db,
        CITY_CODE: CITY,
        RULES_FILE: str(RULES),
        HEARTBEAT_INTERVAL_S: 0.5,
    }
    with nameko.config.patch(config):
        service_cls = build(dict(nameko.config))
    container = container_factory(service_cls, config)
    container.start()
    with ClusterRpcClient(timeout=10, **caller_options()) as rpc:
        yield getattr(rpc, f"vouchers_{CITY}")


def test_apply_redeem_and_publish(city, federation, vouchers_db):
    connection, simple = federation

    # Rejected: not registered in the city; every rule says why.
    rejected = city.apply(application(registered_in="beijing"))
    assert rejected["decision"] == "rejected" and rejected["voucher"] is None
    assert {"rule": "registered_in: shanghai", "passed": False} == {
        k: v for k, v in rejected["reasons"][1].items() if k != "evidence"
    }
    with pytest.raises(InvalidRequest) as err:
        city.apply({**application(), "requested_face_value_cny": 5})
    assert err.value.code == "invalid_application"
    with pytest.raises(NotFound):
        city.apply({**application(), "program_id": "nope"})

    approved = city.apply(application())
    assert approved["decision"] == "approved"
    code = approved["voucher"]["code"]
    assert approved["voucher"]["balance_fen"] == FACE_FEN
    with pytest.raises(Conflict):
        city.apply(application(registration_id=approved["voucher"]["company_id"]))
    consent_by_rpc(city, vouchers_db, code)

    records = [
        rated(code, "r1", 100_000, COMMERCIAL),  # 80 % → 80 000
        rated(code, "r1", 100_000, COMMERCIAL),  # redelivered: same event, no change
        rated(code, "r2", 50_000, GOVERNMENT),  # 90 % → 45 000
        rated(code, "r3", 20_000, GOVERNMENT, correction_of="r2"),  # −45 000, +18 000
        rated("SH-AAAAAAAAAAAA-0", "r4", 10_000, COMMERCIAL),  # unknown voucher
    ]
    burst = [rated(code, f"b{i}", 1_000, COMMERCIAL) for i in range(20)]  # 800 each
    publish_usage_rated(connection, *records[:3], *burst, *records[3:])

    def redeemed(messages):
        return [b for k, b in messages if k == f"{CITY}.voucher_redeemed"]

    messages = drain(simple, lambda m: len(redeemed(m)) >= 25)
    issued = [b for k, b in messages if k == f"{CITY}.voucher_issued"]
    assert [(b["voucher_code"], b["face_value_fen"]) for b in issued] == [
        (code, FACE_FEN)
    ]
    by_id = {}
    for body in redeemed(messages):
        by_id.setdefault(body["event_id"], []).append(body)
    assert len(by_id) == 24  # r1, r2, r2's reversal, r3, 20 × burst
    assert len(redeemed(messages)) == 25  # r1 twice, with the same id and amounts
    for copies in by_id.values():
        assert len({(c["record_id"], c["subsidy_fen"]) for c in copies}) == 1
    subsidies = sorted(
        (c[0]["record_id"], c[0]["subsidy_fen"])
        for c in by_id.values()
        if c[0]["record_id"][0] == "r"
    )
    assert subsidies == [
        ("r1", 80_000),
        ("r2", -45_000),
        ("r2", 45_000),
        ("r3", 18_000),
    ]
    assert all(c[0]["program_id"] == "sh-compute-2025" for c in by_id.values())

    redeemed_fen = 80_000 + 18_000 + 20 * 800
    voucher = city.get_voucher(code)
    assert voucher["redeemed_fen"] == redeemed_fen
    assert voucher["balance_fen"] == FACE_FEN - redeemed_fen
    assert voucher["redemptions_total"] == 24
    states = {s["program_id"]: s for s in city.program_states()}
    compute = states["sh-compute-2025"]
    assert compute["budget_fen"] == 600_000_000_00
    assert compute["available_fen"] == 600_000_000_00 - FACE_FEN
    assert compute["committed_fen"] == FACE_FEN - redeemed_fen
    assert compute["redeemed_fen"] == redeemed_fen
    with pytest.raises(NotFound):
        city.get_voucher(vouchercode.generate("SH"))
    with pytest.raises(InvalidRequest):
        city.get_voucher("SH-AAAAAAAAAAAA-0")  # wrong check character

    # The start-up facts were published too.
    published = [b for k, b in messages if k == f"{CITY}.program_published"]
    heartbeats = [b for k, b in messages if k == f"{CITY}.heartbeat"]
    assert published and heartbeats and heartbeats[0]["version"] == "0.1.0"
    programs = {p["id"]: p for p in published[0]["programs"]}
    assert programs["sh-compute-2025"]["rate_bp"] == 8000
    assert published[0]["voucher_prefix"] == "SH"

    engine = make_engine(vouchers_db)
    with Session(engine) as session:
        assert ledger.check_ledger(session) == []
    diff = schema_drift(engine, Base.metadata, "vouchers")
    engine.dispose()
    assert diff == []

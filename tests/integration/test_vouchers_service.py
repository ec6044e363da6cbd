"""vouchers_<city> as a nameko container: its RPC, its timers, its outbox.

A real RabbitMQ (a fresh vhost per test) and a real PostgreSQL database:

- the review queue (``list_applications``, ``review_application``), vouchers
  (``list_vouchers``, ``revoke_voucher``), statements and ``ledger_totals``
  over RPC, with the ledger checked to the fen;
- ``list_redemptions`` paging through more than 100 booked, clawed-back and
  refused lines of one voucher, none repeated or skipped;
- the expiry timer releases an expired voucher's balance and publishes
  ``voucher_released`` once;
- an event whose publish failed after its commit is published by the outbox
  timer, with the same ``event_id``;
- ``usage_rated`` deliveries are read from their frames by hand, and a batch
  is acked only once its events are confirmed.
"""

import json
import time
from datetime import timedelta

import eventlet
import nameko
import pytest
from nameko.messaging import Publisher
from nameko.standalone.rpc import ClusterRpcClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.common import batching, publishing, vouchercode
from services.common.amqp import FEDERATION_EXCHANGE, federation_key
from services.common.config import (
    CITY_CODE,
    DATABASE_URL,
    HEARTBEAT_INTERVAL_S,
    RULES_FILE,
)
from services.common.db import make_engine
from services.common.errors import Conflict, InvalidRequest, NotFound
from services.common.rpc_access import caller_options
from services.common.units import utcnow
from services.vouchers import ledger
from services.vouchers.models import OutboxEvent, Voucher
from services.vouchers.service import (
    EXPIRY_INTERVAL_S,
    OUTBOX_INTERVAL_S,
    VouchersService,
    build,
)
from tests.support import bus
from tests.support.bus import drain
from tests.support.polling import eventually
from tests.support.vouchers_books import consent_by_rpc
from tests.support.vouchers_data import EAST_COMMERCIAL as COMMERCIAL
from tests.support.vouchers_data import (
    SHANGHAI_RULES,
    application,
    credit_code,
    publish_usage_rated,
    rated,
)

pytestmark = pytest.mark.integration

CITY = "shanghai"
RULES = (
    SHANGHAI_RULES
    + """\
  - id: sh-reviewed
    kind: training_data
    budget_cny: 5000000
    rate_percent: 50
    face_value_cny: {min: 1000, max: 1000000}
    valid_days: 365
    review: manual
"""
)
FACE_CNY = 1_000_000
FACE_FEN = FACE_CNY * 100


class FlakyPublisher(Publisher):
    """A publisher whose first ``voucher_issued`` (first ``losses`` of them) is
    lost: the broker "fails" right after the commit. Records the event_ids it
    dropped."""

    dropped: list[str] = []
    losses = 1

    def get_dependency(self, worker_ctx):
        publish = super().get_dependency(worker_ctx)

        def flaky(body, **kwargs):
            lose = len(self.dropped) < self.losses
            if kwargs["routing_key"].endswith(".voucher_issued") and lose:
                self.dropped.append(body["event_id"])
                raise ConnectionError("the broker went away")
            return publish(body, **kwargs)

        return flaky


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "shanghai.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture
def start_container(vouchers_db, federation, container_factory, rules_file):
    """``start_container(publisher=None)`` → a running container of the city."""

    def start(publisher=None):
        config = {
            DATABASE_URL: vouchers_db,
            CITY_CODE: CITY,
            RULES_FILE: str(rules_file),
            HEARTBEAT_INTERVAL_S: 5,
            EXPIRY_INTERVAL_S: 0.2,
            OUTBOX_INTERVAL_S: 0.3,
        }
        with nameko.config.patch(config):
            service_cls = build(dict(nameko.config))
        if publisher is not None:
            service_cls = type(
                service_cls.__name__, (service_cls,), {"publish": publisher}
            )
        container = container_factory(service_cls, config)
        container.start()
        return container

    return start


@pytest.fixture
def start_city(start_container):
    """``start_city(publisher=None)`` → an RPC proxy of a running city."""
    clients = []

    def start(publisher=None):
        start_container(publisher)
        client = ClusterRpcClient(timeout=10, **caller_options())
        clients.append(client)
        return getattr(client.start(), f"vouchers_{CITY}")

    yield start
    for client in clients:
        client.stop()


@pytest.fixture
def engine(vouchers_db):
    engine = make_engine(vouchers_db)
    yield engine
    engine.dispose()


def _events(messages, event):
    return [body for key, body in messages if key == federation_key(CITY, event)]


def _expire(engine, code):
    """A year passes for this voucher, and its 7 days of grace."""
    with Session(engine) as session:
        session.execute(
            update(Voucher)
            .where(Voucher.code == code)
            .values(expires_at=utcnow() - timedelta(days=7, seconds=1))
        )
        session.commit()


def _of(code, event):
    """``until`` of ``drain``: ``event`` of the voucher ``code`` arrived."""
    return lambda messages: [
        body for body in _events(messages, event) if body["voucher_code"] == code
    ]


def _without(messages, codes):
    """``messages`` but those about the vouchers ``codes`` (the markers)."""
    return [
        (key, body) for key, body in messages if body.get("voucher_code") not in codes
    ]


def _rest(simple):
    """What is in the test queue now."""
    return [(m.delivery_info["routing_key"], m.payload) for m in bus.empty(simple)]


def test_review_queue_vouchers_statements_and_totals_over_rpc(
    start_city, federation, engine, vouchers_db
):
    city = start_city()
    connection, simple = federation

    # Manual review: the application waits; the queue lists it.
    manual = {**application(), "program_id": "sh-reviewed"}
    first = city.apply(manual)
    assert first["decision"] == "pending_review" and first["voucher"] is None
    second = city.apply(
        {
            **application(registration_id=credit_code(900_001)),
            "program_id": "sh-reviewed",
        }
    )
    auto = city.apply(application(registration_id=credit_code(900_002)))
    assert auto["decision"] == "approved"

    pending = city.list_applications(status="pending_review")
    assert pending["total"] == 2
    assert {a["application_id"] for a in pending["items"]} == {
        first["application_id"],
        second["application_id"],
    }
    assert all(a["status"] == "pending_review" for a in pending["items"])
    assert city.list_applications()["total"] == 3
    page = city.list_applications(limit=1, offset=1)
    assert page["total"] == 3 and len(page["items"]) == 1
    with pytest.raises(InvalidRequest):
        city.list_applications(status="maybe")

    # Approve one (it issues), reject the other; neither can be reviewed twice.
    approved = city.review_application(
        first["application_id"], True, "documents checked", "officer-1"
    )
    assert approved["decision"] == "approved"
    assert approved["reviewed_by"] == "officer-1"
    assert approved["voucher"]["program_id"] == "sh-reviewed"
    assert approved["voucher"]["balance_fen"] == FACE_FEN
    assert approved["reasons"][-1] == {
        "rule": "manual_review",
        "passed": True,
        "evidence": "documents checked",
    }
    rejected = city.review_application(
        second["application_id"], False, "not a start-up", "officer-2"
    )
    assert rejected["decision"] == "rejected" and rejected["voucher"] is None
    with pytest.raises(Conflict) as err:
        city.review_application(first["application_id"], False, "again", "officer-1")
    assert err.value.code == "application_not_pending"
    with pytest.raises(NotFound):
        city.review_application("no-such-application", True, "ok", "officer-1")
    with pytest.raises(InvalidRequest):
        city.review_application(second["application_id"], "yes", "ok", "officer-1")
    assert city.list_applications(status="pending_review")["total"] == 0
    assert (
        city.get_application(first["application_id"])["voucher_code"]
        == (approved["voucher"]["code"])
    )

    # Vouchers: by company, by status.
    reviewed_code = approved["voucher"]["code"]
    auto_code = auto["voucher"]["code"]
    for code in (reviewed_code, auto_code):
        consent_by_rpc(city, vouchers_db, code)
    listed = city.list_vouchers()
    assert listed["total"] == 2
    assert {v["code"] for v in listed["items"]} == {reviewed_code, auto_code}
    mine = city.list_vouchers(company_id=credit_code(900_002))
    assert [v["code"] for v in mine["items"]] == [auto_code]

    # Usage on the auto voucher, then revoke it: the rest is released.
    publish_usage_rated(connection, rated(auto_code, "svc-r1", 100_000, COMMERCIAL))
    drain(simple, lambda m: _events(m, "voucher_redeemed"))
    revoked = city.revoke_voucher(auto_code, "fraud suspected", "officer-1")
    assert revoked["status"] == "revoked"
    assert revoked["redeemed_fen"] == 80_000
    assert revoked["released_fen"] == FACE_FEN - 80_000
    assert revoked["balance_fen"] == 0
    with pytest.raises(Conflict) as err:
        city.revoke_voucher(auto_code, "twice", "officer-1")
    assert err.value.code == "voucher_not_active"
    assert [v["code"] for v in city.list_vouchers(status="revoked")["items"]] == [
        auto_code
    ]
    assert city.list_vouchers(status="active")["total"] == 1
    released = drain(simple, lambda m: _events(m, "voucher_released"))
    assert [
        (b["voucher_code"], b["released_fen"], b["reason"])
        for b in _events(released, "voucher_released")
    ] == [(auto_code, FACE_FEN - 80_000, "revoked")]

    # Statements: every movement, summing to the balances.
    statement = city.voucher_statement(auto_code)
    assert statement["voucher"]["code"] == auto_code
    sums = {}
    for entry in statement["entries"]:
        account = entry["account"].rsplit(":", 1)[1]
        sums[account] = sums.get(account, 0) + entry["amount_fen"]
    assert sums == {
        "face": FACE_FEN,
        "redeemed": 80_000,
        "released": FACE_FEN - 80_000,
    }
    assert statement["total"] == len(statement["entries"])
    with pytest.raises(NotFound):
        city.program_statement("no-such-program")

    program = city.program_statement("sh-compute-2025")
    state = program["program"]
    assert state["budget_fen"] == 10_000_000_00
    assert state["redeemed_fen"] == 80_000
    assert state["committed_fen"] == 0
    assert state["available_fen"] == 10_000_000_00 - 80_000
    assert state["released_fen"] == FACE_FEN - 80_000
    program_sums = {}
    for entry in program["entries"]:
        column = entry["account"].rsplit(":", 1)[1]
        program_sums[column] = program_sums.get(column, 0) + entry["amount_fen"]
    assert program_sums["redeemed"] == 80_000
    assert program_sums.get("committed", 0) == 0
    assert program_sums["available"] == state["available_fen"]

    # Totals straight from the ledger, equal to an independent computation.
    totals = city.ledger_totals()
    assert totals["city"] == CITY and totals["as_of"]
    by_program = {p["program_id"]: p for p in totals["programs"]}
    assert by_program["sh-compute-2025"] == {
        "program_id": "sh-compute-2025",
        "budget_fen": 10_000_000_00,
        "available_fen": 10_000_000_00 - 80_000,
        "committed_fen": 0,
        "redeemed_fen": 80_000,
        "released_fen": FACE_FEN - 80_000,
        "vouchers_issued": 1,
    }
    assert by_program["sh-reviewed"]["committed_fen"] == FACE_FEN
    assert by_program["sh-reviewed"]["available_fen"] == 5_000_000_00 - FACE_FEN
    assert by_program["sh-reviewed"]["vouchers_issued"] == 1
    with Session(engine) as session:
        assert ledger.check_ledger(session) == []


def test_expiry_timer_releases_the_balance_and_publishes_once(
    start_city, federation, engine, vouchers_db
):
    city = start_city()
    connection, simple = federation
    code = city.apply(application())["voucher"]["code"]
    consent_by_rpc(city, vouchers_db, code)
    publish_usage_rated(connection, rated(code, "exp-r1", 10_000, COMMERCIAL))
    drain(simple, lambda m: _events(m, "voucher_redeemed"))

    _expire(engine, code)
    messages = drain(simple, lambda m: _events(m, "voucher_released"))
    # Several more expiry ticks: two more vouchers expire, one after the other
    # is released. Ticks run one at a time, so the second marker's release
    # comes in a tick after the first marker's, which came after this
    # voucher's: a tick that released it again would have published before.
    markers = [city.apply(application())["voucher"]["code"] for _ in range(2)]
    for marker in markers:
        _expire(engine, marker)
        messages += drain(simple, _of(marker, "voucher_released"))
    messages = _without(messages, markers)
    released = _events(messages, "voucher_released")
    assert len(released) == 1
    assert released[0]["voucher_code"] == code
    assert released[0]["released_fen"] == FACE_FEN - 8_000
    assert released[0]["reason"] == "expired"

    voucher = city.get_voucher(code)
    assert voucher["status"] == "expired"
    assert voucher["balance_fen"] == 0
    assert voucher["released_fen"] == FACE_FEN - 8_000
    state = {s["program_id"]: s for s in city.program_states()}["sh-compute-2025"]
    assert state["committed_fen"] == 0
    assert state["redeemed_fen"] == 8_000
    assert state["available_fen"] == 10_000_000_00 - 8_000

    # Usage after the expiry is refused, not booked.
    publish_usage_rated(connection, rated(code, "exp-r2", 10_000, COMMERCIAL))
    # Once the city acked both usage messages, what it published for them is
    # on the bus (it acks after the broker confirmed its events).
    bus.wait_acked(connection.as_uri(), f"vouchers_{CITY}.usage_rated", 2)
    late = _rest(simple)
    assert _events(late, "voucher_redeemed") == []
    assert city.get_voucher(code)["redeemed_fen"] == 8_000
    with Session(engine) as session:
        assert ledger.check_ledger(session) == []


def test_outbox_timer_publishes_an_event_whose_publish_failed(
    start_city, federation, engine
):
    FlakyPublisher.dropped, FlakyPublisher.losses = [], 1
    city = start_city(FlakyPublisher(exchange=FEDERATION_EXCHANGE))
    _, simple = federation
    code = city.apply(application())["voucher"]["code"]  # committed, not published
    assert len(FlakyPublisher.dropped) == 1
    dropped = FlakyPublisher.dropped[0]
    with Session(engine) as session:
        row = session.scalar(select(OutboxEvent).where(OutboxEvent.event_id == dropped))
        assert row.event == "voucher_issued" and row.published_at is None

    messages = drain(simple, lambda m: _events(m, "voucher_issued"), timeout=10)
    # The relay does not publish it twice: a marker event, lost as well, is
    # relayed by a later tick (ticks run one at a time, the oldest event
    # first), after any second publishing of this one.
    FlakyPublisher.losses = 2
    marker = city.apply(application())["voucher"]["code"]
    messages += drain(simple, _of(marker, "voucher_issued"), timeout=10)
    messages = _without(messages, [marker])
    issued = _events(messages, "voucher_issued")
    assert [(b["event_id"], b["voucher_code"]) for b in issued] == [(dropped, code)]
    assert issued[0]["face_value_fen"] == FACE_FEN
    with Session(engine) as session:
        row = session.scalar(select(OutboxEvent).where(OutboxEvent.event_id == dropped))
        assert row.published_at is not None


def test_usage_rated_is_read_by_hand_and_acked_once_its_events_are_confirmed(
    start_container, federation, engine, monkeypatch, vouchers_db
):
    """The consumer reads each delivery from its frames by hand (headers of
    any type among them, left to py-amqp's decoder) and acks a batch only
    once the broker confirmed its ``voucher_redeemed`` events: a consumer
    killed before that leaves every message to be redelivered, and each
    record is booked once."""
    connection, simple = federation
    queue = f"vouchers_{CITY}.usage_rated"
    first = start_container()
    with ClusterRpcClient(timeout=10, **caller_options()) as rpc:
        city = getattr(rpc, f"vouchers_{CITY}")
        code = city.apply(application())["voucher"]["code"]
        consent_by_rpc(city, vouchers_db, code)
    assert eventually(
        lambda: bus.ready(connection, queue) is not None, 15, f"{queue} declared"
    )

    by_py_amqp = []  # deliveries the hand reader left to py-amqp
    real_raw = batching.as_delivery

    def raw(message):
        by_py_amqp.append(message)
        return real_raw(message)

    handed = []  # what the workers received

    def handle_usage_rated(self, messages):
        handed.extend(messages)
        return real_handle(self, messages)

    real_handle = VouchersService.handle_usage_rated
    held = []  # the batches of events held back from the broker
    release = eventlet.event.Event()

    def publish_all(self, exchange, events):
        held.append(len(events))
        release.wait()
        return real_publish_all(self, exchange, events)

    real_publish_all = publishing.ConfirmingChannel.publish_all
    monkeypatch.setattr(batching, "as_delivery", raw)
    monkeypatch.setattr(VouchersService, "handle_usage_rated", handle_usage_rated)
    monkeypatch.setattr(publishing.ConfirmingChannel, "publish_all", publish_all)

    headers = [
        {"x-trace": "t-1"},  # strings: read by hand
        {"x-attempt": 3, "x-urgent": True, "x-origin": {"dc": "dc-test-01"}},
    ]
    count = 40
    for n in range(count):
        publish_usage_rated(
            connection,
            rated(code, f"h{n}", 1_000, COMMERCIAL),
            headers=headers[n % 2],
            message_id=f"m-{n}",
        )

    assert eventually(lambda: held, 15, "a batch's events held back")
    time.sleep(0.5)  # long enough for a consumer that acks too early to do so
    assert handed and not by_py_amqp
    for message in handed:
        n = int(message.message_id.removeprefix("m-"))
        assert message.headers == headers[n % 2]
        assert message.routing_key == federation_key(CITY, "usage_rated")
        assert message.content_type == "application/json"
        assert not message.redelivered
        assert json.loads(message.body)["record_id"] == f"h{n}"
    first.kill()  # booked, never confirmed: nothing may have been acked
    assert eventually(
        lambda: bus.ready(connection, queue) == count,
        15,
        f"all {count} messages back in the queue (none acked too early)",
    ), "acked too early"

    handed.clear()
    release.send()
    second = start_container()
    messages = drain(simple, lambda m: len(_events(m, "voucher_redeemed")) >= count)
    redeemed = _events(messages, "voucher_redeemed")
    assert sorted(b["record_id"] for b in redeemed) == sorted(
        f"h{n}" for n in range(count)
    )
    assert len(handed) == count and not by_py_amqp
    assert all(message.redelivered for message in handed)
    second.stop()  # what was not acked goes back to the queue
    assert bus.ready(connection, queue) == 0
    with Session(engine) as session:
        voucher = session.scalar(select(Voucher).where(Voucher.code == code))
        assert voucher.redeemed_fen == count * 800
        assert ledger.check_ledger(session) == []


def test_list_redemptions_pages_through_every_line_without_repeats_or_gaps(
    start_city, federation, engine, vouchers_db
):
    city = start_city()
    connection, _ = federation
    applied = city.apply(application(registration_id=credit_code(900_003)))
    code = applied["voucher"]["code"]
    consent_by_rpc(city, vouchers_db, code)

    def total() -> int:
        return city.list_redemptions(code, limit=1)["total"]

    booked = [f"pg-{n:03d}" for n in range(130)]
    publish_usage_rated(
        connection, *(rated(code, r, 1_000, COMMERCIAL) for r in booked)
    )
    eventually(lambda: total() == 130, what=lambda: f"130 booked, not {total()}")
    # A correction: the original is reversed (clawed back), the fix booked.
    publish_usage_rated(
        connection, rated(code, "pg-fix", 500, COMMERCIAL, correction_of=booked[0])
    )
    eventually(lambda: total() == 132, what=lambda: f"132 lines, not {total()}")
    # Revoked, the voucher refuses what comes after: refused lines too.
    city.revoke_voucher(code, "closing", "officer-1")
    late = [f"pg-late-{n}" for n in range(3)]
    publish_usage_rated(connection, *(rated(code, r, 1_000, COMMERCIAL) for r in late))
    eventually(lambda: total() == 135, what=lambda: f"135 lines, not {total()}")

    lines = []
    for offset in range(0, 200, 40):
        page = city.list_redemptions(code, limit=40, offset=offset)
        assert page["total"] == 135 and page["voucher"]["code"] == code
        lines += page["items"]
    assert len(lines) == 135
    keys = [(line["record_id"], line["status"]) for line in lines]
    assert len(set(keys)) == 135
    assert set(keys) == {
        *((r, "booked") for r in booked),
        (booked[0], "clawed_back"),
        ("pg-fix", "booked"),
        *((r, "refused") for r in late),
    }
    assert lines == city.list_redemptions(code, limit=1000)["items"]
    assert [line["booked_at"] for line in lines] == sorted(
        line["booked_at"] for line in lines
    )
    assert {line["status"] for line in lines[-3:]} == {"refused"}
    assert lines[-1]["reason"] == "voucher_revoked"
    with pytest.raises(InvalidRequest):
        city.list_redemptions(code, limit=1001)
    with pytest.raises(NotFound):
        city.list_redemptions(vouchercode.generate("SH"))


def test_a_poison_usage_rated_is_parked_while_its_batch_is_booked(
    start_container, federation, monkeypatch, vouchers_db
):
    """Issue 16, on RabbitMQ and PostgreSQL: a ``usage_rated`` valid by its
    schema but impossible to book (a cost of 2⁶³ fen, beyond BIGINT) and a
    body that is not JSON, among good records. The good ones are booked at
    once; the poison one is tried ``MAX_DELIVERY_ATTEMPTS`` times, alone,
    then parked with its reason, the malformed one at once; the queue
    drains; a replay of the poison one is still refused (parked_again)."""
    monkeypatch.setattr(batching, "RETRY_PAUSE_S", 0.05)
    connection, simple = federation
    queue = f"vouchers_{CITY}.usage_rated"
    start_container()
    with ClusterRpcClient(timeout=10, **caller_options()) as rpc:
        city = getattr(rpc, f"vouchers_{CITY}")
        code = city.apply(application())["voucher"]["code"]
        consent_by_rpc(city, vouchers_db, code)
        assert eventually(
            lambda: bus.ready(connection, queue) is not None, 15, f"{queue} declared"
        )
        good = [rated(code, f"good-{n}", 1_000, COMMERCIAL) for n in range(6)]
        poison = rated(code, "poison", 2**63, COMMERCIAL)
        publish_usage_rated(connection, *good[:3], poison, *good[3:])
        connection.Producer().publish(
            b"{not json",
            exchange=FEDERATION_EXCHANGE,
            routing_key=federation_key(CITY, "usage_rated"),
            delivery_mode=2,
        )

        def booked():
            found = city.list_redemptions(code)
            return sorted(item["record_id"] for item in found["items"])

        assert eventually(lambda: len(booked()) == 6, 30, "the six good records")

        def both_parked():
            found = city.list_parked_events()
            return found if found["total"] == 2 else None

        parked = {i["kind"]: i for i in eventually(both_parked, 60)["items"]}
        failed, rejected = parked["failed"], parked["rejected"]
        assert failed["event_id"] == "rated-poison"
        assert failed["attempts"] == 5
        assert "DataError" in failed["reason"] or "range" in failed["reason"]
        assert rejected["attempts"] == 1
        assert rejected["reason"].startswith("schema: ")
        assert eventually(lambda: bus.ready(connection, queue) == 0, 15, "drained")
        assert "poison" not in booked()

        again = city.replay_parked_event(failed["id"])
        assert again["outcome"] == "parked_again"

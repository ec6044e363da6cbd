"""``vouchers_<city>``: one city's voucher service — nameko entrypoints only.

Applications arrive by RPC, rated usage on ``vouchers_<city>.usage_rated``
(with the data centres' binding requests; the bindings' entrypoints are in
``binding_entrypoints``);
decisions come from ``domain``, money moves in ``ledger``, and the facts are
published on ``computenet.federation`` after they are committed.
"""

from __future__ import annotations

import logging
from typing import Any

from marshmallow import ValidationError
from nameko.messaging import Publisher
from nameko.timer import timer

import services.common.remote_errors  # noqa: F401 - errors cross RPC as themselves
from services.common import vouchercode
from services.common.amqp import (
    FEDERATION_EXCHANGE,
    RawMessage,
    city_usage_queue,
    federation_key,
)
from services.common.config import (
    CITY_CODE,
    HEARTBEAT_INTERVAL_S,
    RULES_FILE,
    VOUCHER_PREFIX,
    ConfigError,
)
from services.common.contracts import (
    CITY_CODE as CITY_CODE_SHAPE,
)
from services.common.contracts import (
    event_id,
    make_event,
)
from services.common.errors import EXPECTED, InvalidRequest, NotFound
from services.common.parking import Attempts
from services.common.publishing import OrderedConfirmedPublisher
from services.common.rpc_access import rpc
from services.common.units import cny_to_fen
from services.vouchers import domain
from services.vouchers.batching import consume_batch
from services.vouchers.binding_entrypoints import BindingEntrypoints
from services.vouchers.dependencies import Ledger, OutboxMarks, Uptime
from services.vouchers.parking import UsageQueueParking
from services.vouchers.retention import VouchersRetention
from services.vouchers.review_rpc import ReviewEntrypoints
from services.vouchers.rules import instance_rules
from services.vouchers.schemas import (
    ApplicationRequestSchema,
    ApplicationResponseSchema,
    ApplicationSchema,
    LedgerEntrySchema,
    LedgerTotalsSchema,
    MonthlyStatementSchema,
    ProgramStateSchema,
    RedemptionLineSchema,
    VoucherSchema,
)

log = logging.getLogger(__name__)

VERSION = "0.1.0"
PUBLISH_PROGRAMS_EVERY = 10  # ticks: program_published on the first and every 10th
DEFAULT_HEARTBEAT_INTERVAL_S = 30.0
# Config keys of this service alone (read with defaults, so optional).
EXPIRY_INTERVAL_S = "EXPIRY_INTERVAL_S"
OUTBOX_INTERVAL_S = "OUTBOX_INTERVAL_S"
DEFAULT_EXPIRY_INTERVAL_S = 60.0
DEFAULT_OUTBOX_INTERVAL_S = 2.0
# Well inside the relay's 1 s grace, so that it rarely republishes an event.
MARK_INTERVAL_S = 0.2
# Built once: a marshmallow schema costs more to build than to use.
_VOUCHER = VoucherSchema()
_APPLICATION = ApplicationSchema()
_APPLICATION_REQUEST = ApplicationRequestSchema()
_APPLICATION_RESPONSE = ApplicationResponseSchema()
_REDEMPTION_LINES = RedemptionLineSchema(many=True)
_MONTHLY_STATEMENT = MonthlyStatementSchema()


def _voucher_body(city: str, voucher, redemptions=(), total: int = 0) -> dict[str, Any]:
    return _VOUCHER.dump(
        {
            "code": voucher.code,
            "city": city,
            "program_id": voucher.program_id,
            "company_id": voucher.company_id,
            "status": voucher.status,
            "face_value_fen": voucher.face_value_fen,
            "balance_fen": voucher.balance_fen,
            "redeemed_fen": voucher.redeemed_fen,
            "released_fen": voucher.released_fen,
            "issued_at": voucher.issued_at,
            "expires_at": voucher.expires_at,
            "redemptions": list(redemptions),
            "redemptions_total": total,
            "closed_at": voucher.closed_at,
            "close_reason": voucher.close_reason,
        }
    )


def _application_body(city: str, application, voucher=None) -> dict[str, Any]:
    body = _APPLICATION.dump(application)
    body["voucher"] = _voucher_body(city, voucher) if voucher is not None else None
    return body


def _text(value: Any, name: str, max_length: int = 512) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise InvalidRequest(
            "invalid_request", f"{name} must be a non-empty string", {name: [value]}
        )
    return value.strip()


class VouchersService(
    VouchersRetention, BindingEntrypoints, ReviewEntrypoints, UsageQueueParking
):
    """The entrypoints; :func:`build` names an instance for its city (the
    bindings' are in ``binding_entrypoints``, the review queue's in
    ``review_rpc``, the usage queue's bounded retries in ``parking``).

    ``publish`` (a nameko ``Publisher``), the usage queue and the timer are
    added by :func:`build`, because they depend on the configuration.
    """

    name = "vouchers"

    ledger = Ledger()
    attempts = Attempts()
    clock = Uptime()
    outbox_marks = OutboxMarks()
    publish: Any
    publish_confirmed: Any

    @property
    def city(self) -> str:
        return self.ledger.rules.city

    def _publish(self, event: str, eid: str, **fields: Any) -> None:
        body = make_event(event, self.city, eid, **fields)
        self.publish(body, routing_key=federation_key(self.city, event), message_id=eid)

    def _publish_outbox(self, events) -> None:
        """Publish committed outbox events now; the relay timer retries failures.

        What was published is marked so in the database by the next
        ``mark_outbox`` tick (one update for many events, instead of a second
        transaction per request); a crash before it only means the relay
        publishes those events again, with the same ids.
        """
        done = []
        try:
            for row in events:
                self.publish(
                    row.body,
                    routing_key=federation_key(self.city, row.event),
                    message_id=row.event_id,
                )
                done.append(row.id)
        except Exception:  # noqa: BLE001 - the fact is committed; relay retries
            log.warning("publishing outbox events failed; the relay will retry")
        self.outbox_marks.add(done)

    def mark_outbox(self) -> None:
        """Timer: record in the outbox what was published since the last tick."""
        ids = self.outbox_marks.take()
        if not ids:
            return
        try:
            self.ledger.mark_published(ids)
        except Exception:  # noqa: BLE001 - kept for the next tick
            self.outbox_marks.add(ids)
            log.warning("marking %d outbox events published failed", len(ids))

    @rpc(expected_exceptions=EXPECTED)
    def apply(self, application: dict) -> dict:
        try:
            request = _APPLICATION_REQUEST.load(application)
        except ValidationError as err:
            raise InvalidRequest(
                "invalid_application", "the application is invalid", err.messages
            ) from None
        program = self.ledger.rules.program(request["program_id"])
        if program is None:
            raise NotFound(
                "program_not_found",
                f"{self.city} has no program {request['program_id']}",
            )
        face_value_fen = cny_to_fen(request["requested_face_value_cny"])
        problem = domain.face_value_problem(program, face_value_fen)
        if problem is not None:
            raise InvalidRequest(
                "invalid_application", problem, {"requested_face_value_cny": [problem]}
            )
        decision = domain.decide(program, request["company"])
        result = self.ledger.apply(
            program, request["company"], face_value_fen, decision
        )
        voucher = result.voucher
        self._publish_outbox(result.events)
        return _APPLICATION_RESPONSE.dump(
            {
                "application_id": result.application.id,
                "decision": decision.decision,
                "reasons": [r.as_dict() for r in decision.reasons],
                "rules_version": self.ledger.rules.version,
                "voucher": _voucher_body(self.city, voucher)
                if voucher is not None
                else None,
            }
        )

    @rpc(expected_exceptions=EXPECTED)
    def get_voucher(self, code: str) -> dict:
        voucher, redemptions, total = self.ledger.get_voucher(self._code(code))
        return _voucher_body(self.city, voucher, redemptions, total)

    @rpc(expected_exceptions=EXPECTED)
    def program_states(self) -> list[dict]:
        return ProgramStateSchema(many=True).dump(self.ledger.program_states())

    @rpc(expected_exceptions=EXPECTED)
    def list_applications(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict:
        rows, total = self.ledger.list_applications(status, limit, offset)
        return {
            "items": [_application_body(self.city, row) for row in rows],
            "total": total,
        }

    @rpc(expected_exceptions=EXPECTED)
    def get_application(self, application_id: str) -> dict:
        return _application_body(self.city, self.ledger.get_application(application_id))

    @rpc(expected_exceptions=EXPECTED)
    def review_application(
        self, application_id: str, approve: bool, reason: str, reviewer: str
    ) -> dict:
        if not isinstance(approve, bool):
            raise InvalidRequest("invalid_request", "approve must be true or false")
        result = self.ledger.review(
            application_id,
            approve,
            _text(reason, "reason"),
            _text(reviewer, "reviewer", 128),
        )
        self._publish_outbox(result.events)
        return _application_body(self.city, result.application, result.voucher)

    @rpc(expected_exceptions=EXPECTED)
    def revoke_voucher(self, code: str, reason: str, actor: str) -> dict:
        voucher, event = self.ledger.revoke(
            self._code(code), _text(reason, "reason"), _text(actor, "actor", 128)
        )
        self._publish_outbox([event])
        return _voucher_body(self.city, voucher)

    @rpc(expected_exceptions=EXPECTED)
    def list_vouchers(
        self,
        company_id: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict:
        rows, total = self.ledger.list_vouchers(company_id, status, limit, offset)
        return {
            "items": [_voucher_body(self.city, row) for row in rows],
            "total": total,
        }

    @rpc(expected_exceptions=EXPECTED)
    def list_redemptions(self, code: str, limit: int = 100, offset: int = 0) -> dict:
        """Every line the ledger has for the voucher, one page of them."""
        voucher, lines, total = self.ledger.list_redemptions(
            self._code(code), limit, offset
        )
        return {
            "voucher": _voucher_body(self.city, voucher),
            "items": _REDEMPTION_LINES.dump(lines),
            "total": total,
        }

    @rpc(expected_exceptions=EXPECTED)
    def voucher_statement(self, code: str, limit: int = 1000, offset: int = 0) -> dict:
        voucher, entries, total = self.ledger.voucher_statement(
            self._code(code), limit, offset
        )
        return {
            "voucher": _voucher_body(self.city, voucher),
            "entries": LedgerEntrySchema(many=True).dump(entries),
            "total": total,
        }

    @rpc(expected_exceptions=EXPECTED)
    def monthly_statement(
        self, code: str, month: str, company_id: str | None = None
    ) -> dict:
        """The voucher's statement of a UTC month (``YYYY-MM``), reconciled
        to its ledger postings (``ledger/statements.py``); with
        ``company_id``, only if that company holds it."""
        return _MONTHLY_STATEMENT.dump(
            self.ledger.monthly_statement(self._code(code), month, company_id)
        )

    @rpc(expected_exceptions=EXPECTED)
    def program_statement(
        self, program_id: str, limit: int = 1000, offset: int = 0
    ) -> dict:
        program, entries, total = self.ledger.program_statement(
            program_id, limit, offset
        )
        return {
            "program": ProgramStateSchema().dump(
                {
                    "program_id": program.id,
                    "kind": program.kind,
                    "budget_fen": program.budget_fen,
                    "rate_bp": program.rate_bp,
                    "max_rate_bp": program.max_rate_bp,
                    "available_fen": program.available_fen,
                    "committed_fen": program.committed_fen,
                    "redeemed_fen": program.redeemed_fen,
                    "released_fen": program.released_fen,
                    "rules_version": program.rules_version,
                    "rules_sha256": program.rules_sha256,
                }
            ),
            "entries": LedgerEntrySchema(many=True).dump(entries),
            "total": total,
        }

    @rpc(expected_exceptions=EXPECTED)
    def ledger_totals(self) -> dict:
        return LedgerTotalsSchema().dump(self.ledger.totals())

    def _voucher_view(self, voucher) -> dict[str, Any]:
        return _voucher_body(self.city, voucher)

    def _code(self, code: Any) -> str:
        try:
            vouchercode.parse(code)
        except vouchercode.InvalidVoucherCode as exc:
            raise InvalidRequest("invalid_voucher_code", str(exc)) from None
        return code.strip().upper()

    def expire_vouchers(self) -> None:
        """Timer: expire what is due, releasing each unspent balance."""
        while True:
            events = self.ledger.expire_due()
            self._publish_outbox(events)
            if len(events) < 200:
                return

    def relay_outbox(self) -> None:
        """Timer: publish outbox events a crash or a broker fault left behind."""
        self.mark_outbox()  # what is published already is not relayed again
        events = self.ledger.pending_events(older_than_s=1.0)
        if events:
            log.info("relaying %d unpublished events", len(events))
            self._publish_outbox(events)

    def handle_usage_rated(self, messages: list[RawMessage]) -> Any:
        """Book a batch of rated records in one transaction, then publish.

        The ``voucher_redeemed`` events (the same ids for a redelivered record)
        are published after the commit; the returned confirmation tells the
        consumer when the broker has them, and only then is the batch acked
        (the next batch is booked meanwhile). Binding requests on the queue
        are applied first, in their own transaction, holds after. What the
        batch cannot apply is booked one by one, and what fails even alone
        is set aside after ``MAX_DELIVERY_ATTEMPTS`` (``parking``).
        """
        return self.book_or_park(messages)

    def publish_state(self) -> None:
        """Heartbeat every tick; the programs on the first and every 10th."""
        tick = self.clock.next_tick()
        instance = f"{self.clock.started_at:.6f}"
        if tick % PUBLISH_PROGRAMS_EVERY == 0:
            rules = self.ledger.rules
            programs = {program.id: program for program in rules.programs}
            self._publish(
                "program_published",
                event_id("program_published", self.city, instance, str(tick)),
                name=rules.name,
                region=rules.region,
                voucher_prefix=rules.voucher_prefix,
                programs=[
                    domain.program_summary(
                        programs[state["program_id"]],
                        rules.version,
                        rules.sha256,
                        state["budget_fen"],
                        state["available_fen"],
                        state["committed_fen"],
                        state["redeemed_fen"],
                    )
                    for state in self.ledger.program_states()
                    if state["program_id"] in programs
                ],
            )
        self._publish(
            "heartbeat",
            event_id("heartbeat", self.city, instance, str(tick)),
            version=VERSION,
            uptime_s=self.clock.uptime_s,
        )


def build(config: dict) -> type:
    """The service class for ``config[CITY_CODE]``, named ``vouchers_<city>``.

    Loads the rules file first, so that an invalid one stops the process with
    a message naming the file, the line and the problem (a ``ValueError``).
    """
    city = config.get(CITY_CODE)
    if not isinstance(city, str) or not CITY_CODE_SHAPE.match(city):
        raise ConfigError(f"{CITY_CODE} must be a city code ([a-z0-9_]+), not {city!r}")
    if not config.get(RULES_FILE):
        raise ConfigError(f"{RULES_FILE} is not set")
    instance_rules(config[RULES_FILE], city, config.get(VOUCHER_PREFIX))
    queue = city_usage_queue(city)
    interval = float(config.get(HEARTBEAT_INTERVAL_S) or DEFAULT_HEARTBEAT_INTERVAL_S)

    # Fresh functions per class: nameko records entrypoints on the function.
    def handle_usage_rated(self, messages: list[RawMessage]) -> Any:
        return VouchersService.handle_usage_rated(self, messages)

    def publish_state(self) -> None:
        VouchersService.publish_state(self)

    def expire_vouchers(self) -> None:
        VouchersService.expire_vouchers(self)

    def relay_outbox(self) -> None:
        VouchersService.relay_outbox(self)

    def mark_outbox(self) -> None:
        VouchersService.mark_outbox(self)

    expiry_s = float(config.get(EXPIRY_INTERVAL_S) or DEFAULT_EXPIRY_INTERVAL_S)
    outbox_s = float(config.get(OUTBOX_INTERVAL_S) or DEFAULT_OUTBOX_INTERVAL_S)

    return type(
        f"VouchersService_{city}",
        (VouchersService,),
        {
            "name": f"vouchers_{city}",
            # mandatory: an event no queue takes is an error (the outbox
            # keeps it, the batch is not acked), never confirmed and dropped.
            "publish": Publisher(exchange=FEDERATION_EXCHANGE, mandatory=True),
            "publish_confirmed": OrderedConfirmedPublisher(
                FEDERATION_EXCHANGE, mandatory=True
            ),
            "handle_usage_rated": consume_batch(queue)(handle_usage_rated),
            "publish_state": timer(interval=interval, eager=True)(publish_state),
            "expire_vouchers": timer(interval=expiry_s, eager=True)(expire_vouchers),
            "relay_outbox": timer(interval=outbox_s, eager=True)(relay_outbox),
            "mark_outbox": timer(interval=MARK_INTERVAL_S)(mark_outbox),
        },
    )

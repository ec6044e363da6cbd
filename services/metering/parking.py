"""metering's parked messages (issue 16), mixed into ``MeteringService``;
what every consumer shares (the table, the RPC) is
``services/common/parking.py``'s.

metering's consumers already retried a batch that failed one message at a
time, and counted each message's failures in ``delivery_attempts``
(``dead_letters.record_failure``). A message that broke a rule was, and is,
a dead letter, for its data centre to see and fix. One that passed every
check but failed ``MAX_DELIVERY_ATTEMPTS`` times on its own (a bug, a value
the database refuses, an event no city queue takes) is the platform's
fault: it is parked here, with its headers and publisher, for the ministry
to replay once the cause is fixed. A replay checks it again from the start
(signature, publisher, every rule) and applies it; a record stored since
is a duplicate, and its event goes out again.
"""

from __future__ import annotations

from typing import Any

from services.common.amqp import RawMessage
from services.common.parking import ParkedEvents
from services.common.parking_store import ParkingStore
from services.common.units import utcnow
from services.metering import bindings, dead_letters, ingest
from services.metering.domain import bindings as binding_rules
from services.metering.models import ParkedEvent


class MeteringParkingStore(ParkingStore):
    parked_model = ParkedEvent

    def __init__(self, session: Any):
        self.session = session


class MeteringParking(ParkedEvents):
    """Needs the service's ``db``, ``registry_cache``, ``city_registry_rpc``
    and ``publish``. Parking itself is ``dead_letters.record_failure``'s, in
    the transaction that counts the last attempt."""

    @property
    def parking_store(self) -> MeteringParkingStore:
        return MeteringParkingStore(self.db)

    def park(self, message: RawMessage, kind: str, reason: str, attempts: int) -> int:
        """Set a message aside by hand (metering's own consumers park in
        ``record_failure``); its parked id."""
        row = dead_letters.parked_row(message, reason, attempts, utcnow())
        row.kind = kind
        self.db.rollback()
        self.db.add(row)
        self.db.commit()
        return row.id

    def replay_parked(self, parked: dict[str, Any]) -> bool:
        """Check and apply it again, alone; its events published (and
        confirmed) before the answer. A rule it breaks now raises its
        ``Refused``: it stays parked, with that reason."""
        message = dead_letters.parked_message(parked)
        registry = self.registry_cache(self.city_registry_rpc)
        if message.routing_key.endswith("." + binding_rules.BINDING):
            self.publish([bindings.check(registry, message)])
            return True
        outcome = ingest.process_batch(
            self.db, registry, [message], store_refused=False
        )
        if outcome.refused:
            raise outcome.refused[0][1]
        self.publish((e.routing_key, e.event_id, e.body) for e in outcome.outgoing)
        return outcome.inserted > 0 or _capacity(message)


def _capacity(message: RawMessage) -> bool:
    """A capacity report has no dedup answer: applied when it passed."""
    return message.routing_key.endswith(".capacity")

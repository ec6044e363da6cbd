"""Binding requests (CONTRACTS.md §6): a data centre asks to bill a tenant to a
voucher; metering verifies the request and tells the voucher's city.

``metering.bindings`` takes ``*.binding`` from ``computenet.usage``. Each
request is checked like a usage record (``domain.bindings`` lists the
rules, the registry answers through the same cache) and becomes
``<city>.binding_requested``, published with confirms and ``mandatory``
like ``usage_rated``; a request that breaks a rule is a dead letter with
its reason, kept once per ``(datacenter_id, request_id)``. metering stores
nothing else of a request: the event's id is derived from that pair, so a
redelivered request is the same event and its city applies it once.

:class:`BindingRequests` is a mixin of ``MeteringService`` (its entrypoint,
and the replay of a binding request's dead letter).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.common.amqp import USAGE_EXCHANGE, RawMessage, durable_queue
from services.common.batching import RequeueingBatchConsumer
from services.common.errors import Unavailable
from services.common.publishing import Unroutable
from services.common.units import utcnow
from services.metering import dead_letters, ingest
from services.metering.domain import bindings as rules
from services.metering.domain import validation
from services.metering.domain.validation import Reason, Refused
from services.metering.models import DeadLetter
from services.metering.registry import CachedRegistry

log = logging.getLogger(__name__)

BINDINGS_QUEUE = durable_queue(
    "metering.bindings", USAGE_EXCHANGE, [f"*.{rules.BINDING}"]
)


class BindingConsumer(RequeueingBatchConsumer):
    """``metering.bindings``' consumer: a request or two a minute per data
    centre, so one consumer a process, whatever ``CONSUMERS`` says for usage."""

    default_batch_size = 50
    default_batch_wait_ms = 20

    def setup(self):
        super().setup()
        self.consumers = 1


consume_bindings = BindingConsumer.decorator


def check(
    registry: CachedRegistry | ingest.Lookups, message: RawMessage
) -> tuple[str, str, bytes]:
    """Every rule (``domain.bindings``); the event ``(routing key, event id,
    body)`` to publish, or :class:`Refused`."""
    lookups = registry if type(registry) is ingest.Lookups else ingest.Lookups(registry)
    datacenter_id, kind = validation.split_routing_key(message.routing_key)
    if kind != rules.BINDING:
        raise Refused(
            Reason.SCHEMA, f"routing key {message.routing_key[:255]!r} is not a binding"
        )
    user_id = message.properties.get("user_id")
    if not lookups.may_publish(user_id, datacenter_id):
        raise Refused(
            Reason.WRONG_PUBLISHER,
            f"{message.routing_key[:255]!r} published by broker user "
            f"{str(user_id)[:80]!r}, not by {datacenter_id[:64]!r}'s own",
        )
    # The same envelope, data centre and signature checks as a usage record's.
    _datacenter, data = ingest._verified_body(lookups, message, datacenter_id)
    request = rules.load_request(data, datacenter_id)
    request["voucher_code"], city = lookups.voucher(request["voucher_code"])
    return rules.binding_requested(city, request)


def store_refusal(session: Session, message: RawMessage, refused: Refused) -> bool:
    """Keep a refused request as a dead letter, once: a redelivered copy of a
    request already kept (same data centre, routing key and ``request_id``)
    adds nothing. Returns whether a dead letter was added."""
    letter = dead_letters.dead_letter_row(message, refused)
    letter.record_id = rules.readable_request_id(message.body)
    try:
        if letter.record_id is not None and session.scalar(
            select(DeadLetter.id)
            .where(
                DeadLetter.datacenter_id == letter.datacenter_id,
                DeadLetter.record_id == letter.record_id,
                DeadLetter.routing_key == letter.routing_key,
            )
            .limit(1)
        ):
            session.rollback()
            return False
        session.add(letter)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return True


class BindingRequests:
    """``MeteringService``'s binding requests: it brings ``db``,
    ``registry_cache``, ``city_registry_rpc``, ``publish`` and
    ``_count_failure`` (a poison message ends parked, as in the usage
    consumer)."""

    @consume_bindings(BINDINGS_QUEUE)
    def handle_binding_requests(self, messages: list) -> list[int]:
        """Verify and announce each request; returns the indices to requeue."""
        registry = ingest.Lookups(self.registry_cache(self.city_registry_rpc))
        return [
            index
            for index, message in enumerate(messages)
            if not self._apply_binding(registry, message)
        ]

    def _apply_binding(self, registry: ingest.Lookups, message: RawMessage) -> bool:
        """One request; False: requeue it."""
        try:
            event = check(registry, message)
        except Refused as refused:
            return self._refuse_binding(message, refused)
        except Unavailable:  # the registry is down: nothing wrong with the message
            log.exception("could not check %s; requeued", message.routing_key[:255])
            return False
        except Exception as exc:
            log.exception("could not check %s", message.routing_key[:255])
            return self._count_failure(message, exc)
        try:
            self.publish([event])
        except Unroutable as exc:
            # No queue of the city takes it: counted, it ends parked.
            log.error("binding_requested unroutable: %s", exc)
            return self._count_failure(message, exc)
        except Exception:
            log.exception("could not publish binding_requested; requeued")
            return False
        if message.redelivered:
            try:
                dead_letters.forget_failures(self.db, message)
            except Exception:  # noqa: BLE001 - only a counter left behind
                log.warning("could not clear the failures of a message", exc_info=True)
        return True

    def _refuse_binding(self, message: RawMessage, refused: Refused) -> bool:
        try:
            stored = store_refusal(self.db, message, refused)
        except Exception:
            log.exception("could not store a dead letter; requeued")
            return False
        if stored:
            log.info(
                "dead letter %s from %s: %s",
                refused.reason,
                message.routing_key[:255],
                refused.detail_text[:200],
            )
        return True

    def replay_binding_letter(self, dead_letter_id: Any) -> dict | None:
        """Replay a binding request's dead letter (its cause fixed: the city
        admitted, the key registered): announced if it now passes. None when
        the letter is not a binding request's (``replay_dead_letter`` then
        replays it as usage)."""
        if isinstance(dead_letter_id, bool) or not isinstance(dead_letter_id, int):
            return None
        letter = self.db.get(DeadLetter, dead_letter_id)
        if letter is None or not letter.routing_key.endswith("." + rules.BINDING):
            return None
        message = dead_letters.replayable(letter)
        registry = self.registry_cache(self.city_registry_rpc)
        try:
            event = check(registry, message)
        except Refused as refused:
            result = {"outcome": "dead_letter", "reason": refused.reason}
        else:
            self.publish([event])  # announced before the letter says so
            result = {"outcome": "applied", "reason": None}
        letter.replayed_at = utcnow()
        letter.replay_outcome = result["outcome"]
        letter.replay_reason = result["reason"]
        self.db.commit()
        return result

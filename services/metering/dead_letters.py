"""Dead letters: a refused message kept whole with its reason, a poison
message's failed attempts counted until it is parked (issue 16), and a dead
letter (or a parked message) turned back into the message it was made from
(for a replay, ``reports.replay_dead_letter``, ``parking``).

:func:`dead_letter_row` is what :func:`services.metering.ingest.process_batch`
adds to a batch's transaction for each refused message; the other writers
here run in a transaction of their own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from services.common.amqp import RawMessage
from services.common.parking import FAILED
from services.common.parking_store import REASON_WIDTH
from services.common.units import utcnow
from services.metering.domain import validation
from services.metering.domain.validation import Refused
from services.metering.models import DeadLetter, DeliveryAttempt, ParkedEvent
from services.metering.store import insert_for


def _clean(text_: str, limit: int | None = None) -> str:
    """Text any database accepts: no NUL, no lone surrogates."""
    text_ = text_.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return text_[:limit] if limit else text_


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {_clean(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return _clean(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        return _clean(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return _clean(str(value))


def dead_letter_row(message: RawMessage, refused: Refused) -> DeadLetter:
    """The dead letter of ``message`` (not yet added to the session)."""
    datacenter_id, _kind = validation.split_routing_key(message.routing_key)
    record_id = None
    if message.routing_key.endswith("." + validation.USAGE):
        record_id = validation.readable_record_id(message.body)
    properties = {
        name: message.properties.get(name)
        for name in ("content_type", "content_encoding", "message_id", "user_id")
        if message.properties.get(name) is not None
    }
    return DeadLetter(
        received_at=utcnow(),
        routing_key=_clean(message.routing_key, 255),
        datacenter_id=_clean(datacenter_id, 255),
        record_id=record_id,
        reason=refused.reason,
        detail=_clean(refused.detail_text),
        headers=json.loads(json.dumps(_json_safe(message.headers))),
        # An oversized body is kept in part: enough to see what it was.
        body=_clean(
            message.body[: validation.MAX_BODY_BYTES].decode("utf-8", "replace")
        ),
        properties=json.loads(json.dumps(_json_safe(properties))),
    )


def store_dead_letter(session: Session, message: RawMessage, refused: Refused) -> None:
    """Keep one refused message, whole, with its reason (it is then acked)."""
    session.rollback()
    session.add(dead_letter_row(message, refused))
    session.commit()


# -- poison messages -----------------------------------------------------------

_ATTEMPTS = DeliveryAttempt.__table__


def message_key(message: RawMessage) -> str:
    """What identifies a delivery across redeliveries: its routing key and body."""
    digest = hashlib.sha256(message.routing_key.encode("utf-8", "replace"))
    digest.update(b"\x1f")
    digest.update(message.body)
    return digest.hexdigest()


def record_failure(
    session: Session, message: RawMessage, error: BaseException, max_attempts: int
) -> bool:
    """Count one failed attempt of ``message`` processed alone (own transaction).

    Counted in the database (a restart does not reset it), or by the broker
    (a quorum queue's ``x-delivery-count``) when that says more. Returns True
    when this was attempt ``max_attempts``: the message is then parked
    (``parked_events``, kind ``failed``, with the exception; issue 16) and
    the caller acks it; False: the caller requeues it. Raises if the database
    cannot be written either (then nothing is counted and it is requeued).
    """
    session.rollback()
    key = message_key(message)
    error_text = _clean(f"{type(error).__name__}: {error}", 2000)
    now = utcnow()
    statement = insert_for(session)(_ATTEMPTS).values(
        message_key=key, attempts=1, last_error=error_text, updated_at=now
    )
    statement = statement.on_conflict_do_update(
        index_elements=["message_key"],
        set_={
            "attempts": _ATTEMPTS.c.attempts + 1,
            "last_error": statement.excluded.last_error,
            "updated_at": statement.excluded.updated_at,
        },
    ).returning(_ATTEMPTS.c.attempts)
    try:
        attempts = session.execute(statement).scalar_one()
        counted = (message.headers or {}).get("x-delivery-count")
        if isinstance(counted, int) and not isinstance(counted, bool):
            attempts = max(attempts, counted + 1)
        exhausted = attempts >= max_attempts
        if exhausted:
            session.execute(_ATTEMPTS.delete().where(_ATTEMPTS.c.message_key == key))
            session.add(parked_row(message, error_text, attempts, now))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return exhausted


def parked_row(
    message: RawMessage, reason: str, attempts: int, now: datetime
) -> ParkedEvent:
    """The parked event of a message that failed ``attempts`` times."""
    properties = {
        name: message.properties.get(name)
        for name in ("content_type", "content_encoding", "message_id", "user_id")
        if message.properties.get(name) is not None
    }
    return ParkedEvent(
        routing_key=_clean(message.routing_key, 255),
        event_id=_clean(str(message.properties.get("message_id") or ""), 128) or None,
        body=_clean(message.body.decode("utf-8", "replace")),
        kind=FAILED,
        reason=_clean(reason, REASON_WIDTH),
        attempts=attempts,
        parked_at=now,
        headers=json.loads(json.dumps(_json_safe(message.headers))),
        properties=json.loads(json.dumps(_json_safe(properties))),
    )


def parked_message(parked: Mapping[str, Any]) -> RawMessage:
    """The message a parked event was made from, as it was received (its
    publisher checked again; none stored: the national side's replay)."""
    properties = dict(parked.get("properties") or {})
    properties.setdefault("content_type", "application/json")
    properties.setdefault("user_id", REPLAYED_BY)
    return RawMessage(
        body=parked["body"].encode("utf-8"),
        headers=dict(parked.get("headers") or {}),
        properties=properties,
        routing_key=parked["routing_key"],
        redelivered=True,
    )


def forget_failures(session: Session, message: RawMessage) -> None:
    """A message that went through after failing: its count starts again."""
    try:
        session.execute(
            _ATTEMPTS.delete().where(_ATTEMPTS.c.message_key == message_key(message))
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise


# -- replay --------------------------------------------------------------------


REPLAYED_BY = "national.replay"


def replayable(letter: DeadLetter) -> RawMessage:
    """The message a dead letter was made from, as it was received."""
    properties = dict(letter.properties or {})
    properties.setdefault("content_type", "application/json")  # stored before 0002
    # Who published it is checked again; a letter stored without one (before
    # user ids were stored, or published without) is replayed as what it is
    # now, the national side's explicit act.
    properties.setdefault("user_id", REPLAYED_BY)
    return RawMessage(
        body=letter.body.encode("utf-8"),
        headers=dict(letter.headers or {}),
        properties=properties,
        routing_key=letter.routing_key,
        redelivered=True,
    )

"""Cities' refusals, holds and clawbacks in the registry's database.

:class:`ReviewStore` is the part of
:class:`~services.city_registry.store.RegistryStore` that keeps what the
cities publish about records they did not book (``usage_refused``,
``usage_held``, ``usage_released``, ``voucher_clawed_back``): one row per
record and city, updated as later events say more, so that the dead-letter
listing shows each record once with its latest state. Each event is applied
in ``apply_event``'s transaction, which claims its ``event_id`` (a
redelivered one changes nothing).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from services.city_registry.models import CityClawback, CityHold, CityRefusal
from services.common.errors import InvalidRequest, NotFound

HOLD_STATUSES = ("held", "released", "refused")
# What a replayed refusal came to, from the city's next event on the record.
BOOKED = "booked"


def _page(limit: Any, offset: Any) -> tuple[int, int]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidRequest("invalid_page", "limit must be between 1 and 1000")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("invalid_page", "offset must be ≥ 0")
    return limit, offset


class ReviewStore:
    """Refusals, holds, clawbacks (mixed into ``RegistryStore``, which
    provides ``session``, ``_transaction`` and ``_insert_absent``)."""

    # ------------------------------------------------------------ events

    def apply_review_event(
        self, city: str, event: str, body: dict[str, Any], received_at: datetime
    ) -> None:
        key = (body["datacenter_id"], body["record_id"])
        if event == "usage_refused":
            self._refused(city, key, body, received_at)
        elif event == "usage_held":
            self._held(city, key, body)
        elif event == "usage_released":
            self._released(city, key, body)
        else:
            self.session.add(
                CityClawback(
                    city_code=city,
                    voucher_code=body["voucher_code"],
                    datacenter_id=key[0],
                    record_id=key[1],
                    clawed_back_fen=body["clawed_back_fen"],
                    reason=body["reason"],
                    actor=body["actor"],
                    clawed_back_at=body["occurred_at"],
                )
            )

    def _of(self, model: type, city: str, key: tuple[str, str]):
        return (
            model.city_code == city,
            model.datacenter_id == key[0],
            model.record_id == key[1],
        )

    def _refused(self, city, key, body, received_at) -> None:
        values = {
            "event_id": body["event_id"],
            "voucher_code": body.get("voucher_code"),
            "reason": body["reason"],
            "detail": body.get("detail") or "",
            "refused_at": body["occurred_at"],
            "received_at": received_at,
        }
        if self._insert_absent(
            CityRefusal,
            city_code=city,
            datacenter_id=key[0],
            record_id=key[1],
            **values,
        ):
            return
        # Refused again (on replay, or on review): the latest refusal stands.
        row = self.session.scalars(
            select(CityRefusal).where(*self._of(CityRefusal, city, key))
        ).one()
        for name, value in values.items():
            setattr(row, name, value)
        if row.replayed_at is not None:
            row.outcome = "refused"

    def _held(self, city, key, body) -> None:
        self._insert_absent(
            CityHold,
            city_code=city,
            datacenter_id=key[0],
            record_id=key[1],
            voucher_code=body.get("voucher_code"),
            reason=body["reason"],
            evidence=body.get("evidence") or {},
            subsidy_fen=body["subsidy_fen"],
            status="held",
            held_at=body["occurred_at"],
            released_fen=0,
        )
        self._replay_came_to(city, key, "held")

    def _released(self, city, key, body) -> None:
        self.session.execute(
            update(CityHold)
            .where(*self._of(CityHold, city, key), CityHold.status == "held")
            .values(
                status=body["decision"],
                decided_at=body["occurred_at"],
                decided_by=body["actor"],
                decision_reason=body.get("reason") or "",
                released_fen=body["subsidy_fen"],
            )
        )
        if body["decision"] == "released":
            self._replay_came_to(city, key, BOOKED)

    def _replay_came_to(self, city, key, outcome: str) -> None:
        self.session.execute(
            update(CityRefusal)
            .where(
                *self._of(CityRefusal, city, key), CityRefusal.replayed_at.is_not(None)
            )
            .values(outcome=outcome)
        )

    # ------------------------------------------------------------ reads

    def city_refusals(
        self,
        datacenter_id: str | None,
        city: str | None,
        limit: int,
        offset: int,
        reason: str | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of refusals, newest first, and how many there are."""
        limit, offset = _page(limit, offset)
        where = []
        for column, value in (
            (CityRefusal.datacenter_id, datacenter_id),
            (CityRefusal.city_code, city),
            (CityRefusal.reason, reason),
        ):
            if value is not None:
                where.append(column == value)
        rows = self.session.scalars(
            select(CityRefusal)
            .where(*where)
            .order_by(CityRefusal.refused_at.desc(), CityRefusal.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        total = self.session.scalar(
            select(func.count()).select_from(CityRefusal).where(*where)
        )
        self.session.rollback()
        return [_refusal(row) for row in rows], total

    def city_refusal(self, refusal_id: Any) -> dict[str, Any]:
        row = (
            self.session.get(CityRefusal, refusal_id)
            if isinstance(refusal_id, int) and not isinstance(refusal_id, bool)
            else None
        )
        self.session.rollback()
        if row is None:
            raise NotFound("refusal_not_found", f"no city refusal {refusal_id!r}")
        return _refusal(row)

    def mark_replayed(self, refusal_id: int, now: datetime) -> dict[str, Any]:
        with self._transaction():
            row = self.session.get(CityRefusal, refusal_id)
            if row is None:
                raise NotFound("refusal_not_found", f"no city refusal {refusal_id!r}")
            row.replayed_at, row.outcome = now, None
            found = _refusal(row)
        return found

    def city_holds(
        self,
        datacenter_id: str | None,
        city: str | None,
        status: str | None,
        limit: int,
        offset: int,
    ) -> tuple[list[dict[str, Any]], int]:
        limit, offset = _page(limit, offset)
        if status is not None and status not in HOLD_STATUSES:
            raise InvalidRequest(
                "invalid_status", f"status must be one of {', '.join(HOLD_STATUSES)}"
            )
        where = []
        for column, value in (
            (CityHold.datacenter_id, datacenter_id),
            (CityHold.city_code, city),
            (CityHold.status, status),
        ):
            if value is not None:
                where.append(column == value)
        rows = self.session.scalars(
            select(CityHold)
            .where(*where)
            .order_by(CityHold.held_at.desc(), CityHold.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        total = self.session.scalar(
            select(func.count()).select_from(CityHold).where(*where)
        )
        self.session.rollback()
        return [_hold(row) for row in rows], total

    def refusal_counts(
        self, since: datetime, datacenter_id: str | None
    ) -> list[dict[str, Any]]:
        """Refusals and holds since ``since`` per data centre and reason."""
        counts = []
        for kind, model, at in (
            ("refused", CityRefusal, CityRefusal.refused_at),
            ("held", CityHold, CityHold.held_at),
        ):
            where = [at >= since]
            if datacenter_id is not None:
                where.append(model.datacenter_id == datacenter_id)
            counts += [
                {"datacenter_id": dc, "kind": kind, "reason": reason, "count": n}
                for dc, reason, n in self.session.execute(
                    select(model.datacenter_id, model.reason, func.count())
                    .where(*where)
                    .group_by(model.datacenter_id, model.reason)
                    .order_by(model.datacenter_id, model.reason)
                )
            ]
        self.session.rollback()
        return counts

    def review_queues(self, city: str | None) -> list[dict[str, Any]]:
        """Per city, its records waiting for review: how many, the subsidy
        they would pay, and when the oldest was held."""
        where = [CityHold.status == "held"]
        if city is not None:
            where.append(CityHold.city_code == city)
        queues = [
            {
                "city": code,
                "waiting": int(waiting),
                "subsidy_fen": int(subsidy or 0),
                "oldest_held_at": oldest,
            }
            for code, waiting, subsidy, oldest in self.session.execute(
                select(
                    CityHold.city_code,
                    func.count(),
                    func.sum(CityHold.subsidy_fen),
                    func.min(CityHold.held_at),
                )
                .where(*where)
                .group_by(CityHold.city_code)
                .order_by(CityHold.city_code)
            )
        ]
        self.session.rollback()
        return queues


def _refusal(row: CityRefusal) -> dict[str, Any]:
    return {
        "id": row.id,
        "city": row.city_code,
        "datacenter_id": row.datacenter_id,
        "record_id": row.record_id,
        "voucher_code": row.voucher_code,
        "reason": row.reason,
        "detail": row.detail,
        "refused_at": row.refused_at,
        "replayed_at": row.replayed_at,
        "replay_outcome": row.outcome,
    }


def _hold(row: CityHold) -> dict[str, Any]:
    return {
        "id": row.id,
        "city": row.city_code,
        "datacenter_id": row.datacenter_id,
        "record_id": row.record_id,
        "voucher_code": row.voucher_code,
        "reason": row.reason,
        "evidence": row.evidence,
        "subsidy_fen": row.subsidy_fen,
        "status": row.status,
        "held_at": row.held_at,
        "decided_at": row.decided_at,
        "decided_by": row.decided_by,
        "decision_reason": row.decision_reason,
        "released_fen": row.released_fen,
    }

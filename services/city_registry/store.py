"""The registry's database, behind the one wrapper its entrypoints use.

:class:`RegistryStore` turns the domain's decisions into SQL. Counters move by
``UPDATE … SET x = x + :delta`` and rows appear by insert-if-absent, so that
competing consumers (several registry copies, several workers) never lose an
update; a federation event is claimed in ``processed_events`` in the same
transaction as its effects, so it is applied at most once.

:class:`RegistryDatabase` is the nameko dependency: one store per worker, and
the deploy/ seed applied in ``setup()``, before any entrypoint starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from nameko import config
from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.city_registry.credentials import CredentialsStore
from services.city_registry.domain import events, prefixes, seeds
from services.city_registry.domain.reconciliation import RECONCILED_FIELDS
from services.city_registry.domain.seeds import SeedError
from services.city_registry.domain.state import (
    FIGURES,
    CityState,
    DatacenterState,
    InventoryItem,
    ProgramState,
)
from services.city_registry.models import (
    City,
    Datacenter,
    ProcessedEvent,
    Program,
    Voucher,
)
from services.city_registry.parking_store import ParkingStore
from services.city_registry.review_store import ReviewStore
from services.common.config import DEPLOY_DIR
from services.common.db import Database, retry_on_conflict

log = logging.getLogger("computenet.city_registry")
T = TypeVar("T")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def read_deploy_dir(
    deploy_dir: str | Path,
) -> tuple[list[CityState], list[DatacenterState]]:
    """Cities from ``cities/*.yaml``, data centres from ``datacenters.yaml``."""
    root = Path(deploy_dir)
    if not root.is_dir():
        raise SeedError(f"{root}: DEPLOY_DIR is not a directory")

    def load(path: Path) -> Any:
        try:
            return yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SeedError(f"{path}: {exc}") from exc

    cities = [
        seeds.parse_city_seed(load(path), str(path))
        for path in sorted((root / "cities").glob("*.yaml"))
    ]
    dc_file = root / "datacenters.yaml"
    datacenters = (
        seeds.parse_datacenter_seeds(load(dc_file), str(dc_file))
        if dc_file.is_file()
        else []
    )
    return cities, datacenters


class RegistryStore(CredentialsStore, ReviewStore, ParkingStore):
    """Queries and updates of the registry's tables, on one session (keys and
    tokens: :class:`~services.city_registry.credentials.CredentialsStore`;
    cities' refusals and holds: :class:`~.review_store.ReviewStore`; events
    set aside: :class:`~.parking_store.ParkingStore`)."""

    def __init__(self, session: Session):
        self.session = session

    # ------------------------------------------------------------ helpers

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Commit what the block did, or roll it back and re-raise."""
        try:
            yield
            self.session.commit()
        except Exception:
            self.session.rollback()
            raise

    def _insert_absent(self, model: type, **values: Any) -> bool:
        """INSERT … ON CONFLICT DO NOTHING; True if the row is new."""
        dialect = self.session.get_bind().dialect.name
        module = postgresql if dialect == "postgresql" else sqlite
        statement = (
            module.insert(model)
            .values(**values)
            .on_conflict_do_nothing()
            # RETURNING, not rowcount: drivers do not all report rowcount here.
            .returning(*model.__table__.primary_key.columns)
        )
        return self.session.execute(statement).first() is not None

    def _ensure_city(self, code: str) -> None:
        self._insert_absent(City, code=code, name=code)

    def _ensure_program(self, city: str, program_id: str) -> None:
        self._insert_absent(Program, city_code=city, id=program_id)

    # ------------------------------------------------------------ seed

    def seed(self, cities: list[CityState], datacenters: list[DatacenterState]) -> None:
        """Upsert what deploy/ lists; idempotent, and keys and money untouched.

        Each city gets its voucher prefix reserved, the one its file asks for
        when free; a city that holds one keeps it.
        """
        _retry_on_conflict(lambda: self._seed(cities, datacenters), self.session)

    def _seed(
        self, cities: list[CityState], datacenters: list[DatacenterState]
    ) -> None:
        with self._transaction():
            for city in cities:
                self._ensure_city(city.code)
                self.session.execute(
                    update(City)
                    .where(City.code == city.code)
                    .values(name=city.name, region=city.region)
                )
                self._reserve_prefix(city.code, city.voucher_prefix)
            for dc in datacenters:
                values = {
                    "name": dc.name,
                    "operator": dc.operator,
                    "city": dc.city,
                    "hub_region": dc.hub_region,
                    "government_run": dc.government_run,
                    "inventory": [vars(item) for item in dc.inventory],
                }
                if not self._insert_absent(Datacenter, id=dc.id, **values):
                    self.session.execute(
                        update(Datacenter)
                        .where(Datacenter.id == dc.id)
                        .values(**values)
                    )

    # ------------------------------------------------------------ read model

    def apply_event(
        self, event: str, body: dict[str, Any], received_at: datetime
    ) -> bool:
        """Apply one loaded federation event; False if it was seen before."""
        city = body["city"]
        with self._transaction():
            # Heartbeats are not claimed: applying one twice changes nothing
            # (the latest moment wins), and at one per city every few seconds
            # they would be most of processed_events.
            if event != "heartbeat" and not self._insert_absent(
                ProcessedEvent,
                event_id=body["event_id"],
                event=event,
                city_code=city,
                processed_at=received_at,
            ):
                self.session.rollback()
                return False
            self._ensure_city(city)
            if event == "heartbeat":
                self._heartbeat(
                    city, events.heartbeat_moment(body["occurred_at"], received_at)
                )
            elif event == "program_published":
                self._publish(city, body)
            elif event == "binding_changed":
                pass  # claimed above, so a redelivery is seen; no figures move
            elif event in events.REVIEW_EVENTS:
                self.apply_review_event(city, event, body, received_at)
            else:
                self._book(city, event, body)
            return True

    def _heartbeat(self, city: str, moment: datetime) -> None:
        self.session.execute(
            update(City)
            .where(
                City.code == city,
                or_(City.last_heartbeat_at.is_(None), City.last_heartbeat_at < moment),
            )
            .values(last_heartbeat_at=moment)
        )

    def _publish(self, city: str, body: dict[str, Any]) -> None:
        # Never the voucher prefix: that is reserved at admission, and an
        # event claiming another is refused before it gets here.
        details = {
            key: body[key] for key in ("name", "region") if body.get(key) is not None
        }
        if details:
            self.session.execute(
                update(City).where(City.code == city).values(**details)
            )
        for program in body["programs"]:
            self._ensure_program(city, program["id"])
            self.session.execute(
                update(Program)
                .where(Program.city_code == city, Program.id == program["id"])
                .values(
                    kind=program["kind"],
                    budget_fen=program["budget_fen"],
                    rate_bp=program["rate_bp"],
                    rules_version=program["rules_version"],
                    rules_sha256=program["rules_sha256"],
                    terms=events.program_terms(program),
                )
            )

    def _book(self, city: str, event: str, body: dict[str, Any]) -> None:
        delta = events.ledger_delta(event, body)
        program_id = body.get("program_id")
        if event == "voucher_issued":
            self._insert_absent(
                Voucher,
                code=body["voucher_code"],
                city_code=city,
                program_id=program_id,
            )
        elif program_id is None:
            program_id = self.session.scalar(
                select(Voucher.program_id).where(
                    Voucher.code == body["voucher_code"], Voucher.city_code == city
                )
            )
        if event == "voucher_released":
            self._close_voucher(city, body["voucher_code"], program_id)
        if delta.is_zero:
            return
        self.session.execute(
            update(City).where(City.code == city).values(**_increments(City, delta))
        )
        if program_id is None:
            # Still counted for the city; the program is named when its
            # voucher_issued arrives, which an unordered replay may deliver later.
            log.warning(
                "%s %s of voucher %s: program unknown, booked to the city only",
                city,
                event,
                body["voucher_code"],
            )
            return
        self._ensure_program(city, program_id)
        self.session.execute(
            update(Program)
            .where(Program.city_code == city, Program.id == program_id)
            .values(**_increments(Program, delta))
        )

    def _close_voucher(self, city: str, code: str, program_id: str | None) -> None:
        """The first release of a voucher ends it: one fewer active voucher."""
        closed = self.session.execute(
            update(Voucher)
            .where(
                Voucher.code == code,
                Voucher.city_code == city,
                Voucher.released_at.is_(None),
            )
            .values(released_at=_utcnow())
            .returning(Voucher.code)
        ).first()
        if closed is None:
            return
        self.session.execute(
            update(City)
            .where(City.code == city)
            .values(vouchers_closed=City.vouchers_closed + 1)
        )
        if program_id is not None:
            self.session.execute(
                update(Program)
                .where(Program.city_code == city, Program.id == program_id)
                .values(vouchers_closed=Program.vouchers_closed + 1)
            )

    def cities(self) -> list[CityState]:
        programs: dict[str, list[ProgramState]] = {}
        for row in self.session.scalars(select(Program)):
            programs.setdefault(row.city_code, []).append(_program_state(row))
        return [
            _city_state(row, programs.get(row.code, []))
            for row in self.session.scalars(select(City).order_by(City.code))
        ]

    def voucher_prefix(self, code: str) -> str | None:
        """The prefix reserved for city ``code``, or None."""
        return self.session.scalar(select(City.voucher_prefix).where(City.code == code))

    def city(self, code: str) -> CityState | None:
        row = self.session.get(City, code)
        if row is None:
            return None
        programs = self.session.scalars(
            select(Program).where(Program.city_code == code)
        )
        return _city_state(row, [_program_state(p) for p in programs])

    # ------------------------------------------------------------ data centres

    def datacenters(self) -> list[DatacenterState]:
        rows = self.session.scalars(select(Datacenter).order_by(Datacenter.id))
        return [_datacenter_state(row) for row in rows]

    def datacenter(self, datacenter_id: str) -> DatacenterState | None:
        row = self.session.get(Datacenter, datacenter_id)
        return _datacenter_state(row) if row is not None else None

    # ------------------------------------------------------------ federation

    def admit_city(
        self, code: str, name: str, now: datetime, voucher_prefix: str | None = None
    ) -> str:
        """``admitted`` (new or seeded city), ``pending`` (admitted, its
        credentials not delivered: :meth:`credentials_delivered` was not
        called), ``exists`` or ``removed``.

        An admitted city has its voucher prefix reserved: ``voucher_prefix``
        if no other city holds it, else one derived from its code; a seeded
        city keeps the one it holds.
        """
        return _retry_on_conflict(
            lambda: self._admit_city(code, name, now, voucher_prefix), self.session
        )

    def _admit_city(
        self, code: str, name: str, now: datetime, voucher_prefix: str | None
    ) -> str:
        with self._transaction():
            self._insert_absent(City, code=code, name=name, created_at=now)
            row = self.session.get(City, code, with_for_update=True)
            if row.removed_at is not None:
                outcome = "removed"
            elif row.credentials_pending_since is not None:
                outcome = "pending"  # admitted, its credentials never delivered
            elif row.admitted_at is not None:
                outcome = "exists"
            else:
                row.admitted_at, row.name = now, name
                row.credentials_pending_since = now
                self.session.flush()
                self._reserve_prefix(code, voucher_prefix)
                outcome = "admitted"
            return outcome

    def _reserve_prefix(self, code: str, requested: str | None) -> str:
        """The prefix of city ``code``, reserved now if it has none (in the
        caller's transaction; a rival reserving the same one at once makes
        the commit fail with IntegrityError, and the caller try again)."""
        held = self.voucher_prefix(code)
        if held is not None:
            if requested is not None and requested != held:
                log.warning(
                    "%s asks for voucher prefix %s but holds %s: it keeps %s",
                    code,
                    requested,
                    held,
                    held,
                )
            return held
        taken = set(
            self.session.scalars(
                select(City.voucher_prefix).where(City.voucher_prefix.is_not(None))
            )
        )
        prefix = prefixes.assign(code, requested, taken)
        if requested is not None and prefix != requested:
            log.warning(
                "%s asks for voucher prefix %s, held by another city: %s reserved",
                code,
                requested,
                prefix,
            )
        self.session.execute(
            update(City).where(City.code == code).values(voucher_prefix=prefix)
        )
        return prefix

    def remove_city(self, code: str, now: datetime) -> bool:
        return self._mark_removed(City, code, now)

    def add_datacenter(self, dc: DatacenterState, now: datetime) -> str:
        """``added``; ``pending`` if registered before and its credentials
        never delivered (the row then takes this registration: nobody could
        act as it yet); ``exists`` if the id is taken (also by a removed or
        a seeded data centre)."""
        fields = {
            "name": dc.name,
            "operator": dc.operator,
            "city": dc.city,
            "hub_region": dc.hub_region,
            "government_run": dc.government_run,
            "inventory": [vars(item) for item in dc.inventory],
        }
        with self._transaction():
            if self._insert_absent(
                Datacenter,
                id=dc.id,
                created_at=now,
                credentials_pending_since=now,
                **fields,
            ):
                return "added"
            row = self.session.get(Datacenter, dc.id, with_for_update=True)
            if row.removed_at is not None or row.credentials_pending_since is None:
                return "exists"
            for name, value in fields.items():
                setattr(row, name, value)
            return "pending"

    def credentials_delivered(self, model: type, key: str) -> None:
        """The member's credentials are in an answer: onboarding is done."""
        with self._transaction():
            pk = model.__table__.primary_key.columns[0]
            self.session.execute(
                update(model).where(pk == key).values(credentials_pending_since=None)
            )

    def remove_datacenter(self, datacenter_id: str, now: datetime) -> bool:
        """Mark removed and revoke every key; False if unknown or removed."""
        if not self._mark_removed(Datacenter, datacenter_id, now):
            return False
        self.revoke_key(datacenter_id, None, now)
        return True

    def _mark_removed(self, model: type, key: str, now: datetime) -> bool:
        with self._transaction():
            pk = model.__table__.primary_key.columns[0]
            done = self.session.execute(
                update(model)
                .where(pk == key, model.removed_at.is_(None))
                .values(removed_at=now)
                .returning(pk)
            ).first()
            return done is not None

    def rebuild_city(self, code: str, totals: dict[str, Any]) -> None:
        """Set a city's read model to its ledger's totals (``ledger_totals``).

        Events already applied stay claimed; events still in flight will be
        applied on top, so rebuild a city while it is quiet, then reconcile.
        """
        with self._transaction():
            figures = {k: 0 for k in RECONCILED_FIELDS[1:]}
            for program in totals.get("programs") or []:
                self._ensure_program(code, program["program_id"])
                values = {key: program.get(key) or 0 for key in RECONCILED_FIELDS}
                self.session.execute(
                    update(Program)
                    .where(
                        Program.city_code == code, Program.id == program["program_id"]
                    )
                    .values(**values)
                )
                for key in figures:
                    figures[key] += values[key]
            self.session.execute(
                update(City).where(City.code == code).values(**figures)
            )


# A prefix reservation racing another registry copy's: tried again this often.
PREFIX_ATTEMPTS = 5


def _retry_on_conflict(attempt: Callable[[], T], session: Session) -> T:
    """``attempt()``, again when a unique key (a voucher prefix) was taken
    by a concurrent transaction between our read and our commit."""
    return retry_on_conflict(attempt, PREFIX_ATTEMPTS, session.rollback)


def _increments(model: type, delta: events.LedgerDelta) -> dict[str, Any]:
    return {
        "committed_fen": model.committed_fen + delta.committed_fen,
        "redeemed_fen": model.redeemed_fen + delta.redeemed_fen,
        "released_fen": model.released_fen + delta.released_fen,
        "vouchers_issued": model.vouchers_issued + delta.vouchers_issued,
    }


def _columns(row: Any, *names: str) -> dict[str, Any]:
    return {name: getattr(row, name) for name in names}


def _program_state(row: Program) -> ProgramState:
    return ProgramState(
        **_columns(
            row,
            *("id", "kind", "budget_fen", "rate_bp", "rules_version", "rules_sha256"),
            *("terms", *FIGURES),
        )
    )


def _city_state(row: City, programs: list[ProgramState]) -> CityState:
    return CityState(
        **_columns(
            row,
            *("code", "name", "region", "voucher_prefix", "last_heartbeat_at"),
            *("admitted_at", "removed_at", *FIGURES),
        ),
        programs=programs,
    )


def _datacenter_state(row: Datacenter) -> DatacenterState:
    return DatacenterState(
        **_columns(row, "id", "name", "operator", "city", "hub_region"),
        government_run=row.government_run,
        inventory=[InventoryItem(**item) for item in row.inventory or []],
        removed=row.removed_at is not None,
    )


class RegistryDatabase(Database):
    """Injects a :class:`RegistryStore`; seeds from DEPLOY_DIR in ``setup()``.

    nameko sets up every extension before it starts any, so the seed is in
    place before the first RPC or event is handled.
    """

    def setup(self):
        super().setup()
        deploy_dir = config.get(DEPLOY_DIR)
        if not deploy_dir:
            log.info("DEPLOY_DIR not set: nothing to seed")
            return
        cities, datacenters = read_deploy_dir(deploy_dir)
        session = self.sessionmaker()
        try:
            RegistryStore(session).seed(cities, datacenters)
        finally:
            session.close()
        log.info(
            "seeded %d cities and %d data centres from %s",
            len(cities),
            len(datacenters),
            deploy_dir,
        )

    def get_dependency(self, worker_ctx) -> RegistryStore:
        return RegistryStore(super().get_dependency(worker_ctx))

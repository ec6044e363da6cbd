"""Entrypoints of ``city_registry``, the national registry (docs/ARCHITECTURE.md).

RPC for the portal and metering, and the consumer of the federation events
that keeps the national read model. The rules are in ``domain/``, the SQL in
``store.py``, the answers' cache and the projection lock in ``dependencies.py``;
the RPCs of companies' tokens in ``company_tokens.py`` (mixed in).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import eventlet
import requests
from nameko import config
from nameko.timer import timer

import services.common.remote_errors  # noqa: F401 - errors cross RPC as themselves
from services.city_registry.broker import (
    Broker,
    city_permissions,
    city_username,
    datacenter_permissions,
    datacenter_username,
)
from services.city_registry.company_tokens import CompanyTokens, token_ttl_days
from services.city_registry.dependencies import (
    VIEW_CACHE_S,
    PrefixReservations,
    ProjectionLock,
    Views,
)
from services.city_registry.domain import (
    events,
    recommendations,
    reconciliation,
    seeds,
    tokens,
    views,
)
from services.city_registry.domain.state import DatacenterState
from services.city_registry.models import City, Datacenter
from services.city_registry.parking import Attempts, ParkedEvents
from services.city_registry.retention import RegistryRetention
from services.city_registry.review_rpc import ReviewEntrypoints
from services.city_registry.store import RegistryDatabase
from services.common import vouchercode
from services.common.amqp import (
    FEDERATION_EXCHANGE,
    RawMessage,
    SharedTopology,
    consume_raw,
    durable_queue,
)
from services.common.config import STALE_AFTER_S
from services.common.contracts import CITY_CODE
from services.common.errors import (
    EXPECTED,
    Conflict,
    InvalidRequest,
    NotFound,
    Unavailable,
)
from services.common.rpc import TRANSIENT
from services.common.rpc_access import ClusterRpc, ServiceRpc, rpc
from services.common.signing import new_key_id, new_secret
from services.common.units import utcnow

log = logging.getLogger("computenet.city_registry")

FEDERATION_QUEUE = "city_registry.federation"
DEFAULT_STALE_AFTER_S = 90
USAGE_WINDOW_HOURS = 24
# The portal waits for us; a slow metering must not make it wait for ever.
METERING_TIMEOUT_S = 3.0
# A week's figures aggregate seven days of rollups and capacity reports: they
# may take longer, up to this, still inside the portal's 10 s RPC timeout.
METERING_WEEK_TIMEOUT_S = 8.0
WEEK_HOURS = 7 * 24
# A city asked for its ledger (reconciliation, recommendations) must answer
# within this; a silent city is reported, not waited for.
CITY_TIMEOUT_S = 5.0
# metering's usage figures (GPU-seconds, utilisation over 24 h and 7 d) move
# slowly against what they cost to aggregate: asked at most this often.
USAGE_CACHE_S = 10.0
# How often the cities' usage queues are declared again (declare_city_queues).
CITY_QUEUES_INTERVAL_S = 600


def metering_timeout_s(window_hours: int) -> float:
    """How long to wait for metering's figures over ``window_hours``."""
    return min(
        METERING_TIMEOUT_S * max(1.0, window_hours / 24), METERING_WEEK_TIMEOUT_S
    )


def _stale_after_s() -> float:
    return float(config.get(STALE_AFTER_S) or DEFAULT_STALE_AFTER_S)


class CityRegistryService(
    RegistryRetention, CompanyTokens, ReviewEntrypoints, ParkedEvents
):
    name = "city_registry"

    topology = SharedTopology()
    store = RegistryDatabase()
    metering_rpc = ServiceRpc("metering", **TRANSIENT)
    cluster_rpc = ClusterRpc(**TRANSIENT)
    broker = Broker()
    view_cache = Views()
    projection_lock = ProjectionLock()
    attempts = Attempts()
    reserved_prefixes = PrefixReservations()

    # ------------------------------------------------------------ federation

    @consume_raw(
        durable_queue(FEDERATION_QUEUE, FEDERATION_EXCHANGE, events.ROUTING_KEYS),
        requeue_on_error=True,
    )
    def handle_federation_event(self, message: RawMessage) -> None:
        """Project one city event; a database fault requeues it, nothing is
        lost; what cannot be applied is set aside (``parking.py``)."""
        self.project_or_park(message)

    @timer(interval=CITY_QUEUES_INTERVAL_S, eager=True)
    def declare_city_queues(self) -> None:
        """Every city's usage queue exists, whether its service ever started
        or not (metering publishes usage_rated ``mandatory``): at start, and
        again now and then in case one was deleted."""
        codes = [city.code for city in self.store.cities() if city.removed_at is None]
        try:
            self.topology(codes)
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("could not declare the cities' usage queues")

    # ------------------------------------------------------------ cities

    @rpc(expected_exceptions=EXPECTED)
    def list_cities(self) -> list[dict[str, Any]]:
        now, stale = utcnow(), _stale_after_s()
        return [views.city_view(city, now, stale) for city in self.store.cities()]

    @rpc(expected_exceptions=EXPECTED)
    def get_city(self, code: str) -> dict[str, Any]:
        # Not the shape of a city code: not cached, not looked up.
        if not isinstance(code, str) or not CITY_CODE.match(code):
            raise NotFound("city_not_found", f"no city {code!r}", {"city": code})

        def view() -> dict[str, Any] | None:
            city = self.store.city(code)
            if city is None:
                return None
            return views.city_view(city, utcnow(), _stale_after_s())

        found = self.view_cache.get(f"city:{code}", view)
        if found is None:
            raise NotFound("city_not_found", f"no city {code!r}", {"city": code})
        return found

    @rpc(expected_exceptions=EXPECTED)
    def voucher_prefixes(self) -> dict[str, str]:
        return views.voucher_prefixes(self.store.cities())

    # ------------------------------------------------------------ data centres

    @rpc(expected_exceptions=EXPECTED)
    def list_datacenters(self) -> list[dict[str, Any]]:
        overview = self._usage_overview()
        return [views.datacenter_view(dc, overview) for dc in self.store.datacenters()]

    @rpc(expected_exceptions=EXPECTED)
    def get_datacenter(self, datacenter_id: str) -> dict[str, Any]:
        return views.datacenter_view(
            self._datacenter(datacenter_id), self._usage_overview()
        )

    @rpc(expected_exceptions=EXPECTED)
    def datacenter_signing_keys(self, datacenter_id: str) -> list[dict[str, str]]:
        self._datacenter(datacenter_id)
        return self.store.active_keys(datacenter_id)

    @rpc(expected_exceptions=EXPECTED)
    def issue_datacenter_key(self, datacenter_id: str) -> dict[str, str]:
        key_id, secret = new_key_id(datacenter_id), new_secret()
        if not self.store.add_key(datacenter_id, key_id, secret, utcnow()):
            raise self._datacenter_not_found(datacenter_id)
        return {"key_id": key_id, "secret": secret}

    # ------------------------------------------------------------ tokens

    @rpc(expected_exceptions=EXPECTED)
    def issue_token(
        self, role: str, ttl_days: int | None = None, expires_at: str | None = None
    ) -> str:
        """A new token of ``role``, shown only here; it expires after
        ``ttl_days``, at ``expires_at`` (ISO 8601), or after TOKEN_TTL_DAYS."""
        role = tokens.validate_role(role)
        now = utcnow()
        expiry = tokens.token_expiry(
            now,
            ttl_days=ttl_days,
            expires_at=expires_at,
            default_ttl_days=token_ttl_days(),
        )
        token = tokens.new_token()
        self.store.add_token(
            tokens.token_digest(token),
            role,
            now,
            token_id=tokens.new_token_id(),
            expires_at=expiry,
        )
        return token

    @rpc(expected_exceptions=EXPECTED, sensitive_arguments=("token",))
    def authenticate(self, token: str) -> dict[str, str] | None:
        """``{"role"}`` of a token neither revoked nor expired, else None."""
        if not isinstance(token, str) or not token:
            return None
        role = self.store.role_for(tokens.token_digest(token), utcnow())
        return {"role": role} if role is not None else None

    @rpc(expected_exceptions=EXPECTED)
    def list_tokens(
        self, role: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        """Tokens (of ``role``), newest first: ``{"items", "total"}``; each
        ``{id, role, status, created_at, expires_at, revoked_at,
        last_used_at}``, never the secret or its digest."""
        if role is not None:
            role = tokens.validate_role(role)
        limit = max(1, min(int(limit), 1000))
        rows, total = self.store.tokens(role, limit=limit, offset=max(0, int(offset)))
        now = utcnow()
        return {"items": [tokens.token_view(row, now) for row in rows], "total": total}

    @rpc(expected_exceptions=EXPECTED)
    def revoke_token(self, token_id: str, role: str | None = None) -> dict[str, Any]:
        """Revoke one token by its id; with ``role``, only a token of that role
        (``NotFound token_not_found`` otherwise, as if there were none)."""
        found = None
        if isinstance(token_id, str) and tokens.TOKEN_ID.match(token_id):
            found = self.store.revoke_token(token_id, utcnow(), role)
        if found is None:
            raise NotFound(
                "token_not_found", f"no token {token_id!r}", {"id": token_id}
            )
        return tokens.token_view(found, utcnow())

    # ------------------------------------------------------------ national view

    @rpc(expected_exceptions=EXPECTED)
    def network_summary(self) -> dict[str, Any]:
        return self.public_view()["summary"]

    @rpc(expected_exceptions=EXPECTED)
    def public_view(self) -> dict[str, Any]:
        """The summary and every city's page in one answer: what the portal
        keeps in memory and serves to anyone without asking again."""
        return self.view_cache.get(
            "public",
            lambda: views.public_view(self._snapshot(), self._usage_overview()),
        )

    @rpc(expected_exceptions=EXPECTED)
    def national_overview(self) -> dict[str, Any]:
        """Per city, data centre and hub region, with 24 h and 7 d utilisation."""
        return self.view_cache.get(
            "overview",
            lambda: views.national_overview(
                self._snapshot(),
                self._usage_overview(),
                self._usage_overview(WEEK_HOURS),
            ),
        )

    # ------------------------------------------------------------ federation

    @rpc(expected_exceptions=EXPECTED)
    def admit_city(
        self, code: str, name: str, voucher_prefix: str | None = None
    ) -> dict[str, Any]:
        """Admit a city; its credentials are in this answer and nowhere else.

        Its voucher prefix is reserved now (``city.voucher_prefix`` of the
        answer): ``voucher_prefix`` if free, else one derived from its code.
        """
        code, name, requested = seeds.check_city_admission(code, name, voucher_prefix)
        outcome = self.store.admit_city(code, name, utcnow(), requested)
        if outcome not in ("admitted", "pending"):
            raise Conflict(
                f"city_{outcome}",
                f"city {code} was admitted before ({outcome})",
                {"city": code},
            )
        role = f"city_admin:{code}"
        if outcome == "pending":
            log.warning("completing the admission of %s (its grant failed)", code)
            self.store.revoke_tokens(role, utcnow())  # never delivered
        password = secrets.token_urlsafe(24)
        username = city_username(code)
        self._grant(username, password, city_permissions(code))
        self.topology([code])  # its usage waits there until its service starts
        token = self.issue_token(role)
        self.store.credentials_delivered(City, code)
        self.view_cache.clear()
        return {
            "city": self.get_city(code),
            "admin_token": token,
            "amqp": {"username": username, "password": password},
        }

    @rpc(expected_exceptions=EXPECTED)
    def remove_city(self, code: str) -> dict[str, Any]:
        """Delete its AMQP user and revoke its tokens; its history stays."""
        self.get_city(code)  # NotFound
        if not self.store.remove_city(code, utcnow()):
            raise Conflict("city_removed", f"city {code} is already removed")
        self.broker.delete_user(city_username(code))
        self.store.revoke_tokens(f"city_admin:{code}", utcnow())
        self.view_cache.clear()
        return self.get_city(code)

    @rpc(expected_exceptions=EXPECTED)
    def register_datacenter(self, registration: dict) -> dict[str, Any]:
        """Register; key id, secret, AMQP user and token are returned only here."""
        dc = seeds.parse_datacenter_registration(registration)
        outcome = self.store.add_datacenter(dc, utcnow())
        if outcome == "exists":
            raise Conflict(
                "datacenter_exists", f"data centre {dc.id} exists", {"id": dc.id}
            )
        role = f"datacenter:{dc.id}"
        if outcome == "pending":
            # What the failed try issued was never delivered: revoked.
            log.warning("completing the registration of %s (its grant failed)", dc.id)
            self.store.revoke_key(dc.id, None, utcnow())
            self.store.revoke_tokens(role, utcnow())
        key = self.issue_datacenter_key(dc.id)
        password = secrets.token_urlsafe(24)
        username = datacenter_username(dc.id)
        self._grant(username, password, datacenter_permissions(dc.id))
        token = self.issue_token(role)
        self.store.credentials_delivered(Datacenter, dc.id)
        self.view_cache.clear()
        return {
            "datacenter": views.datacenter_view(dc, None),
            "key_id": key["key_id"],
            "secret": key["secret"],
            "amqp": {"username": username, "password": password},
            "token": token,
        }

    def _grant(self, username: str, password: str, permissions) -> None:
        """The broker grant, or 503 ``broker_unavailable``: the member stays
        pending, and the same admission or registration again completes it."""
        try:
            self.broker.grant(username, password, permissions)
        except requests.RequestException as exc:
            log.error("broker grant for %s failed: %s", username, exc)
            raise Unavailable(
                "broker_unavailable",
                "the broker's management API did not grant the member's "
                "user; the member is kept, and the same request again "
                "completes its onboarding",
                {"username": username},
            ) from exc

    @rpc(expected_exceptions=EXPECTED)
    def grant_member_credentials(self, kind: str, member_id: str) -> dict[str, str]:
        """A new password for a member's broker user, with exactly its
        permissions: rotation of a leaked password, and how the launcher
        starts the preset cities and data centres as themselves. The old
        password stops working at once (RabbitMQ closes nothing open)."""
        if kind == "city":
            city = self.store.city(member_id) if isinstance(member_id, str) else None
            if city is None:
                raise NotFound(
                    "city_not_found", f"no city {member_id!r}", {"city": member_id}
                )
            removed = city.removed_at is not None
            username, permissions = (
                city_username(city.code),
                city_permissions(city.code),
            )
        elif kind == "datacenter":
            dc = self._datacenter(member_id)
            removed = dc.removed
            username = datacenter_username(dc.id)
            permissions = datacenter_permissions(dc.id)
        else:
            raise InvalidRequest(
                "invalid_member_kind",
                "kind must be city or datacenter",
                {"kind": [kind]},
            )
        if removed:
            raise Conflict(f"{kind}_removed", f"{member_id} was removed")
        password = secrets.token_urlsafe(24)
        self._grant(username, password, permissions)
        return {"username": username, "password": password}

    @rpc(expected_exceptions=EXPECTED)
    def list_datacenter_keys(self, datacenter_id: str) -> list[dict[str, Any]]:
        self._datacenter(datacenter_id)
        return [
            {
                "key_id": key["key_id"],
                "created_at": views.timestamp(key["created_at"]),
                "revoked_at": views.timestamp(key["revoked_at"]),
                "active": key["revoked_at"] is None,
            }
            for key in self.store.keys(datacenter_id)
        ]

    @rpc(expected_exceptions=EXPECTED)
    def revoke_datacenter_key(self, datacenter_id: str, key_id: str) -> dict:
        self._datacenter(datacenter_id)
        if not self.store.revoke_key(datacenter_id, key_id, utcnow()):
            raise NotFound(
                "key_not_found",
                f"{datacenter_id} has no active key {key_id!r}",
                {"key_id": key_id},
            )
        return {"datacenter_id": datacenter_id, "revoked": key_id}

    @rpc(expected_exceptions=EXPECTED)
    def remove_datacenter(self, datacenter_id: str) -> dict[str, Any]:
        self._datacenter(datacenter_id)
        if not self.store.remove_datacenter(datacenter_id, utcnow()):
            raise Conflict("datacenter_removed", f"{datacenter_id} is already removed")
        self.broker.delete_user(datacenter_username(datacenter_id))
        self.store.revoke_tokens(f"datacenter:{datacenter_id}", utcnow())
        self.view_cache.clear()
        return views.datacenter_view(self._datacenter(datacenter_id), None)

    # ------------------------------------------------------------ reconciliation

    @rpc(expected_exceptions=EXPECTED)
    def reconcile(self) -> dict[str, Any]:
        """Ask every live city for its ledger totals; name every drift."""
        now, stale = utcnow(), _stale_after_s()
        report = {"as_of": views.timestamp(now), "cities": {}, "drift": []}
        for city in self.store.cities():
            status = views.city_view(city, now, stale)["status"]
            if status != "live":
                report["cities"][city.code] = {"status": status, "checked": False}
                continue
            try:
                totals = self._city_call(city.code, "ledger_totals")
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                report["cities"][city.code] = {
                    "status": status,
                    "checked": False,
                    "error": f"{exc.__class__.__name__}: {exc}"[:300],
                }
                continue
            drift = reconciliation.ledger_drift(city, totals)
            report["cities"][city.code] = {
                "status": status,
                "checked": True,
                "drift": len(drift),
                "ledger_as_of": totals.get("as_of"),
            }
            report["drift"].extend(drift)
        report["ok"] = not report["drift"] and all(
            entry["checked"]
            for entry in report["cities"].values()
            if entry["status"] == "live"
        )
        return report

    @rpc(expected_exceptions=EXPECTED)
    def rebuild_read_model(self, city: str | None = None) -> dict[str, Any]:
        """Reset the money of ``city`` (or every live city) to its ledger's."""
        now, stale = utcnow(), _stale_after_s()
        codes = (
            [self.get_city(city)["code"]]
            if city is not None
            else [
                c.code
                for c in self.store.cities()
                if views.city_view(c, now, stale)["status"] == "live"
            ]
        )
        for code in codes:
            self.store.rebuild_city(code, self._city_call(code, "ledger_totals"))
        self.view_cache.clear()
        return {"rebuilt": codes}

    # ------------------------------------------------------------ recommendations

    @rpc(expected_exceptions=EXPECTED)
    def recommend_datacenters(
        self,
        gpu_model: str,
        gpus: int,
        hours: float,
        voucher: str | None = None,
        company_id: str | None = None,
    ) -> dict[str, Any]:
        """Ranked data centres; with ``voucher``, net of its subsidy.

        The portal lets only the voucher's company, its city and the national
        admin name a voucher; for a company it passes ``company_id`` and a
        voucher held by another is ``voucher_not_found`` here too.
        """
        terms = self._voucher_terms(voucher, company_id) if voucher else None
        ranked = recommendations.recommend(
            self.store.datacenters(),
            self._usage_overview(),
            gpu_model,
            gpus,
            hours,
            terms,
        )
        return {
            "gpu_model": gpu_model,
            "gpus": gpus,
            "hours": hours,
            "voucher": voucher,
            "items": ranked,
        }

    def _voucher_terms(
        self, code: str, company_id: str | None = None
    ) -> recommendations.VoucherTerms:
        """The voucher's program terms: balance from its city (RPC), rate and
        bonuses from the city's latest ``program_published``."""
        try:
            prefix = vouchercode.parse(code)
        except vouchercode.InvalidVoucherCode as exc:
            raise InvalidRequest("invalid_voucher_code", str(exc)) from None
        city_code = views.voucher_prefixes(self.store.cities()).get(prefix)
        city = self.store.city(city_code) if city_code else None
        if city is None:
            raise NotFound("voucher_not_found", f"no city issues {prefix}- vouchers")
        voucher = self._city_call(city.code, "get_voucher", code.strip().upper())
        if company_id is not None and voucher.get("company_id") != company_id:
            raise NotFound("voucher_not_found", f"no voucher {code.strip().upper()}")
        if voucher.get("status") not in (None, "active"):
            raise Conflict(
                "voucher_not_active", f"voucher is {voucher['status']}", {"code": code}
            )
        program = next(
            (p for p in city.programs if p.id == voucher["program_id"]), None
        )
        if program is None or program.rate_bp is None:
            raise Conflict(
                "program_unknown",
                f"{city.code} has not published program {voucher['program_id']}",
            )
        return recommendations.voucher_terms(
            city.code, program, voucher.get("balance_fen")
        )

    def _assigned_prefix(self, city: str) -> str | None:
        return self.reserved_prefixes.of(city, self.store.voucher_prefix)

    def _city_call(self, city: str, method: str, *args: Any) -> Any:
        with eventlet.Timeout(CITY_TIMEOUT_S):
            return getattr(self.cluster_rpc[f"vouchers_{city}"], method)(*args)

    # ------------------------------------------------------------ helpers

    def _snapshot(self) -> views.Snapshot:
        """Every city and data centre of the read model, as of now."""
        return views.Snapshot.of(
            self.store.cities(), self.store.datacenters(), utcnow(), _stale_after_s()
        )

    def _datacenter(self, datacenter_id: str) -> DatacenterState:
        dc = (
            self.store.datacenter(datacenter_id)
            if isinstance(datacenter_id, str)
            else None
        )
        if dc is None:
            raise self._datacenter_not_found(datacenter_id)
        return dc

    @staticmethod
    def _datacenter_not_found(datacenter_id: Any) -> NotFound:
        return NotFound(
            "datacenter_not_found",
            f"no data centre {datacenter_id!r}",
            {"datacenter_id": datacenter_id},
        )

    def _usage_overview(
        self, window_hours: int = USAGE_WINDOW_HOURS
    ) -> dict[str, Any] | None:
        """metering's figures, or None when it is down, absent or slow.

        The registry's own answers (money, inventories) must not fail because
        metering does: GPU-seconds and utilisation are then null.
        """

        def ask() -> dict[str, Any] | None:
            try:
                with eventlet.Timeout(metering_timeout_s(window_hours)):
                    return self.metering_rpc.usage_overview(window_hours=window_hours)
            except eventlet.Timeout:
                log.warning("metering.usage_overview timed out")
            except Exception as exc:  # noqa: BLE001 - any failure means "unknown"
                log.warning("metering.usage_overview failed: %r", exc)
            return None

        # Aggregating every rollup and capacity report is metering's dearest
        # query (at 10⁷ records and 1 000 data centres: ~0.25 s for 24 h,
        # ~1.7 s for 7 days, most of it Python that holds metering's hub). An
        # answer is kept USAGE_CACHE_S per day of window, so a 7-day figure is
        # asked for every 70 s; a failure only as long as the money views.
        kept = USAGE_CACHE_S * max(1.0, window_hours / 24)
        return self.view_cache.get(
            f"usage:{window_hours}",
            ask,
            ttl=lambda answer: kept if answer is not None else VIEW_CACHE_S,
        )

"""Who a broker user is, and which RPC methods each kind of member may call.

DESIGN.md §8: every member can do only its own part. On the bus the broker
knows who publishes: each member connects with its own user (``city.<code>``,
``dc.<id>``, ``vendor.<id>``), and RabbitMQ refuses a message whose
``user_id`` property is not the user of the connection that published it
(validated user-id). A service serving an RPC reads that validated
``user_id`` and looks the method up in :data:`RPC_CALLERS`, the one table of
method → allowed callers (docs/security.md is generated from it and tested
to match). A method missing from the table can be called by nobody.

The national side (the registry, metering, the portal, the launcher, the
CLI) connects as a national user: ``national.<name>`` or one of the
bootstrap users named in the configuration (``guest`` on a local run, which
RabbitMQ admits only over loopback). Members never reach a national
operation: today every RPC method is the national side's, because no member
process calls RPC at all (a city's service only serves its queue and talks
over events; a data centre only publishes usage).

Pure: no nameko, no I/O, so the docs generator and unit tests can import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

NATIONAL = "national"
CITY = "city"
DATACENTER = "datacenter"
DATA_VENDOR = "data_vendor"

# Config key: broker users that belong to the national side besides
# ``national.*`` (a list, or a comma-separated string). Default: guest.
NATIONAL_BROKER_USERS = "NATIONAL_BROKER_USERS"
DEFAULT_NATIONAL_USERS = ("guest",)

_MEMBER_PREFIXES = {"city.": CITY, "dc.": DATACENTER, "vendor.": DATA_VENDOR}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass(frozen=True)
class Principal:
    """A broker user as a principal: its kind and, for members, its id."""

    kind: str
    member_id: str | None = None

    def __str__(self) -> str:
        return self.kind if self.member_id is None else f"{self.kind}:{self.member_id}"


def national_users(configured: object = None) -> frozenset[str]:
    """The bootstrap users configured as national (``NATIONAL_BROKER_USERS``)."""
    if configured is None or configured == "":
        return frozenset(DEFAULT_NATIONAL_USERS)
    if isinstance(configured, str):
        return frozenset(u.strip() for u in configured.split(",") if u.strip())
    return frozenset(str(u) for u in configured)  # type: ignore[union-attr]


def principal_of(username: object, national: frozenset[str]) -> Principal | None:
    """The principal a (broker-validated) user name stands for, or None."""
    if not isinstance(username, str) or not username:
        return None
    if username in national or username.startswith("national."):
        return Principal(NATIONAL)
    for prefix, kind in _MEMBER_PREFIXES.items():
        if username.startswith(prefix):
            member = username[len(prefix) :]
            return Principal(kind, member) if _ID.match(member) else None
    return None


def username_of(amqp_uri: str) -> str:
    """The user an AMQP URI connects as (``guest`` when it names none); of a
    cluster's failover list (``amqp://…;amqp://…``), the first node's, which
    is every node's: users are cluster-wide."""
    first = amqp_uri.split(";", 1)[0].strip()
    return unquote(urlsplit(first).username or "guest")


def uri_as(amqp_uri: str, username: str, password: str) -> str:
    """``amqp_uri`` (scheme, host, port, vhost, options) as another user;
    each node of a failover list (``amqp://…;amqp://…``)."""
    if ";" in amqp_uri:
        return ";".join(
            uri_as(uri.strip(), username, password)
            for uri in amqp_uri.split(";")
            if uri.strip()
        )
    parts = urlsplit(amqp_uri)
    host = parts.hostname or "localhost"
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def service_kind(service_name: str) -> str:
    """``vouchers_shanghai`` → ``vouchers``: the table's key for a service."""
    return "vouchers" if service_name.startswith("vouchers_") else service_name


_NATIONAL_ONLY = frozenset({NATIONAL})

# service kind → method → who may call it. Every @rpc method of every service
# is listed (tests/unit/common/test_principals.py walks the services to hold
# this true both ways), so a new method cannot be forgotten: unlisted, it is
# refused to everyone.
RPC_CALLERS: dict[str, dict[str, frozenset[str]]] = {
    "city_registry": {
        method: _NATIONAL_ONLY
        for method in (
            # the public views, asked by the portal on anyone's behalf
            "list_cities",
            "get_city",
            "voucher_prefixes",
            "list_datacenters",
            "get_datacenter",
            "network_summary",
            "public_view",
            "national_overview",
            "recommend_datacenters",
            # keys and tokens: never to a member (a city asking for
            # datacenter_signing_keys would learn every centre's secret)
            "datacenter_signing_keys",
            "issue_datacenter_key",
            "list_datacenter_keys",
            "revoke_datacenter_key",
            "issue_token",
            "authenticate",
            "list_tokens",
            "revoke_token",
            "issue_company_token",
            "reissue_company_token",
            # membership
            "admit_city",
            "remove_city",
            "register_datacenter",
            "remove_datacenter",
            "grant_member_credentials",
            # the national read model
            "reconcile",
            "rebuild_read_model",
            # cities' refusals and holds (issue 15)
            "list_city_refusals",
            "get_city_refusal",
            "mark_refusal_replayed",
            "list_city_holds",
            "city_refusal_counts",
            "review_queues",
            # federation events set aside (issue 16)
            "list_parked_events",
            "replay_parked_event",
        )
    },
    "metering": {
        method: _NATIONAL_ONLY
        for method in (
            "usage_overview",
            "usage_figures",
            "usage_by_tenant",
            "usage_by_hour",
            "list_dead_letters",
            "replay_dead_letter",
            "replay_rated",
            "integrity_counts",
            # messages set aside after failing to apply (issue 16)
            "list_parked_events",
            "replay_parked_event",
        )
    },
    # A city's own service: called by the portal (for the city's staff, its
    # companies and the ministry, each checked there by token) and by the
    # registry (reconciliation, recommendations). Another city can't reach
    # it: the broker refuses its publish, and this table its user.
    "vouchers": {
        method: _NATIONAL_ONLY
        for method in (
            "apply",
            "get_voucher",
            "program_states",
            "list_applications",
            "get_application",
            "review_application",
            "revoke_voucher",
            "list_vouchers",
            "list_redemptions",
            # bindings: the portal lets only the holder decide
            "list_bindings",
            "authorise_binding",
            "withdraw_binding",
            "voucher_statement",
            # a voucher's month (issue 17): its holder, its city, national
            "monthly_statement",
            "program_statement",
            "ledger_totals",
            # the review queue and clawbacks (issue 15)
            "list_held",
            "decide_held",
            "claw_back",
            # usage-queue messages set aside (issue 16): the portal lets
            # the ministry and the city's own admin call them
            "list_parked_events",
            "replay_parked_event",
        )
    },
}


def may_call(service_name: str, method: str, caller: Principal | None) -> bool:
    """Whether ``caller`` may invoke ``service_name.method`` (deny by default)."""
    if caller is None:
        return False
    allowed = RPC_CALLERS.get(service_kind(service_name), {}).get(method)
    if not allowed:
        return False
    return caller.kind in allowed


def may_publish_for(user_id: object, member_id: str, national: frozenset[str]) -> bool:
    """Whether broker user ``user_id`` may publish messages of member
    ``member_id`` (its ``<id>.usage``, ``.capacity`` …): the member's own
    user, or the national side (an operator's replay). No user_id: no."""
    principal = principal_of(user_id, national)
    if principal is None:
        return False
    if principal.kind == NATIONAL:
        return True
    return (
        principal.kind in (DATACENTER, DATA_VENDOR) and principal.member_id == member_id
    )

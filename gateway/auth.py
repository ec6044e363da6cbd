"""Who is calling: ``Authorization: Bearer <token>`` → a :class:`Role`.

Tokens are issued and checked by ``city_registry`` (``authenticate(token) ->
{"role": role} | None``); the answer is cached for ``AUTH_CACHE_TTL_S`` so
that a page of requests costs one RPC, at the price of a revoked token living
up to that long. Roles (CONTRACTS.md §7): ``national_admin``,
``city_admin:<city>``, ``company:<credit code>``, ``datacenter:<id>``. A
company is one legal person nationally (DESIGN.md §2): its role names its
unified social credit code and no city, and it acts in every city.

Views call :func:`require_role` (401 without a valid token) and then the
small predicates below; a refused, authenticated caller gets 403.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, request

from services.common import creditcode
from services.common.caches import BoundedTtlCache
from services.common.errors import Forbidden, Unauthorized

AUTH_CACHE_TTL_S = 30.0
AUTH_CACHE_NEGATIVE_TTL_S = 5.0  # an unknown token may be issued a moment later
AUTH_CACHE_MAX = 10_000  # valid tokens: more than the signed-in callers of a portal
AUTH_CACHE_NEGATIVE_MAX = 1_000  # refused ones: anyone may send new ones
AUTH_CACHE = "auth_cache"  # key in app.extensions
_MISSING = object()

NATIONAL_ADMIN = "national_admin"
CITY_ADMIN = "city_admin"
COMPANY = "company"
DATACENTER = "datacenter"


class AuthCache:
    """Tokens' answers: the valid ones and the refused ones kept apart.

    Both are bounded (services/common/caches.py). Unknown tokens are what an
    anonymous caller can send without end, so they have their own, smaller
    cache: sending a million made-up tokens evicts only other made-up ones,
    never a signed-in user's role.
    """

    def __init__(
        self,
        max_known: int = AUTH_CACHE_MAX,
        max_unknown: int = AUTH_CACHE_NEGATIVE_MAX,
    ) -> None:
        self.known = BoundedTtlCache(max_known)
        self.unknown = BoundedTtlCache(max_unknown)

    def get_or_load(self, key: str, load: Callable[[], Any]) -> Any:
        for cache in (self.known, self.unknown):
            entry = cache.get(key, _MISSING)
            if entry is not _MISSING:
                return entry
        answer = load()  # outside any lock: an RPC must not serialise requests
        if answer:
            self.known.put(key, answer, AUTH_CACHE_TTL_S)
        else:
            self.unknown.put(key, answer, AUTH_CACHE_NEGATIVE_TTL_S)
        return answer

    def clear(self) -> None:
        self.known.clear()
        self.unknown.clear()


@dataclass(frozen=True)
class Role:
    kind: str  # national_admin | city_admin | company | datacenter
    city: str | None = None
    company_id: str | None = None  # a company's unified social credit code
    datacenter_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> Role | None:
        """``"company:91310000MA1DEM001X"`` → Role; None for an unknown shape.

        A company's code must be a well-formed credit code as the registry
        spells it (normalised): the legacy ``company:<city>:<code>`` of the
        early test fixtures is no role at all.
        """
        if text == NATIONAL_ADMIN:
            return cls(NATIONAL_ADMIN)
        kind, _, rest = text.partition(":")
        if kind == CITY_ADMIN and rest:
            return cls(CITY_ADMIN, city=rest)
        if kind == DATACENTER and rest:
            return cls(DATACENTER, datacenter_id=rest)
        if kind == COMPANY and is_credit_code(rest):
            return cls(COMPANY, company_id=rest)
        return None

    def __str__(self) -> str:
        """The role as the registry spells it: ``company:91310000MA1DEM001X``."""
        parts = {
            CITY_ADMIN: (self.city,),
            COMPANY: (self.company_id,),
            DATACENTER: (self.datacenter_id,),
        }.get(self.kind, ())
        return ":".join((self.kind, *parts))

    @property
    def scope(self) -> str | None:
        """The city or data centre the role is confined to (None: national,
        or a company, which deals with every city)."""
        return self.datacenter_id if self.kind == DATACENTER else self.city

    @property
    def is_national_admin(self) -> bool:
        return self.kind == NATIONAL_ADMIN

    def is_city_admin(self, city: str) -> bool:
        return self.kind == CITY_ADMIN and self.city == city

    def is_company(self, company_id: str | None = None) -> bool:
        """A company (and, when given, exactly the one of that credit code)."""
        if self.kind != COMPANY:
            return False
        return company_id is None or self.company_id == company_id

    def is_datacenter(self, datacenter_id: str | None = None) -> bool:
        if self.kind != DATACENTER:
            return False
        return datacenter_id is None or self.datacenter_id == datacenter_id


def is_credit_code(text: str) -> bool:
    """``text`` is a unified social credit code, spelt as it is normalised."""
    try:
        return creditcode.parse(text) == text
    except creditcode.InvalidCreditCode:
        return False


def _bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Unauthorized("unauthorized", "this endpoint needs a bearer token")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("unauthorized", "expected 'Authorization: Bearer <token>'")
    return token.strip()


def authenticate_token(token: str) -> Role | None:
    """The role of ``token`` (cached), or None when it is not valid."""
    return _authenticate(token)


def _authenticate(token: str) -> Role | None:
    rpc = current_app.extensions["rpc"]
    cache: AuthCache = current_app.extensions[AUTH_CACHE]
    # The cache keys on a digest, so raw tokens do not sit in memory.
    key = hashlib.sha256(token.encode()).hexdigest()
    answer = cache.get_or_load(
        key, lambda: rpc.call("city_registry", "authenticate", token)
    )
    if not answer or not isinstance(answer.get("role"), str):
        return None
    return Role.parse(answer["role"])


def require_role() -> Role:
    """The caller's role; raises Unauthorized without a valid token."""
    if "role" not in g:
        role = _authenticate(_bearer_token())
        if role is None:
            raise Unauthorized("invalid_token", "the bearer token is not valid")
        g.role = role
    return g.role


def optional_role() -> Role | None:
    """The caller's role when a token is sent (and valid), else None.

    Public pages use it to show more to a signed-in caller; a token that is
    sent but not valid is still refused, so a typo is not silently anonymous.
    """
    if not request.headers.get("Authorization"):
        return None
    return require_role()


def forbid(message: str = "your role may not do this") -> Forbidden:
    return Forbidden("forbidden", message)

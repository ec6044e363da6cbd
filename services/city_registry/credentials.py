"""Data centres' signing keys and portal tokens in the registry's database.

:class:`CredentialsStore` is the part of
:class:`~services.city_registry.store.RegistryStore` that keeps credentials:
keys are rotated with overlap and revoked, tokens are kept as digests with an
expiry and their last use, listed and revoked one by one. A company's first
token is stored only if it has no live one, and a re-issue revokes the
earlier ones, each under a lock of the role, so two at once leave one live
token. It works on the store's session and transactions.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update

from services.city_registry.domain import tokens
from services.city_registry.models import Datacenter, DatacenterKey, Token


class CredentialsStore:
    """Keys and tokens (mixed into ``RegistryStore``, which provides
    ``session`` and ``_transaction``)."""

    def active_keys(self, datacenter_id: str) -> list[dict[str, str]]:
        """Active keys, newest first."""
        rows = self.session.scalars(
            select(DatacenterKey)
            .where(
                DatacenterKey.datacenter_id == datacenter_id,
                DatacenterKey.revoked_at.is_(None),
            )
            .order_by(DatacenterKey.seq.desc())
        )
        return [{"key_id": row.key_id, "secret": row.secret} for row in rows]

    def add_key(
        self, datacenter_id: str, key_id: str, secret: str, now: datetime
    ) -> bool:
        """Store a new active key and revoke all but the newest two.

        False if the data centre is unknown. The data centre's row is locked
        (PostgreSQL) so that two rotations at once cannot leave three active.
        """
        with self._transaction():
            locked = self.session.scalar(
                select(Datacenter.id)
                .where(Datacenter.id == datacenter_id)
                .with_for_update()
            )
            if locked is None:
                self.session.rollback()
                return False
            self.session.add(
                DatacenterKey(
                    key_id=key_id,
                    datacenter_id=datacenter_id,
                    secret=secret,
                    created_at=now,
                )
            )
            self.session.flush()
            active = [key["key_id"] for key in self.active_keys(datacenter_id)]
            revoke = tokens.keys_to_revoke(active)
            if revoke:
                self.session.execute(
                    update(DatacenterKey)
                    .where(DatacenterKey.key_id.in_(revoke))
                    .values(revoked_at=now)
                )
            return True

    def add_token(
        self,
        digest: str,
        role: str,
        now: datetime,
        *,
        token_id: str,
        expires_at: datetime | None = None,
    ) -> None:
        with self._transaction():
            self.session.add(_token_row(digest, role, now, token_id, expires_at))

    def add_first_token(
        self,
        digest: str,
        role: str,
        now: datetime,
        *,
        token_id: str,
        expires_at: datetime | None = None,
    ) -> bool:
        """Store a token of ``role`` unless the role has a live one (neither
        revoked nor expired at ``now``); True if stored.

        Inserted first, then counted, under the role's lock: of two callers
        at once the second sees the first's token and takes its own back.
        """
        with self._transaction():
            self._lock_role(role)
            self.session.add(_token_row(digest, role, now, token_id, expires_at))
            self.session.flush()  # SQLite: the write lock is held from here
            live = self.session.execute(
                select(Token.revoked_at, Token.expires_at).where(
                    Token.role == role, Token.revoked_at.is_(None)
                )
            ).all()
            if sum(tokens.is_usable(r.revoked_at, r.expires_at, now) for r in live) > 1:
                self.session.rollback()
                return False
            return True

    def replace_tokens(
        self,
        digest: str,
        role: str,
        now: datetime,
        *,
        token_id: str,
        expires_at: datetime | None = None,
    ) -> int:
        """Revoke every token of ``role`` and store a new one, in one
        transaction under the role's lock; how many were revoked."""
        with self._transaction():
            self._lock_role(role)
            revoked = self.session.execute(
                update(Token)
                .where(Token.role == role, Token.revoked_at.is_(None))
                .values(revoked_at=now)
                .returning(Token.id)
            ).all()
            self.session.add(_token_row(digest, role, now, token_id, expires_at))
            return len(revoked)

    def _lock_role(self, role: str) -> None:
        """Serialise the writers of one role's tokens to the end of the
        transaction: a PostgreSQL advisory lock (SQLite has one writer at a
        time anyway, from a transaction's first write to its end)."""
        if self.session.get_bind().dialect.name != "postgresql":
            return
        key = int.from_bytes(
            hashlib.blake2b(f"token-role\x1f{role}".encode(), digest_size=8).digest(),
            "big",
            signed=True,
        )
        self.session.execute(select(func.pg_advisory_xact_lock(key)))

    def tokens(
        self, role: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """Newest first (never the digest), with the total of ``role``'s."""
        query = select(Token)
        if role is not None:
            query = query.where(Token.role == role)
        total = self.session.scalar(select(func.count()).select_from(query.subquery()))
        rows = self.session.scalars(
            query.order_by(Token.created_at.desc(), Token.id)
            .limit(limit)
            .offset(offset)
        ).all()
        return [_token_record(row) for row in rows], int(total or 0)

    def revoke_token(
        self, token_id: str, now: datetime, role: str | None = None
    ) -> dict[str, Any] | None:
        """Revoke one token (of ``role``, when given); the token as it now
        is, or None when there is no such token (of that role). Revoking a
        revoked token changes nothing."""
        with self._transaction():
            conditions = [Token.id == token_id]
            if role is not None:
                conditions.append(Token.role == role)
            self.session.execute(
                update(Token)
                .where(*conditions, Token.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = self.session.scalars(select(Token).where(*conditions)).first()
            return _token_record(row) if row is not None else None

    def revoke_tokens(self, role: str, now: datetime) -> int:
        with self._transaction():
            result = self.session.execute(
                update(Token)
                .where(Token.role == role, Token.revoked_at.is_(None))
                .values(revoked_at=now)
                .returning(Token.token_sha256)
            ).all()
            return len(result)

    def keys(self, datacenter_id: str) -> list[dict[str, Any]]:
        """Every key of the data centre, newest first, without secrets."""
        rows = self.session.scalars(
            select(DatacenterKey)
            .where(DatacenterKey.datacenter_id == datacenter_id)
            .order_by(DatacenterKey.seq.desc())
        )
        return [
            {
                "key_id": row.key_id,
                "created_at": row.created_at,
                "revoked_at": row.revoked_at,
            }
            for row in rows
        ]

    def revoke_key(self, datacenter_id: str, key_id: str | None, now: datetime) -> int:
        """Revoke one key (or all with ``key_id=None``); how many were active."""
        with self._transaction():
            query = update(DatacenterKey).where(
                DatacenterKey.datacenter_id == datacenter_id,
                DatacenterKey.revoked_at.is_(None),
            )
            if key_id is not None:
                query = query.where(DatacenterKey.key_id == key_id)
            done = self.session.execute(
                query.values(revoked_at=now).returning(DatacenterKey.key_id)
            ).all()
            return len(done)

    def role_for(self, digest: str, now: datetime | None = None) -> str | None:
        """The role of a token that is neither revoked nor expired at ``now``;
        its ``last_used_at`` is moved on when older than the resolution."""
        now = now or datetime.now(UTC)
        row = self.session.execute(
            select(
                Token.role, Token.expires_at, Token.revoked_at, Token.last_used_at
            ).where(Token.token_sha256 == digest)
        ).first()
        if row is None or not tokens.is_usable(row.revoked_at, row.expires_at, now):
            return None
        if tokens.needs_touch(row.last_used_at, now):
            with self._transaction():
                self.session.execute(
                    update(Token)
                    .where(Token.token_sha256 == digest)
                    .values(last_used_at=now)
                )
        return row.role


def _token_row(
    digest: str, role: str, now: datetime, token_id: str, expires_at: datetime | None
) -> Token:
    return Token(
        token_sha256=digest,
        id=token_id,
        role=role,
        created_at=now,
        expires_at=expires_at,
    )


def _token_record(row: Token) -> dict[str, Any]:
    names = ("id", "role", "created_at", "expires_at", "revoked_at", "last_used_at")
    return {name: getattr(row, name) for name in names}

"""HMAC-SHA256 signing of usage messages (CONTRACTS.md §1).

The signature covers the exact body bytes; it travels in the ``x-signature``
header as lowercase hex, beside ``x-key-id``. Metering verifies every message
it receives with :func:`verify`, so a secret is keyed once (:func:`_keyed`)
and each message is fed to a copy of that HMAC.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

KEY_ID_HEADER = "x-key-id"
SIGNATURE_HEADER = "x-signature"


def sign(body: bytes, secret: str) -> str:
    """The lowercase hex HMAC-SHA256 of ``body`` under ``secret``."""
    mac = _keyed(secret).copy()
    mac.update(body)
    return mac.hexdigest()


def verify(body: bytes, secret: str, signature: str | None) -> bool:
    """True if ``signature`` (hex, either case) is ``body``'s under ``secret``.

    Compared in constant time; a missing or non-text signature is False. The
    body of :func:`sign` is written out here, not called: this runs once per
    metered message.
    """
    if not signature or not isinstance(signature, str):
        return False
    mac = _keyed(secret).copy()
    mac.update(body)
    return hmac.compare_digest(mac.hexdigest(), signature.lower())


# Keying an HMAC costs as much as feeding it a usage record, and a process
# sees few secrets (its data centres' active keys): each is keyed once, and
# the keyed state copied per message. Bounded, so rotated-out secrets go.
@functools.lru_cache(maxsize=256)
def _keyed(secret: str) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with ``secret`` and fed nothing: copy, then use."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def new_secret() -> str:
    return secrets.token_hex(32)


def new_key_id(datacenter_id: str) -> str:
    return f"{datacenter_id}-{secrets.token_hex(4)}"

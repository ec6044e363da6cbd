"""HMAC-SHA256 signing of usage messages (CONTRACTS.md §1).

The signature covers the exact body bytes; it travels in the ``x-signature``
header as lowercase hex, beside ``x-key-id``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_ID_HEADER = "x-key-id"
SIGNATURE_HEADER = "x-signature"


def sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, signature: str | None) -> bool:
    if not signature or not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(body, secret), signature.lower())


def new_secret() -> str:
    return secrets.token_hex(32)


def new_key_id(datacenter_id: str) -> str:
    return f"{datacenter_id}-{secrets.token_hex(4)}"

"""TLS to the broker, configured once for every connection a process opens.

A member that is not on the broker's own host reaches it over TLS
(docs/security.md, "TLS to the broker"): its ``AMQP_URI`` is ``amqps://…``
(port 5671 unless it names one) and ``AMQP_SSL`` names the CA that signed the
broker's certificate, and the member's own certificate and key if the broker
asks for one::

    AMQP_SSL:
      ca_certs: ${AMQP_CA_FILE:}
      certfile: ${AMQP_CERT_FILE:}
      keyfile: ${AMQP_KEY_FILE:}

Blank values are unset. :func:`broker_ssl` turns that into kombu's ``ssl=``
argument (py-amqp's ``SSLTransport`` options): the broker's certificate is
always verified, its host name included (kombu fills ``server_hostname`` in
from the URI); no option turns that off. ``AMQP_SSL`` is nameko's own key: the
runner stores the result back under it (:func:`with_broker_ssl`), so nameko's
RPC, events and consumers use the same settings as our own connections
(``batching.py``, ``publishing.py``, ``rpc.py``, the data-centre gateway's
relay and capacity reporter, the portal).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common.config import AMQP_SSL, AMQP_URI, ConfigError

_FILES = ("ca_certs", "certfile", "keyfile")
# cert_reqs is accepted only as "required" (what a normalised dict holds).
_OPTIONS = frozenset((*_FILES, "server_hostname", "cert_reqs"))
_REQUIRED = (ssl.CERT_REQUIRED, "CERT_REQUIRED", "required")


def is_tls_uri(amqp_uri: str) -> bool:
    return amqp_uri.partition("://")[0].lower() == "amqps"


def broker_ssl(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """kombu's ``ssl=`` for ``config``'s ``AMQP_URI`` and ``AMQP_SSL``: None
    for a plain ``amqp://`` URI, else py-amqp's TLS options (verifying the
    broker). Idempotent: a result passed back as ``AMQP_SSL`` gives itself.

    Raises :class:`ConfigError` for certificates named beside a plain URI (a
    member configured for TLS must not silently connect without it), an
    unknown option, a file that does not exist, or a key without its
    certificate.
    """
    uri = config.get(AMQP_URI) or ""
    raw = config.get(AMQP_SSL)
    if raw in (None, False, True, ""):
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{AMQP_SSL} must be a mapping of {', '.join(_FILES)}")
    options = {key: value for key, value in raw.items() if value not in (None, "")}
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigError(
            f"{AMQP_SSL}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_OPTIONS))}"
        )
    if not is_tls_uri(uri):
        named = [key for key in _FILES if key in options]
        if named:
            raise ConfigError(
                f"{AMQP_SSL} names {', '.join(named)} but {AMQP_URI} is not "
                "amqps://: use amqps:// to reach the broker over TLS"
            )
        return None
    if options.get("cert_reqs", ssl.CERT_REQUIRED) not in _REQUIRED:
        raise ConfigError(f"{AMQP_SSL}: the broker's certificate is always verified")
    for key in _FILES:
        if key in options and not Path(options[key]).is_file():
            raise ConfigError(f"{AMQP_SSL}: {key} {options[key]} is not a file")
    if "keyfile" in options and "certfile" not in options:
        raise ConfigError(f"{AMQP_SSL}: keyfile needs its certfile")
    result: dict[str, Any] = {key: options[key] for key in _FILES if key in options}
    result["cert_reqs"] = ssl.CERT_REQUIRED
    # None: kombu puts the URI's host here, and py-amqp then checks the
    # certificate names it.
    result["server_hostname"] = options.get("server_hostname")
    return result


def with_broker_ssl(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``AMQP_SSL`` replaced by :func:`broker_ssl`'s result,
    for nameko (which hands ``AMQP_SSL`` to kombu as it is)."""
    config[AMQP_SSL] = broker_ssl(config)
    return config

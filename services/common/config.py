"""Configuration: one YAML file per process, with ``${ENV:default}`` substitution.

Service code never reads ``os.environ``; it reads the dict this module returns
(for nameko services, ``nameko.config``), by the key constants defined here so
that tests can import them.

Substitution happens after the file is parsed, in each string scalar, so no
value from the environment can change the document's structure (a token such
as ``#x`` or ``a: b``, a newline, ``{`` or a quote stays the text it is):

- ``${NAME}`` is the variable's value; ``${NAME:default}`` falls back to the
  default when it is unset. A default may itself use variables, resolved
  first: ``${DATABASE_URL:sqlite:///var/vouchers_${CITY_CODE}.db}``. A
  variable's value is taken as it is, never substituted again. A reference
  without a default to an unset variable is a :class:`ConfigError`.
- A plain (unquoted) scalar that is exactly one reference, such as
  ``HTTP_PORT: ${HTTP_PORT:8101}``, gets its value's YAML scalar type: an
  int, float, bool, null (an empty value) or timestamp, as if the value had
  been written there; anything else is a string. A value is never read as a
  mapping or a list.
- A reference inside a longer string (``dcgw_${DATACENTER_ID}.db``), or in a
  quoted scalar, is replaced as text.

Comments are not substituted. In a flow collection (``[…]``, ``{…}``) quote a
reference: ``{`` and ``}`` end a plain scalar there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# Keys shared by every process.
# One broker URI, or a cluster's nodes joined by ";" (kombu's failover form,
# tried in turn: see broker_urls).
AMQP_URI = "AMQP_URI"
# How long each class of rows is kept and how the timer prunes the rest:
# {<class>_days: int, interval_s, batch_size, pause_s, max_batches, enabled}
# (services/common/retention.py; a value below its class's floor is an error).
RETENTION = "RETENTION"
# The type of the durable queues this process declares (services/common/amqp.py):
# "quorum" (the default; replicated on a cluster, and on one node too) or
# "classic" (lazy). QUEUE_DELIVERY_LIMIT: a quorum queue's x-delivery-limit.
QUEUE_TYPE = "QUEUE_TYPE"
QUEUE_DELIVERY_LIMIT = "QUEUE_DELIVERY_LIMIT"
# TLS to the broker: {ca_certs, certfile, keyfile} (services/common/broker_tls.py);
# nameko's own key, so its consumers and publishers read it too.
AMQP_SSL = "AMQP_SSL"
DATABASE_URL = "DATABASE_URL"
TRACING = "TRACING"  # {"exporter": "none" | "console" | "otlp", "endpoint": ...}
SERVICE_NAME = "SERVICE_NAME"
# The two HTTP APIs (portal, data-centre gateway): largest request body, bytes.
MAX_CONTENT_LENGTH = "MAX_CONTENT_LENGTH"

# vouchers
CITY_CODE = "CITY_CODE"
RULES_FILE = "RULES_FILE"
# The voucher prefix the registry reserved for the city at admission (issue 14);
# when unset, the rules file's voucher_prefix.
VOUCHER_PREFIX = "VOUCHER_PREFIX"
HEARTBEAT_INTERVAL_S = "HEARTBEAT_INTERVAL_S"

# city_registry
DEPLOY_DIR = "DEPLOY_DIR"
STALE_AFTER_S = "STALE_AFTER_S"
TOKEN_TTL_DAYS = "TOKEN_TTL_DAYS"  # a token's life unless issued for less; 0: ever

# datacenter_gateway
DATACENTER_ID = "DATACENTER_ID"
KEY_ID = "KEY_ID"
KEY_SECRET = "KEY_SECRET"
HTTP_HOST = "HTTP_HOST"
HTTP_PORT = "HTTP_PORT"
AGENT_TOKEN = "AGENT_TOKEN"
INVENTORY = "INVENTORY"
DATACENTERS_FILE = "DATACENTERS_FILE"
CAPACITY_INTERVAL_S = "CAPACITY_INTERVAL_S"
RELAY_BATCH_SIZE = "RELAY_BATCH_SIZE"
MAX_BACKLOG = "MAX_BACKLOG"
NEXT_KEY_ID = "NEXT_KEY_ID"  # a second active key during a rotation
NEXT_KEY_SECRET = "NEXT_KEY_SECRET"
NEXT_KEY_FROM = "NEXT_KEY_FROM"  # UTC time to start signing with the next key
SLURM_TIMEZONE = "SLURM_TIMEZONE"  # the zone sacct/nvidia-smi times are in
SLURM_TENANT_FIELD = "SLURM_TENANT_FIELD"  # sacct column naming the tenant
SLURM_ACCOUNTS = "SLURM_ACCOUNTS"  # {slurm account: tenant_id}
GPU_MODEL_NAMES = "GPU_MODEL_NAMES"  # {gres type or GPU name: gpu_model}
NVIDIA_TENANTS = "NVIDIA_TENANTS"  # {GPU uuid | bus id | index: tenant_id}
SAMPLE_INTERVAL_S = "SAMPLE_INTERVAL_S"
TAIL_FILE = "TAIL_FILE"  # a sacct output file to follow
TAIL_INTERVAL_S = "TAIL_INTERVAL_S"

# metering
REGISTRY_CACHE_TTL_S = "REGISTRY_CACHE_TTL_S"
PREFETCH_COUNT = "PREFETCH_COUNT"
BATCH_SIZE = "BATCH_SIZE"
BATCH_WAIT_MS = "BATCH_WAIT_MS"
CONSUMERS = "CONSUMERS"

# gateway (portal)
RPC_POOL_SIZE = "RPC_POOL_SIZE"
RPC_TIMEOUT_S = "RPC_TIMEOUT_S"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_TAG = "tag:computenet,2026:env"  # a plain scalar that starts ${ , ends }
_STR_TAG = "tag:yaml.org,2002:str"
# The scalar types a whole-scalar reference's value may take, as YAML would
# give them to the same text written in the file.
_TYPED = frozenset(
    f"tag:yaml.org,2002:{name}"
    for name in ("null", "bool", "int", "float", "timestamp")
)


class ConfigError(Exception):
    """A configuration file is missing, malformed, or names an unset variable."""


def substitute(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace every ``${NAME:default}`` in ``text`` with its value, as text.

    A default may itself use variables: ``${DATABASE_URL:sqlite:///var/
    vouchers_${CITY_CODE}.db}``; a value from ``env`` is not substituted
    again. A reference without a default to an unset variable is an error;
    something that is not a reference (``$x``, ``${a b}``) is left as it is.
    """
    return _expand(text, os.environ if env is None else env)[0]


def _expand(text: str, env: Mapping[str, str]) -> tuple[str, bool]:
    """``text`` with its references replaced, and whether it was exactly one."""
    parts = []
    position = 0
    whole = False
    while (start := text.find("${", position)) >= 0:
        parts.append(text[position:start])
        found = _reference(text, start, env)
        if found is None:  # not a reference: the "$" is text
            parts.append("$")
            position = start + 1
            continue
        value, position = found
        whole = start == 0 and position == len(text)
        parts.append(value)
    parts.append(text[position:])
    return "".join(parts), whole


def _reference(text: str, start: int, env: Mapping[str, str]) -> tuple[str, int] | None:
    """The value of the reference at ``text[start:]`` (which starts ``${``)
    and the index after it, or None if it is not one.

    ``${NAME}`` or ``${NAME:default}``; the default holds no ``{``, ``}`` or
    ``$`` but in references of its own, which are resolved even when NAME is
    set (so a missing one is an error either way).
    """
    name = _NAME.match(text, start + 2)
    if name is None:
        return None
    position = name.end()
    default = None
    if text.startswith(":", position):
        parts = []
        position += 1
        while position < len(text) and text[position] != "}":
            char = text[position]
            if char == "$":
                inner = _reference(text, position, env)
                if inner is None:
                    return None
                value, position = inner
                parts.append(value)
            elif char == "{":
                return None
            else:
                parts.append(char)
                position += 1
        default = "".join(parts)
    if not text.startswith("}", position):
        return None
    if name.group() in env:
        return env[name.group()], position + 1
    if default is None:
        raise ConfigError(f"environment variable {name.group()} is not set")
    return default, position + 1


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that substitutes references in string scalars."""

    def __init__(self, stream: str, env: Mapping[str, str]):
        super().__init__(stream)
        self.env = env


def _substituted(loader: _Loader, node: yaml.ScalarNode) -> str:
    """A string scalar (quoted, or tagged ``!!str``): references as text."""
    value = loader.construct_scalar(node)
    return _expand(value, loader.env)[0] if "${" in value else value


def _substituted_plain(loader: _Loader, node: yaml.ScalarNode) -> Any:
    """A plain scalar that starts ``${`` and ends ``}``: typed if it is one
    reference (its value's YAML scalar type), else references as text."""
    text, whole = _expand(loader.construct_scalar(node), loader.env)
    if not whole:
        return text
    tag = loader.resolve(yaml.ScalarNode, text, (True, False))
    if tag not in _TYPED:
        return text
    return loader.yaml_constructors[tag](loader, yaml.ScalarNode(tag, text))


_Loader.add_constructor(_STR_TAG, _substituted)
_Loader.add_constructor(_ENV_TAG, _substituted_plain)
# Only plain scalars are resolved implicitly: a quoted one stays a string.
_Loader.add_implicit_resolver(_ENV_TAG, re.compile(r"^\$\{.*\}$", re.DOTALL), ["$"])


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Read one YAML configuration file, substituting environment variables."""
    path = Path(path)
    try:
        raw = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    loader = _Loader(raw, os.environ if env is None else env)
    try:
        data = loader.get_single_data() or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def broker_urls(amqp_uri: str) -> list[str]:
    """The brokers an ``AMQP_URI`` names: one, or a cluster's nodes joined by
    ``;``. kombu's ``Connection`` takes the joined form as it is (the first
    URI, the others its alternates, switched to round-robin as a node stops
    answering), so nameko and our own connections accept it; code that reads
    a URI's parts (user, vhost, host) reads each one, or the first."""
    return [uri.strip() for uri in (amqp_uri or "").split(";") if uri.strip()]


def primary_url(amqp_uri: str) -> str:
    """The first broker of ``AMQP_URI`` (its user and vhost are every node's)."""
    urls = broker_urls(amqp_uri)
    return urls[0] if urls else ""

"""Configuration: one YAML file per process, with ``${ENV:default}`` substitution.

Service code never reads ``os.environ``; it reads the dict this module returns
(for nameko services, ``nameko.config``), by the key constants defined here so
that tests can import them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# Keys shared by every process.
AMQP_URI = "AMQP_URI"
DATABASE_URL = "DATABASE_URL"
TRACING = "TRACING"  # {"exporter": "none" | "console" | "otlp", "endpoint": ...}
SERVICE_NAME = "SERVICE_NAME"

# vouchers
CITY_CODE = "CITY_CODE"
RULES_FILE = "RULES_FILE"
HEARTBEAT_INTERVAL_S = "HEARTBEAT_INTERVAL_S"

# city_registry
DEPLOY_DIR = "DEPLOY_DIR"
STALE_AFTER_S = "STALE_AFTER_S"

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

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^${}]*))?\}")


class ConfigError(Exception):
    """A configuration file is missing, malformed, or names an unset variable."""


def substitute(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME:default}`` with the environment's value.

    Innermost references are resolved first, so a default may itself use a
    variable: ``${DATABASE_URL:sqlite:///var/vouchers_${CITY_CODE}.db}``.
    A reference without a default to an unset variable is an error.
    """
    env = os.environ if env is None else env

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is None:
            raise ConfigError(f"environment variable {name} is not set")
        return default

    while True:
        new = _VAR.sub(replace, text)
        if new == text:
            return new
        text = new


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Read one YAML configuration file, substituting environment variables."""
    path = Path(path)
    try:
        raw = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    try:
        data = yaml.safe_load(substitute(raw, env)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data

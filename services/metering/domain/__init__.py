"""Metering's rules, pure Python: validate, rate and roll up usage (no I/O).

- :mod:`.validation` — the rules a message must pass, in order, and the
  dead-letter reason of each (``Reason``, ``Refused``); loading a usage
  record or a capacity report through the contract;
- :mod:`.rating` — the data centre's price and attributes for a GPU model;
- :mod:`.encoding` — a record's canonical JSON and digest, its ``usage_rated``
  event's bytes and id, written out by hand for the hot path;
- :mod:`.rollups` — hourly buckets, spreading over hours, corrections,
  capacity and utilisation.

Import the submodule that holds a rule. The names below are re-exported so
that ``domain.X`` keeps naming what the running code uses.
"""

from services.metering.domain.encoding import (
    canonical_sha256,
    dump_record,
    record_json,
    usage_rated_bytes,
    usage_rated_event_id,
    wire_sha256,
)
from services.metering.domain.rating import (
    ModelTerms,
    PriceTerms,
    check_inventory,
    inventory_item,
    model_terms,
    price_terms,
    registered_gpus,
)
from services.metering.domain.rollups import (
    CAPACITY_SLICE,
    HOUR,
    RecordKey,
    RollupKey,
    capacity_gpu_seconds,
    competing_corrections,
    effectiveness_changes,
    hour_of,
    lock_key,
    rollup_contribution,
    spread_over_hours,
    utilisation,
)
from services.metering.domain.validation import (
    CAPACITY,
    JSON_CONTENT_TYPE,
    MAX_BODY_BYTES,
    MAX_GPU_COUNT,
    RECORD_FIELDS,
    USAGE,
    Reason,
    Refused,
    check_envelope,
    check_signature,
    fast_load_usage,
    header_text,
    load_capacity,
    load_usage,
    normalise_voucher_code,
    parse_body,
    readable_record_id,
    split_routing_key,
    unknown_prefix,
    voucher_prefix,
)

__all__ = [
    "CAPACITY",
    "CAPACITY_SLICE",
    "HOUR",
    "JSON_CONTENT_TYPE",
    "MAX_BODY_BYTES",
    "MAX_GPU_COUNT",
    "RECORD_FIELDS",
    "USAGE",
    "ModelTerms",
    "PriceTerms",
    "Reason",
    "RecordKey",
    "Refused",
    "RollupKey",
    "canonical_sha256",
    "capacity_gpu_seconds",
    "competing_corrections",
    "check_envelope",
    "check_inventory",
    "check_signature",
    "dump_record",
    "effectiveness_changes",
    "fast_load_usage",
    "header_text",
    "hour_of",
    "inventory_item",
    "load_capacity",
    "load_usage",
    "lock_key",
    "model_terms",
    "normalise_voucher_code",
    "parse_body",
    "price_terms",
    "readable_record_id",
    "registered_gpus",
    "record_json",
    "rollup_contribution",
    "spread_over_hours",
    "split_routing_key",
    "unknown_prefix",
    "usage_rated_bytes",
    "usage_rated_event_id",
    "utilisation",
    "voucher_prefix",
    "wire_sha256",
]

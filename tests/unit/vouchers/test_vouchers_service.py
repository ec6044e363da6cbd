"""build(): one service class per city, refusing a broken rules file; the
consumer's hand-written event body."""

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.config import CITY_CODE, RULES_FILE, VOUCHER_PREFIX, ConfigError
from services.common.contracts import EVENT_SCHEMAS
from services.common.units import format_ts
from services.vouchers.parking import redeemed_body
from services.vouchers.rules import RulesError
from services.vouchers.service import build

SHANGHAI = Path(__file__).resolve().parents[3] / "deploy" / "cities" / "shanghai.yaml"


def test_build_names_the_service_after_its_city():
    cls = build({CITY_CODE: "shanghai", RULES_FILE: str(SHANGHAI)})
    assert cls.name == "vouchers_shanghai"
    assert cls.__name__ == "VouchersService_shanghai"
    other = build({CITY_CODE: "shanghai", RULES_FILE: str(SHANGHAI)})
    # Entrypoints are per class: building twice does not double them.
    assert cls.handle_usage_rated is not other.handle_usage_rated
    assert len(cls.handle_usage_rated.nameko_entrypoints) == 1


def test_build_refuses_bad_configuration(tmp_path):
    with pytest.raises(ConfigError):
        build({CITY_CODE: "Shang Hai", RULES_FILE: str(SHANGHAI)})
    with pytest.raises(RulesError, match="this instance is 'chengdu'"):
        build({CITY_CODE: "chengdu", RULES_FILE: str(SHANGHAI)})
    broken = tmp_path / "shanghai.yaml"
    broken.write_text(
        SHANGHAI.read_text().replace("rate_percent: 80", "rate_percent: 95")
    )
    with pytest.raises(
        ValueError, match=r"shanghai.yaml:\d+: .*above max_rate_percent"
    ):
        build({CITY_CODE: "shanghai", RULES_FILE: str(broken)})


def test_build_refuses_a_prefix_other_than_the_reserved_one():
    """The rules file says SH; the registry reserved SHA: the city must not
    start issuing codes that would route to whoever holds SH."""
    config = {CITY_CODE: "shanghai", RULES_FILE: str(SHANGHAI)}
    assert build({**config, VOUCHER_PREFIX: "SH"}).name == "vouchers_shanghai"
    with pytest.raises(RulesError, match="the registry reserved 'SHA'"):
        build({**config, VOUCHER_PREFIX: "SHA"})


_text = st.text(min_size=1, max_size=40)
_fen = st.integers(-(10**12), 10**12)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "event_id": _text,
            "voucher_code": _text,
            "program_id": st.one_of(st.none(), _text),
            "record_id": _text,
            "datacenter_id": _text,
            "gpu_seconds": _fen,
            "cost_fen": _fen,
            "subsidy_fen": _fen,
        }
    ),
    st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
)
def test_redeemed_body_is_what_the_schema_dumps(row, moment):
    """The consumer's hand-written voucher_redeemed body equals the schema's
    dump of the same row (and loads back through the schema)."""
    schema = EVENT_SCHEMAS["voucher_redeemed"]()
    body = redeemed_body("shanghai", SimpleNamespace(**row), format_ts(moment))
    assert body == schema.dump({**row, "city": "shanghai", "occurred_at": moment})
    assert schema.load(json.loads(json.dumps(body)))["record_id"] == row["record_id"]

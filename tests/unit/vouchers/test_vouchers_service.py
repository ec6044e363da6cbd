"""build(): one service class per city, refusing a broken rules file."""

from pathlib import Path

import pytest

from services.common.config import CITY_CODE, RULES_FILE, ConfigError
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

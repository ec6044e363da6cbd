"""``python -m services.city_registry --config deploy/config/city_registry.yaml``"""

import sys

from services.common.runner import main


def build(config: dict) -> type:
    from services.city_registry.service import CityRegistryService

    return CityRegistryService


if __name__ == "__main__":
    sys.exit(main("city_registry", build))

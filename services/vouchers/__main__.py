"""Run one city: ``CITY_CODE=shanghai python -m services.vouchers``.

(``--config deploy/config/vouchers.yaml`` is the default.)
"""

import sys

from services.common.runner import main
from services.vouchers.service import build

if __name__ == "__main__":
    sys.exit(main("vouchers", build))

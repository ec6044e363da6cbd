"""``python -m services.metering --config deploy/config/metering.yaml``."""

import sys

from services.common.runner import main
from services.metering.service import build

sys.exit(main("metering", build))

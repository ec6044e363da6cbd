"""schemathesis against the OpenAPI document of a running portal.

The network starts as in ``test_local_run.py`` (``python -m deploy.localnet
run`` on the test's own vhost); schemathesis then fuzzes every operation of
``/api/v1/openapi.json``, anonymously and with the national admin's token:
no answer may be a 5xx, and every answer must match the schema (and status
codes) the document declares.

schemathesis runs as a subprocess: its hypothesis and anyio machinery stays
out of this pytest process, which eventlet has monkey-patched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance"
MAX_EXAMPLES = "8"  # per operation; keeps each run well under 30 s
# Writes that create RabbitMQ users (on the shared broker, not the test's
# vhost) or remove what the other run needs are left out of the admin's run;
# the anonymous run still covers them (401).
ADMIN_EXCLUDED = [
    "--exclude-method",
    "DELETE",
    "--exclude-path",
    "/api/v1/cities",
    "--exclude-path",
    "/api/v1/datacenters",
]


@pytest.fixture
def running_network(launch_network):
    return launch_network("--no-simulate", "--heartbeat-interval", "2").credentials


def schemathesis(portal: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{portal}/api/v1/openapi.json",
            "--url",
            portal,
            "--checks",
            CHECKS,
            "--max-examples",
            MAX_EXAMPLES,
            "--phases",
            "examples,fuzzing",
            "--seed",
            "1",
            "--workers",
            "2",
            "--request-timeout",
            "15",
            "--no-color",
            "--generation-database",
            "none",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_answer_matches_the_openapi_document(running_network):
    portal = running_network["portal"]
    token = running_network["national_admin_token"]

    anonymous = schemathesis(portal)
    admin = schemathesis(
        portal, "-H", f"Authorization: Bearer {token}", *ADMIN_EXCLUDED
    )

    for name, run in (("anonymous", anonymous), ("national admin", admin)):
        assert run.returncode == 0, (
            f"{name}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
        )

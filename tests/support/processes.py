"""A service as operators run it: ``python -m services.<name> --config
deploy/config/<name>.yaml`` from the repository's root, in its own process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def service_command(name: str) -> list[str]:
    """The command line that runs the service ``name`` (a package of services/)."""
    config = f"deploy/config/{name}.yaml"
    return [sys.executable, "-m", f"services.{name}", "--config", config]


def start_service(name: str, env: dict[str, str], **popen: Any) -> subprocess.Popen:
    """The service ``name`` started with ``env`` (``popen``: Popen's options)."""
    return subprocess.Popen(service_command(name), cwd=ROOT, env=env, **popen)


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

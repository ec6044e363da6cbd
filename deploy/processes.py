"""The network's child processes, as ``make run`` starts them: each with its
output prefixed by its name and kept in a log file, stopped with its process
group, and never outliving the launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# prctl(PR_SET_PDEATHSIG, SIGTERM): a child is sent SIGTERM when the launcher
# dies, however it dies (even SIGKILL), so no process of the network outlives
# it. Resolved here, before any fork: between fork and exec the child may call
# nothing but this (the launcher has threads).
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_launcher() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One process of the network, its output prefixed and kept in a log file."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, echo: bool
    ):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Ctrl-C reaches the launcher only, which stops the children in order.
            start_new_session=True,
            preexec_fn=_die_with_launcher,
        )
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.proc and self.proc.stdout
        with self.log_path.open("ab") as logfile:
            for line in iter(self.proc.stdout.readline, b""):
                logfile.write(line)
                logfile.flush()
                if self.echo:
                    text = line.decode(errors="replace").rstrip()
                    print(f"{self.name:>22} | {text}", flush=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if not self.running:
            return
        assert self.proc
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(
                self.log_path.read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return ""

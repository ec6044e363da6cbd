"""The gateway's background loops (relay, capacity reports, sacct tail) run in
threads of their own; this is how each one starts and stops.
"""

from __future__ import annotations

import threading


class BackgroundLoop:
    """A daemon thread running ``run()`` until ``stop()`` sets ``_stop``.

    Subclasses set ``thread_name`` and ``stop_timeout_s`` and write ``run()``,
    which must return soon after ``self._stop`` is set.
    """

    thread_name = "background"
    stop_timeout_s = 10.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, name=self.thread_name, daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout_s if timeout is None else timeout)
            self._thread = None

    def run(self) -> None:
        raise NotImplementedError

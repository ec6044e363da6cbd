"""Back-off for every reconnect loop: the gateway's relay and the batch
consumers (issue 16, item 7)."""

from __future__ import annotations

import random


class Backoff:
    """Exponential back-off with jitter: the n-th delay is drawn from
    ``[d/2, d]`` where ``d = min(initial × 2ⁿ, cap)`` (0.5 s, 1 s, 2 s …
    capped at 30 s); reset on success.

    The jitter ("equal jitter") spreads 1 000 gateways that lost the same
    broker over half of each step instead of reconnecting in lockstep, and
    keeps a floor so that no retry comes at once. ``jitter=False`` gives the
    bare steps (tests of the schedule).
    """

    def __init__(
        self,
        initial: float = 0.5,
        cap: float = 30.0,
        *,
        jitter: bool = True,
        rng: random.Random | None = None,
    ):
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._next = initial

    def next_delay(self) -> float:
        step = self._next
        self._next = min(self._next * 2, self.cap)
        if not self.jitter:
            return step
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        self._next = self.initial

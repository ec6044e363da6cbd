"""metering's usage figures as the registry sums them: GPU-seconds, utilisation
(used ÷ capacity, each data centre's used capped at its capacity) and spare
GPUs, per data centre, hub region or nation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def ratio(used: int, capacity: int) -> float | None:
    return used / capacity if capacity > 0 else None


def used_within_capacity(figures: Mapping[str, Any]) -> int:
    """A data centre's used GPU-seconds in the window, at most its capacity.

    Metering caps each data centre's utilisation at 1 (usage is bucketed by
    the hour a job started, capacity by the second, so a window's edge can
    overshoot); the sums over a region or the nation must agree with that, or
    one data centre's overshoot would inflate everyone's figure.
    """
    # The usage metering compares with capacity (from the hour its reports
    # began); older metering answers only carry the whole window's.
    used = figures.get("gpu_seconds_covered", figures.get("gpu_seconds_window")) or 0
    capacity = figures.get("capacity_gpu_seconds_window") or 0
    return min(used, capacity)


def datacenter_usage(
    overview: Mapping[str, Any] | None, dc_id: str
) -> Mapping[str, Any]:
    """One data centre's figures in metering's ``usage_overview``; {} if none."""
    return ((overview or {}).get("datacenters") or {}).get(dc_id) or {}


def spare_gpus(gpus: int, utilisation: float | None) -> int:
    """GPUs free on average over the last 24 h; all of them if never measured."""
    if utilisation is None:
        return gpus
    return max(0, round(gpus * (1 - min(utilisation, 1.0))))


class UsageTotals:
    """Data centres, GPUs, spare GPUs, all-time GPU-seconds and the utilisation of
    each window, summed one data centre at a time: a hub region's or the
    nation's. The network summary and the national overview both sum with it.
    """

    def __init__(self, windows: int = 1) -> None:
        self.datacenters = 0
        self.gpus = 0
        self.spare_gpus = 0
        self.gpu_seconds = 0
        self._used = [0] * windows
        self._capacity = [0] * windows

    def add(
        self, *windows: Mapping[str, Any], gpus: int = 0, spare_gpus: int = 0
    ) -> None:
        """One data centre: its figures for each window (the first one also
        gives the all-time GPU-seconds), its GPUs and spare GPUs."""
        self.datacenters += 1
        self.gpus += gpus
        self.spare_gpus += spare_gpus
        self.gpu_seconds += windows[0].get("gpu_seconds_total") or 0
        for index, figures in enumerate(windows):
            self._used[index] += used_within_capacity(figures)
            self._capacity[index] += figures.get("capacity_gpu_seconds_window") or 0

    def utilisation(self, window: int = 0) -> float | None:
        return ratio(self._used[window], self._capacity[window])

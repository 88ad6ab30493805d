"""Percentiles, and what a load-generating process reports about itself (CPU, loop lag)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psutil


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: a p99 is a value that was measured)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """n, p50, p99 and max of durations given in seconds, in milliseconds."""
    ordered = sorted(seconds)
    return {
        "n": len(ordered),
        "p50_ms": round(quantile(ordered, 0.50) * 1000, 3) if ordered else None,
        "p99_ms": round(quantile(ordered, 0.99) * 1000, 3) if ordered else None,
        "max_ms": round(ordered[-1] * 1000, 3) if ordered else None,
    }


def distribution_ms(seconds: Sequence[float], points: int = 101) -> list[float]:
    """The quantiles 0, 1/(points-1), ..., 1 in milliseconds: enough to draw a CDF later."""
    ordered = sorted(seconds)
    if not ordered:
        return []
    last = len(ordered) - 1
    return [round(ordered[round(i * last / (points - 1))] * 1000, 3) for i in range(points)]


def own_cpu_seconds() -> float:
    """CPU (user + system) this process has used so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LagMonitor:
    """Event-loop lag: how late a 10 ms sleep wakes up. A load generator whose loop lags is
    itself the bottleneck, and its latencies are inflated by that lag."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self.worst_at = 0.0  # time.monotonic() of the worst lag
        self._worst = -1.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.monotonic() - before - self.interval)
            if lag > self._worst:
                self._worst, self.worst_at = lag, before
            self.lags.append(lag)

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return {
            "loop_lag_p99_ms": round(quantile(self.lags, 0.99) * 1000, 2) if self.lags else None,
            "loop_lag_max_ms": round(max(self.lags) * 1000, 2) if self.lags else None,
        }


class CpuWindow:
    """CPU use of some processes, and of the whole machine, between two points in time."""

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        self.processes = list(processes)
        self._wall = time.monotonic()
        self._proc = self._process_seconds()
        self._machine = psutil.cpu_times()

    def _process_seconds(self) -> float:
        total = 0.0
        for proc in self.processes:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def result(self) -> dict[str, float]:
        """Process CPU in % of one core; machine busy in % of all cores."""
        wall = max(1e-9, time.monotonic() - self._wall)
        now = psutil.cpu_times()
        idle = (now.idle + getattr(now, "iowait", 0.0)) - (
            self._machine.idle + getattr(self._machine, "iowait", 0.0)
        )
        total = sum(now) - sum(self._machine)
        return {
            "server_cpu_pct": round(100 * (self._process_seconds() - self._proc) / wall, 1),
            "machine_busy_pct": round(100 * (1 - idle / total), 1) if total > 0 else math.nan,
        }


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t:` ... `t[0]` is the elapsed seconds afterwards."""
    box = [0.0]
    start = time.monotonic()
    try:
        yield box
    finally:
        box[0] = time.monotonic() - start

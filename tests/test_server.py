"""The serving process's GC schedule: CPython's automatic full collections off, full
collections on a timer that still frees cyclic garbage, and everything restored on stop."""

from __future__ import annotations

import asyncio
import gc
import weakref

from taskd.server import GcSchedule


class Node:
    """An object in a reference cycle: only a full collection frees it once it is old."""

    def __init__(self) -> None:
        self.me = self


async def test_scheduled_collections_free_cycles_that_cpython_would_no_longer_collect() -> None:
    before = gc.get_threshold()
    schedule = GcSchedule(full_every=0.05, sweep_every=2)
    schedule.start()
    try:
        assert gc.get_threshold()[2] == GcSchedule.NEVER
        assert gc.get_freeze_count() > 0  # start-up objects are out of the collector's reach
        young = Node()
        # Frozen in one run (it was alive), then thawed and freed by the second, the sweep.
        await _runs(schedule, 1)
        old = weakref.ref(young)
        del young
        await _runs(schedule, 3)
        assert old() is None
    finally:
        await schedule.stop()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def _runs(schedule: GcSchedule, count: int) -> None:
    async with asyncio.timeout(10):
        while schedule.runs < count:  # noqa: ASYNC110 - the schedule is a timer
            await asyncio.sleep(0.01)


async def test_a_burst_of_new_objects_is_collected_in_slices_not_in_one_pause() -> None:
    """Each early run walks what the last few young collections kept, then freezes it."""
    schedule = GcSchedule(full_every=3600)
    schedule.start()
    try:
        kept = []
        async with asyncio.timeout(10):
            while schedule.early_runs < 3:
                kept.append([Node() for _ in range(1000)])  # survivors, as connections are
                await asyncio.sleep(0)
        frozen = gc.get_freeze_count()
        assert frozen > 3000  # what survived was frozen: the next runs do not walk it again
        assert schedule.runs == 0  # no timed run: these came from the young collections
    finally:
        await schedule.stop()
    assert gc.get_freeze_count() == 0

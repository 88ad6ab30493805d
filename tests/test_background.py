"""The retry delays of the background tasks."""

from __future__ import annotations

from taskd.background import Backoff


def test_backoff_grows_with_jitter_and_starts_over_after_a_reset() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.delay() for _ in range(6)]
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
    backoff.reset()
    assert 0.05 <= backoff.delay() <= 0.1

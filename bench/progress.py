"""A plain-text progress bar: one line per step, so it reads the same in a terminal, under
`make` and in a CI log."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, width: int = 24) -> None:
        self.total = total
        self.width = width
        self.done = 0
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        """Announce the step that starts now."""
        self.done += 1
        filled = round(self.width * (self.done - 1) / max(1, self.total))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        count = f"{self.done:>{len(str(self.total))}}/{self.total}"
        print(f"[{bar}] {count} {elapsed:6.1f}s  {label}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A result line under the current step."""
        print(f"{'':>{self.width + 2}}   -> {text}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{'#' * self.width}] done in {elapsed:.1f}s", file=sys.stderr, flush=True)

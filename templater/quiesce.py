"""Quiescence per template (a config file's `template { wait { min max } }`): pure.

A change to the data of a template with its own wait is held until nothing more changed for
`min`, or `max` after the first change, whichever comes first; meanwhile other templates render
at once. A template's first render is not held.

`gather` is the runner's wait before a cycle: template edits settled, `--reload-interval` and the
global `--wait`. It blocks only through the wait function it is given (the store's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

TEMPLATE_KEY = "template:"  # a template file's change, as the runner's changed keys name it
EDIT_SETTLE = 0.05  # a file being written arrives in several events


class TemplateWaits:
    def __init__(self) -> None:
        self._pending: dict[int, tuple[float, float, float, float]] = {}  # index -> first, last, min, max

    def ready(self, index: int, wait: tuple[float, float], touched: bool, now: float) -> bool:
        """Whether template index renders now; touched: this cycle's changes are its data's."""
        pending = self._pending.get(index)
        if touched:
            self._pending[index] = pending = (pending[0] if pending else now, now, *wait)
        if pending is None or now < _due(pending):
            return False
        del self._pending[index]
        return True

    def next_due(self) -> float | None:
        """When the first held template is due (time.monotonic), None when none is held."""
        return min((_due(p) for p in self._pending.values()), default=None)


def _due(pending: tuple[float, float, float, float]) -> float:
    first, last, low, high = pending
    return min(last + low, first + high)


@dataclass(frozen=True)
class Pace:
    """What the wait before a cycle obeys: the global --wait (min, max; 0: none) and
    --reload-interval (0: none)."""

    wait_min: float
    wait_max: float
    reload_interval: float


def gather(
    changed: set[str], wait: Callable[[float], set[str]], pace: Pace, last_write: float, stop: threading.Event
) -> set[str]:
    """The changes to render in the next cycle: a template being written settles first; then
    --reload-interval spaces out a burst (the first change after a quiet spell goes at once, the
    ones within the interval after a write are gathered into one write when it has passed); then
    --wait holds until nothing changed for wait_min, or wait_max after the first change."""
    while any(k.startswith(TEMPLATE_KEY) for k in changed) and not stop.is_set():
        more = wait(EDIT_SETTLE)
        if not more:
            break
        changed |= more
    while pace.reload_interval > 0 and not stop.is_set():
        remaining = last_write + pace.reload_interval - time.monotonic()
        if remaining <= 0:
            break
        changed |= wait(remaining)
    if pace.wait_min <= 0:
        return changed
    first = last = time.monotonic()
    while not stop.is_set():
        remaining = _due((first, last, pace.wait_min, pace.wait_max)) - time.monotonic()
        if remaining <= 0:
            break
        more = wait(remaining)
        if more:
            changed |= more
            last = time.monotonic()
    return changed

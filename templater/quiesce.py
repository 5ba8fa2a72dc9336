"""Quiescence per template (a config file's `template { wait { min max } }`): pure.

A change to the data of a template with its own wait is held until nothing more changed for
`min`, or `max` after the first change, whichever comes first; meanwhile other templates render
at once. A template's first render is not held.
"""

from __future__ import annotations


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

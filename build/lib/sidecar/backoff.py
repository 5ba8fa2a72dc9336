"""Capped exponential backoff with jitter, and a stoppable sleep."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delay sequence for retrying a network call: base, 2*base, ... up to cap, with jitter.

    Jitter keeps many sidecars that lost the same agent from retrying in lockstep.
    """

    base: float = 0.1
    cap: float = 2.0
    jitter: float = 0.2
    attempt: int = field(default=0, init=False)

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return float(delay * (1 + random.uniform(-self.jitter, self.jitter)))

    def reset(self) -> None:
        self.attempt = 0


def sleep(stop: threading.Event, seconds: float) -> bool:
    """Sleep unless asked to stop; return True when stopping."""
    return stop.wait(max(0.0, seconds))

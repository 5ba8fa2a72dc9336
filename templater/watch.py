"""The blocking-query loop, in one place, with Consul's documented index rules.

- carry X-Consul-Index into the next request; skip a result whose index did not move;
- reset to 0 when the index goes backwards (the agent lost its state or changed leader);
- never send an index below 1;
- a minimum delay plus jitter between requests, so a flapping key cannot make us spin;
- capped exponential backoff on errors, with one log line per change of state.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.backoff import Backoff, sleep
from sidecar.durations import parse_duration
from sidecar.threads import Supervisor
from templater.errors import ConsulRejected, ConsulUnavailable

log = logging.getLogger("templater.watch")


@dataclass(frozen=True)
class Response:
    index: int
    data: Any
    last_contact_ms: int = 0


class Fetcher(Protocol):
    def get(self, path: str, params: dict[str, str]) -> Response: ...


def next_index(previous: int, received: int) -> int:
    """The index for the next request. Pure."""
    if received < previous:
        return 0
    return max(1, received)


@dataclass
class WatchSettings:
    wait: str = "60s"
    min_delay: float = 0.005
    jitter: float = 0.01
    backoff_base: float = 0.25
    backoff_cap: float = 2.0
    stale: bool = False
    max_stale_ms: int = 0


class BlockingLoop:
    """Runs one blocking query until stopped, calling on_change(data) when its data changes."""

    def __init__(
        self,
        key: str,
        path: str,
        params: dict[str, str],
        fetcher: Fetcher,
        on_change: Callable[[Any, int], None],
        on_state: Callable[[str, bool, str], None],
        settings: WatchSettings,
        skip_equal: bool = True,
        supervisor: Supervisor | None = None,
        start: Response | None = None,
        poll: float = 0.0,
    ) -> None:
        """skip_equal: call on_change only when the data differs. start: an answer already
        taken (a first read made by other means): the loop blocks on its index at once."""
        self.key = key
        self._skip_equal = skip_equal
        self._path = path
        self._params = params
        self._fetcher = fetcher
        self._on_change = on_change
        self._on_state = on_state
        self._settings = settings
        self._stop = threading.Event()
        self._start = start
        self._supervisor = supervisor or Supervisor()
        self.last_ok = time.monotonic()  # last answer from Consul (or the start)
        # a blocking query answers within wait + wait/16; beyond this without one, it is stale
        self.stale_after = parse_duration(settings.wait) * 1.1 + STALE_MARGIN + 2 * poll
        self._poll = poll  # an endpoint without blocking queries: asked again after this long

    @property
    def loops(self) -> list[BlockingLoop]:
        """A KV watch is its own single loop (a catalog source has two)."""
        return [self]

    def start(self) -> None:
        self._supervisor.start(f"watch {self.key}", self.run, self._stop)

    def stop(self) -> None:
        self._stop.set()

    def stale(self, now: float) -> bool:
        return now - self.last_ok > self.stale_after

    def _fetch(self, index: int) -> Response:
        params = dict(self._params)
        if index:
            params.update(index=str(index), wait=self._settings.wait)
        if self._settings.stale:
            params["stale"] = ""
        response = self._fetcher.get(self._path, params)
        if (
            self._settings.stale
            and self._settings.max_stale_ms
            and response.last_contact_ms > self._settings.max_stale_ms
        ):
            # too stale: ask the leader, as consul-template's max-stale does (without the index:
            # the leader answers at once with what it has, which may be newer)
            params.pop("stale", None)
            params.pop("index", None)
            params.pop("wait", None)
            response = self._fetcher.get(self._path, params)
        return response

    def run(self) -> None:
        backoff = Backoff(self._settings.backoff_base, self._settings.backoff_cap)
        index = 0
        last: Any = _UNSET
        if self._start is not None:
            index, last = next_index(0, self._start.index), self._start.data
            self._start = None  # a node's first answer can be tens of megabytes decoded
        if not self._skip_equal:
            last = _UNSET  # nothing to compare with: not kept
        while not self._stop.is_set():
            try:
                response = self._fetch(index)
                moved = response.index != index or self._poll > 0  # a polled answer has no index
                if moved and (not self._skip_equal or response.data != last):
                    self._on_change(response.data, response.index)  # may fetch more (a service's instances)
                    if self._skip_equal:
                        last = response.data
            except (ConsulUnavailable, ConsulRejected) as err:
                if self._stop.is_set():
                    return  # stopping: whatever broke on the way out is no news
                self._on_state(self.key, False, str(err))
                # the agent that answers next may be a new one with lower indexes: an old index
                # would block until its wait runs out, so ask without one first
                index = 0
                if sleep(self._stop, backoff.next_delay()):
                    return
                continue
            self.last_ok = time.monotonic()
            backoff.reset()
            self._on_state(self.key, True, "")
            index = next_index(index, response.index)
            if sleep(self._stop, self._poll or self._settings.min_delay + random.uniform(0, self._settings.jitter)):
                return


STALE_MARGIN = 15.0


class _Unset:
    pass


_UNSET = _Unset()

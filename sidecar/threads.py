"""Long-lived threads that never die silently.

Every worker thread of both programs runs under a Supervisor: an exception is logged with its
traceback, the body is started again after a capped backoff, and the crash is kept for
`/health` so that a thread stuck in a crash loop, or one that ended, is visible without logs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.backoff import Backoff

log = logging.getLogger("sidecar.threads")

RECENT = 60.0  # a crash is reported by /health for this long after it happened


@dataclass
class _Crash:
    count: int
    error: str
    at: float


class Supervisor:
    def __init__(self, backoff_base: float = 0.5, backoff_cap: float = 30.0) -> None:
        self._base = backoff_base
        self._cap = backoff_cap
        self._lock = threading.Lock()
        self._threads: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._crashes: dict[str, _Crash] = {}

    def start(self, name: str, body: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Run body in a thread until stop is set; restart it whenever it raises or returns."""
        thread = threading.Thread(target=self._run, args=(name, body, stop), name=name, daemon=True)
        with self._lock:
            self._threads[name] = (thread, stop)
        thread.start()
        return thread

    def _run(self, name: str, body: Callable[[], None], stop: threading.Event) -> None:
        backoff = Backoff(self._base, self._cap)
        while not stop.is_set():
            started = time.monotonic()
            try:
                body()
            except Exception as err:  # the point of a supervisor: nothing ends the thread
                log.exception("thread %s failed; restarting it", name)
                self._record(name, f"{type(err).__name__}: {err}")
            else:
                if stop.is_set():
                    break
                log.error("thread %s ended unexpectedly; restarting it", name)
                self._record(name, "ended unexpectedly")
            if time.monotonic() - started > self._cap * 2:
                backoff.reset()  # it ran well for a while: this is a new failure, not a loop
            if stop.wait(backoff.next_delay()):
                break
        with self._lock:
            self._threads.pop(name, None)

    def _record(self, name: str, error: str) -> None:
        with self._lock:
            crash = self._crashes.get(name)
            self._crashes[name] = _Crash((crash.count if crash else 0) + 1, error, time.monotonic())

    def problems(self) -> dict[str, str]:
        """Threads that crashed recently, or died while they should run: name -> what happened."""
        now = time.monotonic()
        found = {}
        with self._lock:
            for name, crash in self._crashes.items():
                if now - crash.at < RECENT:
                    found[name] = f"crashed {crash.count} time(s), last: {crash.error}"
            for name, (thread, stop) in self._threads.items():
                if not thread.is_alive() and not stop.is_set():
                    found[name] = "not running"
        return found

"""The latest data per dependency, with the empty-set grace applied; wakes the runner."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from templater.catalog import Grace, Snapshot
from templater.deps import catalog_key

log = logging.getLogger("templater.store")


class Store:
    def __init__(self, grace_seconds: float) -> None:
        self._cond = threading.Condition()
        self._grace_seconds = grace_seconds
        self._raw: dict[str, Snapshot] = {}
        self._shown: dict[str, Snapshot] = {}
        self._graces: dict[str, Grace] = {}
        self._deadlines: dict[str, float] = {}
        self._kv: dict[str, list[Any]] = {}  # KV answers, and the datacenters list
        self._dirty: set[str] = set()
        self._dirty_since: float | None = None  # when the oldest change not yet taken came in
        self._taken_since: float | None = None  # the same, for what wait() returned since take_since()
        self.generation = 0  # grows with every change published (the routes page's version)

    # -- writers (watch threads)

    def publish_catalog(self, key: str, snapshot: Snapshot) -> None:
        with self._cond:
            self._raw[key] = snapshot
            self._apply_grace(key, time.monotonic())
            self._mark()
            self._cond.notify_all()

    def publish_kv(self, key: str, data: list[Any]) -> None:
        with self._cond:
            self._kv[key] = data
            self._dirty.add(key)
            self._mark()
            self._cond.notify_all()

    def touch(self, key: str) -> None:
        """Mark something as changed that is not Consul data (a template file edit)."""
        with self._cond:
            self._dirty.add(key)
            self._mark()
            self._cond.notify_all()

    def _mark(self) -> None:
        self.generation += 1
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def take_since(self) -> float | None:
        """When the oldest change the runner has taken since the last call came in (monotonic)."""
        with self._cond:
            since, self._taken_since = self._taken_since, None
            return since

    def _apply_grace(self, key: str, now: float) -> None:
        grace = self._graces.setdefault(key, Grace(self._grace_seconds))
        before = set(grace.held_since)
        shown, deadline = grace.apply(self._shown.get(key), self._raw[key], now)
        for name in sorted(set(grace.held_since) - before):
            log.warning(
                "holding %s service=%s: every instance vanished at once; believed after %.0f s",
                key, name, self._grace_seconds,
            )  # fmt: skip
        self._shown[key] = shown
        if deadline is None:
            self._deadlines.pop(key, None)
        else:
            self._deadlines[key] = deadline
        self._dirty.add(key)

    # -- the runner

    def wait(self, timeout: float | None) -> set[str]:
        """Block until something changed (or timeout); return and clear the changed keys."""
        with self._cond:
            now = time.monotonic()
            for key, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    self._apply_grace(key, now)
            if not self._dirty:
                limit = timeout
                if self._deadlines:
                    until = max(0.0, min(self._deadlines.values()) - now)
                    limit = until if limit is None else min(limit, until)
                self._cond.wait(limit)
                now = time.monotonic()
                for key, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        self._apply_grace(key, now)
            dirty, self._dirty = self._dirty, set()
            if dirty and self._dirty_since is not None:
                since = self._dirty_since
                self._taken_since = since if self._taken_since is None else min(self._taken_since, since)
            self._dirty_since = None
            return dirty

    def has_catalog(self, key: str) -> bool:
        with self._cond:
            return key in self._raw

    def held(self) -> list[str]:
        with self._cond:
            return sorted(name for g in self._graces.values() for name in g.holding())

    def view(self) -> FrozenView:
        """A consistent view for one render cycle: every template sees the same data."""
        with self._cond:
            return FrozenView(dict(self._shown), dict(self._kv))

    def forget(self, key: str) -> None:
        with self._cond:
            self._kv.pop(key, None)
            self._raw.pop(key, None)
            self._shown.pop(key, None)
            self._graces.pop(key, None)
            self._deadlines.pop(key, None)


class FrozenView:
    def __init__(self, catalogs: dict[str, Snapshot], kv: dict[str, list[dict[str, Any]]]) -> None:
        self._catalogs = catalogs
        self._kv = kv

    def catalog(self, dc: str) -> Snapshot | None:
        return self._catalogs.get(catalog_key(dc))

    def kv(self, key: str) -> list[dict[str, Any]] | None:
        return self._kv.get(key)

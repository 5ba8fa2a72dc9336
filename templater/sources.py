"""The sources of what the templates depend on: one per dependency, shared by every template and
the DNS sync, and Consul's state as their watches see it (up or down, stale, failed attempts)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sidecar.once import SayOnce
from sidecar.threads import Supervisor
from templater.catalog import Snapshot
from templater.consul_source import CatalogSource, ConsulFetcher, kv_watch
from templater.deps import AgentNode, Catalog, Checks, Datacenters, Dependency
from templater.settings import Settings
from templater.status import Metrics
from templater.store import Store
from templater.watch import BlockingLoop, WatchSettings

log = logging.getLogger("templater")

STALE_NOTICE = 2.0  # a stale read this far behind the leader is said in the log
AGENT_POLL = 60.0  # the agent's node name: read again this often (it changes only with a new agent)
DATACENTERS_POLL = 15.0  # /v1/catalog/datacenters has no blocking query: asked this often, as consul-template does


class Source(Protocol):
    key: str

    @property
    def loops(self) -> list[BlockingLoop]: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...


class CheckKeeping:
    """The Checks dependency's "source": its dc's catalog source keeping each instance's checks."""

    def __init__(self, key: str, catalog: CatalogSource) -> None:
        self.key, self._catalog = key, catalog

    @property
    def loops(self) -> list[BlockingLoop]:
        return []

    def start(self) -> None:
        self._catalog.keep_checks(True)

    def stop(self) -> None:
        self._catalog.keep_checks(False)


def _node_name(data: object) -> str:
    config = data.get("Config") if isinstance(data, dict) else None
    return str((config or {}).get("NodeName") or "") if isinstance(config, dict) else ""


class Sources:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics, warn: Callable[[str], None]) -> None:
        self.fetcher = ConsulFetcher(settings.consul)
        self.watch_settings = WatchSettings(
            stale=settings.max_stale_ms > 0,
            max_stale_ms=settings.max_stale_ms,
            backoff_base=settings.retry_backoff,
            backoff_cap=settings.retry_max_backoff,
        )
        self.supervisor = Supervisor()
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._warn = warn
        self.by_key: dict[str, Source] = {}
        self.down: dict[str, str] = {}
        self.failed_attempts: dict[str, int] = {}  # query -> failed attempts in a row
        self._lock = threading.Lock()
        self._said = SayOnce()

    def watch(self, dep: Dependency) -> None:
        """A source for dep, unless one runs."""
        if dep.key in self.by_key:
            return

        def on_state(loop_key: str, up: bool, error: str) -> None:
            self._on_state(loop_key, up, error)
            if not up:
                self._stand_in_for_other_dc(dep, error)

        source: Source
        if isinstance(dep, Checks):
            self.watch(dep.catalog)
            catalog_source = self.by_key[dep.catalog.key]
            assert isinstance(catalog_source, CatalogSource)
            source = CheckKeeping(dep.key, catalog_source)
        elif isinstance(dep, Datacenters):
            source = self._polled(dep.key, "/v1/catalog/datacenters", DATACENTERS_POLL, on_state,
                                  lambda data: [d for d in data or [] if isinstance(d, str)])  # fmt: skip
        elif isinstance(dep, AgentNode):
            source = self._polled(dep.key, "/v1/agent/self", AGENT_POLL, on_state, lambda data: [_node_name(data)])
        elif isinstance(dep, Catalog):
            source = CatalogSource(
                dep, self.fetcher, self._store.publish_catalog, on_state, self.watch_settings, self._warn,
                self.supervisor,
            )  # fmt: skip
        else:
            source = kv_watch(dep, self.fetcher, self._store.publish_kv, on_state, self.watch_settings, self.supervisor)
        log.info("watching %s", dep.key)
        self.by_key[dep.key] = source
        source.start()

    def _polled(
        self, key: str, path: str, poll: float, on_state: Callable[[str, bool, str], None],
        shape: Callable[[Any], list[Any]],
    ) -> BlockingLoop:  # fmt: skip
        """An endpoint with no blocking query, asked every poll seconds; its answer shaped for the store."""
        return BlockingLoop(
            key, path, {}, self.fetcher, lambda data, _index: self._store.publish_kv(key, shape(data)), on_state,
            self.watch_settings, supervisor=self.supervisor, poll=poll,
        )  # fmt: skip

    def keep_only(self, used: set[str]) -> None:
        for key in sorted(set(self.by_key) - used):
            log.info("no longer watching %s", key)
            self.by_key.pop(key).stop()
            self._store.forget(key)

    def _on_state(self, key: str, up: bool, error: str) -> None:
        with self._lock:
            was_up = not self.down
            if up:
                self.down.pop(key, None)
                self.failed_attempts.pop(key, None)
            else:
                self.down[key] = error
                self.failed_attempts[key] = self.failed_attempts.get(key, 0) + 1
            now_up = not self.down
            self._metrics.consul_up = now_up
            self._metrics.consul_error = "" if now_up else next(iter(self.down.values()))
        if was_up and not now_up:
            what = "consul refused a read (ACL)" if error.startswith("permission denied") else "consul unavailable"
            log.warning("%s, keeping the last good output, will retry: %s", what, error)
        elif now_up and not was_up:
            log.info("consul available again")

    def _stand_in_for_other_dc(self, dep: Dependency, error: str) -> None:
        """Another datacenter's catalog that cannot be read (a WAN partition, a dc that does not
        exist) and has never been: templates render as if it had no services, with a warning,
        rather than everything waiting for it. Its watch goes on and replaces this when it reads."""
        if not isinstance(dep, Catalog) or not dep.dc or self._store.has_catalog(dep.key):
            return
        self._warn(f"{dep.key}: cannot be read ({error}); rendering as if datacenter {dep.dc} had no services")
        self._store.publish_catalog(dep.key, Snapshot())

    def watchdog(self) -> None:
        """Twice a second: watches with no answer for too long, request counts, staleness."""
        now = time.monotonic()
        stale = {
            loop.key: f"no answer from Consul for {now - loop.last_ok:.0f} s"
            for source in list(self.by_key.values())
            for loop in source.loops
            if loop.stale(now)
        }
        self._metrics.replace_problems("watch:", stale)
        self._metrics.consul_requests = self.fetcher.requests
        self._metrics.consul_bytes = self.fetcher.bytes
        self._report_staleness()

    def gave_up(self) -> bool:
        """--once: a query failed --retry-attempts times in a row (consul-template's retry)."""
        attempts = self._settings.retry_attempts
        if not self._settings.once or attempts <= 0:
            return False
        with self._lock:
            exhausted = [(k, self.down.get(k, "")) for k, n in self.failed_attempts.items() if n >= attempts]
        if exhausted:
            key, error = exhausted[0]
            log.error("--once: giving up after %d failed attempts of %s: %s", attempts, key, error)
        return bool(exhausted)

    def _report_staleness(self) -> None:
        """Stale reads (--max-stale) that a server answered without a leader, or long after it
        heard from one: the output may lag the cluster. Said once in the log as it starts and
        ends; /metrics and /health show the figures all along."""
        last_contact = self.fetcher.last_contact_ms / 1000
        known_leader = self.fetcher.known_leader
        self._metrics.last_contact = last_contact
        self._metrics.known_leader = known_leader
        stale = not known_leader or last_contact > STALE_NOTICE
        if stale and self._said.new("stale"):
            log.warning(
                "rendering from stale reads: the Consul server answering has %s, last contact %.1f s ago "
                "(accepted up to --max-stale %.0f s); the output may lag the cluster",
                "no leader" if not known_leader else "a leader", last_contact, self._settings.max_stale_ms / 1000,
            )  # fmt: skip
        elif not stale and self._said.over("stale"):
            log.info("reads are fresh again: the Consul servers have a leader")

    def close(self) -> None:
        for source in self.by_key.values():
            source.stop()
        self.by_key.clear()

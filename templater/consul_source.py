"""Consul as the templater reads it: an HTTP fetcher and the sources templates depend on.

Connections: a dc's whole catalog is watched with two blocking queries (`/v1/catalog/services`
and `/v1/health/state/any`) and read with a small pool (changed services, or every node), so a
template over 1,000 services keeps a handful of connections open, where one blocking query per
service would hold 1,000. Each KV key or prefix a template reads has its own blocking query.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import consul
import consul.exceptions
import requests

from sidecar.consul_conn import ClientPerThread, ConsulSettings
from templater.catalog import (
    Health,
    Instance,
    Node,
    Row,
    Snapshot,
    build_instances,
    changed_services,
    clean_nodes,
    clean_services,
    group_rows,
    health_index,
    instances_with_health,
    rows_from_node,
    service_row,
    sorted_rows,
    summarize,
)
from templater.errors import ConsulRejected, ConsulUnavailable
from templater.render import catalog_key
from templater.watch import BlockingLoop, Response, WatchSettings

log = logging.getLogger("templater.consul")

NODE_POOL = 4


class ConsulFetcher:
    """GET requests with one py-consul client (one keep-alive connection) per thread."""

    def __init__(self, settings: ConsulSettings, timeout: float = 10.0) -> None:
        self._settings = settings
        self._clients = ClientPerThread(settings, timeout)

    def get(self, path: str, params: dict[str, str]) -> Response:
        """A GET; with `index` in params it blocks, and py-consul sizes the read timeout to `wait`."""
        client = self._clients.get()
        query = list(params.items())
        if client.token:
            query.append(("token", client.token))
        try:
            raw = client.http.get(lambda r: r, path, params=query)
        except (requests.RequestException, consul.exceptions.Timeout, OSError) as err:
            raise ConsulUnavailable(f"consul {self._settings.url}{path}: {err}") from err
        if raw.code >= 500:
            raise ConsulUnavailable(f"consul {path}: {raw.code} {raw.body[:200]}")
        if raw.code == 404:
            return Response(int(raw.headers.get("X-Consul-Index", "1")), None)
        if raw.code >= 400:
            raise ConsulRejected(f"consul {path}: {raw.code} {raw.body[:200]}")
        try:
            data = json.loads(raw.body) if raw.body else None
        except ValueError as err:
            raise ConsulUnavailable(f"consul {path}: bad JSON: {err}") from err
        return Response(
            index=int(raw.headers.get("X-Consul-Index", "0") or 0),
            data=data,
            last_contact_ms=int(raw.headers.get("X-Consul-LastContact", "0") or 0),
        )


StateFn = Callable[[str, bool, str], None]

RECONCILE_QUIET = 0.5  # a full read this long after the last change ...
RECONCILE_MAX = 3.0  # ... or at the latest this long after the first one not yet read in full
TARGETED_MAX = 32  # more changed services than this (an agent that lost its state): one full read


class CatalogSource:
    """A dc's catalog: services, instances with health, nodes; published as one Snapshot.

    When `/v1/catalog/services` moves, one read of the per-service summary
    (`/v1/internal/ui/services`: instance and check counts) names the services that changed and
    only those are read again (`/v1/catalog/service/<name>`), so a single change costs a few
    small reads instead of the whole catalog. The summary cannot see an instance changed in
    place, so a full read (every node's catalog) follows once changes quiet down. Without the
    summary endpoint (an older or newer agent, ACLs) every change is a full read.
    """

    def __init__(
        self,
        dc: str,
        fetcher: ConsulFetcher,
        publish: Callable[[str, Snapshot], None],
        on_state: StateFn,
        settings: WatchSettings,
        warn: Callable[[str], None],
    ) -> None:
        self.key = catalog_key(dc)
        self._params = {"dc": dc} if dc else {}
        self._fetcher = fetcher
        self._publish = publish
        self._warn = warn
        self._lock = threading.Condition()  # the state below; publishing happens under it, in order
        self._fetch_lock = threading.Lock()  # one targeted read-and-apply at a time
        self._stopped = threading.Event()
        self._services: dict[str, Any] | None = None
        self._kept: dict[str, tuple[str, ...]] = {}
        self._checks: list[dict[str, Any]] | None = None
        self._health = Health()
        self._rows: dict[str, list[Row]] = {}
        self._bare: dict[str, tuple[Instance, ...]] = {}
        self._dirty: set[str] = set()
        self._nodes: tuple[Node, ...] = ()
        self._summary: dict[str, Any] | None = None
        self._summary_ok = True
        self._loaded = False
        self._seq = 0
        self._read_at: dict[str, int] = {}  # service -> _seq of its last targeted read
        self._pending_since: float | None = None
        self._last_change = 0.0
        self._pool = ThreadPoolExecutor(NODE_POOL, thread_name_prefix="catalog-read")
        params = self._params
        self.loops = [
            BlockingLoop(
                f"{self.key}.services",
                "/v1/catalog/services",
                params,
                fetcher,
                self._services_changed,
                on_state,
                settings,
                skip_equal=False,
            ),
            BlockingLoop(
                f"{self.key}.checks", "/v1/health/state/any", params, fetcher, self._checks_changed, on_state, settings
            ),
        ]

    def start(self) -> None:
        for loop in self.loops:
            loop.start()
        threading.Thread(target=self._reconcile_loop, name=f"reconcile {self.key}", daemon=True).start()

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        with self._lock:
            self._stopped.set()
            self._lock.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- reads

    def _read_summary(self) -> dict[str, Any] | None:
        """The per-service summary, or None when this agent does not give it to us."""
        if not self._summary_ok:
            return None
        try:
            data = self._fetcher.get("/v1/internal/ui/services", self._params).data
        except ConsulRejected as err:
            data, reason = None, str(err)
        else:
            reason = "not found"
        if not isinstance(data, list):
            self._summary_ok = False
            log.info("%s: no service summary (%s); every catalog change is a full read", self.key, reason)
            return None
        return summarize(data)

    def _read_services(self, names: set[str]) -> dict[str, list[Row]]:
        ordered = sorted(names)
        paths = [f"/v1/catalog/service/{urllib.parse.quote(n, safe='')}" for n in ordered]
        results = list(self._pool.map(lambda path: self._fetcher.get(path, self._params), paths))
        return {
            n: sorted_rows(service_row(r) for r in (res.data or []) if isinstance(r, dict))
            for n, res in zip(ordered, results, strict=True)
        }

    def _read_everything(self) -> tuple[dict[str, list[Row]], list[dict[str, Any]]]:
        nodes = [n for n in self._fetcher.get("/v1/catalog/nodes", self._params).data or [] if isinstance(n, dict)]
        names = [str(n.get("Node", "")) for n in nodes]
        quoted = [urllib.parse.quote(n, safe="") for n in names]
        results = list(self._pool.map(lambda q: self._fetcher.get(f"/v1/catalog/node/{q}", self._params), quoted))
        rows = group_rows(row for name, r in zip(names, results, strict=True) for row in rows_from_node(name, r.data))
        return rows, nodes

    # -- the watch callbacks

    def _services_changed(self, data: Any) -> None:
        services = dict(data or {})
        with self._fetch_lock:
            summary = self._read_summary()
            if summary is None or not self._loaded:
                self._load_everything(services, summary)
                return
            with self._lock:
                names = changed_services(self._summary or {}, summary, self._services or {}, services)
            if len(names) > TARGETED_MAX:
                self._load_everything(services, summary)
                return
            rows = self._read_services(names & set(services))
            with self._lock:
                self._summary = summary
                self._set_services(services)
                self._apply_targeted(names, rows)
                self._rebuild()
        self._schedule_reconcile()

    def _checks_changed(self, data: Any) -> None:
        checks = [c for c in data or [] if isinstance(c, dict)]
        owners = {(c.get("Node"), c.get("ServiceID"), c.get("ServiceName")) for c in checks if c.get("ServiceID")}
        with self._lock:
            before = {
                (c.get("Node"), c.get("ServiceID"), c.get("ServiceName"))
                for c in self._checks or []
                if c.get("ServiceID")
            }
        vanished = {str(name) for _, _, name in before - owners}
        if vanished and self._loaded:
            # a service's checks vanished: it was most likely deregistered. Without reading it
            # again it would look like an instance with no checks, which counts as passing.
            with self._fetch_lock:
                rows = self._read_services(vanished)
                with self._lock:
                    self._apply_targeted(vanished, rows)
            self._schedule_reconcile()
        with self._lock:
            self._checks = checks
            self._health = health_index(checks)
            self._rebuild()

    def _load_everything(self, services: dict[str, Any], summary: dict[str, Any] | None) -> None:
        rows, nodes = self._read_everything()
        with self._lock:
            self._summary = summary
            self._set_services(services)
            self._apply_everything(rows, nodes, since=None)
            self._loaded = True
            self._rebuild()

    # -- the full read that catches what the summary cannot see

    def _schedule_reconcile(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._last_change = now
            if self._pending_since is None:
                self._pending_since = now
            self._lock.notify_all()

    def _reconcile_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped.is_set():
                    if self._pending_since is not None:
                        now = time.monotonic()
                        due = min(self._last_change + RECONCILE_QUIET, self._pending_since + RECONCILE_MAX)
                        if due <= now:
                            break
                        self._lock.wait(due - now)
                    else:
                        self._lock.wait()
                if self._stopped.is_set():
                    return
                self._pending_since = None
                since = self._seq
            try:
                rows, nodes = self._read_everything()
            except (ConsulUnavailable, ConsulRejected) as err:
                # the watch loops report the outage; their next change schedules another read
                log.debug("full catalog read %s failed: %s", self.key, err)
                continue
            with self._lock:
                missed = self._apply_everything(rows, nodes, since=since)
                if missed:
                    log.info("%s: full read found changes the summary missed: %s", self.key, ", ".join(sorted(missed)))
                    self._rebuild()

    # -- state (called with self._lock held)

    def _set_services(self, services: dict[str, Any]) -> None:
        if services != self._services:
            self._services = services
            self._kept = clean_services(services, self._warn)

    def _apply_targeted(self, names: set[str], rows: dict[str, list[Row]]) -> None:
        self._seq += 1
        for name in names:
            self._read_at[name] = self._seq
            self._set_rows(name, rows.get(name, []))

    def _apply_everything(self, rows: dict[str, list[Row]], nodes: list[dict[str, Any]], since: int | None) -> set[str]:
        """Take a full read, except for services read on their own after it started. The changed names."""
        changed = set()
        for name in set(rows) | set(self._rows):
            if since is not None and self._read_at.get(name, 0) > since:
                continue
            if self._set_rows(name, rows.get(name, [])):
                changed.add(name)
        kept_nodes = clean_nodes(nodes, self._warn)
        if kept_nodes != self._nodes:
            self._nodes = kept_nodes
            changed.add("(nodes)")
        return changed

    def _set_rows(self, name: str, rows: list[Row]) -> bool:
        if self._rows.get(name, []) == rows:
            return False
        if rows:
            self._rows[name] = rows
        else:
            self._rows.pop(name, None)
        self._dirty.add(name)
        return True

    def _rebuild(self) -> None:
        if self._services is None or self._checks is None or not self._loaded:
            return
        started = time.perf_counter()
        for name in self._dirty:
            built = build_instances(name, self._rows.get(name, ()), self._warn)
            if built:
                self._bare[name] = built
            else:
                self._bare.pop(name, None)
        self._dirty.clear()
        instances = instances_with_health(self._kept, self._bare, self._health)
        # _kept and _nodes are replaced, never changed in place: the snapshot can share them
        self._publish(self.key, Snapshot(self._kept, instances, self._nodes))
        log.debug("catalog rebuilt %s in %.1f ms", self.key, (time.perf_counter() - started) * 1000)


def kv_watch(
    key: str,
    path: str,
    recurse: bool,
    dc: str,
    fetcher: ConsulFetcher,
    publish: Callable[[str, Any], None],
    on_state: StateFn,
    settings: WatchSettings,
) -> BlockingLoop:
    """One KV key (`key`) or prefix (`ls`, `tree`): a blocking query of its own."""
    params = {"dc": dc} if dc else {}
    if recurse:
        params["recurse"] = ""

    def changed(data: Any) -> None:
        publish(key, data or [])

    quoted = urllib.parse.quote(path.lstrip("/"))
    return BlockingLoop(key, f"/v1/kv/{quoted}", params, fetcher, changed, on_state, settings)

"""Consul as the templater reads it: an HTTP fetcher and the sources templates depend on.

Connections: a dc's whole catalog is watched with two blocking queries (`/v1/catalog/services`
and `/v1/health/state/any`) and read with a small pool (changed services, or every node), so a
template over 1,000 services keeps a handful of connections open, where one blocking query per
service would hold 1,000. Each KV key or prefix a template reads has its own blocking query.
"""

from __future__ import annotations

import json
import logging
import random
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
from sidecar.threads import Supervisor
from templater.catalog import (
    CRITICAL,
    Health,
    Instance,
    Node,
    Row,
    Snapshot,
    behind_checks,
    build_instances,
    check_signatures,
    clean_nodes,
    clean_services,
    group_rows,
    health_index,
    instances_with_health,
    rows_from_node,
    service_row,
    sorted_rows,
)
from templater.errors import ConsulForbidden, ConsulRejected, ConsulUnavailable
from templater.render import catalog_key
from templater.watch import BlockingLoop, Response, WatchSettings

log = logging.getLogger("templater.consul")

NODE_POOL = 4


class ConsulFetcher:
    """GET requests with one py-consul client (one keep-alive connection) per thread."""

    def __init__(self, settings: ConsulSettings, timeout: float = 10.0) -> None:
        self._settings = settings
        self._clients = ClientPerThread(settings, timeout)
        self.requests = 0  # for /metrics and the bench: requests per change, per idle minute
        # what the last stale read said about the servers: ms since the answering server last
        # heard from a leader, and whether it knows one (X-Consul-LastContact, -KnownLeader)
        self.last_contact_ms = 0
        self.known_leader = True

    def get(self, path: str, params: dict[str, str]) -> Response:
        """A GET; with `index` in params it blocks, and py-consul sizes the read timeout to `wait`.

        The token goes in the X-Consul-Token header, never in the URL, and every error text is
        scrubbed: requests quotes the URL it failed on."""
        client = self._clients.get()
        scrub = self._settings.scrub
        self.requests += 1
        try:
            raw = client.http.get(lambda r: r, path, params=list(params.items()), headers=client.prepare_headers())
        except (requests.RequestException, consul.exceptions.Timeout, OSError) as err:
            raise ConsulUnavailable(scrub(f"consul {self._settings.url}{path}: {err}")) from None
        if raw.code >= 500:
            raise ConsulUnavailable(scrub(f"consul {path}: {raw.code} {raw.body[:200]}"))
        if raw.code == 404:
            return Response(int(raw.headers.get("X-Consul-Index", "1")), None)
        if raw.code == 403:
            raise ConsulForbidden(scrub(f"permission denied reading {path} (needs {read_permission(path)}): "
                                        f"{raw.body[:200]}"))  # fmt: skip
        if raw.code >= 400:
            raise ConsulRejected(scrub(f"consul {path}: {raw.code} {raw.body[:200]}"))
        try:
            data = json.loads(raw.body) if raw.body else None
        except ValueError as err:
            raise ConsulUnavailable(f"consul {path}: bad JSON: {err}") from None
        last_contact_ms = int(raw.headers.get("X-Consul-LastContact", "0") or 0)
        if "stale" in params:
            self.last_contact_ms = last_contact_ms
            self.known_leader = raw.headers.get("X-Consul-KnownLeader", "true") == "true"
        return Response(
            index=int(raw.headers.get("X-Consul-Index", "0") or 0),
            data=data,
            last_contact_ms=last_contact_ms,
        )


def read_permission(path: str) -> str:
    """The ACL permission a templater read needs. Pure."""
    if path.startswith("/v1/kv/"):
        return f'key:read on "{urllib.parse.unquote(path[len("/v1/kv/") :])}"'
    if path.startswith("/v1/catalog/node"):
        return "node:read and service:read"
    if path.startswith("/v1/health/"):
        return "service:read and node:read"
    return "service:read"


StateFn = Callable[[str, bool, str], None]

FULL_READ_GAP = 0.25  # full reads for unexplained changes start at most this often (a burst costs a few)
VANISHED_GRACE = 5.0  # an instance whose checks vanished is not routed to for this long (or until it goes)
CHECKS_GRACE = 0.05  # how long a catalog change waits for the checks of the same raft index
FULL_READ_FIRST = 0.2  # a full read waits this long for checks that may explain the change
SAFETY_READ = 300.0  # and one at least this often (jittered), for what no watch announced
Signature = frozenset[tuple[str, ...]]
CATCH_UP = (0.05, 0.1, 0.2, 0.4, 0.8)  # re-reads of a service a lagging server answered
TARGETED_MAX = 32  # more changed services than this (an agent that lost its state): one full read


class CatalogSource:
    """A dc's catalog: services, instances with health, nodes; published as one Snapshot.

    Two blocking queries on documented endpoints watch everything: `/v1/catalog/services`
    (names and tags) and `/v1/health/state/any` (every check, with its service and node). A
    service whose tags changed, or whose set of checks changed (an instance with checks came
    or went), is read again on its own (`/v1/catalog/service/<name>`). A catalog change that
    neither explains (an instance without checks, or one changed in place) costs one full read
    (`/v1/catalog/node/<n>` for every node), debounced; one more runs every few minutes as a
    safety net. With --max-stale every read may be answered by any server, not the leader.
    """

    def __init__(
        self,
        dc: str,
        fetcher: ConsulFetcher,
        publish: Callable[[str, Snapshot], None],
        on_state: StateFn,
        settings: WatchSettings,
        warn: Callable[[str], None],
        supervisor: Supervisor | None = None,
    ) -> None:
        self.key = catalog_key(dc)
        self._params = {"dc": dc} if dc else {}
        self._read_params = dict(self._params, **({"stale": ""} if settings.stale else {}))
        self._fetcher = fetcher
        self._publish = publish
        self._warn = warn
        self._supervisor = supervisor or Supervisor()
        self._lock = threading.Condition()  # the state below; publishing happens under it, in order
        self._fetch_lock = threading.Lock()  # one read-and-apply at a time
        self._stopped = threading.Event()
        self._services: dict[str, Any] | None = None
        self._kept: dict[str, tuple[str, ...]] = {}
        self._checks: list[dict[str, Any]] | None = None
        self._signatures: dict[str, frozenset[tuple[str, ...]]] = {}
        self._check_nodes: frozenset[str] | None = None
        self._explained: dict[str, int] = {}  # service -> index of the checks that explained it
        self._checks_index = 0  # index of the last checks answer whose explanation is recorded
        self._checkless: set[str] = set()  # services with an instance that has no check
        self._vanished: dict[tuple[str, str], float] = {}  # instance -> when its checks all vanished
        self._last_full = 0.0
        self._health = Health()
        self._rows: dict[str, list[Row]] = {}
        self._bare: dict[str, tuple[Instance, ...]] = {}
        self._dirty: set[str] = set()
        self._nodes: tuple[Node, ...] = ()
        self._loaded = False
        self._seq = 0
        self._read_at: dict[str, int] = {}  # service -> _seq of its last targeted read, until a full read
        self._pending_since: float | None = None
        self._pending_index = 0
        self._next_safety = time.monotonic() + _jittered(SAFETY_READ)
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
                supervisor=self._supervisor,
            ),
            BlockingLoop(
                f"{self.key}.checks",
                "/v1/health/state/any",
                params,
                fetcher,
                self._checks_changed,
                on_state,
                settings,
                supervisor=self._supervisor,
            ),
        ]

    def start(self) -> None:
        for loop in self.loops:
            loop.start()
        self._supervisor.start(f"full-read {self.key}", self._full_read_loop, self._stopped)

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        with self._lock:
            self._stopped.set()
            self._lock.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- reads

    def _map(self, fn: Callable[[str], Response], items: list[str]) -> list[Response]:
        """fn over items on the read pool; once stop() shut the pool down, a ConsulUnavailable
        that the stopping watch loop swallows."""
        try:
            return list(self._pool.map(fn, items))
        except RuntimeError as err:  # cannot schedule new futures after shutdown
            raise ConsulUnavailable(f"{self.key}: reads stopped ({err})") from None

    def _read_services(self, names: set[str]) -> dict[str, list[Row]]:
        ordered = sorted(names)
        paths = [f"/v1/catalog/service/{urllib.parse.quote(n, safe='')}" for n in ordered]
        results = self._map(lambda path: self._fetcher.get(path, self._read_params), paths)
        return {
            n: sorted_rows(service_row(r) for r in (res.data or []) if isinstance(r, dict))
            for n, res in zip(ordered, results, strict=True)
        }

    def _read_caught_up(
        self, names: set[str], signatures: dict[str, frozenset[tuple[str, ...]]]
    ) -> dict[str, list[Row]]:
        """Read these services; a stale read that misses an instance the checks already show
        came from a server behind the one that answered the checks: read those again, a few
        times over about a second (the servers catch up within a heartbeat)."""
        rows = self._read_services(names)
        behind = {n for n in names if behind_checks(signatures.get(n, frozenset()), rows.get(n, []))}
        for delay in CATCH_UP:
            if not behind or self._stopped.wait(delay):
                break
            rows.update(self._read_services(behind))
            behind = {n for n in behind if behind_checks(signatures.get(n, frozenset()), rows.get(n, []))}
        if behind:
            log.debug("%s: reads still behind the checks for %s", self.key, sorted(behind)[:5])
        return rows

    def _read_nodes(self) -> list[dict[str, Any]]:
        data = self._fetcher.get("/v1/catalog/nodes", self._read_params).data or []
        return [n for n in data if isinstance(n, dict)]

    def _read_everything(self) -> tuple[dict[str, list[Row]], list[dict[str, Any]]]:
        nodes = self._read_nodes()
        names = [str(n.get("Node", "")) for n in nodes]
        quoted = [urllib.parse.quote(n, safe="") for n in names]
        results = self._map(lambda q: self._fetcher.get(f"/v1/catalog/node/{q}", self._read_params), quoted)
        rows = group_rows(row for name, r in zip(names, results, strict=True) for row in rows_from_node(name, r.data))
        return rows, nodes

    # -- the watch callbacks

    def _services_changed(self, data: Any, index: int) -> None:
        services = dict(data or {})
        if self._loaded:
            # a registration with checks moves both watches at the same index: give the checks
            # answer a moment, so that it explains this change and no full read is needed
            with self._lock:
                self._lock.wait_for(lambda: self._checks_index >= index or self._stopped.is_set(), CHECKS_GRACE)
        with self._fetch_lock:
            if not self._loaded:
                self._load_everything(services)
                return
            with self._lock:
                old = self._services or {}
                names = {n for n in set(old) | set(services) if old.get(n) != services.get(n)}
                explained = {n for n, i in self._explained.items() if i >= index}
                self._explained = {n: i for n, i in self._explained.items() if i > index}
                checkless = set(self._checkless) & set(services)
            if len(names) > TARGETED_MAX:
                self._load_everything(services)
                return
            unexplained = not names and not explained
            many_checkless = len(checkless) > TARGETED_MAX
            if not many_checkless:
                # an instance without checks may come or go in any catalog move, hidden behind an
                # explained one: the services that have such instances are read every time
                names = names | checkless
            log.debug("%s: catalog at %d: read=%s explained=%s checkless=%d", self.key, index, sorted(names)[:5],
                      sorted(explained)[:5], len(checkless))  # fmt: skip
            rows = self._read_services(names & set(services)) if names else {}
            with self._lock:
                self._set_services(services)
                moved = self._apply_targeted(names, rows)
                self._rebuild()
        if many_checkless:
            # too many services with check-less instances to read on their own, and no check
            # will say which one moved: read everything, at once (rate-limited)
            self._schedule_full(index, 0.0)
        elif unexplained and not moved:
            # nothing says what moved (an instance re-registered in place, one without checks
            # in a service that had only checked ones): read everything. The agent's check
            # write usually follows a service it registered and cancels this.
            self._schedule_full(index, FULL_READ_FIRST)

    def _checks_changed(self, data: Any, index: int) -> None:
        checks = [c for c in data or [] if isinstance(c, dict)]
        signatures = check_signatures(checks)
        node_names = frozenset(str(c.get("Node", "")) for c in checks if not c.get("ServiceID"))
        with self._lock:
            old = self._signatures
            # a node joined or left (its serfHealth check came or went): read the node list
            nodes_moved = self._loaded and self._check_nodes is not None and node_names != self._check_nodes
            self._check_nodes = node_names
            changed = {n for n in set(signatures) | set(old) if signatures.get(n) != old.get(n)}
            for name in changed:
                self._explained[name] = index
            # instances these checks are the first news of: an agent that wrote a service and
            # then its check. Only they may explain a catalog change that came before them.
            listed = {(str(r["Node"]), str(r["ServiceID"])) for n in changed for r in self._rows.get(n, ())}
            newcomers = any((sig[0], sig[1]) not in listed for n in changed for sig in signatures.get(n, frozenset()))
            self._checks_index = max(self._checks_index, index)
            self._lock.notify_all()
        if self._loaded and (changed or nodes_moved):
            with self._fetch_lock:
                if len(changed) > TARGETED_MAX:
                    self._load_everything(self._services or {})
                else:
                    rows = self._read_caught_up(changed, signatures)
                    nodes = self._read_nodes() if nodes_moved else None
                    with self._lock:
                        self._apply_targeted(changed, rows)
                        if nodes is not None:
                            self._set_nodes(nodes)
        with self._lock:
            self._checks = checks
            self._signatures = signatures
            health = health_index(checks)
            now = time.monotonic()
            # an instance whose checks all vanished while it is still listed is being
            # deregistered (Consul removes its checks before the service): never route to it
            for instance in set(self._health.services) - set(health.services):
                self._vanished.setdefault(instance, now)
            for instance in set(health.services):
                self._vanished.pop(instance, None)
            if self._vanished:
                self._next_safety = min(self._next_safety, now + VANISHED_GRACE)
                self._lock.notify_all()
            self._health = health
            if newcomers and self._pending_since is not None and index >= self._pending_index:
                log.debug("%s: checks at %d explain the catalog change: %s", self.key, index, sorted(changed))
                self._pending_since = None  # these checks explain the catalog change
            self._rebuild()

    def _load_everything(self, services: dict[str, Any]) -> None:
        rows, nodes = self._read_everything()
        with self._lock:
            self._set_services(services)
            self._apply_everything(rows, nodes, since=None)
            self._loaded = True
            self._rebuild()

    # -- the full read that catches what no watch explained

    def _schedule_full(self, index: int, delay: float) -> None:
        with self._lock:
            self._pending_index = max(self._pending_index, index)
            if self._pending_since is None:
                self._pending_since = time.monotonic() + delay
            self._lock.notify_all()

    def _full_read_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped.is_set():
                    now = time.monotonic()
                    due = self._next_safety
                    if self._pending_since is not None:
                        due = min(due, max(self._pending_since, self._last_full + FULL_READ_GAP))
                    if due <= now:
                        break
                    self._lock.wait(due - now)
                if self._stopped.is_set():
                    return
                self._pending_since = None
                self._last_full = time.monotonic()
                self._next_safety = self._last_full + _jittered(SAFETY_READ)
                since = self._seq
            if not self._loaded:
                continue
            try:
                with self._fetch_lock:
                    rows, nodes = self._read_everything()
                    with self._lock:
                        missed = self._apply_everything(rows, nodes, since=since)
                        if missed:
                            log.info("%s: full read found changes: %s", self.key, ", ".join(sorted(missed)))
                        if missed or self._vanished:
                            self._rebuild()
            except (ConsulUnavailable, ConsulRejected) as err:
                # the watch loops report the outage; their next change schedules another read
                log.debug("full catalog read %s failed: %s", self.key, err)

    # -- state (called with self._lock held)

    def _set_services(self, services: dict[str, Any]) -> None:
        if services != self._services:
            self._services = services
            self._kept = clean_services(services, self._warn)

    def _set_nodes(self, nodes: list[dict[str, Any]]) -> bool:
        kept = clean_nodes(nodes, self._warn)
        if kept == self._nodes:
            return False
        self._nodes = kept
        self._dirty.add("(nodes)")
        return True

    def _apply_targeted(self, names: set[str], rows: dict[str, list[Row]]) -> bool:
        """Take targeted reads; whether anything changed."""
        self._seq += 1
        moved = False
        for name in names:
            self._read_at[name] = self._seq
            moved |= self._set_rows(name, rows.get(name, []))
        return moved

    def _apply_everything(self, rows: dict[str, list[Row]], nodes: list[dict[str, Any]], since: int | None) -> set[str]:
        """Take a full read, except for services read on their own after it started. The changed names."""
        changed = set()
        for name in set(rows) | set(self._rows):
            if since is not None and self._read_at.get(name, 0) > since:
                continue
            if self._set_rows(name, rows.get(name, [])):
                changed.add(name)
        # what was read on its own before this full read began is now covered by it
        self._read_at = {n: s for n, s in self._read_at.items() if since is not None and s > since}
        if self._set_nodes(nodes):
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
        for name in self._dirty - {"(nodes)"}:
            built = build_instances(name, self._rows.get(name, ()), self._warn)
            if built:
                self._bare[name] = built
            else:
                self._bare.pop(name, None)
        self._dirty.clear()
        checked = self._health.services
        self._checkless = {
            name
            for name, rows in self._rows.items()
            if any((r.get("Node"), r.get("ServiceID")) not in checked for r in rows)
        }
        instances = instances_with_health(self._kept, self._bare, self._health_now())
        # _kept and _nodes are replaced, never changed in place: the snapshot can share them
        self._publish(self.key, Snapshot(self._kept, instances, self._nodes))
        log.debug("catalog rebuilt %s in %.1f ms", self.key, (time.perf_counter() - started) * 1000)

    def _health_now(self) -> Health:
        """The health index, with instances whose checks just vanished counted critical."""
        if not self._vanished:  # the usual case: nothing to walk
            return self._health
        now = time.monotonic()
        listed = {(str(r["Node"]), str(r["ServiceID"])) for rows in self._rows.values() for r in rows}
        self._vanished = {i: t for i, t in self._vanished.items() if now - t < VANISHED_GRACE and i in listed}
        if not self._vanished:
            return self._health
        services = dict(self._health.services)
        services.update(dict.fromkeys(self._vanished, CRITICAL))
        return Health(self._health.nodes, services)


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(0.9, 1.1)


def kv_watch(
    key: str,
    path: str,
    recurse: bool,
    dc: str,
    fetcher: ConsulFetcher,
    publish: Callable[[str, Any], None],
    on_state: StateFn,
    settings: WatchSettings,
    supervisor: Supervisor | None = None,
) -> BlockingLoop:
    """One KV key (`key`) or prefix (`ls`, `tree`): a blocking query of its own."""
    params = {"dc": dc} if dc else {}
    if recurse:
        params["recurse"] = ""

    def changed(data: Any, _index: int) -> None:
        publish(key, data or [])

    quoted = urllib.parse.quote(path.lstrip("/"))
    return BlockingLoop(key, f"/v1/kv/{quoted}", params, fetcher, changed, on_state, settings, supervisor=supervisor)

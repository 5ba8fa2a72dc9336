"""Consul as the templater reads it: an HTTP fetcher and the sources templates depend on.

Connections: a dc's catalog is watched with one blocking query per node, one for the node
list and two for the checks that are not passing (critical, warning), and read with a small pool (changed
services), so a template over 10,000 services keeps the nodes plus a handful of connections
open, where one blocking query per service would hold 10,000. Each KV key or prefix a template
reads has its own blocking query.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from sidecar.backoff import Backoff
from sidecar.consul_conn import ConsulSettings
from sidecar.consul_http import ConsulHTTP
from sidecar.memory import gc_paused
from sidecar.threads import Supervisor
from templater.catalog import Snapshot
from templater.catalog_index import CatalogIndex
from templater.deps import KV, Catalog
from templater.errors import ConsulRejected, ConsulUnavailable
from templater.watch import BlockingLoop, Response, WatchSettings

log = logging.getLogger("templater.consul")

NODE_POOL = 4


class ConsulFetcher:
    """The templater's reads, through the shared HTTP layer (one connection per thread)."""

    def __init__(self, settings: ConsulSettings, timeout: float = 10.0) -> None:
        self._http = ConsulHTTP(settings, timeout)
        # what the last stale read said about the servers: ms since the answering server last
        # heard from a leader, and whether it knows one (X-Consul-LastContact, -KnownLeader)
        self.last_contact_ms = 0
        self.known_leader = True

    @property
    def requests(self) -> int:  # for /metrics and the bench: requests per change, per idle minute
        return self._http.requests

    @property
    def bytes(self) -> int:  # the answers' bodies
        return self._http.bytes

    def get(self, path: str, params: dict[str, str]) -> Response:
        """A GET; with `index` in params it blocks, and py-consul sizes the read timeout to `wait`.
        A 404 is no data (a KV key not there yet)."""
        answer = self._http.get(path, list(params.items()), doing=f"reading {path}", needs=read_permission(path))
        if not answer.found:
            return Response(answer.index, None)
        if "stale" in params:
            self.last_contact_ms = answer.last_contact_ms
            self.known_leader = answer.known_leader
        return Response(answer.index, answer.data, answer.last_contact_ms)


def read_permission(path: str) -> str:
    """The ACL permission a templater read needs. Pure."""
    if path.startswith("/v1/kv/"):
        return f'key:read on "{urllib.parse.unquote(path[len("/v1/kv/") :])}"'
    if path.startswith("/v1/catalog/node"):
        return "node:read and service:read"
    if path.startswith("/v1/agent/"):
        return "agent:read on the agent's node"
    if path.startswith("/v1/health/"):
        return "service:read and node:read"
    return "service:read"


StateFn = Callable[[str, bool, str], None]

READ_POOL = 4  # connections for service reads and the first (or safety) read of every node
CATCH_UP = (0.05, 0.1, 0.2, 0.4, 0.8)  # re-reads of a service a lagging server answered
SAFETY_READ = 900.0  # every node and the checks read again at least this often (jittered)
# the checks that are not passing, a watch per state: Consul finds them by its index of checks by
# status, where a filter over /v1/health/state/any evaluates every check of the datacenter on each
# wake (about 10 ms of Consul's CPU per change at 10,000 checks, on the machine the proxy runs on)
NOT_PASSING = ("critical", "warning")


class ReadQueue:
    """Which services to read next and when: the pure plan of the catalog's reads.

    A service asked for again while queued is read once; one a lagging server answered is read
    again after each CATCH_UP delay in turn, then taken as it is."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._attempts: dict[str, int] = {}

    def want(self, names: set[str], now: float) -> None:
        for name in names:
            self._due[name] = min(self._due.get(name, now), now)
            self._attempts.pop(name, None)

    def behind(self, name: str, now: float) -> bool:
        """A read of name missed what the node watches show: whether it is read again."""
        attempt = self._attempts.get(name, 0)
        if attempt >= len(CATCH_UP):
            self._attempts.pop(name, None)
            return False
        self._attempts[name] = attempt + 1
        self._due[name] = now + CATCH_UP[attempt]
        return True

    def retry(self, names: list[str], when: float) -> None:
        for name in names:
            self._due[name] = min(self._due.get(name, when), when)

    def take(self, now: float) -> list[str]:
        ready = sorted(n for n, t in self._due.items() if t <= now)
        for name in ready:
            del self._due[name]
        return ready

    def next_due(self) -> float | None:
        return min(self._due.values(), default=None)


class CatalogReads:
    """A dc's catalog reads that are not watches: nodes' lists, the checks, services; on a small
    pool of connections. With --max-stale any server may answer them."""

    def __init__(self, key: str, fetcher: ConsulFetcher, params: dict[str, str]) -> None:
        self._key = key
        self._fetcher = fetcher
        self._params = params
        self._pool = ThreadPoolExecutor(READ_POOL, thread_name_prefix="catalog-read")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _many(self, paths: dict[str, str]) -> dict[str, Response]:
        """Each name's path read on the pool; once close() shut the pool down, a
        ConsulUnavailable that the stopping watch loop swallows."""
        try:
            answers = list(self._pool.map(lambda p: self._fetcher.get(p, self._params), paths.values()))
        except RuntimeError as err:  # cannot schedule new futures after shutdown
            raise ConsulUnavailable(f"{self._key}: reads stopped ({err})") from None
        return dict(zip(paths, answers, strict=True))

    def nodes(self, names: list[str]) -> dict[str, Response]:
        return self._many({n: f"/v1/catalog/node-services/{urllib.parse.quote(n, safe='')}" for n in names})

    def services(self, names: list[str]) -> dict[str, Response]:
        return self._many({n: f"/v1/health/service/{urllib.parse.quote(n, safe='')}" for n in names})

    def not_passing(self) -> dict[str, Response]:
        return {state: self._fetcher.get(f"/v1/health/state/{state}", self._params) for state in NOT_PASSING}

    def all_checks(self) -> list[dict[str, Any]]:
        return _checks(self._fetcher.get("/v1/health/state/any", self._params).data)

    def whole(self, names: list[str], with_checks: bool) -> WholeRead:
        """Every node's list, the checks that are not passing (and every check, with_checks):
        the first read of a catalog, and the safety read."""
        nodes = self.nodes(names)
        not_passing = self.not_passing()
        return WholeRead(nodes, not_passing, self.all_checks() if with_checks else None)


class WholeRead(NamedTuple):
    nodes: dict[str, Response]
    not_passing: dict[str, Response]  # state -> its watch's first answer
    all_checks: list[dict[str, Any]] | None

    def load_into(self, index: CatalogIndex) -> None:
        not_passing = _flatten({state: _checks(r.data) for state, r in self.not_passing.items()})
        index.load({n: r.data for n, r in self.nodes.items()}, not_passing, self.all_checks)


def rebuilt(whole: WholeRead) -> dict[str, Any]:
    """Each service's instances in a catalog built afresh from a whole read."""
    fresh = CatalogIndex(lambda _message: None)
    whole.load_into(fresh)
    fresh.take_changed()
    return fresh.instances


def differences(kept: dict[str, Any], fresh: dict[str, Any]) -> set[str]:
    return {n for n in set(kept) | set(fresh) if kept.get(n) != fresh.get(n)}


class CatalogSource:
    """A dc's catalog: services, instances with health, nodes; published as one Snapshot.

    Watches: `/v1/catalog/nodes` (which nodes there are), one `/v1/catalog/node-services/<n>` per node
    (that node's instances: a blocking query that wakes only when they change), and the checks
    that are not passing (`/v1/health/state/critical` and `.../warning`). A service an answer names is
    read on its own (`/v1/health/service/<name>`) on a small pool. So a change costs the
    changed node's list and the changed service, whatever the size of the catalog; the
    connections are the nodes plus a handful. Every node is read once at the start and again
    every SAFETY_READ, a check on this bookkeeping. With --max-stale any server may answer.
    """

    def __init__(
        self,
        dep: Catalog,
        fetcher: ConsulFetcher,
        publish: Callable[[str, Snapshot], None],
        on_state: StateFn,
        settings: WatchSettings,
        warn: Callable[[str], None],
        supervisor: Supervisor | None = None,
    ) -> None:
        self.key = dep.key
        self._params = {"dc": dep.dc} if dep.dc else {}
        self._read_params = dict(self._params, **({"stale": ""} if settings.stale else {}))
        self._fetcher = fetcher
        self._publish = publish
        self._on_state = on_state
        self._settings = settings
        self._warn = warn
        self._supervisor = supervisor or Supervisor()
        self._lock = threading.Condition()  # the index and the queue; publishing happens under it
        self._stopped = threading.Event()
        self._index = CatalogIndex(warn)
        self._queue = ReadQueue()
        self._loaded = False
        self._keep_checks = False  # each instance's checks too (a template reads `.Checks`)
        self._last_index: dict[str, int] = {}  # watch -> its last index, to see Consul lose its state
        self._node_loops: dict[str, BlockingLoop] = {}
        self._checks_loops: dict[str, BlockingLoop] = {}  # state -> its watch
        self._not_passing: dict[str, list[dict[str, Any]]] = {}  # state -> the checks in it
        self._reads = CatalogReads(self.key, fetcher, self._read_params)
        self.safety_reads = 0
        self._nodes_loop = self._loop(f"{self.key}.nodes", "/v1/catalog/nodes", self._nodes_changed)

    @property
    def loops(self) -> list[BlockingLoop]:
        with self._lock:
            return [self._nodes_loop, *self._checks_loops.values(), *self._node_loops.values()]

    def start(self) -> None:
        self._nodes_loop.start()
        self._supervisor.start(f"reads {self.key}", self._read_loop, self._stopped)
        self._supervisor.start(f"safety-read {self.key}", self._safety_loop, self._stopped)

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        with self._lock:
            self._stopped.set()
            self._lock.notify_all()
        self._reads.close()

    # -- reads

    def _loop(
        self, key: str, path: str, on_change: Callable[[Any, int], None], start: Response | None = None,
        skip_equal: bool = True,
    ) -> BlockingLoop:  # fmt: skip
        return BlockingLoop(
            key, path, dict(self._params), self._fetcher, on_change, self._on_state,
            self._settings, skip_equal=skip_equal, supervisor=self._supervisor, start=start,
        )  # fmt: skip

    # -- each instance's checks

    def keep_checks(self, on: bool) -> None:
        """Keep each instance's checks (a template reads them), or stop. Turned on after the
        first read, every check is read once on the pool; the watches keep them from then on."""
        with self._lock:
            if on == self._keep_checks or self._stopped.is_set():
                return
            self._keep_checks = on
            loaded = self._loaded
            self._index.keep_checks(on)
            if not loaded:  # the first read reads them with the rest
                return
            if not on:  # off at once: instances without their checks
                self._publish_changes()
                return
        self._start_loading_checks()

    def _start_loading_checks(self) -> None:
        """Every check read once, on a thread of its own: again after a backoff while Consul
        fails; given up when the checks are no longer wanted."""
        done = threading.Event()

        def body() -> None:
            backoff = Backoff(self._settings.backoff_base, self._settings.backoff_cap)
            while not self._stopped.is_set() and self._keep_checks:
                try:
                    checks = self._reads.all_checks()
                except (ConsulUnavailable, ConsulRejected) as err:
                    self._on_state(f"{self.key}.checks(any)", False, str(err))
                    self._stopped.wait(backoff.next_delay())
                    continue
                self._on_state(f"{self.key}.checks(any)", True, "")
                with self._lock:
                    if self._keep_checks:
                        self._index.load_checks(checks)
                        self._publish_changes()
                break
            done.set()  # read, stopped or no longer wanted: not a thread to restart

        self._supervisor.start(f"checks {self.key}", body, done)

    # -- watch callbacks

    def _saw(self, key: str, index: int) -> None:
        """An index that went backwards: Consul lost its state; service indexes start again."""
        if index < self._last_index.get(key, 0):
            self._index.forget_read_indexes()
        self._last_index[key] = index

    def _nodes_changed(self, data: Any, index: int) -> None:
        nodes = [n for n in data or [] if isinstance(n, dict)]
        names = sorted({str(n.get("Node", "")) for n in nodes} - {""})
        if not self._loaded:
            self._load(nodes, names)
            return
        with self._lock:
            self._saw("nodes", index)
            self._index.set_nodes(nodes)
            for name in sorted(set(self._node_loops) - set(names)):
                log.info("%s: node %s left", self.key, name)
                self._node_loops.pop(name).stop()
                self._index.node_gone(name)
            for name in sorted(set(names) - set(self._node_loops)):
                self._watch_node(name, None)
            self._publish_changes()

    def _load(self, nodes: list[dict[str, Any]], names: list[str]) -> None:
        """The first read: every node, then the checks; then the watches go on from there."""
        started = time.perf_counter()
        with gc_paused:
            whole = self._reads.whole(names, self._keep_checks)
            with self._lock:
                self._index.set_nodes(nodes)
                self._not_passing = {state: _checks(answer.data) for state, answer in whole.not_passing.items()}
                if whole.all_checks is None and self._keep_checks:  # turned on while the first read was on its way
                    self._index.keep_checks(True)
                    self._start_loading_checks()
                whole.load_into(self._index)
                for name, answer in whole.nodes.items():
                    self._watch_node(name, answer)
                for state, answer in whole.not_passing.items():
                    self._watch_checks(state, answer)
                self._loaded = True
                self._publish_changes(first=True)
        log.info("%s: read %d nodes in %.0f ms", self.key, len(names), (time.perf_counter() - started) * 1000)

    def _watch_node(self, name: str, start: Response | None) -> None:
        quoted = urllib.parse.quote(name, safe="")

        def changed(data: Any, index: int) -> None:
            with self._lock:
                if name not in self._node_loops:
                    return  # the node left while this answer was on its way
                self._saw(f"node {name}", index)
                self._read_soon(self._index.node_answer(name, data))

        # node_answer compares the node's entries itself: the loop neither compares nor keeps the
        # answer (the decoded list of a node with 30,000 instances is about 48 MiB)
        path = f"/v1/catalog/node-services/{quoted}"
        loop = self._loop(f"{self.key}.node({name})", path, changed, start, skip_equal=False)
        self._node_loops[name] = loop
        loop.start()

    def _watch_checks(self, state: str, start: Response) -> None:
        def changed(data: Any, index: int) -> None:
            with self._lock:
                self._saw(f"checks {state}", index)
                self._not_passing[state] = _checks(data)
                # a check moving between the two states may be missing from both for a moment:
                # read as better, which is believed only after its service is read again
                self._read_soon(self._index.checks_answer(_flatten(self._not_passing)))

        loop = self._loop(f"{self.key}.checks({state})", f"/v1/health/state/{state}", changed, start=start)
        self._checks_loops[state] = loop
        loop.start()

    def _read_soon(self, names: set[str]) -> None:
        """After a watch's answer (the lock held): what changed published, the services it
        names read again on the pool."""
        self._queue.want(names, time.monotonic())
        self._publish_changes()
        self._lock.notify_all()

    # -- service reads

    def _read_loop(self) -> None:
        backoff = Backoff(self._settings.backoff_base, self._settings.backoff_cap)
        while not self._stopped.is_set():
            with self._lock:
                names = self._queue.take(time.monotonic())
                while not names and not self._stopped.is_set():
                    due = self._queue.next_due()
                    self._lock.wait(None if due is None else max(0.0, due - time.monotonic()))
                    names = self._queue.take(time.monotonic())
                since = self._index.checks_seq
            if self._stopped.is_set():
                return
            try:
                answers = self._reads.services(names)
            except (ConsulUnavailable, ConsulRejected) as err:
                self._on_state(f"{self.key}.reads", False, str(err))
                with self._lock:
                    self._queue.retry(names, time.monotonic() + backoff.next_delay())
                continue
            backoff.reset()
            self._on_state(f"{self.key}.reads", True, "")
            with self._lock:
                now = time.monotonic()
                for name, answer in answers.items():
                    read = self._index.service_answer(name, _entries(answer.data), answer.index, since)
                    if read.behind and self._queue.behind(name, now):
                        log.debug("%s: read of %s behind the node watches for %s", self.key, name, sorted(read.behind))
                self._publish_changes()

    # -- the safety read

    def _safety_loop(self) -> None:
        while not self._stopped.wait(_jittered(SAFETY_READ)):
            if not self._loaded:
                continue
            try:
                self.safety_read()
            except (ConsulUnavailable, ConsulRejected) as err:
                log.debug("safety read %s failed: %s", self.key, err)

    def safety_read(self) -> set[str]:
        """Read every node and the checks, build the catalog afresh, and read again the services
        where it differs from the one kept up to date. The names that differed."""
        started = time.perf_counter()
        with self._lock:
            names = sorted(self._node_loops)
        with gc_paused:
            fresh = rebuilt(self._reads.whole(names, self._keep_checks))
        with self._lock:
            self.safety_reads += 1
            differ = differences(self._index.instances, fresh)
            if differ:
                log.info("%s: safety read found changes: %s", self.key, ", ".join(sorted(differ)[:20]))
                self._queue.want(differ, time.monotonic())
                self._lock.notify_all()
        log.info("%s: safety read of %d nodes in %.0f ms", self.key, len(names), (time.perf_counter() - started) * 1000)
        return differ

    def _publish_changes(self, first: bool = False) -> None:
        """Hand what changed to the store (called with the lock held, so in order)."""
        changed = self._index.take_changed()
        if changed or first or self._index.nodes_changed():
            self._publish(self.key, self._index.snapshot(None if first else changed))


def _flatten(by_state: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The checks of every state that is not passing, in one list."""
    return [check for state in NOT_PASSING for check in by_state.get(state, [])]


def _checks(data: Any) -> list[dict[str, Any]]:
    return [c for c in data or [] if isinstance(c, dict)]


def _entries(data: Any) -> list[Any]:
    return list(data) if isinstance(data, list) else []


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(0.9, 1.1)


def kv_watch(
    dep: KV,
    fetcher: ConsulFetcher,
    publish: Callable[[str, Any], None],
    on_state: StateFn,
    settings: WatchSettings,
    supervisor: Supervisor | None = None,
) -> BlockingLoop:
    """One KV key (`key`) or prefix (`ls`, `tree`): a blocking query of its own."""
    params = {"dc": dep.dc} if dep.dc else {}
    if dep.recurse:
        params["recurse"] = ""

    def changed(data: Any, _index: int) -> None:
        publish(dep.key, data or [])

    quoted = urllib.parse.quote(dep.path.lstrip("/"))
    return BlockingLoop(
        dep.key, f"/v1/kv/{quoted}", params, fetcher, changed, on_state, settings, supervisor=supervisor
    )

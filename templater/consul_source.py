"""Consul as the templater reads it: an HTTP fetcher and the sources templates depend on.

Connections: a dc's whole catalog is watched with two blocking queries (`/v1/catalog/services`
and `/v1/health/state/any`) and refreshed per node with a small pool, so a template over 1,000
services keeps a handful of connections open, where one blocking query per service would hold
1,000. Each KV key or prefix a template reads has its own blocking query.
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
from templater.catalog import Snapshot, build_snapshot
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


class CatalogSource:
    """A dc's catalog: services, instances with health, nodes; published as one Snapshot."""

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
        self._lock = threading.Lock()
        self._services: dict[str, list[str]] | None = None
        self._checks: list[dict[str, Any]] | None = None
        self._nodes: dict[str, dict[str, Any]] = {}
        self._pool = ThreadPoolExecutor(NODE_POOL, thread_name_prefix="catalog-node")
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

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _services_changed(self, data: Any) -> None:
        nodes = self._fetch_nodes()
        with self._lock:
            self._services = dict(data or {})
            self._nodes = nodes
        self._rebuild()

    def _fetch_nodes(self) -> dict[str, dict[str, Any]]:
        nodes = self._fetcher.get("/v1/catalog/nodes", self._params).data or []
        names = [str(n.get("Node", "")) for n in nodes]
        quoted = [urllib.parse.quote(n, safe="") for n in names]
        results = list(self._pool.map(lambda q: self._fetcher.get(f"/v1/catalog/node/{q}", self._params), quoted))
        return {name: r.data for name, r in zip(names, results, strict=True) if r.data}

    def _checks_changed(self, data: Any) -> None:
        checks = list(data or [])
        owners = {(c.get("Node"), c.get("ServiceID")) for c in checks if c.get("ServiceID")}
        with self._lock:
            before = {(c.get("Node"), c.get("ServiceID")) for c in self._checks or [] if c.get("ServiceID")}
        if before - owners:
            # a service's checks vanished: it was most likely deregistered. Without re-reading
            # the nodes it would look like an instance with no checks, which counts as passing.
            nodes = self._fetch_nodes()
            with self._lock:
                self._nodes = nodes
        with self._lock:
            self._checks = checks
        self._rebuild()

    def _rebuild(self) -> None:
        with self._lock:
            if self._services is None or self._checks is None:
                return
            started = time.perf_counter()
            snapshot = build_snapshot(self._services, self._nodes, self._checks, self._warn)
        log.debug("catalog rebuilt %s in %.1f ms", self.key, (time.perf_counter() - started) * 1000)
        self._publish(self.key, snapshot)


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

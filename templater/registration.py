"""The proxy's own registration: a service per host (default `ingress`) whose TTL check follows
the templater's state, so the Consul UI shows whether this host's proxy serves a good config.

critical: the proxy is not running, or the last render, check or reload failed;
warning: servers are draining; passing otherwise. The check's output says which.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from dataclasses import dataclass

import psutil

from sidecar.consul_conn import ConsulSettings
from sidecar.consul_http import ConsulHTTP
from sidecar.once import SayOnce
from sidecar.own_registration import OwnRegistration, OwnService
from templater.errors import ConsulRejected, ConsulUnavailable

log = logging.getLogger("templater.registration")

PORTS_AGAIN = 60.0  # the proxy's listening ports are looked up again at least this often
HEARTBEAT = 10.0  # the TTL is 30 s: three missed heartbeats (a dead templater) turn it critical


@dataclass(frozen=True)
class State:
    status: str  # passing, warning or critical
    output: str


def proxy_version(binary: str) -> str:
    """'2.6.12-1+deb12u4' from `haproxy -v`, '1.22.1' from `nginx -v`; '' when unknown."""
    try:
        proc = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"(?:version |nginx/)(\S+)", proc.stdout + proc.stderr)
    return match.group(1) if match else ""


def proxy_processes(pid: int) -> list[psutil.Process]:
    """The proxy's master and its workers; [] when it is gone."""
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def listening_ports(procs: list[psutil.Process]) -> list[int]:
    """TCP ports these processes listen on. Each look parses every TCP socket of the machine
    (/proc/net/tcp): call it when the processes changed, not on every heartbeat."""
    ports: set[int] = set()
    for proc in procs:
        try:
            for conn in proc.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    ports.add(int(conn.laddr.port))
        except psutil.Error:
            continue
    return sorted(ports)


class SelfRegistration:
    """The proxy's own service (sidecar/own_registration.py does the agent's part): its ID
    `NAME:NODE`, its port the proxy's first listening port, its meta what proxy serves what."""

    def __init__(
        self, consul_settings: ConsulSettings, name: str, kind: str, config: str, address: str, page: str = ""
    ) -> None:
        """page: the routes page's address (the templater's status address), for the fleet view."""
        self._http = ConsulHTTP(consul_settings, 5.0)
        self._own = OwnRegistration(self._http, HEARTBEAT)
        self.name = name
        self._kind = kind
        self._config = config
        self._address = address
        self._version = proxy_version(kind)
        self.version = self._version
        self._page = page
        self._node = ""
        self._ports: list[int] = []  # the last ports seen (a proxy between two masters has none)
        self._ports_of: tuple[tuple[int, ...], list[int], float] = ((), [], 0.0)  # pids, ports, when
        self._said = SayOnce()

    def _service(self) -> OwnService:
        if not self._node:
            me = self._http.get("/v1/agent/self", doing="during agent self", needs="agent:read on this node")
            agent = me.mapping()
            self._node = str((agent.get("Config") or {}).get("NodeName") or "")
            self._address = self._address or str(((agent.get("Member") or {}).get("Addr")) or "")
        ports = self._ports
        return OwnService(
            id=f"{self.name}:{self._node}",
            name=self.name,
            port=ports[0] if ports else 0,
            address=self._address,
            tags=("sidecar", self._kind),
            meta=(
                ("proxy", self._kind),
                ("proxy_version", self._version or "unknown"),
                ("ports", ",".join(map(str, ports))),
                ("config", self._config[:200]),
                ("templater_host", self._node),
                *((("routes_page", self._page),) if self._page else ()),
            ),
            check_name=f"Proxy {self._kind} serves the rendered configuration",
            check_notes="The templater's state: critical when the proxy is not running or the last render, "
            "check or reload failed; warning while servers drain",
        )

    def _listening(self, master: int) -> list[int]:
        """The proxy's listening ports, looked up again only when its processes changed (a
        start or a reload: new workers)."""
        procs = proxy_processes(master)
        pids = tuple(sorted(p.pid for p in procs))
        now = time.monotonic()
        known_pids, ports, looked = self._ports_of
        # again at least every PORTS_AGAIN: a look during a reload may miss a port not bound yet
        if pids != known_pids or not ports or now - looked > PORTS_AGAIN:
            self._ports_of = (pids, listening_ports(procs), now)
        return self._ports_of[1]

    def update(self, state: State, master: int | None) -> None:
        """Register when needed; send the state when it changed or every HEARTBEAT. Never raises."""
        if self._own.settled(state.status, state.output):
            return  # twice a second: no look at the proxy's processes and ports
        if master:
            self._ports = self._listening(master) or self._ports
        try:
            self._own.update(self._service(), state.status, state.output)
        except (ConsulUnavailable, ConsulRejected) as err:
            if self._said.new("failing"):
                log.warning("own registration %s not updated, will retry: %s", self.name, err)
            return
        if self._said.over("failing"):
            log.info("own registration %s updated again", self.name)

    def deregister(self) -> None:
        try:
            self._own.deregister()
        except (ConsulUnavailable, ConsulRejected) as err:
            log.warning("own registration %s left in Consul: %s", self.name, err)

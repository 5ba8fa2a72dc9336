"""A program's own service in Consul, shown in the UI beside what it manages: the registrar per
host (passing while it follows the Docker engine), the templater's proxy (`ingress`, passing
while the proxy serves a good configuration). Its TTL check carries the program's state.

One implementation for both programs: registered when the agent does not have it yet (the
first time, after the agent lost it, after its definition changed), the check's state sent when
it changes and every HEARTBEAT (the TTL is three heartbeats: a program that died turns
critical), deregistered on a clean stop. Failures are raised for the caller to report its way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sidecar.consul_http import ConsulHTTP
from sidecar.errors import ConsulRejected

log = logging.getLogger("sidecar.own")

HEARTBEAT = 10.0
TTL = "30s"


@dataclass(frozen=True)
class OwnService:
    id: str
    name: str
    port: int
    address: str
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str], ...]
    check_name: str
    check_notes: str

    @property
    def check_id(self) -> str:
        return f"service:{self.id}"

    def definition(self, status: str) -> dict[str, object]:
        """The agent's registration body, its check starting at status."""
        return {
            "ID": self.id,
            "Name": self.name,
            "Port": self.port,
            "Address": self.address,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
            "Check": {"CheckID": self.check_id, "Name": self.check_name, "Notes": self.check_notes, "TTL": TTL,
                      "Status": status},
        }  # fmt: skip


class OwnRegistration:
    def __init__(self, http: ConsulHTTP, heartbeat: float = HEARTBEAT) -> None:
        self._http = http
        self._heartbeat = heartbeat
        self._registered: OwnService | None = None  # as the agent has it, as far as we know
        self._known: OwnService | None = None  # the last one registered: what a stop takes away
        self._sent: tuple[str, str] | None = None  # the state the check has
        self._sent_at = 0.0

    @property
    def registered(self) -> OwnService | None:
        return self._registered

    def settled(self, status: str, output: str) -> bool:
        """Nothing to send for this state: registered, the same state sent, no heartbeat due
        (a caller may skip building its service then)."""
        fresh = time.monotonic() - self._sent_at < self._heartbeat
        return self._registered is not None and (status, output) == self._sent and fresh

    def update(self, service: OwnService, status: str, output: str) -> None:
        """Register when needed, then send the state when it changed or the heartbeat is due.
        Raises ConsulUnavailable or ConsulRejected (then the next call registers again)."""
        if service == self._registered and self.settled(status, output):
            return
        now = time.monotonic()
        try:
            if service != self._registered:
                self._register(service, status)
            try:
                self._send(service, status, output)
            except ConsulRejected:
                self._register(service, status)  # the agent lost it (a restart): register again
                self._send(service, status, output)
        except Exception:
            self._registered = None
            raise
        if (status, output) != self._sent:
            log.info("own check %s %s: %s", service.name, status, output)
        self._sent, self._sent_at = (status, output), now

    def lost(self) -> None:
        """The agent does not list it (seen by the caller): register at the next update."""
        self._registered = None

    def deregister(self) -> None:
        """A clean stop takes it away. Raises as update() does."""
        service, self._known, self._registered = self._known, None, None
        if service is None:
            return
        self._http.put(f"/v1/agent/service/deregister/{service.id}", doing=f"during deregister {service.id}",
                       needs=f'service:write on "{service.name}"')  # fmt: skip
        log.info("deregistered own service=%s id=%s", service.name, service.id)

    def _register(self, service: OwnService, status: str) -> None:
        self._http.put("/v1/agent/service/register", service.definition(status),
                       doing=f"during register {service.id}", needs=f'service:write on "{service.name}"')  # fmt: skip
        self._registered = self._known = service
        self._sent = None  # the output goes with the update that follows
        log.info("registered own service=%s id=%s port=%d", service.name, service.id, service.port)

    def _send(self, service: OwnService, status: str, output: str) -> None:
        self._http.put(f"/v1/agent/check/update/{service.check_id}", {"Status": status, "Output": output},
                       doing=f"during check update {service.check_id}",
                       needs=f'service:write on "{service.name}"')  # fmt: skip

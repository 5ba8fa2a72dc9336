"""What the local agent should hold, and the writes that make it so.

The sync loop (registrar/sync.py) decides from Docker's events which services each container
has; this book keeps what the agent was told (the check statuses known, the maintenance wanted
and set, the deregistrations still pending) and writes through the Registry: each write is
logged, a refusal said once (refusals.py) and the change confirmed in the catalog (confirm.py).
`reconcile` compares the agent's state with what is wanted and does the difference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from registrar.authz import DRAIN_MARK
from registrar.confirm import CatalogConfirmer
from registrar.consul_registry import MAINTENANCE_MARK, Registry, is_ours
from registrar.errors import ConsulRejected
from registrar.model import CRITICAL, AgentState, Held, Service
from registrar.probe import Prober
from registrar.refusals import Refusals
from registrar.spec import OWNER_META
from sidecar.logs import kv
from sidecar.once import SayOnce

if TYPE_CHECKING:
    from registrar.lifecycle import Tracked

log = logging.getLogger("registrar.sync")


@dataclass
class Plan:
    register: list[Service] = field(default_factory=list)
    deregister: list[str] = field(default_factory=list)
    maintenance_on: list[str] = field(default_factory=list)
    maintenance_off: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.register or self.deregister or self.maintenance_on or self.maintenance_off)


def plan(
    desired: dict[str, Service],
    want_maintenance: set[str],
    agent: dict[str, Held],
    agent_maintenance: set[str],
    owned: Callable[[str, Held], bool],
) -> Plan:
    """What to do so that the agent holds the desired services. Pure.

    Every service of ours (owned(id, agent view)) without a container is removed, whether
    its deregistration failed before or it was left by an earlier run. agent_maintenance holds
    the services in maintenance that we put there; maintenance set by an operator is never
    lifted.
    """
    result = Plan()
    for service_id, service in sorted(desired.items()):
        view = agent.get(service_id)
        if view is None or not service.same_registration(view):
            result.register.append(service)
    result.deregister = sorted(sid for sid, view in agent.items() if sid not in desired and owned(sid, view))
    missing = {s.id for s in result.register if s.id not in agent}
    result.maintenance_on = sorted(
        sid for sid in want_maintenance if sid in desired and (sid not in agent_maintenance or sid in missing)
    )
    result.maintenance_off = sorted(sid for sid in agent_maintenance if sid in desired and sid not in want_maintenance)
    return result


class AgentBook:
    def __init__(
        self,
        registry: Registry,
        containers: dict[str, Tracked],
        hostname: str,
        prober: Prober,
        on_registered: Callable[[float], None],
    ) -> None:
        """containers: the sync loop's own map of what runs (read here, changed there)."""
        self._registry = registry
        self._containers = containers
        self._hostname = hostname
        self._prober = prober
        self._on_registered = on_registered  # seconds from the Docker event, for the histogram
        self.counts = {"registered": 0, "deregistered": 0}
        self.known_status: dict[str, str] = {}
        self.pending_deregister: set[str] = set()  # retried until the agent has them gone
        self.want_maintenance: set[str] = set()
        self.maintenance_reason: dict[str, str] = {}  # what the Consul UI shows as the reason
        self.agent_maintenance: set[str] = set()
        self.drained_by_plugin: set[str] = set()  # a stop the drain plugin saw; lifted on a start
        self.refusals = Refusals()
        self.confirmer = CatalogConfirmer(registry, self.registration_of)
        self._plan_said = SayOnce()  # the same plan retried every second is said once

    def statuses(self, service: Service, tracked: Tracked) -> dict[str, str]:
        statuses = {}
        for index, check in enumerate(service.checks):
            check_id = service.check_id(index)
            if check.kind == "docker":
                statuses[check_id] = tracked.docker_status or CRITICAL
            elif check_id in self.known_status:
                statuses[check_id] = self.known_status[check_id]
            elif check.initial_status is None:
                statuses[check_id] = CRITICAL
        return statuses

    def register(self, service: Service, tracked: Tracked, event_ns: int | None = None) -> None:
        try:
            self._registry.register(service, self.statuses(service, tracked))
        except ConsulRejected as err:
            self.refusals.refused(f"register {service.id} (container {tracked.name})", err)
            return
        self.refusals.accepted(f"register {service.id} (container {tracked.name})")
        self.pending_deregister.discard(service.id)
        self.counts["registered"] += 1
        self.confirmer.wrote(service.id)
        facts: dict[str, object] = {"service": service.name, "id": service.id, "port": service.port}
        if event_ns:
            seconds = (time.time_ns() - int(event_ns)) / 1e9
            facts["latency_ms"] = round(seconds * 1000, 1)
            self._on_registered(seconds)
        log.info("registered %s", kv(**facts))

    def deregister(self, service_id: str) -> None:
        """Deregister, or leave it pending: the tick retries until the agent has it gone."""
        self.pending_deregister.add(service_id)
        self.confirmer.forget(service_id)
        self._prober.cancel(service_id)
        self.want_maintenance.discard(service_id)
        self.agent_maintenance.discard(service_id)
        self.maintenance_reason.pop(service_id, None)
        for check_id in [
            c for c in self.known_status if c == f"service:{service_id}" or c.startswith(f"service:{service_id}:")
        ]:
            del self.known_status[check_id]
        try:
            self._registry.deregister(service_id)
        except ConsulRejected as err:
            self.refusals.refused(f"deregister {service_id}", err)
            return
        self.refusals.accepted(f"deregister {service_id}")
        self.pending_deregister.discard(service_id)
        self.counts["deregistered"] += 1
        log.info("deregistered %s", kv(id=service_id))

    def lifted_on_start(self) -> set[str]:
        """The maintenances a container's fresh start ends: the registrar's, and the drain
        plugin's (a container stopped, kept registered by --deregister, started again)."""
        return self.want_maintenance | self.agent_maintenance | self.drained_by_plugin

    def maintenance(self, service_id: str, enable: bool) -> None:
        reason = self.maintenance_reason.get(service_id, "Draining") if enable else ""
        if not enable:
            self.maintenance_reason.pop(service_id, None)
        try:
            self._registry.maintenance(service_id, enable, f"{reason} {MAINTENANCE_MARK}" if enable else None)
        except ConsulRejected as err:
            self.refusals.refused(f"maintenance {'on' if enable else 'off'} {service_id}", err)
            return
        self.refusals.accepted(f"maintenance {'on' if enable else 'off'} {service_id}")
        if enable:
            self.agent_maintenance.add(service_id)
        else:
            self.agent_maintenance.discard(service_id)
        self.confirmer.wrote(service_id)

    def ttl(self, check_id: str, status: str) -> None:
        try:
            self._registry.ttl_update(check_id, status, f"docker health: {status}")
        except ConsulRejected as err:
            self.refusals.refused(f"check update {check_id}", err)

    def registration_of(self, service_id: str) -> tuple[Service, dict[str, str]] | None:
        """For the confirmer: the service and its statuses as registered now, None once gone."""
        service = self.service(service_id)
        if service is None:
            return None
        return service, self.statuses(service, self._containers[service.container_id])

    def service(self, service_id: str) -> Service | None:
        for tracked in self._containers.values():
            if service_id in tracked.services:
                return tracked.services[service_id]
        return None

    def reconcile(self, state: AgentState, lingering: set[str], own_id: str | None) -> list[Service]:
        """Make the agent hold what the containers want, from its state just read; the services
        registered that it did not have (their probes start again)."""
        agent = state.services
        self.agent_maintenance = {sid for sid, reason in state.maintenance.items() if is_ours(reason)}
        self.drained_by_plugin = {sid for sid, reason in state.maintenance.items() if reason.endswith(DRAIN_MARK)}
        for check_id, (_, status) in state.checks.items():
            if check_id.startswith("service:"):
                self.known_status[check_id] = status
        desired = {sid: s for t in self._containers.values() for sid, s in t.services.items()}
        hostname = self._hostname
        # gone from the agent by other means (a restart that lost its state): nothing to retry
        self.pending_deregister &= set(agent)

        def owned(sid: str, view: Held) -> bool:
            if sid in lingering or sid == own_id:
                return False
            ours = sid.startswith(f"{hostname}:") or view.meta.get(OWNER_META) == hostname
            return ours or sid in self.pending_deregister

        todo = plan(desired, self.want_maintenance, agent, self.agent_maintenance, owned)
        if todo.empty():
            self._plan_said.over("plan")
            return []
        summary = kv(register=len(todo.register), deregister=len(todo.deregister), maintenance=len(todo.maintenance_on))
        if self._plan_said.new("plan", summary):
            log.info("reconcile %s", summary)
        fresh = []
        for service in todo.register:
            self.register(service, self._containers[service.container_id])
            if service.id not in agent:
                fresh.append(service)
        for service_id in todo.deregister:
            self.deregister(service_id)
        for service_id in todo.maintenance_on:
            self.maintenance(service_id, True)
        for service_id in todo.maintenance_off:
            self.maintenance(service_id, False)
        return fresh

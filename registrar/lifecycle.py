"""What each Docker event means for this host's containers and their services.

The sync loop (registrar/sync.py) hands each intent here in the order the engine gave them: a
container up (registered, probes started), stopping with a terminating signal or paused
(maintenance: the proxies drain it), dead or removed (deregistered, unless --deregister
on-success keeps a failed one), its Docker health, a listing of everything running (which
never undoes an event that came after it began), a probe that saw it ready. The writes go
through the AgentBook.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from registrar.agent_book import AgentBook
from registrar.consul_registry import Registry
from registrar.intents import TERMINATING, Died, Health, Intent, Listing, Ready, Stopping, Up
from registrar.model import PASSING, now_text
from registrar.probe import Prober
from registrar.settings import SyncSettings
from registrar.spec import container_name, docker_health_status, services_for
from sidecar.logs import kv
from sidecar.signals import parse_signal, signal_name

if TYPE_CHECKING:
    from registrar.model import Service

log = logging.getLogger("registrar.sync")

SEEN_MAX = 10_000  # containers remembered for listings in flight


@dataclass
class Tracked:
    container_id: str
    name: str
    services: dict[str, Service]
    generation: int
    stop_signal: int | None = None
    docker_status: str | None = None


class Lifecycle:
    def __init__(
        self,
        registry: Registry,
        settings: SyncSettings,
        containers: dict[str, Tracked],
        lingering: dict[str, list[str]],
        book: AgentBook,
        prober: Prober,
    ) -> None:
        """containers, lingering: the sync loop's maps (what runs; what died and is kept)."""
        self._registry = registry
        self._settings = settings
        self._containers = containers
        self._lingering = lingering
        self._book = book
        self._prober = prober
        self._generation = 0
        self._died_at: dict[str, int] = {}  # container -> sequence of its Died, for listings in flight
        self._up_at: dict[str, int] = {}  # container -> sequence of its last fresh Up

    def remember(self, intent: Intent, seq: int) -> None:
        """The event sequence of each death and fresh start, for listings in flight."""
        if isinstance(intent, Died):
            _remember(self._died_at, intent.container_id, seq)
        elif isinstance(intent, Up) and intent.fresh:
            _remember(self._up_at, str(intent.inspect.get("Id", "")), seq)

    def up(self, intent: Up) -> None:
        inspect = intent.inspect
        container_id = str(inspect.get("Id", ""))
        name = container_name(inspect)
        result = services_for(inspect, self._settings.spec)
        for error in result.errors:
            log.error("skipped %s", error)
        for note in result.skipped:
            log.info("ignored %s", note)
        for warning in result.warnings:
            log.warning("%s", warning)
        old = self._containers.get(container_id)
        if intent.fresh:
            # A restarted container is not ready because its previous run was.
            for service in result.services:
                for index, check in enumerate(service.checks):
                    if check.kind != "docker":
                        self._book.known_status.pop(service.check_id(index), None)
        if intent.fresh or old is None:
            self._generation += 1
        generation = self._generation if intent.fresh or old is None else old.generation
        tracked = Tracked(
            container_id=container_id,
            name=name,
            services={s.id: s for s in result.services},
            generation=generation,
            stop_signal=parse_signal((inspect.get("Config") or {}).get("StopSignal")),
            docker_status=docker_health_status(inspect),
        )
        self._containers[container_id] = tracked
        self._lingering.pop(container_id, None)
        stale = set(old.services) - set(tracked.services) if old else set()
        for service_id in sorted(stale):
            self._book.deregister(service_id)
        paused = bool((inspect.get("State") or {}).get("Paused"))
        for service in tracked.services.values():
            if intent.fresh or old is None or old.services.get(service.id) != service:
                self._book.register(service, tracked, intent.event_ns)
                if intent.fresh or old is None:  # also containers found running at start
                    self.start_probes(service, generation)
            if intent.fresh and not paused and service.id in self._book.lifted_on_start():
                self._book.want_maintenance.discard(service.id)
                self._book.drained_by_plugin.discard(service.id)
                self._book.maintenance(service.id, False)
            elif paused and service.id not in self._book.want_maintenance:
                self._book.want_maintenance.add(service.id)
                self._book.maintenance_reason[service.id] = f"Paused: found paused at {now_text()}"
                self._book.maintenance(service.id, True)

    def stopping(self, intent: Stopping) -> None:
        tracked = self._containers.get(intent.container_id)
        if tracked is None:
            return
        terminating = intent.signal in {int(s) for s in TERMINATING} or intent.signal == tracked.stop_signal
        if terminating:
            why = f"Draining: docker stop received at {now_text()} (signal {signal_name(intent.signal)})"
            self.set_maintenance(intent.container_id, True, why)

    def set_maintenance(self, container_id: str, enable: bool, why: str) -> None:
        tracked = self._containers.get(container_id)
        if tracked is None:
            return
        for service_id in sorted(tracked.services):
            if enable:
                self._book.want_maintenance.add(service_id)
                self._book.maintenance_reason[service_id] = why
            else:
                self._book.want_maintenance.discard(service_id)
            self._book.maintenance(service_id, enable)
            log.info("%s %s", "draining" if enable else "undraining", kv(id=service_id, reason=why))

    def died(self, container_id: str, exit_code: int | None) -> None:
        tracked = self._containers.pop(container_id, None)
        if tracked is None:
            return
        for service_id in tracked.services:
            self._prober.cancel(service_id)
        if self._settings.deregister == "on-success" and exit_code != 0:
            self._lingering[container_id] = sorted(tracked.services)
            log.info("kept %s", kv(container=tracked.name, exit_code=exit_code, deregister="on-success"))
            return
        # pending first: if Consul fails half-way, the tick retries every one of them
        self._book.pending_deregister.update(tracked.services)
        for service_id in sorted(tracked.services):
            self._book.deregister(service_id)

    def destroyed(self, container_id: str) -> None:
        self.died(container_id, None)
        lingering = self._lingering.pop(container_id, [])
        self._book.pending_deregister.update(lingering)
        for service_id in lingering:
            self._book.deregister(service_id)

    def health(self, intent: Health) -> None:
        tracked = self._containers.get(intent.container_id)
        if tracked is None:
            return
        tracked.docker_status = intent.status
        for service in tracked.services.values():
            for index, check in enumerate(service.checks):
                if check.kind == "docker":
                    check_id = service.check_id(index)
                    self._book.known_status[check_id] = intent.status
                    self._book.ttl(check_id, intent.status)
                    self._book.confirmer.wrote(service.id)
                    log.info("health %s", kv(id=service.id, status=intent.status))

    def listing(self, intent: Listing) -> None:
        """Every running container, as listed from `since` on. What the event stream said after
        that (a container that died, one that started) is newer than the listing and wins."""
        running = {str(i.get("Id", "")) for i in intent.inspects}
        for container_id in sorted(set(self._containers) - running):
            if self._up_at.get(container_id, -1) > intent.since:
                continue  # started after the listing began
            self.died(container_id, None)
        for inspect in intent.inspects:
            container_id = str(inspect.get("Id", ""))
            if self._died_at.get(container_id, -1) > intent.since:
                log.info("listing skipped %s: it died after the listing began", kv(container=container_name(inspect)))
                continue
            self.up(Up(inspect, fresh=False))

    def ready(self, intent: Ready) -> None:
        service = self._book.service(intent.service_id)
        if service is None:
            return
        tracked = self._containers[service.container_id]
        if tracked.generation != intent.generation:
            return
        check_id = service.check_id(intent.check_index)
        if self._book.known_status.get(check_id) == PASSING:
            return
        self._registry.set_check_status(service, intent.check_index, PASSING)
        self._book.known_status[check_id] = PASSING
        self._book.confirmer.wrote(service.id)
        log.info("ready %s", kv(id=service.id, check=check_id))

    def start_probes(self, service: Service, generation: int) -> None:
        for index, check in enumerate(service.checks):
            if check.probeable and self._book.known_status.get(service.check_id(index)) != PASSING:
                self._prober.start(service.id, index, check, generation)


def _remember(seen: dict[str, int], container_id: str, seq: int) -> None:
    """A container's latest event sequence, for listings in flight; the oldest half goes once
    there are SEEN_MAX (a host where containers come and go never stops adding to it)."""
    seen.pop(container_id, None)  # the newest last: the dict is in event order
    seen[container_id] = seq
    if len(seen) > SEEN_MAX:
        for old in list(itertools.islice(seen, SEEN_MAX // 2)):
            del seen[old]

"""Keep the agent's services equal to the running containers.

One thread owns all state and makes every Consul call, fed by a queue of intents from the
Docker side and the readiness probes, so no lock and no ordering puzzles. A tick (every
second, or with backoff while Consul is away) compares what is desired with what the agent
holds and restores anything it lost.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from registrar.agent_book import AgentBook
from registrar.consul_registry import Registry
from registrar.errors import ConsulRejected, ConsulUnavailable
from registrar.intents import (
    TERMINATING,
    Destroyed,
    Died,
    Health,
    Intent,
    Listing,
    Paused,
    Ready,
    Stopping,
    Up,
)
from registrar.model import CRITICAL, PASSING, Service, now_text
from registrar.probe import Prober
from registrar.settings import SyncSettings
from registrar.spec import container_name, docker_health_status, services_for
from sidecar.backoff import Backoff
from sidecar.logs import kv
from sidecar.own_registration import OwnRegistration, OwnService
from sidecar.signals import parse_signal, signal_name

log = logging.getLogger("registrar.sync")

TICK = 1.0
SEEN_MAX = 10_000  # containers remembered for listings in flight
TTL_HEARTBEAT = 60.0


@dataclass
class Tracked:
    container_id: str
    name: str
    services: dict[str, Service]
    generation: int
    stop_signal: int | None = None
    docker_status: str | None = None


class Syncer:
    def __init__(
        self,
        registry: Registry,
        settings: SyncSettings,
        own: tuple[OwnService, OwnRegistration] | None = None,
        docker_state: Callable[[], tuple[bool, str]] = lambda: (True, ""),
        on_registered: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        """own: the registrar's own service and what registers it (its TTL check follows
        docker_state(), which says whether the Docker engine's events are followed and why not)."""
        self._registry = registry
        self._settings = settings
        self._own: OwnService | None = own[0] if own is not None else None
        self._own_registration: OwnRegistration | None = own[1] if own is not None else None
        self._docker_state = docker_state
        self._queue: queue.Queue[tuple[int, Intent | None]] = queue.Queue()
        self._submit_lock = threading.Lock()
        self._submitted = 0  # sequence of the last intent queued; the queue keeps this order
        self._died_at: dict[str, int] = {}  # container -> sequence of its Died, for listings in flight
        self._up_at: dict[str, int] = {}  # container -> sequence of its last fresh Up
        self._containers: dict[str, Tracked] = {}
        self._lingering: dict[str, list[str]] = {}  # died, kept by --deregister on-success
        self._consul_up: bool | None = None
        self._backoff = Backoff(base=0.1, cap=settings.retry_interval)
        self._generation = 0
        self._last_heartbeat = 0.0
        self._prober = Prober(self._on_ready, window=settings.probe_window)
        self._book = AgentBook(registry, self._containers, settings.spec.hostname, self._prober, on_registered)

    # -- state for /health and /metrics (read from another thread: plain reads of small values)

    @property
    def consul_up(self) -> bool | None:
        return self._consul_up

    @property
    def tracked(self) -> int:
        return len(self._containers)

    @property
    def pending_deregistrations(self) -> int:
        return len(self._book.pending_deregister)

    @property
    def denied(self) -> dict[str, str]:
        """Operations the ACL token may not do now (permission denied), with Consul's answer."""
        return self._book.refusals.denied

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._book.counts)

    # -- inputs, from any thread

    def submit(self, intent: Intent | None) -> None:
        with self._submit_lock:
            self._submitted += 1
            self._queue.put((self._submitted, intent))

    def mark(self) -> int:
        """The sequence a listing started at: call it before listing containers, then submit
        Listing(..., since=mark). Events queued after the mark win over the listing."""
        with self._submit_lock:
            return self._submitted

    def _on_ready(self, service_id: str, index: int, generation: int) -> None:
        self.submit(Ready(service_id, index, generation))

    def stop(self) -> None:
        self.submit(None)

    # -- the loop

    def run(self, stop: threading.Event) -> None:
        next_tick = time.monotonic()
        while not stop.is_set():
            wake = min(next_tick, self._book.confirmer.next_at() or next_tick)
            try:
                seq, intent = self._queue.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick()
                self._book.confirmer.confirm_due()
                continue
            if intent is None:
                if stop.is_set():
                    break
                continue
            self._handle(intent, seq)
        self._prober.cancel_all()
        self._deregister_own()

    def _handle(self, intent: Intent, seq: int = 0) -> None:
        if isinstance(intent, Died):
            _remember(self._died_at, intent.container_id, seq)
        elif isinstance(intent, Up) and intent.fresh:
            _remember(self._up_at, str(intent.inspect.get("Id", "")), seq)
        try:
            if isinstance(intent, Up):
                self._up(intent)
            elif isinstance(intent, Stopping):
                self._stopping(intent)
            elif isinstance(intent, Paused):
                self._set_maintenance(intent.container_id, True, f"Paused: docker pause at {now_text()}")
            elif isinstance(intent, Died):
                self._died(intent.container_id, intent.exit_code)
            elif isinstance(intent, Destroyed):
                self._destroyed(intent.container_id)
            elif isinstance(intent, Health):
                self._health(intent)
            elif isinstance(intent, Listing):
                self._listing(intent)
            elif isinstance(intent, Ready):
                self._ready(intent)
        except ConsulUnavailable as err:
            self._consul_down(err)
        except ConsulRejected as err:
            # one refused call (bad data for this agent version) never stops the loop
            log.error("refused %s: %s", kv(intent=type(intent).__name__), err)

    # -- container lifecycle

    def _up(self, intent: Up) -> None:
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
                    self._start_probes(service, generation)
            if intent.fresh and not paused and service.id in self._book.want_maintenance | self._book.agent_maintenance:
                self._book.want_maintenance.discard(service.id)
                self._book.maintenance(service.id, False)
            elif paused and service.id not in self._book.want_maintenance:
                self._book.want_maintenance.add(service.id)
                self._book.maintenance_reason[service.id] = f"Paused: found paused at {now_text()}"
                self._book.maintenance(service.id, True)

    def _stopping(self, intent: Stopping) -> None:
        tracked = self._containers.get(intent.container_id)
        if tracked is None:
            return
        terminating = intent.signal in {int(s) for s in TERMINATING} or intent.signal == tracked.stop_signal
        if terminating:
            why = f"Draining: docker stop received at {now_text()} (signal {signal_name(intent.signal)})"
            self._set_maintenance(intent.container_id, True, why)

    def _set_maintenance(self, container_id: str, enable: bool, why: str) -> None:
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

    def _died(self, container_id: str, exit_code: int | None) -> None:
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

    def _destroyed(self, container_id: str) -> None:
        self._died(container_id, None)
        lingering = self._lingering.pop(container_id, [])
        self._book.pending_deregister.update(lingering)
        for service_id in lingering:
            self._book.deregister(service_id)

    def _health(self, intent: Health) -> None:
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

    def _listing(self, intent: Listing) -> None:
        """Every running container, as listed from `since` on. What the event stream said after
        that (a container that died, one that started) is newer than the listing and wins."""
        running = {str(i.get("Id", "")) for i in intent.inspects}
        for container_id in sorted(set(self._containers) - running):
            if self._up_at.get(container_id, -1) > intent.since:
                continue  # started after the listing began
            self._died(container_id, None)
        for inspect in intent.inspects:
            container_id = str(inspect.get("Id", ""))
            if self._died_at.get(container_id, -1) > intent.since:
                log.info("listing skipped %s: it died after the listing began", kv(container=container_name(inspect)))
                continue
            self._up(Up(inspect, fresh=False))
        self._reconcile()

    def _ready(self, intent: Ready) -> None:
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

    # -- Consul calls, each logging what it did

    def _start_probes(self, service: Service, generation: int) -> None:
        for index, check in enumerate(service.checks):
            if check.probeable and self._book.known_status.get(service.check_id(index)) != PASSING:
                self._prober.start(service.id, index, check, generation)

    # -- the tick: notice a lost or restarted agent and restore

    def _tick(self) -> float:
        try:
            self._reconcile()
            self._update_own()
            if time.monotonic() - self._last_heartbeat > TTL_HEARTBEAT:
                self._heartbeat()
        except ConsulUnavailable as err:
            self._consul_down(err)
            return self._backoff.next_delay()
        except ConsulRejected as err:  # the token may not list this agent's services (or was revoked)
            self._book.refusals.refused("list this agent's services and checks", err)
            return self._backoff.next_delay()
        self._book.refusals.accepted("list this agent's services and checks")
        return TICK

    def _reconcile(self) -> None:
        state = self._registry.agent_state()
        self._consul_back()
        own_id = self._own.id if self._own is not None else None
        if own_id is not None and own_id not in state.services and self._own_registration is not None:
            self._own_registration.lost()  # the agent lost it (a restart): registered at the next update
        lingering = {sid for ids in self._lingering.values() for sid in ids}
        for service in self._book.reconcile(state, lingering, own_id):
            self._start_probes(service, self._containers[service.container_id].generation)

    # -- the registrar's own registration: a TTL check that follows the Docker engine

    def _own_check(self) -> tuple[str, str]:
        up, detail = self._docker_state()
        return (PASSING if up else CRITICAL), detail

    def _update_own(self) -> None:
        """Registered when the agent lacks it; its check sent when the state changes and every
        heartbeat. Consul down is the tick's to handle; a refusal is said once."""
        if self._own is None or self._own_registration is None:
            return
        status, output = self._own_check()
        operation = f"own registration {self._own.id}"
        try:
            self._own_registration.update(self._own, status, output)
        except ConsulRejected as err:
            self._book.refusals.refused(operation, err)
            return
        self._book.refusals.accepted(operation)

    def _deregister_own(self) -> None:
        """A clean stop takes the registrar's own registration with it."""
        if self._own_registration is None:
            return
        try:
            self._own_registration.deregister()
        except (ConsulUnavailable, ConsulRejected) as err:
            log.warning("own registration left in Consul %s: %s", kv(id=self._own.id if self._own else ""), err)

    def _heartbeat(self) -> None:
        for tracked in self._containers.values():
            if tracked.docker_status is None:
                continue
            for service in tracked.services.values():
                for index, check in enumerate(service.checks):
                    if check.kind == "docker":
                        self._book.ttl(service.check_id(index), tracked.docker_status)
        self._last_heartbeat = time.monotonic()

    def _consul_down(self, err: Exception) -> None:
        if self._consul_up is not False:
            log.warning("consul unavailable, will retry: %s", err)
        self._consul_up = False

    def _consul_back(self) -> None:
        if self._consul_up is False:
            log.info("consul available again")
        self._consul_up = True
        self._backoff.reset()


def _remember(seen: dict[str, int], container_id: str, seq: int) -> None:
    """A container's latest event sequence, for listings in flight; the oldest half goes once
    there are SEEN_MAX (a host where containers come and go never stops adding to it)."""
    seen.pop(container_id, None)  # the newest last: the dict is in event order
    seen[container_id] = seq
    if len(seen) > SEEN_MAX:
        for old in list(itertools.islice(seen, SEEN_MAX // 2)):
            del seen[old]

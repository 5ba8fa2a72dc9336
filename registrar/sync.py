"""Keep the agent's services equal to the running containers.

One thread owns all state and makes every Consul call, fed by a queue of intents from the
Docker side and the readiness probes, so no lock and no ordering puzzles. A tick (every
second, or with backoff while Consul is away) compares what is desired with what the agent
holds and restores anything it lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from registrar.agent_book import AgentBook
from registrar.consul_registry import Registry
from registrar.errors import ConsulRejected, ConsulUnavailable
from registrar.intents import (
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
from registrar.lifecycle import Lifecycle, Tracked
from registrar.model import CRITICAL, PASSING, now_text
from registrar.probe import Prober
from registrar.settings import SyncSettings
from sidecar.backoff import Backoff
from sidecar.logs import kv
from sidecar.own_registration import OwnRegistration, OwnService

log = logging.getLogger("registrar.sync")

TICK = 1.0
TTL_HEARTBEAT = 60.0


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
        self._containers: dict[str, Tracked] = {}
        self._lingering: dict[str, list[str]] = {}  # died, kept by --deregister on-success
        self._consul_up: bool | None = None
        self._backoff = Backoff(base=0.1, cap=settings.retry_interval)
        self._last_heartbeat = 0.0
        self._prober = Prober(self._on_ready, window=settings.probe_window)
        self._book = AgentBook(registry, self._containers, settings.spec.hostname, self._prober, on_registered)
        self._life = Lifecycle(registry, settings, self._containers, self._lingering, self._book, self._prober)

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
        self._life.remember(intent, seq)
        try:
            if isinstance(intent, Up):
                self._life.up(intent)
            elif isinstance(intent, Stopping):
                self._life.stopping(intent)
            elif isinstance(intent, Paused):
                self._life.set_maintenance(intent.container_id, True, f"Paused: docker pause at {now_text()}")
            elif isinstance(intent, Died):
                self._life.died(intent.container_id, intent.exit_code)
            elif isinstance(intent, Destroyed):
                self._life.destroyed(intent.container_id)
            elif isinstance(intent, Health):
                self._life.health(intent)
            elif isinstance(intent, Listing):
                self._life.listing(intent)
                self._reconcile()
            elif isinstance(intent, Ready):
                self._life.ready(intent)
        except ConsulUnavailable as err:
            self._consul_down(err)
        except ConsulRejected as err:
            # one refused call (bad data for this agent version) never stops the loop
            log.error("refused %s: %s", kv(intent=type(intent).__name__), err)

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
            self._life.start_probes(service, self._containers[service.container_id].generation)

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

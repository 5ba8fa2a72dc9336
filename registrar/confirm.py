"""After each write, the service is looked for in the catalog as the agent has it.

A change the agent could not pass on to the servers (an election, no quorum) is retried by its
anti-entropy only some seconds later: each change is confirmed in the catalog (one stale read
of this node for all that are due), and while it is missing there it is registered again
(which makes the agent sync everything pending), at growing intervals, for CONFIRM_FOR; after
that the agent's own anti-entropy is left to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from registrar.consul_registry import Registry
from registrar.errors import ConsulRejected, ConsulUnavailable
from registrar.model import Service
from sidecar.logs import kv

log = logging.getLogger("registrar.sync")

CONFIRM_FIRST = 0.25
CONFIRM_CAP = 0.5
CONFIRM_FOR = 120.0

# a service of ours and the check statuses to register it with; None: it is gone
Registration = Callable[[str], tuple[Service, dict[str, str]] | None]


@dataclass
class _Unconfirmed:
    next_at: float
    delay: float
    until: float


class CatalogConfirmer:
    def __init__(self, registry: Registry, registration: Registration) -> None:
        self._registry = registry
        self._registration = registration
        self._unconfirmed: dict[str, _Unconfirmed] = {}  # service -> when to look for it

    def wrote(self, service_id: str) -> None:
        """The agent took a change of service_id: look for it in the catalog soon."""
        now = time.monotonic()
        self._unconfirmed[service_id] = _Unconfirmed(now + CONFIRM_FIRST, CONFIRM_FIRST, now + CONFIRM_FOR)

    def forget(self, service_id: str) -> None:
        self._unconfirmed.pop(service_id, None)

    def next_at(self) -> float | None:
        """When the next look is due (monotonic), or None when nothing waits."""
        return min((u.next_at for u in self._unconfirmed.values()), default=None)

    def pending(self) -> set[str]:
        return set(self._unconfirmed)

    def confirm_due(self) -> None:
        """Look for the services due in the catalog; register again each one the catalog does
        not show as the agent has it (its checks' statuses included)."""
        now = time.monotonic()
        due = [sid for sid, u in self._unconfirmed.items() if u.next_at <= now]
        if not due:
            return
        try:
            services, statuses, known_leader = self._registry.node_in_catalog()
            local = self._registry.agent_state(services=False)
        except (ConsulUnavailable, ConsulRejected) as err:
            log.debug("catalog confirmation postponed: %s", err)
            for sid in due:
                self._postpone(sid, now)
            return
        for sid in due:
            registration = self._registration(sid)
            mine = local.statuses_of(sid)
            if registration is None or (sid in services and all(statuses.get(c) == st for c, st in mine.items())):
                del self._unconfirmed[sid]
                continue
            if now > self._unconfirmed[sid].until:
                log.warning("not in the catalog as the agent has it after %.0f s; left to the agent's "
                            "anti-entropy %s", CONFIRM_FOR, kv(id=sid))  # fmt: skip
                del self._unconfirmed[sid]
                continue
            if not known_leader:
                # nothing can reach the catalog before there is a leader: look again soon, and
                # register again the moment one is known
                self._unconfirmed[sid].next_at = now + CONFIRM_FIRST
                continue
            try:
                self._registry.register(*registration)
            except (ConsulUnavailable, ConsulRejected) as err:
                log.debug("register again postponed %s: %s", kv(id=sid), err)
            else:
                log.info("registered again: the catalog did not show the agent's state yet %s", kv(id=sid))
            self._postpone(sid, now)

    def _postpone(self, service_id: str, now: float) -> None:
        u = self._unconfirmed[service_id]
        u.next_at = now + u.delay
        u.delay = min(CONFIRM_CAP, u.delay * 2)

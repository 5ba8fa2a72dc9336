"""The registrar's sync loop with an in-memory registry: ordering of listings against events,
deregistrations that fail are retried, the loop never stops on a refusal."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from registrar.consul_registry import agent_state_from
from registrar.errors import ConsulUnavailable
from registrar.intents import Died, Listing, Up
from registrar.model import AgentState, Service
from registrar.settings import SyncSettings
from registrar.spec import SpecSettings
from registrar.sync import Syncer


class Registry:
    """The agent's service table in memory, the Registry interface; `down` makes calls fail."""

    def __init__(self) -> None:
        self.services_: dict[str, dict[str, Any]] = {}
        self.down = False
        # the servers' catalog: the agent passes a registration on only while they accept
        # writes (an election makes that sync fail, and it is not retried by itself)
        self.catalog: set[str] = set()
        self.catalog_writable = True

    def _guard(self) -> None:
        if self.down:
            raise ConsulUnavailable("consul down")

    def register(self, service: Service, statuses: dict[str, str]) -> None:
        self._guard()
        body = service.registration(statuses)
        view = {"ID": service.id, "Service": service.name, "Port": service.port, "Address": service.address}
        self.services_[service.id] = {**view, "Tags": body["Tags"], "Meta": body["Meta"]}
        if self.catalog_writable:
            self.catalog.add(service.id)

    def deregister(self, service_id: str) -> None:
        self._guard()
        self.services_.pop(service_id, None)

    def set_check_status(self, service: Service, index: int, status: str) -> None:
        self._guard()

    def ttl_update(self, check_id: str, status: str, note: str) -> None:
        self._guard()

    def maintenance(self, service_id: str, enable: bool, reason: str | None = None) -> None:
        self._guard()

    def agent_state(self, services: bool = True, checks: bool = True) -> AgentState:
        self._guard()
        return agent_state_from(dict(self.services_) if services else {}, {})

    def ping(self) -> None:
        self._guard()

    def node_in_catalog(self) -> tuple[set[str], dict[str, str], bool]:
        self._guard()
        return set(self.catalog), {}, self.catalog_writable


def inspect(cid: str, name: str) -> dict[str, Any]:
    return {
        "Id": cid,
        "Name": f"/{name}",
        "Config": {"Image": "web", "Labels": {"SERVICE_NAME": "web"}, "ExposedPorts": {"80/tcp": {}}},
        "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "4000"}]}},
        "State": {"Running": True},
    }


SETTINGS = SyncSettings(spec=SpecSettings(hostname="h1"), retry_interval=0.05)


@contextlib.contextmanager
def running(registry: Registry) -> Iterator[Syncer]:
    """A Syncer over registry, its loop in a thread, stopped and joined afterwards."""
    syncer = Syncer(registry, SETTINGS)
    stop = threading.Event()
    thread = threading.Thread(target=syncer.run, args=(stop,), name="sync-under-test")
    thread.start()
    try:
        yield syncer
    finally:
        stop.set()
        syncer.stop()
        thread.join(5)
        assert not thread.is_alive()


def settle(syncer: Syncer, cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def test_a_death_after_the_listing_began_is_not_undone_by_the_listing():
    """resync lists X as running, X dies, Died is handled, then the stale listing arrives."""
    registry = Registry()
    with running(registry) as syncer:
        syncer.submit(Up(inspect("c1", "web-1")))
        assert settle(syncer, lambda: "h1:web-1:80" in registry.services_)
        since = syncer.mark()  # the resync thread starts listing: web-1 still runs
        listed = [inspect("c1", "web-1")]
        syncer.submit(Died("c1", 137))  # meanwhile the event thread sees it die
        syncer.submit(Listing(listed, since=since))
        time.sleep(0.3)
        assert "h1:web-1:80" not in registry.services_


def test_a_start_after_the_listing_began_is_not_undone_by_the_listing():
    registry = Registry()
    with running(registry) as syncer:
        since = syncer.mark()  # listing begins: web-2 does not run yet
        syncer.submit(Up(inspect("c2", "web-2")))
        syncer.submit(Listing([], since=since))
        time.sleep(0.3)
        assert "h1:web-2:80" in registry.services_


def test_a_deregistration_that_failed_is_retried_until_done():
    registry = Registry()
    with running(registry) as syncer:
        syncer.submit(Up(inspect("c1", "web-1")))
        assert settle(syncer, lambda: "h1:web-1:80" in registry.services_)
        registry.down = True
        syncer.submit(Died("c1", 0))
        time.sleep(0.3)
        registry.down = False
        assert settle(syncer, lambda: "h1:web-1:80" not in registry.services_, timeout=5)


def test_dangling_services_of_this_host_removed_without_cleanup_flag():
    registry = Registry()
    registry.services_["h1:old:80"] = {"ID": "h1:old:80", "Service": "web", "Port": 1, "Meta": {}}
    registry.services_["h2:other:80"] = {"ID": "h2:other:80", "Service": "web", "Port": 1, "Meta": {}}
    registry.services_["custom"] = {"ID": "custom", "Service": "web", "Port": 1, "Meta": {"registrar_host": "h1"}}
    with running(registry) as syncer:
        assert settle(syncer, lambda: set(registry.services_) == {"h2:other:80"}, timeout=5)


def test_a_registration_the_agent_could_not_pass_on_is_registered_again():
    """The agent took the registration while the servers elected a leader: its sync failed.
    The syncer sees the catalog without it and registers again once the servers accept."""
    registry = Registry()
    registry.catalog_writable = False
    with running(registry) as syncer:
        syncer.submit(Up(inspect("c1", "web-1")))
        assert settle(syncer, lambda: "h1:web-1:80" in registry.services_)
        time.sleep(0.5)
        assert "h1:web-1:80" not in registry.catalog
        registry.catalog_writable = True
        assert settle(syncer, lambda: "h1:web-1:80" in registry.catalog, timeout=3)


def test_event_sequences_kept_for_listings_stay_bounded_without_listings():
    """A host where containers come and go and no listing runs (no --resync) used to keep the
    sequence of every container it ever saw (about 0.4 KB each: the soak's slow RSS slope)."""
    from registrar.lifecycle import SEEN_MAX, _remember

    seen: dict[str, int] = {}
    for seq in range(3 * SEEN_MAX):
        _remember(seen, f"c{seq}", seq)
    assert len(seen) <= SEEN_MAX
    assert seen[f"c{3 * SEEN_MAX - 1}"] == 3 * SEEN_MAX - 1  # the newest are kept
    _remember(seen, "c0", 10**9)  # one seen again is newest again
    assert list(seen)[-1] == "c0"

"""The catalog confirmer on its own, with the in-memory registry of the sync loop's tests and a
clock the test moves: a write not in the catalog is registered again at growing intervals,
not before a leader is known, and given up on after CONFIRM_FOR."""

from __future__ import annotations

import pytest

import registrar.confirm as confirm
from registrar.confirm import CONFIRM_CAP, CONFIRM_FIRST, CONFIRM_FOR, CatalogConfirmer
from registrar.model import Service
from tests.unit.test_sync_loop import Registry

WEB = Service(id="h1:web:8080", name="web", port=8080, address="10.0.0.5", container_id="c1", container_name="web")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(confirm.time, "monotonic", fake)
    return fake


def setup(registered: set[str]) -> tuple[Registry, CatalogConfirmer, list[str]]:
    registry = Registry()
    again: list[str] = []
    original = registry.register

    def register(service: Service, statuses: dict[str, str]) -> None:
        again.append(service.id)
        original(service, statuses)

    registry.register = register  # type: ignore[method-assign]
    confirmer = CatalogConfirmer(registry, lambda sid: (WEB, {}) if sid in registered else None)
    return registry, confirmer, again


def test_a_write_missing_from_the_catalog_is_registered_again_until_it_shows(clock: Clock) -> None:
    registry, confirmer, again = setup({WEB.id})
    registry.catalog_writable = False  # an election: the agent cannot pass the write on
    registry.register(WEB, {})
    again.clear()
    confirmer.wrote(WEB.id)
    confirmer.confirm_due()
    assert again == [] and confirmer.next_at() == clock.now + CONFIRM_FIRST  # not due yet
    clock.now += CONFIRM_FIRST
    confirmer.confirm_due()  # no leader known: not registered, looked at again soon
    assert again == [] and confirmer.next_at() == clock.now + CONFIRM_FIRST
    registry.catalog_writable = True  # a leader, and the catalog writable again
    registry.catalog.clear()
    clock.now += CONFIRM_FIRST
    confirmer.confirm_due()
    assert again == [WEB.id]  # registered again: the catalog has it now
    assert confirmer.next_at() == clock.now + CONFIRM_FIRST
    clock.now += CONFIRM_FIRST
    confirmer.confirm_due()
    assert again == [WEB.id] and confirmer.pending() == set()  # confirmed: forgotten


def test_the_interval_grows_to_its_cap_and_the_confirmer_gives_up_after_confirm_for(clock: Clock) -> None:
    registry, confirmer, again = setup({WEB.id})
    registry.catalog_writable = False
    confirmer.wrote(WEB.id)
    registry.node_in_catalog = lambda: (set(), {}, True)  # type: ignore[method-assign] - a leader that never shows it
    delays = []
    while confirmer.pending():
        before = clock.now
        clock.now = confirmer.next_at() or clock.now
        confirmer.confirm_due()
        delays.append(round(clock.now - before, 3))
    assert delays[:3] == [CONFIRM_FIRST, CONFIRM_FIRST, 2 * CONFIRM_FIRST]
    assert max(delays) == CONFIRM_CAP and len(again) == len(delays) - 1  # the last look gave up
    assert clock.now - 1000.0 > CONFIRM_FOR


def test_a_service_gone_meanwhile_or_consul_down_is_not_registered(clock: Clock) -> None:
    registry, confirmer, again = setup(set())  # the container is gone
    confirmer.wrote(WEB.id)
    clock.now += CONFIRM_FIRST
    confirmer.confirm_due()
    assert again == [] and confirmer.pending() == set()
    registry, confirmer, again = setup({WEB.id})
    confirmer.wrote(WEB.id)
    registry.down = True
    clock.now += CONFIRM_FIRST
    confirmer.confirm_due()  # postponed, not dropped
    assert again == [] and confirmer.pending() == {WEB.id}

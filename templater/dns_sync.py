"""The DNS worker: keeps an authoritative zone equal to the records the catalog asks for.

The runner offers the desired records after each render cycle (the same Consul watch and the
same empty-set grace as the templates). This thread reads the zone, plans, and sends one UPDATE
per batch: at once when the desired records change, and every sync interval to restore what was
changed by hand. It never acts before Consul has been read once, so a templater that cannot
reach Consul never removes a record. A server that cannot be reached or refuses is retried with
capped backoff; each change of state is logged once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

from sidecar.backoff import Backoff
from sidecar.once import SayOnce
from sidecar.threads import Supervisor
from templater.catalog import Snapshot
from templater.deps import Catalog
from templater.dns_records import Desired, Plan, Zone, applied, plan
from templater.dns_records import desired as records_for
from templater.dns_server import DnsConflict, DnsError, DnsServer, read_key_file
from templater.settings import Settings
from templater.status import Metrics

log = logging.getLogger("templater.dns")

FULL_EVERY = 10  # periodic syncs per zone transfer while the SOA serial shows no other writer


class CatalogView(Protocol):
    def catalog(self, dc: str) -> Snapshot | None: ...


class DnsSync:
    def __init__(
        self,
        server: DnsServer,
        ttl: int,
        interval: float,
        metrics: Metrics,
        warn: Callable[[str], None],
        backoff: Backoff,
        dry: bool = False,
    ) -> None:
        self.server = server
        self._ttl = ttl
        self._interval = interval
        self._metrics = metrics
        self._warn = warn
        self._backoff = backoff
        self._dry = dry
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._want: Zone | None = None
        self._pending = False
        self._offered_at: float | None = None  # the oldest offer not yet in the zone
        self._said = SayOnce()  # the last error, and the last --dry plan printed
        self.problem_key = f"dns:{server.naming.zone}"
        self.offered = False
        self._periodic = 0  # periodic syncs done
        self._copy: tuple[Zone, int] | None = None  # the zone as last read or written, its serial

    @property
    def dc(self) -> str:
        return self.server.naming.dc

    def cycle(self, view: CatalogView, changed: set[str], once: bool) -> bool | None:
        """After a render cycle: offer the records the catalog now asks for (--once: sync here).
        None until the catalog has been read: nothing is ever sent before Consul answered."""
        snapshot = view.catalog(self.dc)
        if snapshot is None:
            return None
        if self.offered and Catalog(self.dc).key not in changed:
            return True
        want = records_for(snapshot, self.server.naming)
        if once:
            return self.sync_now(want)
        self.offer(want)
        return True

    def _take(self, desired: Desired) -> None:
        for warning in desired.warnings:
            self._warn(warning)
        self.offered = True

    def offer(self, desired: Desired) -> None:
        """The runner's latest view of what the zone should hold under our suffix."""
        self._take(desired)
        with self._cond:
            if desired.names == self._want:
                return
            self._want = desired.names
            self._pending = True
            if self._offered_at is None:
                self._offered_at = time.monotonic()
            self._cond.notify_all()

    def start(self, supervisor: Supervisor) -> None:
        supervisor.start("dns-sync", self._body, self._stop)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def sync_now(self, desired: Desired) -> bool:
        """--once: one sync in the caller's thread. False (logged) when it failed."""
        self._take(desired)
        try:
            self.sync(desired.names)
        except DnsError as err:
            log.error("%s", err)
            return False
        return True

    def _zone(self, full: bool) -> Zone:
        """The zone under our suffix: our copy while the SOA serial says nobody else changed it
        since we last read or wrote it, else a new transfer (always, with `full`)."""
        if not full and self._copy is not None and self.server.serial() == self._copy[1]:
            return self._copy[0]
        zone, serial = self.server.read()
        self._metrics.add(dns_transfers=1)
        self._copy = (zone, serial)
        return zone

    def sync(self, want: Zone, full: bool = True) -> Plan:
        """Send what differs between `want` and the zone. Raises DnsError.

        A name changed by someone else since our read (another templater writing the same
        zone) fails the update's prerequisites: the zone is read again and the plan made anew.
        After any failure our copy is dropped: the next sync reads the zone."""
        try:
            try:
                return self._sync(want, full)
            except DnsConflict as err:
                log.info("%s; reading the zone again", err)
                return self._sync(want, True)
        except DnsError:
            self._copy = None
            raise

    def _sync(self, want: Zone, full: bool) -> Plan:
        started = time.monotonic()
        zone = self._zone(full)
        changes = plan(want, zone, self.server.naming)
        for name in changes.foreign:
            self._warn(f"dns: {name} holds records this templater did not write (no ownership TXT): left alone")
        if changes and self._dry:
            lines = "".join(f"> dns {change.text()}\n" for change in changes.changes)
            if self._said.new("dry", lines):  # --dry: each plan once, not at every sync
                sys.stdout.write(lines)
                sys.stdout.flush()
        elif changes:
            messages = self.server.update(changes.changes, self._ttl)
            # the serial read right after our update is the one our copy matches; a change by
            # someone else in between is found by the next full read (every sync interval)
            self._copy = (applied(zone, changes.changes, self.server.naming), self.server.serial())
            self._metrics.add(dns_updates=messages)
            log.info("dns: %s in %s (%d update message(s), %.0f ms)", changes.summary(), self.server.where,
                     messages, (time.monotonic() - started) * 1000)  # fmt: skip
            for change in changes.changes:
                log.debug("dns: %s", change.text())
        self._metrics.dns_names = len(want)
        return changes

    def _next(self, next_sync: float, not_before: float) -> tuple[Zone | None, float | None, bool]:
        """Wait for new desired records (not before `not_before`) or the periodic sync.
        (records, when they were offered, whether this is the periodic sync)"""
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                periodic = now >= next_sync
                if (periodic or (self._pending and now >= not_before)) and self._want is not None:
                    self._pending = False
                    offered, self._offered_at = self._offered_at, None
                    return self._want, offered, periodic
                wake = next_sync if not self._pending else min(next_sync, not_before)
                self._cond.wait(max(0.01, wake - now) if self._want is not None else None)
        return None, None, False

    def _body(self) -> None:
        next_sync = not_before = 0.0
        while not self._stop.is_set():
            want, offered, periodic = self._next(next_sync, not_before)
            if want is None:
                return
            try:
                # the periodic sync trusts the serial too, but transfers the zone every
                # FULL_EVERY-th time: a change by someone else that landed between our update and
                # the serial read after it has the same serial as our copy
                self.sync(want, full=periodic and self._periodic % FULL_EVERY == 0)
            except DnsError as err:
                delay = self._backoff.next_delay()
                if self._said.new("error", str(err)):
                    log.error("%s; keeping what the zone holds, will retry", err)
                self._metrics.add(dns_failures=1)
                self._metrics.problem(self.problem_key, str(err))
                with self._cond:
                    self._pending = True
                    if offered is not None and (self._offered_at is None or offered < self._offered_at):
                        self._offered_at = offered
                not_before = next_sync = time.monotonic() + delay
                continue
            if self._said.over("error"):
                log.info("dns: %s answers and takes updates again", self.server.where)
            self._backoff.reset()
            self._metrics.problem(self.problem_key, None)
            if offered is not None:
                self._metrics.dns_seconds.observe(time.monotonic() - offered)
            if periodic:
                self._periodic += 1
                next_sync = time.monotonic() + self._interval


def make_dns_sync(settings: Settings, metrics: Metrics, warn: Callable[[str], None]) -> DnsSync:
    """Raises DnsError when the TSIG key file cannot be read."""
    dns = settings.dns
    assert dns is not None
    key = read_key_file(dns.key_file) if dns.key_file else None
    server = DnsServer(dns.server[0], dns.server[1], dns.naming, key)
    backoff = Backoff(settings.retry_backoff, max(settings.retry_max_backoff, 10.0))
    return DnsSync(server, dns.ttl, dns.interval, metrics, warn, backoff, settings.dry)

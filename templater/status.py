"""The templater's state for /health and Prometheus /metrics (served by sidecar.status)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.metrics import Reading, Registry
from templater.history import History


@dataclass
class Metrics:
    renders: int = 0
    render_failures: int = 0
    writes: int = 0
    reloads: int = 0
    reload_failures: int = 0
    check_failures: int = 0
    runtime_updates: int = 0
    last_success: float = 0.0
    # the number of consul-template style queries the templates use, counted when asked
    watched: Callable[[], int] = lambda: 0
    consul_up: bool = False
    consul_error: str = ""
    held: list[str] = field(default_factory=list)
    consul_requests: int = 0
    consul_bytes: int = 0  # bodies of Consul's answers, as sent (before decompression)
    last_contact: float = 0.0  # seconds since the server answering stale reads heard from a leader
    known_leader: bool = True
    dns_updates: int = 0  # UPDATE messages sent
    dns_failures: int = 0
    dns_transfers: int = 0
    dns_names: int = 0
    # what is wrong now, by key: render:<template>, check:<template>, reload:<proxy>,
    # thread:<name>, watch:<query>. Each is cleared by the next success of the same thing.
    problems: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    history: History = field(default_factory=History)  # for the routes page

    def __post_init__(self) -> None:
        self.registry = Registry(self.readings)
        self.change_to_write = self.registry.histogram(
            "templater_change_to_write_seconds", "from Consul data (or a template edit) seen to the file written"
        )
        self.reload_seconds = self.registry.histogram(
            "templater_reload_seconds", "a proxy reload, from the signal to the new worker serving"
        )
        self.runtime_seconds = self.registry.histogram(
            "templater_runtime_api_seconds", "a change applied on HAProxy's admin socket"
        )
        self.drain_seconds = self.registry.histogram(
            "templater_drain_seconds", "a removed HAProxy server, from drain to deletion"
        )
        self.dns_seconds = self.registry.histogram(
            "templater_dns_change_seconds", "external DNS: from a change of the desired records to the zone updated"
        )

    def problem(self, key: str, text: str | None) -> None:
        """Set (text) or clear (None) one problem."""
        with self.lock:
            if text is None:
                self.problems.pop(key, None)
            else:
                self.problems[key] = text

    def problem_items(self) -> list[tuple[str, str]]:
        with self.lock:
            return sorted(self.problems.items())

    def replace_problems(self, prefix: str, found: dict[str, str]) -> None:
        """Make the problems under prefix exactly `found` (keys without the prefix)."""
        with self.lock:
            for key in [k for k in self.problems if k.startswith(prefix)]:
                del self.problems[key]
            for key, text in found.items():
                self.problems[prefix + key] = text

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def health(self) -> tuple[int, dict[str, Any]]:
        with self.lock:
            healthy = self.consul_up and not self.problems
            body = {
                "status": "ok" if healthy else "degraded",
                "consul": "up" if self.consul_up else "down",
                "consul_error": self.consul_error,
                "problems": dict(sorted(self.problems.items())),
                "last_success": self.last_success,
                "held_services": list(self.held),
                "consul_last_contact_seconds": self.last_contact,
                "consul_known_leader": self.known_leader,
            }
        return (200 if healthy else 503), body

    def readings(self) -> list[Reading]:
        with self.lock:
            return [
                ("templater_renders_total", "counter", "templates rendered", self.renders),
                ("templater_render_failures_total", "counter", "renders that failed", self.render_failures),
                ("templater_writes_total", "counter", "destination files written", self.writes),
                ("templater_reloads_total", "counter", "proxy reloads and template commands", self.reloads),
                ("templater_reload_failures_total", "counter", "reloads or commands that failed", self.reload_failures),
                ("templater_check_failures_total", "counter", "staged files the check refused", self.check_failures),
                ("templater_runtime_api_updates_total", "counter", "changes applied on HAProxy's admin socket",
                 self.runtime_updates),
                ("templater_consul_requests_total", "counter", "HTTP requests sent to Consul", self.consul_requests),
                ("templater_consul_response_bytes_total", "counter", "bytes of Consul's answers", self.consul_bytes),
                ("templater_last_success_timestamp_seconds", "gauge", "end of the last cycle with no failure",
                 self.last_success),
                ("templater_watched_queries", "gauge", "consul-template style queries the templates use",
                 self.watched()),
                ("templater_consul_up", "gauge", "1 while every watch reaches Consul", int(self.consul_up)),
                ("templater_consul_last_contact_seconds", "gauge",
                 "stale reads: how long since the answering server last heard from a leader", self.last_contact),
                ("templater_consul_known_leader", "gauge", "stale reads: 1 while the answering server knows a leader",
                 int(self.known_leader)),
                ("templater_problems", "gauge", "problems /health reports", len(self.problems)),
                ("templater_held_services", "gauge", "services held by --empty-grace", len(self.held)),
                ("templater_dns_updates_total", "counter", "DNS UPDATE messages sent", self.dns_updates),
                ("templater_dns_failures_total", "counter", "zone reads or updates that failed", self.dns_failures),
                ("templater_dns_zone_transfers_total", "counter", "zone transfers (AXFR) read", self.dns_transfers),
                ("templater_dns_names", "gauge", "names the external DNS sync keeps in its zone", self.dns_names),
            ]  # fmt: skip

    def prometheus(self) -> str:
        return self.registry.text()

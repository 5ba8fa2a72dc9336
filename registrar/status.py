"""The registrar's /health and /metrics: it follows the Docker engine and reaches Consul."""

from __future__ import annotations

from typing import Any, Protocol

from sidecar.metrics import Reading, Registry


class Watching(Protocol):
    @property
    def up(self) -> bool | None: ...

    def state(self) -> tuple[bool, str]: ...


class Syncing(Protocol):
    @property
    def consul_up(self) -> bool | None: ...

    @property
    def tracked(self) -> int: ...

    @property
    def pending_deregistrations(self) -> int: ...
    @property
    def denied(self) -> dict[str, str]: ...

    @property
    def counts(self) -> dict[str, int]: ...


class Problems(Protocol):
    def problems(self) -> dict[str, str]: ...


class RegistrarStatus:
    """/health, /metrics and the state of the Docker engine for the registrar's own check."""

    def __init__(self, supervisor: Problems) -> None:
        self._supervisor = supervisor
        self._watcher: Watching | None = None
        self._syncer: Syncing | None = None
        self.registry = Registry(self.readings)
        self.event_to_registered = self.registry.histogram(
            "registrar_event_to_registered_seconds", "from a container's Docker start event to its registration"
        )

    def follow(self, watcher: Watching, syncer: Syncing) -> None:
        self._watcher, self._syncer = watcher, syncer

    def registered(self, seconds: float) -> None:
        self.event_to_registered.observe(seconds)

    def health(self) -> tuple[int, dict[str, Any]]:
        assert self._watcher is not None and self._syncer is not None
        problems = {f"thread:{k}": v for k, v in self._supervisor.problems().items()}
        if self._watcher.up is not True:
            problems["docker"] = "the Docker engine's event stream is not connected"
        if self._syncer.consul_up is False:
            problems["consul"] = "the Consul agent does not answer"
        for operation, text in sorted(self._syncer.denied.items())[:20]:
            problems[f"acl:{operation}"] = text
        body = {
            "status": "ok" if not problems else "degraded",
            "docker": "up" if self._watcher.up else "down",
            "consul": "down" if self._syncer.consul_up is False else "up",
            "problems": problems,
            "containers": self._syncer.tracked,
            "pending_deregistrations": self._syncer.pending_deregistrations,
        }
        return (200 if not problems else 503), body

    def readings(self) -> list[Reading]:
        if self._watcher is None or self._syncer is None:
            return []
        syncer, counts = self._syncer, self._syncer.counts
        return [
            ("registrar_docker_up", "gauge", "1 while Docker events are followed", int(bool(self._watcher.up))),
            ("registrar_consul_up", "gauge", "1 while the Consul agent answers", int(syncer.consul_up is not False)),
            ("registrar_containers", "gauge", "running containers followed", syncer.tracked),
            ("registrar_pending_deregistrations", "gauge", "deregistrations to retry", syncer.pending_deregistrations),
            ("registrar_registrations_total", "counter", "services registered", counts["registered"]),
            ("registrar_deregistrations_total", "counter", "services deregistered", counts["deregistered"]),
        ]

    def prometheus(self) -> str:
        return self.registry.text()

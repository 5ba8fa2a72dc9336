"""The registrar's /health and /metrics: it follows the Docker engine and reaches Consul."""

from __future__ import annotations

from typing import Any, Protocol


class Watching(Protocol):
    @property
    def up(self) -> bool | None: ...


class Syncing(Protocol):
    @property
    def consul_up(self) -> bool | None: ...

    @property
    def tracked(self) -> int: ...

    @property
    def pending_deregistrations(self) -> int: ...


class Problems(Protocol):
    def problems(self) -> dict[str, str]: ...


class RegistrarStatus:
    def __init__(self, watcher: Watching, syncer: Syncing, supervisor: Problems) -> None:
        self._watcher = watcher
        self._syncer = syncer
        self._supervisor = supervisor

    def health(self) -> tuple[int, dict[str, Any]]:
        problems = {f"thread:{k}": v for k, v in self._supervisor.problems().items()}
        if self._watcher.up is not True:
            problems["docker"] = "the Docker engine's event stream is not connected"
        if self._syncer.consul_up is False:
            problems["consul"] = "the Consul agent does not answer"
        body = {
            "status": "ok" if not problems else "degraded",
            "docker": "up" if self._watcher.up else "down",
            "consul": "down" if self._syncer.consul_up is False else "up",
            "problems": problems,
            "containers": self._syncer.tracked,
            "pending_deregistrations": self._syncer.pending_deregistrations,
        }
        return (200 if not problems else 503), body

    def prometheus(self) -> str:
        rows = [
            ("registrar_docker_up", "gauge", int(bool(self._watcher.up))),
            ("registrar_consul_up", "gauge", int(self._syncer.consul_up is not False)),
            ("registrar_containers", "gauge", self._syncer.tracked),
            ("registrar_pending_deregistrations", "gauge", self._syncer.pending_deregistrations),
        ]
        lines = []
        for name, kind, value in rows:
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"

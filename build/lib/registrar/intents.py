"""What the Docker side tells the sync loop, and the pure mapping from Docker events to it."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from sidecar.signals import parse_signal

# Signals after which a container is expected to go away: its services drain at once.
TERMINATING = {signal.SIGINT, signal.SIGQUIT, signal.SIGABRT, signal.SIGKILL, signal.SIGTERM}


@dataclass(frozen=True)
class Up:
    """A running container. fresh: it just started (or unpaused), not merely listed."""

    inspect: dict[str, Any] = field(hash=False)
    fresh: bool = True
    event_ns: int | None = None


@dataclass(frozen=True)
class Stopping:
    container_id: str
    signal: int


@dataclass(frozen=True)
class Paused:
    container_id: str


@dataclass(frozen=True)
class Died:
    container_id: str
    exit_code: int | None


@dataclass(frozen=True)
class Destroyed:
    container_id: str


@dataclass(frozen=True)
class Health:
    container_id: str
    status: str  # a Consul status


@dataclass(frozen=True)
class Listing:
    """Every running container, after the event stream was (re)opened or on --resync."""

    inspects: list[dict[str, Any]] = field(hash=False)
    since: int = 0  # the Syncer.mark() taken before listing; later events win over it


@dataclass(frozen=True)
class Ready:
    service_id: str
    check_index: int
    generation: int


Intent = Up | Stopping | Paused | Died | Destroyed | Health | Listing | Ready


def needs_inspect(action: str) -> bool:
    return action in ("start", "unpause", "rename")


def from_event(event: dict[str, Any], inspect: dict[str, Any] | None) -> Intent | None:
    """The intent for one Docker event; inspect is the container's data for start-like events."""
    action = str(event.get("Action") or event.get("status") or "")
    actor = event.get("Actor") or {}
    container_id = str(actor.get("ID") or event.get("id") or "")
    attrs = actor.get("Attributes") or {}
    if needs_inspect(action):
        if inspect is None or not (inspect.get("State") or {}).get("Running"):
            return None
        return Up(inspect, fresh=action != "rename", event_ns=event.get("timeNano"))
    if action == "kill":
        number = parse_signal(attrs.get("signal"))
        return Stopping(container_id, number) if number is not None else None
    if action == "pause":
        return Paused(container_id)
    if action == "die":
        code = attrs.get("exitCode")
        return Died(container_id, int(code) if code is not None and str(code).isdigit() else None)
    if action == "destroy":
        return Destroyed(container_id)
    if action.startswith("health_status"):
        state = action.partition(":")[2].strip()
        return Health(container_id, "passing" if state == "healthy" else "critical")
    return None
